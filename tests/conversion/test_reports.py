"""Honest reports: convert's summary keeps convert and verify apart, the dry run estimates both, and
``inspect`` calls a folder stale exactly when ``push`` refuses it as stale."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.conversion.inspect import inspect_converted


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_dry_run_estimates_convert_and_the_automatic_verify(releases, tmp_path):
    result = run("convert", releases["tar"], tmp_path / "hf", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "estimated peak memory (convert): " in out and "time not estimated" in out
    assert "automatic verify: would run (on CPU in fp32: 431,488 parameters" in out
    assert "estimated peak memory (verify): " in out and "time roughly " in out
    summary = json.loads(run("convert", releases["tar"], tmp_path / "hf", "--dry-run", "--json").stdout)
    ver = summary["verify"]
    assert ver["runs"] is True and ver["estimated_peak_memory_bytes"] > 0 and ver["estimated_seconds"] > 0
    assert summary["estimated_peak_memory_bytes"] > 0
    off = run("convert", releases["tar"], tmp_path / "hf", "--dry-run", "--no-verify")
    assert "automatic verify: would not run (--no-verify)" in off.stdout
    assert "estimated peak memory (verify)" not in off.stdout
    assert not (tmp_path / "hf").exists()


def test_estimate_says_an_8b_model_is_not_verified_automatically():
    from persimmon_tools.conversion.config import ModelDims
    from persimmon_tools.verification.auto_check import estimate_auto_verify

    dims = ModelDims(262144, 4096, 16384, 36, 64, 64, 32, 25000.0, 1e-5, 16384, True)
    est = estimate_auto_verify(dims, 18_794_350_592)
    assert not est.runs and "run `persimmon-tools verify` yourself" in est.why
    assert est.peak_memory_bytes is None and est.seconds is None


@pytest.fixture(scope="module")
def verified_run(releases, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "hf"
    result = run("convert", releases["tar"], out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_summary_keeps_convert_and_verify_apart(verified_run):
    _, summary = verified_run
    conv, ver = summary["convert"], summary["verify"]
    assert conv["seconds"] == summary["seconds"] and conv["peak_rss_bytes"] == summary["peak_rss_bytes"] > 0
    assert summary["verification"] == ver["result"] == "pass"
    assert ver["seconds"] > 0 and ver["peak_rss_bytes"] >= conv["peak_rss_bytes"]
    assert ver["peak_rss_reached_in_verify"] == (ver["peak_rss_bytes"] > conv["peak_rss_bytes"])


def test_human_summary_has_a_line_per_phase(releases, tmp_path):
    result = run("convert", releases["tar"], tmp_path / "hf")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(line.startswith("Converted ") and "(at the end of convert)" in line for line in lines)
    assert any(
        line.startswith("Verify: pass in ")
        and "peak RSS of the process" in line
        and "convert and verify" in line
        for line in lines
    )
    quiet = run("convert", releases["tar"], tmp_path / "hf2", "--no-verify")
    assert not any(line.startswith("Verify:") for line in quiet.stderr.splitlines())


def test_inspect_and_push_agree_after_a_real_convert_and_verify(verified_run, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    from persimmon_tools.errors import HubError
    from persimmon_tools.hub.push import PushOptions, push_folder, verification_state

    folder = tmp_path / "copy"
    shutil.copytree(verified_run[0], folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the dry run never reaches a network
    assert (
        inspect_converted(folder)["verification"]["state"] == "verified" == verification_state(folder).state
    )
    push_folder(folder, "me/model", PushOptions(dry_run=True, license="apache-2.0"))

    (folder / "config.json").write_text((folder / "config.json").read_text().replace("}", ', "x": 1}', 1))
    info = inspect_converted(folder)["verification"]
    assert info["verdict"] == "pass" and info["state"] == "stale" == verification_state(folder).state
    assert info["status"].startswith("stale (files changed after verification: config.json: ")
    with pytest.raises(HubError, match="refusing to publish") as err:
        push_folder(folder, "me/model", PushOptions(dry_run=True, license="apache-2.0"))
    assert info["status"] in err.value.message
    assert f"verification: {info['status']}" in run("inspect", folder).stdout
