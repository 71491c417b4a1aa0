"""Pickle bombs of shared nested lists/tuples (~400 bytes): both unpicklers and everything that walks their
result fail fast with CheckpointError, under a 2 GiB address-space limit (they used to take GiBs and minutes)."""

from __future__ import annotations

import pickle as P
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hostile_inputs import glob, program, s, write_torch_zip

LEVELS = 40  # 2**40 unfolded nodes


def _nested(kind: bytes) -> bytes:
    """Opcodes pushing x_40 where x_0 = [] (or ()), x_k = [x_{k-1}, x_{k-1}]: every level is one memo entry."""
    ops = (P.EMPTY_LIST if kind == P.LIST else P.EMPTY_TUPLE) + P.BINPUT + b"\x00" + P.POP
    for k in range(1, LEVELS + 1):
        ops += P.MARK + P.BINGET + bytes([k - 1]) + P.BINGET + bytes([k - 1]) + kind
        ops += P.BINPUT + bytes([k]) + P.POP
    return ops + P.BINGET + bytes([LEVELS])


def _bomb(where: str) -> bytes:
    lst, tup = _nested(P.LIST), _nested(P.TUPLE)
    model = P.EMPTY_DICT + s("model") + P.EMPTY_DICT
    return {
        "args": program(model, P.SETITEM, s("args"), lst, P.SETITEM),
        "iteration": program(model, P.SETITEM, s("iteration"), lst, P.SETITEM),
        "model": program(model, s("x"), lst, P.SETITEM, P.SETITEM),
        "dict key": program(model, tup, P.NONE, P.SETITEM, P.SETITEM),
        "frozenset": program(
            model,
            P.SETITEM,
            s("args"),
            glob("builtins", "frozenset"),
            P.MARK,
            P.MARK,
            tup,
            P.LIST,
            P.TUPLE,
            P.REDUCE,
            P.SETITEM,
        ),
        "persistent id": program(model, s("x"), tup, P.BINPERSID, P.SETITEM, P.SETITEM),
        "tensor size": program(
            model,
            s("w"),
            glob("torch._utils", "_rebuild_tensor_v2"),
            P.MARK,
            P.NONE,
            P.BININT1,
            b"\x00",
            lst,
            P.BINGET + bytes([LEVELS]),
            P.TUPLE,
            P.REDUCE,
            P.SETITEM,
            P.SETITEM,
        ),
    }[where]


_RUN = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from pathlib import Path
    from persimmon_tools.errors import CheckpointError
    path = Path(sys.argv[2])
    start = time.monotonic()
    try:
        if sys.argv[1] == "convert":
            from persimmon_tools.conversion.inspect import inspect_release
            inspect_release(path)
        else:
            from persimmon_tools.verification.source_merge import load_source
            load_source(path)
    except CheckpointError as err:
        print("REFUSED", type(err).__name__, round(time.monotonic() - start, 2), err.message)
    else:
        print("LOADED")
    """
)


@pytest.mark.parametrize("reader", ["convert", "verify"])
@pytest.mark.parametrize(
    "where", ["args", "iteration", "model", "dict key", "frozenset", "persistent id", "tensor size"]
)
def test_shared_structure_bomb_fails_fast(tmp_path, reader, where):
    """Case pickle-shared-bomb: under a 2 GiB address-space limit and a timeout, in both readers."""
    pkl = _bomb(where)
    assert len(pkl) < 600
    path = write_torch_zip(tmp_path / "model_optim_rng.pt", pkl)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, reader, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    words = proc.stdout.split()
    assert words[0] == "REFUSED", proc.stdout
    assert words[1] in ("CheckpointError", "UnsafeCheckpointError")
    assert float(words[2]) < 5, proc.stdout  # the unpickle and checks; interpreter start is not counted
