"""CLI: convert / inspect / unpack / make-release, error rendering and exit codes."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
from click.testing import CliRunner
from hostile_inputs import basic_hostile_tar

from persimmon_tools.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_convert_cli_writes_a_folder_and_summary(releases, tmp_path):
    result = run("convert", releases["tp2"], tmp_path / "hf", "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (
        summary["tensors"] == 100
        and summary["peak_rss_bytes"] > 0
        and "model.safetensors" in summary["files"]
    )


def test_dry_run_prints_the_plan(releases, tmp_path):
    result = run("convert", releases["tp2pp3"], tmp_path / "hf", "--dry-run", "--max-shard-size", "300KB")
    assert result.exit_code == 0
    assert (
        "TP=2 PP=3" in result.stdout
        and "model-00001-of-" in result.stdout
        and "estimated peak memory" in result.stdout
    )
    assert not (tmp_path / "hf").exists()


def test_known_errors_become_error_and_hint_with_exit_1(releases, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    result = run("convert", releases["tar"], tmp_path / "out")
    assert result.exit_code == 1
    assert (
        result.stderr.startswith("Error: ") and "Hint: " in result.stderr and "Traceback" not in result.stderr
    )


def test_usage_errors_exit_2(releases, tmp_path):
    result = run("convert", releases["tar"], tmp_path / "out", "--dtype", "int4")
    assert result.exit_code == 2


def test_an_existing_output_is_a_failure_not_a_usage_error(releases, tmp_path):
    """make-release onto an existing file gives 1 like convert into a non-empty folder (tests/cli/
    test_json_and_exit_codes.py checks every command)."""
    result = run("make-release", releases["tar"])
    assert result.exit_code == 1 and "exists" in result.stderr and "--force" in result.stderr


def test_debug_shows_the_traceback(releases, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(Exception, match="not empty"):
        CliRunner().invoke(
            main, ["convert", str(releases["tar"]), str(tmp_path / "out"), "--debug"], catch_exceptions=False
        )


def test_inspect_release_and_converted(releases, converted_tiny):
    info = json.loads(run("inspect", releases["tp2pp3"], "--json").stdout)
    assert info["tp"] == 2 and info["pp"] == 3 and info["iteration"] == 1251
    assert info["args"]["num_layers"] == 6 and "argparse.Namespace" in info["pickle_globals"]
    assert len(info["tensors"]) == 106 and info["dims"]["head_dim"] == 16
    text = run("inspect", releases["tar"]).stdout
    assert "language_model.encoder.layers.0.self_attention.query_key_value.weight" in text
    conv = json.loads(run("inspect", converted_tiny, "--json").stdout)
    assert conv["type"] == "converted" and conv["shards"][0]["metadata"] == {"format": "pt"}


def test_make_release_cli(tmp_path):
    out = tmp_path / "r.tar"
    assert run("make-release", out, "--tp", "2", "--pp", "2", "--seed", "3", "-q").exit_code == 0
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert (
        "r/iter_0001251/mp_rank_01_001/model_optim_rng.pt" in names
        and "r/latest_checkpointed_iteration.txt" in names
    )
    assert run("make-release", tmp_path / "bad.tar", "--pp", "4").exit_code == 2


def test_unpack_extracts_and_refuses_to_overwrite(releases, tmp_path):
    dest = tmp_path / "dest"
    result = run("unpack", releases["tar"], dest)
    assert result.exit_code == 0, result.output
    assert (dest / "tiny_release" / "iter_0001251" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert run("unpack", releases["tar"], dest).exit_code == 1


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unpack_refuses_hostile_members_and_writes_nothing(tmp_path, kind):
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    tar = tmp_path / "evil.tar"
    basic_hostile_tar(tar, kind, sentinel_dir)
    work = tmp_path / "work"
    work.mkdir()
    result = run("unpack", tar, work / "dest")
    assert result.exit_code == 1 and "Error:" in result.stderr
    assert list(work.iterdir()) == []  # no DEST, no temp folder
    assert list(sentinel_dir.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_unpack_checks_md5_of_known_release_names(releases, tmp_path):
    fake = tmp_path / "8b_chat_model_release.tar"
    shutil.copy(releases["tar"], fake)
    result = run("unpack", fake, tmp_path / "dest")
    assert (
        result.exit_code == 1
        and "does not match the published 663aeace07269c44e90f4e8bcd07f32a" in result.stderr
    )
    assert not (tmp_path / "dest").exists()
    assert run("unpack", fake, tmp_path / "dest", "--no-md5").exit_code == 0


def test_help_teaches_with_examples():
    for cmd in ("convert", "inspect", "unpack", "make-release"):
        out = run(cmd, "--help").stdout
        assert "Example" in out, cmd
