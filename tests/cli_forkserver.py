"""A fork server for the ``persimmon-tools`` commands of the docs examples and the CI recipe (tests only).

Each ``persimmon-tools`` process spends about 1.5 CPU-seconds importing torch before it does anything; the
docs examples and docs/ci.md's recipe run a few dozen of them, so the imports were a large part of the test
suite's CPU. Here one server process imports the toolkit and its heavy dependencies once (torch,
safetensors, tokenizers, sentencepiece, numpy; never huggingface_hub or transformers, whose settings are
read from the environment at import time) and then, per command, forks a child that runs the real
console-script entry point (:func:`persimmon_tools.cli.run`) with the caller's argv, working directory,
environment and standard streams (passed as file descriptors), and reports its exit status.

The examples call ``persimmon-tools`` through :func:`write_shim`'s small client, put first on their PATH:
what they run is unchanged, the exit codes and the bytes on stdout and stderr are the command's own. What
this does not exercise is a fresh interpreter's start (the console script, import errors): tests in
tests/cli/test_cli_process.py and the README's quick start run real processes. When the server is not
running, the client runs the real console script instead.

    python tests/cli_forkserver.py SOCKET      # serve until killed (prints "ready" once listening)
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

#: The client, run as ``persimmon-tools``: Python without site (fast to start), stdlib only.
_SHIM = """#!{python} -S
import array, json, os, socket, struct, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({sock!r})
except OSError:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
body = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
s.sendmsg([struct.pack("!I", len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
s.sendall(body)
got = b""
while len(got) < 4:
    more = s.recv(4 - len(got))
    if not more:
        sys.exit(70)
    got += more
sys.exit(struct.unpack("!i", got)[0])
"""


def write_shim(folder: Path, sock: Path) -> Path:
    """``folder/persimmon-tools``: the client of the server listening on ``sock`` (put ``folder`` first on
    PATH)."""
    real = Path(sys.executable).parent / "persimmon-tools"
    shim = folder / "persimmon-tools"
    shim.write_text(_SHIM.format(python=sys.executable, sock=str(sock), real=str(real)))
    shim.chmod(0o755)
    return shim


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command, run it, exit with its code (never returns)."""
    code = 70
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile

        tempfile.tempdir = None  # read TMPDIR again, as a fresh process would
        sys.argv = [str(Path(sys.executable).parent / "persimmon-tools"), *request["argv"]]
        from persimmon_tools.cli import run

        run()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    except BaseException:  # a bug: the traceback, as a fresh process would show it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, ancillary, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(3 * array.array("i").itemsize))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    while len(head) < 4:
        head += conn.recv(4 - len(head))
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise ConnectionError("the client went away")
        body += more
    return json.loads(body), list(fds)


def serve(sock: Path) -> None:
    import numpy  # noqa: F401  (imported once here, inherited by every command)
    import safetensors.torch  # noqa: F401
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401

    import persimmon_tools.cli  # noqa: F401
    import persimmon_tools.conversion.convert  # noqa: F401
    import persimmon_tools.export.export  # noqa: F401

    leaked = [m for m in ("huggingface_hub", "transformers") if m in sys.modules]
    if leaked:
        raise SystemExit(f"the fork server must not import {leaked}: they read settings at import time")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([server], [], [], 0.02 if waiting else 1.0)
        if ready:
            conn, _ = server.accept()
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _run_child(request, fds)
            for fd in fds:
                os.close(fd)
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):
                    conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
                conn.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))


_STARTED = threading.Lock()


def shim_folder(background, scratch_root: Path) -> Path | None:
    """The folder holding the ``persimmon-tools`` client of the session's server (started on first use with
    ``background.keep``; killed when the session ends); None when it did not start (then the caller's PATH
    finds the real console script)."""
    with _STARTED:
        if "cli_forkserver" not in background.started:
            folder = scratch_root / "forkserver"
            folder.mkdir(parents=True, exist_ok=True)
            sock = folder / "sock"
            proc = background.keep(
                [sys.executable, __file__, str(sock)],
                cwd=folder,
                env=background.environ,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            ready = proc.stdout.readline().strip() == "ready"
            background.started["cli_forkserver"] = write_shim(folder, sock).parent if ready else None
        return background.started["cli_forkserver"]


def cli_path(background, scratch_root: Path) -> str:
    """A PATH on which ``persimmon-tools`` is the fork server's client (when the server started), else this
    interpreter's console script, then the session's own PATH."""
    shims = shim_folder(background, scratch_root)
    first = [str(shims)] if shims is not None else []
    return os.pathsep.join([*first, str(Path(sys.executable).parent), background.environ.get("PATH", "")])
