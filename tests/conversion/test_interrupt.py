"""Interruptions and full disks during ``convert``: no partial OUT_DIR, no temporary folder, a clear message,
and a re-run that succeeds.

Signals are sent to a real ``persimmon-tools convert`` subprocess while it writes a 1 GiB shard (the ``mid``
synthetic preset: ``mid_release`` of tests/conftest.py, made once per session), beside the other tests
(``start_in_background``); the re-run after it is in process. Full disks are a 512 KiB tmpfs where mounting
is permitted, and ``ENOSPC`` injected at every place that writes in any case.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from reliability_cases import expect, expect_cli

import persimmon_tools.conversion.convert as convert_module
import persimmon_tools.conversion.writer as writer
from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import PersimmonToolsError

REPO = Path(__file__).resolve().parents[2]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _interrupted_convert(background, mid_started, scratch: Path, sig: signal.Signals) -> dict:
    """A ``background`` job (tests/conftest.py): ``convert`` the mid release into ``scratch/out`` in a child
    (SIGINT at its default disposition: ``background.default_signals``), sent ``sig`` once 16 MiB of its ~1 GiB shard are
    written, then the same command again; what the test checks: whether the signal landed mid-write, the exit
    code and output, ``scratch``'s listing right after the child ended, and the second run's."""
    tar = mid_started.result()
    out = scratch / "out"
    args = [sys.executable, "-m", "persimmon_tools.cli", "convert", str(tar), str(out), "--no-verify"]
    with background.spawn(
        background.default_signals(args),
        cwd=REPO,
        env=background.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        deadline = time.monotonic() + 120
        shard = None
        while time.monotonic() < deadline and proc.poll() is None:
            shards = list(scratch.glob(".out.tmp-*/model.safetensors"))
            if shards and shards[0].stat().st_size > (16 << 20):  # mid-write: 16 MiB of ~1 GiB written
                shard = shards[0]
                break
            time.sleep(0.005)
        alive = proc.poll() is None
        if shard is None or not alive:  # the test fails on it (the block's end kills a child still running)
            return {"scratch": scratch, "shard": shard, "alive": alive}
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    listing = sorted(p.name for p in scratch.iterdir())
    rerun = [background.python(), *args[1:], "-q"]  # the same command, from the fork server: no signal
    rerun = background.run(rerun, cwd=REPO, env=background.environ, timeout=600)
    facts = {
        "scratch": scratch,
        "shard": shard,
        "alive": alive,
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "listing": listing,
        "rerun": rerun,
        "rerun_shard_size": (out / "model.safetensors").stat().st_size if rerun.returncode == 0 else None,
        "rerun_listing": sorted(p.name for p in scratch.iterdir()),
    }
    # The 1 GiB output is not needed once measured: removed now (the session's disk use stays ~2 GiB lower).
    shutil.rmtree(out, ignore_errors=True)
    return facts


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: each signal's interrupted
    ``convert`` runs in a child beside the tests, once the session's mid release is built."""
    for item in items:
        if item.originalname == "test_signal_during_convert":
            sig = item.callspec.params["sig"]
            scratch = background.roomy_scratch(f"interrupt-{sig.name}")
            background.started[f"{__name__}: {item.name}"] = background.submit(
                _interrupted_convert, background.started["mid_release"], scratch, sig
            )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_convert(mid_release, background, request, sig):
    """Cases sigint and sigterm. The interrupted child and the same command run again after it ran beside the
    tests (``start_in_background``)."""
    run = background.result(f"{__name__}: {request.node.name}")
    assert run["shard"] is not None and run["alive"], "convert finished before it could be interrupted"
    stdout, stderr = run["stdout"], run["stderr"]
    assert run["returncode"] == 130, stderr
    assert "Traceback" not in stderr + stdout and "Error: interrupted" in stderr
    assert run["listing"] == []  # no OUT_DIR, no .out.tmp-*
    assert run["rerun"].returncode == 0, run["rerun"].stderr  # the same command again, after the interruption
    assert run["rerun_shard_size"] > (1 << 30)
    assert run["rerun_listing"] == ["out"]


