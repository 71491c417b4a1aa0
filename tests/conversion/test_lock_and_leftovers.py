"""One writer per OUT_DIR, SIGHUP/SIGQUIT clean up like SIGINT, and what SIGKILL leaves behind is named and
removed by the next run only when it is provably a persimmon-tools leftover (issue 15, items 2-3).

Signals go to a real ``python -m persimmon_tools.cli convert`` of the ``mid`` preset (~1 GiB shard) while it
writes, as in ``test_interrupt.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import _install_sigterm_handler, main
from persimmon_tools.conversion.output_dir import RUN_MARKER
from persimmon_tools.errors import ConversionError
from persimmon_tools.safe_write import acquire_lock


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _default_signals() -> None:
    """A background shell starts its jobs with SIGINT and SIGQUIT ignored, and the toolkit keeps an inherited
    SIG_IGN (nohup's contract): give the child default dispositions so the signal under test arrives."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def start_convert(release: Path, out: Path, **popen) -> subprocess.Popen:
    """A convert subprocess, returned once it has written 16 MiB of its shard into `.out.tmp-*`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "persimmon_tools.cli", "convert", str(release), str(out), "--no-verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,
        **popen,
    )
    if _written(proc, out):
        return proc
    proc.kill()
    proc.communicate()
    pytest.fail("convert finished (or never started writing) before it could be interrupted")


def _written(proc: subprocess.Popen, out: Path) -> bool:
    """Wait until ``proc`` (a convert into ``out``) has written 16 MiB of its shard; False if it ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        shards = list(out.parent.glob(f".{out.name}.tmp-*/model.safetensors"))
        if shards and shards[0].stat().st_size > (16 << 20):
            return True
        time.sleep(0.005)
    return False


def _signal_a_convert(
    background, mid_started, folder: Path, sig: signal.Signals
) -> tuple[Path, int, str, str]:
    """A ``background`` job (tests/conftest.py): ``sig`` to a real convert of the mid release into ``folder``
    once it has written 16 MiB of its shard; (folder, exit code, stdout, stderr)."""
    out = folder / "out"
    command = [sys.executable, "-m", "persimmon_tools.cli", "convert", str(mid_started.result()), str(out)]
    command = background.default_signals([*command, "--no-verify"], ("SIGINT", "SIGHUP", "SIGQUIT"))
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with background.spawn(command, cwd=folder, env=background.environ, **popen) as proc:
        if not _written(proc, out):
            return (
                folder,
                -1,
                "",
                "convert finished (or never started writing) before it could be interrupted",
            )
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    return folder, proc.returncode, stdout, stderr


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the SIGHUP and SIGQUIT cases'
    children run beside the tests once the session's mid release is built."""
    for item in items:
        if item.originalname == "test_sighup_and_sigquit_clean_up_like_sigint":
            sig = item.callspec.params["sig"]
            folder = background.roomy_scratch(f"signal-{sig.name}")
            started = background.started["mid_release"]
            background.started[f"{__name__}: {sig.name}"] = background.submit(
                _signal_a_convert, started, folder, sig
            )


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_sighup_and_sigquit_clean_up_like_sigint(mid_release, background, sig):
    folder, returncode, stdout, stderr = background.result(f"{__name__}: {sig.name}")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr + stdout and "Error: interrupted" in stderr
    assert sorted(os.listdir(folder)) == []  # no OUT_DIR, no temp folder, no lock file


def test_nohup_keeps_sighup_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _install_sigterm_handler()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def test_concurrent_run_fails_fast_and_sigkill_leftovers_are_removed_next_time(
    mid_release, releases, tmp_path
):
    out = tmp_path / "out"
    proc = start_convert(mid_release, out)
    try:
        t0 = time.monotonic()
        second = cli("convert", releases["tar"], out, "--no-verify")
        assert time.monotonic() - t0 < 10
        assert second.exit_code == 1, second.output
        assert f"PID {proc.pid}" in second.stderr and ".out.lock" in second.stderr
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / RUN_MARKER).is_file() and not out.exists()
    assert json.loads((stale[0] / RUN_MARKER).read_text())["pid"] == proc.pid
    result = cli("convert", releases["tar"], out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert f"removed {stale[0]}" in result.stderr and f"PID {proc.pid}" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_held_lock_names_the_holder(releases, tmp_path):
    lock = acquire_lock(tmp_path / ".out.lock", "OUT_DIR out", ConversionError)
    try:
        result = cli("convert", releases["tar"], tmp_path / "out", "--no-verify")
    finally:
        lock.release()
    assert result.exit_code == 1 and f"(PID {os.getpid()})" in result.stderr
    assert "another persimmon-tools process" in result.stderr
    assert str(tmp_path / ".out.lock") in result.stderr and "wait for it" in result.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_a_symlinked_lock_file_is_refused(releases, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / ".out.lock").symlink_to(victim)
    result = cli("convert", releases["tar"], tmp_path / "out", "--no-verify")
    assert result.exit_code == 1 and "is a symbolic link" in result.stderr
    assert victim.read_text() == "keep" and not (tmp_path / "out").exists()


def test_unprovable_leftovers_are_named_and_kept(releases, tmp_path):
    """A look-alike folder without our marker, or whose creator still runs, is reported, never deleted."""
    foreign = tmp_path / ".out.tmp-mine"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"user data")
    alive = tmp_path / ".out.tmp-0011223344556677-abc"
    alive.mkdir()
    marker = {"tool": "persimmon-tools", "pid": os.getpid(), "token": "0011223344556677", "role": "new"}
    (alive / RUN_MARKER).write_text(json.dumps(marker))
    result = cli("convert", releases["tar"], tmp_path / "out", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (
        f"{foreign} looks like a leftover" in result.stderr
        and "no valid persimmon-tools marker" in result.stderr
    )
    assert "still running" in result.stderr
    assert (foreign / "data.bin").read_bytes() == b"user data" and (alive / RUN_MARKER).is_file()
