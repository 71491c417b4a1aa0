"""The verdict line, the table, the error and verification.json say the same thing when no prompt could be
compared (another model as --reference, or shapes that differ), and "the logits agree" only when they were
compared and agreed (issue 23, part G). test_wrong_reference.py keeps the diagnosis and the kept report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.synth.build import ReleaseOptions, make_release

pytest.importorskip("transformers")

FIXTURE_TAR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"
FAST = ("--no-default-prompts", "--ids", "1,2,3", "--loader", "persimmon-tools")
NOT_COMPARED = "no prompts were compared"


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled tiny release converted once (no verify), and another model: 4 layers, other weights."""
    root = tmp_path_factory.mktemp("wrong_reference_verdict")
    done = cli("convert", FIXTURE_TAR, root / "hf", "--no-verify")
    assert done.exit_code == 0, done.stderr
    other = make_release(root / "other_model.tar", ReleaseOptions(seed=3, overrides={"layers": 4}))
    return {"hf": root / "hf", "other": other}


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "hf")
    return tmp_path / "hf"


def test_another_model_as_reference_says_the_comparison_did_not_run(tiny, tmp_path) -> None:
    folder = copy_of(tiny["hf"], tmp_path)
    result = cli("verify", folder, "--reference", tiny["other"], *FAST)
    assert result.exit_code == 3, result.stderr
    out, err = result.stdout, result.stderr
    # the table: no empty prompt table, but why there is none
    assert "prompt     tokens" not in out and "tolerance (" not in out
    reason = f"{NOT_COMPARED}: --reference is likely not this folder's source (see the note), and its shapes"
    assert reason in out
    assert f"verdict: FAIL ({reason}" in out
    # nothing claims that logits agree; the diagnosis and the hint stay
    assert "logits agree" not in out + err
    assert "likely wrong --reference" in out and "likely wrong --reference" in err
    assert "fails verification: likely wrong --reference" in err and NOT_COMPARED in err
    assert "does not compute what the checkpoint computes" not in err
    assert "Hint: check --reference" in err
    report = json.loads((folder / "verification.json").read_text())
    assert report["verdict"] == "fail" and report["metrics"] == []
    assert report["forward_pass"]["ran"] is False and report["forward_pass"]["prompts"] == 0
    assert report["forward_pass"]["skipped_because"].startswith(reason)
    assert (
        NOT_COMPARED in report["diagnosis"]["summary"]
        and "logits agree" not in report["diagnosis"]["summary"]
    )


def test_json_on_stdout_is_the_same_report(tiny, tmp_path) -> None:
    folder = copy_of(tiny["hf"], tmp_path)
    result = cli("verify", folder, "--reference", tiny["other"], *FAST, "--json")
    assert result.exit_code == 3
    printed = json.loads(result.stdout)
    assert printed["forward_pass"] == json.loads((folder / "verification.json").read_text())["forward_pass"]
    assert printed["forward_pass"]["ran"] is False


def test_shapes_that_differ_from_the_right_source_say_so_without_blaming_the_reference(
    tiny, tmp_path
) -> None:
    folder = copy_of(tiny["hf"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    result = cli("verify", folder, "--reference", FIXTURE_TAR, *FAST)
    assert result.exit_code == 3, result.stderr
    reason = f"{NOT_COMPARED}: the checkpoint's shapes differ from config.json's"
    assert f"verdict: FAIL ({reason})" in result.stdout
    assert "likely wrong --reference" not in result.stdout + result.stderr
    assert "logits agree" not in result.stdout + result.stderr


def test_logits_that_agree_are_still_said_to_agree(tiny, tmp_path) -> None:
    """A config value that does not change these prompts' logits: every prompt compared passes, and the
    verdict fails on the exact check alone, as before."""
    folder = copy_of(tiny["hf"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20000}))
    result = cli("verify", folder, "--reference", FIXTURE_TAR, *FAST)
    assert result.exit_code == 3, result.stderr
    assert "the logits agree within tolerance, but the conversion is not faithful" in result.stdout
    assert "verdict: FAIL\n" in result.stdout + "\n" and NOT_COMPARED not in result.stdout
    report = json.loads((folder / "verification.json").read_text())
    assert report["forward_pass"] == {"ran": True, "prompts": 1, "skipped_because": None}
    assert all(m["passed"] for m in report["metrics"])