def _interrupt_after(n_calls: int, monkeypatch) -> None:
    """Ctrl-C during the ``n_calls``-th write of shard bytes (headers and copied chunks)."""
    real = writer._write_all
    calls = []

    def write_all(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_all", write_all)


def test_keyboard_interrupt_keeps_old_output(releases, tmp_path, monkeypatch):
    """Case ctrl-c-force."""
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())  # the old output: an earlier conversion
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _interrupt_after(20, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(releases["tar"], out, ConvertOptions(force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []
    _interrupt_after(20, monkeypatch)
    result = cli("convert", releases["tar"], out, "--force", "--no-verify")
    assert (
        result.exit_code == 130 and "Error: interrupted" in result.stderr and "Traceback" not in result.stderr
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []


def test_an_interrupt_does_not_wait_for_the_tokenizer_thread(releases, tmp_path, monkeypatch):
    """Ctrl-C while the tokenizer thread is busy (in a real run: importing transformers, seconds): convert
    stops at once, and the abandoned thread, once it goes on, fails without writing anything."""
    import persimmon_tools.tokenizer.write as tokenizer_write

    entered, go_on, finished = threading.Event(), threading.Event(), threading.Event()
    real_reload = tokenizer_write.check_reload

    def busy_reload(*args, **kwargs):
        entered.set()
        go_on.wait(30)
        try:
            return real_reload(*args, **kwargs)
        finally:
            finished.set()

    def interrupted_write(*args, **kwargs):
        assert entered.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_write, "check_reload", busy_reload)
    monkeypatch.setattr(writer, "_write_all", interrupted_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(releases["tar"], tmp_path / "out", ConvertOptions())
        assert not finished.is_set()  # returned while the tokenizer thread still waits
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        go_on.set()
    assert finished.wait(60)
    time.sleep(0.2)  # the thread's own cleanup after its failure
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_second_interrupt_during_cleanup_still_removes_the_temp_folder(releases, tmp_path, monkeypatch):
    """Case ctrl-c-twice: the user presses Ctrl-C again while the temporary folder is being deleted."""
    real_rmtree, calls = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        if Path(path).parent != tmp_path:  # the abandoned tokenizer thread's own staging folder
            return real_rmtree(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 1:
            next(Path(path).glob("*.safetensors")).unlink()  # part of the way, then the second Ctrl-C
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    _interrupt_after(20, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(releases["tar"], tmp_path / "out", ConvertOptions())
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == []


def _can_mount_tmpfs(target: Path) -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(target)], capture_output=True, text=True
    )
    return None if proc.returncode == 0 else f"mount -t tmpfs not permitted here: {proc.stderr.strip()}"


def test_full_tmpfs(releases, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    why = _can_mount_tmpfs(mnt)
    if why:
        pytest.skip(why)
    try:
        result = cli("convert", releases["tar"], mnt / "out", "--no-verify")
        expect_cli("tmpfs-full", result)
        assert os.listdir(mnt) == []  # no OUT_DIR, no temporary folder, no partial shard
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _under(path: Path, fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    except OSError:
        return False


@pytest.mark.parametrize(
    "where",
    ["temp folder", "shard copy", "shard cast (--dtype fp32)", "fsync", "config.json", "tokenizer.model"],
)
def test_injected_enospc(releases, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    options = ConvertOptions(dtype="fp32" if "fp32" in where else "auto")
    if where == "temp folder":
        monkeypatch.setattr(tempfile, "mkdtemp", _enospc)
    elif where == "shard copy":
        real_write = os.write
        monkeypatch.setattr(
            os, "write", lambda fd, data: _enospc() if _under(tmp_path, fd) else real_write(fd, data)
        )
    elif where.startswith("shard cast"):
        monkeypatch.setattr(writer, "_write_all", _enospc)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    elif where == "config.json":
        monkeypatch.setattr(convert_module, "write_json", _enospc)
    else:
        real = Path.write_bytes
        monkeypatch.setattr(
            Path,
            "write_bytes",
            lambda self, data: _enospc() if self.name == "tokenizer.model" else real(self, data),
        )
    with pytest.raises(PersimmonToolsError) as err:
        convert(releases["tar"], out, options)
    expect("enospc", err.value)
    assert "free space" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert(releases["tar"], out, options)  # the same command succeeds once there is space
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []


def test_enospc_while_saving_tokenizer_json(releases, tmp_path, monkeypatch):
    """Case enospc-tokenizer-json: the disk fills up exactly when tokenizer.json is written."""
    import errno
    import pathlib

    real = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "tokenizer.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(PersimmonToolsError) as err:
        convert(releases["tar"], tmp_path / "out", ConvertOptions())
    expect("enospc", err.value)
