"""What a SIGKILLed ``export`` leaves behind is recognized by its marker and removed by the next run, as for
``convert`` (tests/conversion/test_lock_and_leftovers.py): export writes through the same staged output.

The export is a real ``persimmon-tools export`` process of the tiny fixture; its shard writer sends SIGKILL
to its own process once the first shard file has some bytes, so the kill lands mid-write every time. It runs
beside the other tests (``start_in_background``), from a conversion of the tiny fixture made there too; the
next run, which removes what it left, is in process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from export_helpers import killed_mid_write, left_by_the_kill, read_release

from persimmon_tools.cli import main

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "tiny_release.tar"


# tests/conftest.py's ``converted_tiny``, made in a child for the jobs below (they start before any fixture)
def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _killed_export(
    background, source_started, scratch: Path, tar: bool
) -> tuple[list[str], subprocess.CompletedProcess]:
    """A ``background`` job: ``export`` of the converted tiny release into ``scratch``, SIGKILLed mid-write
    (``export_helpers.killed_mid_write``); (the export's arguments, the finished child). What it left stays in ``scratch``
    for the test, and the next run there, in process."""
    out = scratch / ("out.tar" if tar else "out")
    args = ["export", str(source_started.result()), str(out), *(["--tar"] if tar else [])]
    return args, killed_mid_write(background, "persimmon_tools.megatron.release_writer", args)


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the killed exports run in
    children beside the tests, from the session's one conversion of the tiny release in a child
    (``background.converted_tiny``)."""
    killed = [
        item
        for item in items
        if item.originalname == "test_sigkill_leftovers_of_an_export_are_removed_next_time"
    ]
    if not killed:
        return
    source = background.converted_tiny(tmp_path_factory)
    for item in killed:
        tar = item.callspec.params["tar"]
        scratch = tmp_path_factory.mktemp(f"export-leftovers-{'tar' if tar else 'folder'}")
        background.started[f"{__name__}: {item.name}"] = background.submit(
            _killed_export, source, scratch, tar
        )


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_sigkill_leftovers_of_an_export_are_removed_next_time(background, request, tar):
    """The killed export ran beside the tests (``start_in_background``); the next run is in process."""
    args, proc = background.result(f"{__name__}: {request.node.name}")
    out, stale, marker = left_by_the_kill(args, proc)
    scratch = out.parent
    assert marker["tool"] == "persimmon-tools" and marker["role"] == "new"
    partial = stale / out.name if tar else next(stale.rglob("model_optim_rng.pt"))
    assert partial.stat().st_size > 0  # killed mid-write: a partial tarball / shard is there

    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"removed {stale}" in result.stderr and "the temporary folder of an interrupted run" in (
        result.stderr
    )
    assert sorted(os.listdir(scratch)) == [out.name]  # no temp folder, no lock file
    name, shards, _ = read_release(out)
    assert name == "tiny_release" and len(shards) == 1


def test_an_unprovable_look_alike_is_named_and_kept(converted_tiny, tmp_path):
    """A folder named like a temp folder but without the marker is reported, never deleted."""
    foreign = tmp_path / ".out.tmp-mine"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"user data")
    result = run("export", converted_tiny, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{foreign} looks like a leftover of an interrupted export" in result.stderr
    assert "no valid persimmon-tools marker" in result.stderr
    assert (foreign / "data.bin").read_bytes() == b"user data"
