"""What a SIGKILLed ``export`` leaves behind is recognized by its marker and removed by the next run, as for
``convert`` (tests/conversion/test_lock_and_leftovers.py): export writes through the same staged output.

The export is a real ``persimmon-tools export`` process of the tiny fixture; its shard writer sends SIGKILL
to its own process once the first shard file has some bytes, so the kill lands mid-write every time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from export_helpers import read_release

from persimmon_tools.cli import main
from persimmon_tools.staged_output import RUN_MARKER

KILLED_MID_WRITE = """
import os, signal, sys
import persimmon_tools.megatron.release_writer as release_writer

def write_pt(fh, obj, on_bytes=None):
    fh.write(b"partial shard bytes" * 100)
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

release_writer.write_pt = write_pt
from persimmon_tools.cli import main
main(sys.argv[1:])
"""


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_sigkill_leftovers_of_an_export_are_removed_next_time(converted_tiny, tmp_path, tar):
    out = tmp_path / ("out.tar" if tar else "out")
    args = ["export", str(converted_tiny), str(out), *(["--tar"] if tar else [])]
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert len(stale) == 1 and not os.path.lexists(out)
    marker = json.loads((stale[0] / RUN_MARKER).read_text())
    assert marker["tool"] == "persimmon-tools" and marker["role"] == "new"
    partial = stale[0] / out.name if tar else next(stale[0].rglob("model_optim_rng.pt"))
    assert partial.stat().st_size > 0  # killed mid-write: a partial tarball / shard is there

    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"removed {stale[0]}" in result.stderr and "the temporary folder of an interrupted run" in (
        result.stderr
    )
    assert sorted(os.listdir(tmp_path)) == [out.name]  # no temp folder, no lock file
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
