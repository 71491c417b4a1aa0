"""Pickle bombs of shared nested lists/tuples (~400 bytes): both unpicklers and everything that walks their
result fail fast with CheckpointError, under a 2 GiB address-space limit (they used to take GiBs and minutes)."""

from __future__ import annotations

import json
import pickle as P
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


READERS = ["convert", "verify"]
WHERES = ["args", "iteration", "model", "dict key", "frozenset", "persistent id", "tensor size"]
CASE_TIMEOUT_S = 60  # per case, as when each case had its own subprocess

# One interpreter runs every case, one after another, under the 2 GiB address-space limit, and prints one
# JSON line per case. Both readers are imported before the first case, so the clock of each case covers the
# unpickle and checks only (interpreter start and imports are not counted). A case that raises anything else,
# runs out of memory or over CASE_TIMEOUT_S is reported as such, and the next case still runs.
_RUN = textwrap.dedent(
    """
    import json, resource, signal, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from pathlib import Path
    from persimmon_tools.errors import CheckpointError
    from persimmon_tools.conversion.inspect import inspect_release
    from persimmon_tools.verification.source_merge import load_source

    class CaseTimeout(BaseException):
        pass

    def alarm(signum, frame):
        raise CaseTimeout

    signal.signal(signal.SIGALRM, alarm)
    readers = {"convert": inspect_release, "verify": load_source}
    for case in json.loads(sys.argv[1]):
        out = {"id": case["id"]}
        start = time.monotonic()
        signal.alarm(int(sys.argv[2]))
        try:
            readers[case["reader"]](Path(case["path"]))
        except CheckpointError as err:
            out.update(outcome="REFUSED", type=type(err).__name__, message=err.message)
        except CaseTimeout:
            out.update(outcome="TIMEOUT")
        except BaseException as err:
            out.update(outcome="RAISED", type=type(err).__name__, message=str(err)[:500])
        else:
            out.update(outcome="LOADED")
        finally:
            signal.alarm(0)
        out["seconds"] = round(time.monotonic() - start, 2)
        print(json.dumps(out), flush=True)
    """
)


def _case_id(reader: str, where: str) -> str:
    return f"{where}-{reader}"


def _run_every_case(background, base: Path) -> dict[str, dict]:
    """A ``background`` job (tests/conftest.py): every (reader, where) case run in one child process;
    case id -> its JSON line."""
    cases = []
    for where in WHERES:
        path = write_torch_zip(base / f"{where.replace(' ', '_')}_model_optim_rng.pt", _bomb(where))
        cases += [{"id": _case_id(r, where), "reader": r, "path": str(path)} for r in READERS]
    repo = Path(__file__).resolve().parents[2]
    proc = background.run(
        [background.python(), "-c", _RUN, json.dumps(cases), str(CASE_TIMEOUT_S)],
        cwd=repo,
        env=background.environ,
        timeout=CASE_TIMEOUT_S * len(cases),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(c["id"] for c in cases), proc.stdout + proc.stderr[-2000:]
    return results


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the child that runs every case
    starts beside the tests."""
    background.start_for(
        items, "bomb_results", __name__, _run_every_case, tmp_path_factory.mktemp("pickle-bombs")
    )


@pytest.fixture(scope="module")
def bomb_results(background) -> dict[str, dict]:
    """Every (reader, where) case run in one subprocess: case id -> its JSON line."""
    return background.result(__name__)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("where", WHERES)
def test_shared_structure_bomb_fails_fast(bomb_results, reader, where):
    """Case pickle-shared-bomb: under a 2 GiB address-space limit and a timeout, in both readers."""
    assert len(_bomb(where)) < 600
    result = bomb_results[_case_id(reader, where)]
    assert result["outcome"] == "REFUSED", result
    assert result["type"] in ("CheckpointError", "UnsafeCheckpointError"), result
    assert result["seconds"] < 5, result  # the unpickle and checks; interpreter start is not counted
