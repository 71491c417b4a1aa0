"""verify against another source than the folder's: named as a likely wrong --reference, and a passing
verification.json of the right source is never replaced by that failing run."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.synth.build import ReleaseOptions, make_release


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_wrong_reference_is_named_and_the_passing_report_kept(converted_tiny, releases, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(converted_tiny, folder)
    assert cli("verify", folder, "--reference", releases["tar"]).exit_code == 0
    passing = (folder / "verification.json").read_bytes()
    assert json.loads(passing)["verdict"] == "pass"
    other = make_release(tmp_path / "other_release.tar", ReleaseOptions(seed=7))  # same shapes, other weights
    result = cli("verify", folder, "--reference", other)
    assert result.exit_code == 3, result.stderr
    assert "likely wrong --reference" in result.stderr and "Hint: check --reference" in result.stderr
    assert (folder / "verification.json").read_bytes() == passing  # not replaced by the run against `other`
    # the right source again: passes and may rewrite its own report
    assert cli("verify", folder, "--reference", releases["tar"]).exit_code == 0


def test_a_same_sized_other_source_cannot_replace_a_passing_report(tmp_path):
    """Same shapes and file sizes, other weights: told apart by the recorded sha256."""
    ours = make_release(tmp_path / "ours.tar", ReleaseOptions(seed=0))
    theirs = make_release(tmp_path / "theirs.tar", ReleaseOptions(seed=7))
    folder = tmp_path / "hf"
    assert cli("convert", ours, folder).exit_code == 0  # converts and verifies: a passing report
    passing = (folder / "verification.json").read_bytes()
    assert json.loads(passing)["verdict"] == "pass"
    assert cli("verify", folder, "--reference", theirs).exit_code == 3
    assert (folder / "verification.json").read_bytes() == passing
