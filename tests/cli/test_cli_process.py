"""The console script as a real process: exit codes, output flushed before the fast exit, closed pipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import FIXTURE_TAR

CLI = [sys.executable, "-m", "persimmon_tools.cli"]


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([*CLI, *args], text=True, check=False, timeout=120, **streams)


def test_piped_output_is_complete_after_the_fast_exit():
    # stdout is a pipe (block-buffered): all of it must arrive although run() ends with os._exit.
    done = run_cli("inspect", str(FIXTURE_TAR), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dims"]["num_layers"] == 6


def test_exit_codes_of_the_process(tmp_path):
    usage = run_cli("convert", str(tmp_path / "missing.tar"), str(tmp_path / "out"))
    assert usage.returncode == 2 and "does not exist" in usage.stderr
    bad = tmp_path / "not_a_release.tar"
    bad.write_bytes(b"this is not a tar file")
    failed = run_cli("convert", str(bad), str(tmp_path / "out"))
    assert failed.returncode == 1
    assert failed.stderr.startswith("Error: ") and "Hint: " in failed.stderr
    assert not (tmp_path / "out").exists()


def test_a_closed_stdout_pipe_ends_quietly_with_141():
    read_end, write_end = os.pipe()
    os.close(
        read_end
    )  # the reader is gone before the first write, like `persimmon-tools inspect X | head -0`
    try:
        done = run_cli("inspect", str(FIXTURE_TAR), stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""
