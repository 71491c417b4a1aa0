"""A fork server for the test suite's ``persimmon-tools`` commands and Python children (tests only).

A fresh Python process that imports torch spends about 1.5 CPU-seconds on it, and one that also loads
transformers' Persimmon model about 4.5; the docs examples, docs/ci.md's recipe, the Megatron-Core child and
the tests' Python children start several dozen of them. Here one server process imports the toolkit and its
heavy dependencies once (torch, safetensors, tokenizers, sentencepiece, numpy) and, per request, forks a
child that becomes the command:

- ``persimmon-tools ARGS``: the real console-script entry point (:func:`persimmon_tools.cli.run`);
- ``python [-W error] (-c CODE | -m MODULE | SCRIPT) ARGS``: the code as ``__main__``, with ``sys.argv`` and
  ``sys.path[0]`` as the interpreter sets them (any other option: the real interpreter, exec'd in the child).

Each child gets the caller's argv, working directory, environment and standard streams (passed as file
descriptors), and the caller gets its exit status: the exit codes and the bytes on stdout and stderr are the
command's own.

huggingface_hub and transformers read their settings (``HF_HOME``, ``HF_HUB_OFFLINE``, ...) from the
environment when they are imported, so they are never imported into the server itself. Instead, each
distinct *import environment* (the values of the variables :data:`IMPORT_TIME` matches) gets a warm child of
its own, forked from the server on the first request with that environment: it takes that environment,
imports transformers' Persimmon model and tokenizers and the toolkit's verify and hub wings, and forks the
requests with the same import environment from there. At most :data:`MAX_WARM` of them; beyond that a
request is forked from the server, which has not imported them.

The callers run the small clients of tests/forkserver_clients.py (``persimmon-tools`` first on PATH from
``cli_path``, ``python`` from ``python_path``), which start the session's server on first use; when it is
not running, a client runs the real console script or interpreter instead. What this does not exercise is a
fresh interpreter's start (the console script, import errors, the import of transformers): tests in
tests/cli/test_cli_process.py, tests that check what a fresh process imports, and the README's quick start
run real processes.

    python tests/cli_forkserver.py SOCKET      # serve until killed (prints "ready" once listening)
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import re
import select
import socket
import struct
import sys
import threading
from pathlib import Path

#: The variables that can change what an import does: those that the interpreter, torch, transformers,
#: huggingface_hub and tokenizers read when they are imported (locale, home and cache folders, offline
#: switches, thread counts, proxies). Requests whose values of these differ get different warm children;
#: every other variable (the shell's, PATH, TMPDIR, a script's own inputs) is only applied in the child.
IMPORT_TIME = re.compile(
    r"HF_|HUGGINGFACE|TRANSFORMERS|TOKENIZERS|SAFETENSORS|TORCH|PYTORCH|CUDA|OMP_|MKL_|KMP_|USE_|XDG_"
    r"|PYTHON|LANG|LC_|HOME$|TZ$|.*PROXY$|DISABLE_TELEMETRY$|DO_NOT_TRACK$",
    re.IGNORECASE,
)
#: Read per request in the child: put on ``sys.path``, set as ``sys.dont_write_bytecode``.
PER_REQUEST = frozenset({"PYTHONPATH", "PYTHONDONTWRITEBYTECODE"})

#: How many import environments get a warm child.
MAX_WARM = 3

_WARM_IMPORTS = (
    "huggingface_hub",
    "transformers",
    "transformers.models.persimmon.modeling_persimmon",
    "transformers.tokenization_utils_fast",
    "persimmon_tools.verification.verify",
    "persimmon_tools.verification.transformers_side",
    "persimmon_tools.hub.push",
)


def import_key(env: dict[str, str]) -> str:
    """What distinguishes one import environment from another: ``env``'s :data:`IMPORT_TIME` variables."""
    chosen = [(k, v) for k, v in env.items() if IMPORT_TIME.match(k) and k not in PER_REQUEST]
    return json.dumps(sorted(chosen))


# --- in the forked child ------------------------------------------------------------------------------


