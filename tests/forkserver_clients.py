"""The clients of tests/cli_forkserver.py's fork server, and the session's one server (tests only).

:func:`cli_path` puts a ``persimmon-tools`` client first on a PATH, :func:`python_path` gives a ``python``
client; both start the session's server on first use. Each client is a small stdlib-only script that sends
its argv, working directory, environment and standard streams (as file descriptors) to the server, waits for
the exit status of the child forked for it and ends with the same (a death by signal as the same signal).
When no server listens, it runs the real console script or interpreter instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

SERVER = Path(__file__).resolve().with_name("cli_forkserver.py")

#: The client, run as ``persimmon-tools`` or ``python``: Python without site (fast to start), stdlib only.
_SHIM = """#!{python} -S
import array, json, os, signal, socket, struct, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({sock!r})
except OSError:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
request = {{"mode": {mode!r}, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
body = json.dumps(request).encode()
s.sendmsg([struct.pack("!I", len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
s.sendall(body)
got = b""
while len(got) < 4:
    more = s.recv(4 - len(got))
    if not more:
        sys.exit("cli_forkserver: the server gave no exit status (see tests/cli_forkserver.py)")
    got += more
code = struct.unpack("!i", got)[0]
if code < 0:  # ended by a signal: end by the same one
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), -code)
sys.exit(code if code >= 0 else 128 - code)
"""


def write_shim(folder: Path, sock: Path, mode: str = "cli") -> Path:
    """``folder/persimmon-tools`` (``mode="cli"``) or ``folder/python`` (``mode="python"``): a client of the
    server listening on ``sock``."""
    if mode == "cli":
        real, name = Path(sys.executable).parent / "persimmon-tools", "persimmon-tools"
    else:
        real, name = Path(sys.executable), "python"
    shim = folder / name
    shim.write_text(_SHIM.format(python=sys.executable, sock=str(sock), real=str(real), mode=mode))
    shim.chmod(0o755)
    return shim


_STARTED = threading.Lock()
#: Set for a child pytest (tests/offload.py): the folder of the session's clients, which it uses instead of
#: starting a server of its own.
SHARED_ENV = "PERSIMMON_TESTS_FORKSERVER"


def shim_folder(background, scratch_root: Path) -> Path | None:
    """The folder holding the ``persimmon-tools`` and ``python`` clients of the session's server (started on
    first use with ``background.keep``; killed with its children when the session ends); None when it did
    not start (then the callers run the real console script and interpreter)."""
    with _STARTED:
        shared = background.environ.get(SHARED_ENV)
        if "cli_forkserver" not in background.started and shared and Path(shared, "python").is_file():
            background.started["cli_forkserver"] = Path(shared)
        if "cli_forkserver" not in background.started:
            folder = scratch_root / "forkserver"
            folder.mkdir(parents=True, exist_ok=True)
            sock = folder / "sock"
            proc = background.keep(
                [sys.executable, str(SERVER), str(sock)],
                cwd=folder,
                env={k: v for k, v in background.environ.items() if k != "PYTHONPATH"},
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            ready = proc.stdout.readline().strip() == "ready"
            if ready:
                write_shim(folder, sock, "python")
            background.started["cli_forkserver"] = write_shim(folder, sock).parent if ready else None
        return background.started["cli_forkserver"]


def cli_path(background, scratch_root: Path) -> str:
    """A PATH on which ``persimmon-tools`` is the fork server's client (when the server started), else this
    interpreter's console script, then the session's own PATH."""
    shims = shim_folder(background, scratch_root)
    first = [str(shims)] if shims is not None else []
    return os.pathsep.join([*first, str(Path(sys.executable).parent), background.environ.get("PATH", "")])


def python_path(background, scratch_root: Path) -> str:
    """The fork server's ``python`` client (when the server started), else this interpreter: for a child
    whose test is about what its code computes, not about a fresh interpreter's start (what it imports, its
    signal dispositions, its memory from zero)."""
    shims = shim_folder(background, scratch_root)
    return str(shims / "python") if shims is not None else sys.executable
