"""The console script as a real process: exit codes, output flushed before the fast exit, closed pipes.

The processes run beside the tests (``start_in_background``, tests/conftest.py's ``background``); each test
checks what its job saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# tests/conftest.py's FIXTURE_TAR (``from conftest import`` would find whichever conftest.py pytest imported
# last: tests/hub/ has one of its own)
FIXTURE_TAR = REPO / "fixtures" / "tiny_release.tar"
CLI = [sys.executable, "-m", "persimmon_tools.cli"]


def run_cli(background, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return background.run([*CLI, *args], cwd=cwd, env=background.environ, timeout=120)


def _piped_inspect(background, scratch: Path) -> subprocess.CompletedProcess:
    """A ``background`` job: ``inspect --json`` with stdout on a pipe."""
    return run_cli(background, "inspect", str(FIXTURE_TAR), "--json", cwd=scratch)


def _exit_codes(
    background, scratch: Path
) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A ``background`` job: ``convert`` on a missing file (usage error) and on a file that is no tar."""
    usage = run_cli(background, "convert", str(scratch / "missing.tar"), str(scratch / "out"), cwd=scratch)
    bad = scratch / "not_a_release.tar"
    bad.write_bytes(b"this is not a tar file")
    failed = run_cli(background, "convert", str(bad), str(scratch / "out"), cwd=scratch)
    return scratch, usage, failed


def _closed_stdout(background, scratch: Path) -> tuple[int, str]:
    """A ``background`` job: ``inspect`` with stdout on a pipe whose reader is gone; (exit code, stderr)."""
    read_end, write_end = os.pipe()
    # the reader is gone before the first write, like `persimmon-tools inspect X | head -0`
    os.close(read_end)
    try:
        with background.spawn(
            [*CLI, "inspect", str(FIXTURE_TAR)],
            cwd=scratch,
            env=background.environ,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            _, stderr = proc.communicate(timeout=120)
    finally:
        os.close(write_end)
    return proc.returncode, stderr


JOBS = {
    "test_piped_output_is_complete_after_the_fast_exit": _piped_inspect,
    "test_exit_codes_of_the_process": _exit_codes,
    "test_a_closed_stdout_pipe_ends_quietly_with_141": _closed_stdout,
}


def _key(test: str) -> str:
    return f"{__name__}: {test}"


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: each selected test's processes
    run beside the tests, in a scratch folder of their own."""
    for test in sorted({item.originalname for item in items} & JOBS.keys(), key=list(JOBS).index):
        scratch = tmp_path_factory.mktemp("cli-process")
        background.started[_key(test)] = background.submit(JOBS[test], scratch)


def test_piped_output_is_complete_after_the_fast_exit(background):
    # stdout is a pipe (block-buffered): all of it must arrive although run() ends with os._exit.
    done = background.result(_key("test_piped_output_is_complete_after_the_fast_exit"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dims"]["num_layers"] == 6


def test_exit_codes_of_the_process(background):
    tmp_path, usage, failed = background.result(_key("test_exit_codes_of_the_process"))
    assert usage.returncode == 2 and "does not exist" in usage.stderr
    assert failed.returncode == 1
    assert failed.stderr.startswith("Error: ") and "Hint: " in failed.stderr
    assert not (tmp_path / "out").exists()


def test_a_closed_stdout_pipe_ends_quietly_with_141(background):
    returncode, stderr = background.result(_key("test_a_closed_stdout_pipe_ends_quietly_with_141"))
    assert returncode == 141
    assert stderr == ""