def _become(request: dict, fds: list[int], base_path: list[str]) -> None:
    """Take the caller's standard streams, working directory, environment and PYTHONPATH."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import tempfile

    tempfile.tempdir = None  # read TMPDIR again, as a fresh process would
    sys.dont_write_bytecode = bool(request["env"].get("PYTHONDONTWRITEBYTECODE"))
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = ["", *extra, *base_path]


def _run_cli(argv: list[str]) -> int:
    sys.argv = [str(Path(sys.executable).parent / "persimmon-tools"), *argv]
    sys.path[0] = str(Path(sys.executable).parent)
    from persimmon_tools.cli import run

    run()
    return 0


def _errors_after_imports(defaults: int) -> None:
    """``-W error`` as the interpreter applies it: behind the filters that imports added, ahead of the
    ``defaults`` the interpreter started with."""
    import warnings

    current = list(warnings.filters)
    cut = len(current) - defaults
    ordered = [*current[:cut], ("error", None, Warning, None, 0), *current[cut:]]
    sys.warnoptions[:] = ["error"]
    warnings.resetwarnings()
    for action, message, category, module, lineno in reversed(ordered):
        text, where = (getattr(part, "pattern", part) or "" for part in (message, module))
        warnings.filterwarnings(action, text, category, where, lineno)


def _run_python(argv: list[str], defaults: int) -> int:
    """``python ARGV`` for ``[-W error]... (-c CODE | -m MODULE | SCRIPT) ARGS``; anything else execs the
    interpreter."""
    import runpy
    import types

    i, errors = 0, False
    while argv[i : i + 2] == ["-W", "error"]:
        errors, i = True, i + 2
    module = None
    if argv[i : i + 1] == ["-c"] and len(argv) > i + 1:
        code, sys.argv = argv[i + 1], ["-c", *argv[i + 2 :]]
    elif argv[i : i + 1] == ["-m"] and len(argv) > i + 1:
        code, module, sys.argv = None, argv[i + 1], ["-m", *argv[i + 2 :]]
        sys.path[0] = os.getcwd()
    elif i < len(argv) and not argv[i].startswith("-"):
        code, sys.argv = None, argv[i:]
        sys.path[0] = os.path.dirname(os.path.realpath(argv[i]))
    else:
        os.execv(sys.executable, [sys.executable, *argv])
    if errors:
        _errors_after_imports(defaults)
    if module is not None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif code is None:
        runpy.run_path(os.path.abspath(sys.argv[0]), run_name="__main__")
    else:
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        exec(compile(code, "<string>", "exec"), main.__dict__)
    return 0


def run_job(job: tuple[dict, list[int]], base_path: list[str], defaults: int) -> int:
    """In the forked child: become the request's command and run it; its exit code."""
    request, fds = job
    code = 70
    try:
        _become(request, fds, base_path)
        if request.get("mode") == "python":
            code = _run_python(request["argv"], defaults)
        else:
            code = _run_cli(request["argv"])
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):  # as the interpreter prints it
            print(done.code, file=sys.stderr)
    except BaseException as error:  # as a fresh interpreter reports it, without this file's frames
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        code = 1
    return code


# --- the server and its warm children -----------------------------------------------------------------


def _receive(conn: socket.socket, nfds: int) -> tuple[dict, list[int]]:
    """One length-prefixed JSON request and the ``nfds`` descriptors sent with it."""
    head, ancillary, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(nfds * array.array("i").itemsize))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not head:
        raise ConnectionError("closed")
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


def _send(conn: socket.socket, request: dict, fds: list[int]) -> None:
    body = json.dumps(request).encode()
    conn.sendmsg(
        [struct.pack("!I", len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    )
    conn.sendall(body)


class _Forker:
    """Forks a child per job and, once it has ended, sends its exit status on the job's connection."""

    def __init__(self) -> None:
        self.waiting: dict[int, socket.socket] = {}

    def fork(self, conn: socket.socket, job: tuple[dict, list[int]], *closing: socket.socket):
        """The job in the child (the caller runs it), None in the server."""
        pid = os.fork()
        if pid == 0:
            for sock in (*closing, *self.waiting.values(), conn):
                sock.close()
            return job
        for fd in job[1]:
            os.close(fd)
        self.waiting[pid] = conn
        return None

    def reap(self) -> None:
        while self.waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            conn = self.waiting.pop(pid, None)
            if conn is not None:
                code = os.waitstatus_to_exitcode(status)  # -N: ended by signal N
                with contextlib.suppress(OSError):
                    conn.sendall(struct.pack("!i", code))
                conn.close()


def _warm(pipe: socket.socket, env: dict[str, str]):
    """A warm child's loop: take ``env``, import :data:`_WARM_IMPORTS`, then fork each job that the server
    passes on ``pipe`` (its connection, then its standard streams); returns a job in a forked child."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    for name in _WARM_IMPORTS:
        with contextlib.suppress(Exception):  # then the job imports it (and meets the error) itself
            importlib.import_module(name)
    gc.freeze()
    forker = _Forker()
    while True:
        ready, _, _ = select.select([pipe], [], [], 0.02 if forker.waiting else 1.0)
        if ready:
            try:
                request, fds = _receive(pipe, 4)
            except (OSError, ValueError):
                os._exit(0)  # the server has gone
            conn = socket.socket(fileno=fds[0])
            job = forker.fork(conn, (request, fds[1:]), pipe)
            if job is not None:
                return job
        forker.reap()


def _start_warm(env: dict[str, str], closing: tuple, fds: list[int]):
    """Fork a warm child for ``env``: ``(the server's end of its pipe, None)`` in the server, ``(None, job)``
    in a job's child forked by the warm child (the warm child itself never returns)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.fork() == 0:
        for sock in (ours, *closing):
            if sock is not None:
                sock.close()
        for fd in fds:
            os.close(fd)
        return None, _warm(theirs, env)
    theirs.close()
    return ours, None


def _pass_on(pipe: socket.socket, request: dict, conn: socket.socket, fds: list[int]) -> bool:
    """Hand the request to a warm child (its connection and standard streams); False when it has gone."""
    try:
        _send(pipe, request, [conn.fileno(), *fds])
    except OSError:
        return False
    for fd in fds:
        os.close(fd)
    conn.close()
    return True


def serve(sock: Path):
    """Serve ``sock`` until killed; returns a job only in a forked child (the caller runs it)."""
    import numpy  # noqa: F401  (imported once here, inherited by every command)
    import safetensors.torch  # noqa: F401
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401

    import persimmon_tools.cli  # noqa: F401
    import persimmon_tools.conversion.convert  # noqa: F401
    import persimmon_tools.export.export  # noqa: F401

    gc.freeze()  # the imports' objects: never collected, so a child's collections copy none of their pages
    leaked = [m for m in ("huggingface_hub", "transformers") if m in sys.modules]
    if leaked:
        raise SystemExit(f"the fork server must not import {leaked}: they read settings at import time")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(64)
    print("ready", flush=True)
    warm: dict[str, socket.socket | None] = {}
    forker = _Forker()
    while True:
        ready, _, _ = select.select([server], [], [], 0.02 if forker.waiting else 1.0)
        if ready:
            conn, _ = server.accept()
            try:
                request, fds = _receive(conn, 3)
            except (OSError, ValueError):
                conn.close()
                continue
            key = import_key(request["env"])
            if key not in warm and len(warm) < MAX_WARM:
                warm[key], job = _start_warm(request["env"], (server, conn, *warm.values()), fds)
                if job is not None:
                    return job
            if warm.get(key) is not None and _pass_on(warm[key], request, conn, fds):
                continue
            if warm.get(key) is not None:  # the warm child has gone: the server forks this key's requests
                warm[key].close()
                warm[key] = None
            job = forker.fork(conn, (request, fds), server, *(p for p in warm.values() if p is not None))
            if job is not None:
                return job
        forker.reap()


def main(sock: Path) -> None:
    import warnings

    defaults = len(warnings.filters)  # the interpreter's own, before any import added one
    base_path = sys.path[1:]
    job = serve(sock)
    code = run_job(job, base_path, defaults)
    if job[0].get("mode") == "python":  # what the interpreter does at exit, before it tears down its modules
        import atexit

        threading._shutdown()  # waits for the non-daemon threads
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)  # tearing the inherited modules down would only copy their pages


if __name__ == "__main__":
    main(Path(sys.argv[1]))
