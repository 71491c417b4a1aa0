"""Pickles whose object graph is built from one deeply shared value (``a = [x]; b = [a, a]; c = [b, b]; ...``,
a few dozen objects whose tree expansion is ``2**depth`` nodes), hidden where the load-time check used not
to look or where a later walk unfolded them: every command that reads checkpoints (``inspect``, ``convert``,
``verify --reference``, ``export``) refuses each with one ``Error:`` line naming the file, no traceback, in
seconds and under a 2 GiB address-space limit.

Before the shared budget (``persimmon_tools.safe_graph``) these took GiBs or never finished: ``inspect``
rendered a 15-level fan of a 32 KiB string as 1 GiB of JSON (3+ GiB resident), ``torch.device`` of a fan
ran ``str()`` over ``2**40`` nodes inside the unpickler, a Namespace's field values, slices and
``OrderedDict`` instance state were not walked by the load-time check but were by ``repr``/``inspect``, a
20,000-bit integer made ``inspect`` and ``convert`` fail with a traceback, and a stand-in's ``repr`` in an
error message unfolded its arguments.
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle as P
import re
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hostile_inputs import Reduce, glob, program, s, storage, write_pt_obj, write_torch_zip

from persimmon_tools.conversion.args_record import record_args
from persimmon_tools.conversion.inspect import _jsonable
from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.consistency import _canon
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.megatron.unpickle import _children as unpickle_children
from persimmon_tools.megatron.unpickle import _opaque_class
from persimmon_tools.safe_graph import MAX_TREE_NODES, Budget, check_tree, small_repr
from persimmon_tools.synth.build import build_release, bundled_vocab
from persimmon_tools.synth.shard import with_adept_module

LEVELS = 40  # 2**40 unfolded nodes from 41 list objects


def fan(leaf: object, levels: int = LEVELS) -> list:
    """``x_0 = leaf``, ``x_k = [x_{k-1}, x_{k-1}]``: pickled with one memo entry per level."""
    node: object = leaf
    for _ in range(levels):
        node = [node, node]
    return node  # type: ignore[return-value]


def stand_in_fan(levels: int = LEVELS) -> bytes:
    """Opcodes pushing ``megatron.core.Fan(x, x, x, x)`` nested ``levels`` deep (an inert stand-in each)."""
    ops = glob("megatron.core", "Fan") + P.BINPUT + b"\x00" + P.POP + P.NONE + P.BINPUT + b"\x01" + P.POP
    for k in range(1, levels + 1):
        ops += P.BINGET + b"\x00" + P.MARK + (P.BINGET + bytes([k])) * 4 + P.TUPLE + P.REDUCE
        ops += P.BINPUT + bytes([k + 1]) + P.POP
    return ops + P.BINGET + bytes([levels + 1])


def _shard(**args: object) -> dict:
    """The tiny synthetic release's shard (about 920 kB) with ``args`` fields added."""
    obj = build_release(seed=0).objects[(0, 0)]
    for name, value in args.items():
        setattr(obj["args"], name, value)
    return obj


def _metadata_args() -> collections.OrderedDict:
    """Args as an ``OrderedDict`` whose instance state (``BUILD``, like torch's ``_metadata``) is a fan."""
    args = collections.OrderedDict(vars(_shard()["args"]))
    args._metadata = fan([])  # type: ignore[attr-defined]
    return args


def _write(path: Path, obj: dict) -> None:
    with_adept_module(lambda: write_pt_obj(path, obj))  # ModelBackend pickled under ADEPT's name


def write_case(case: str, path: Path) -> Path:
    """Write hostile checkpoint ``case`` at ``path`` (each under 1 MB), with the vocabulary beside it."""
    (path.parent / "adept_vocab.model").write_bytes(bundled_vocab())
    model = P.EMPTY_DICT + s("model") + P.EMPTY_DICT
    if case == "text":  # 2**15 references to one 32 KiB string: 1 GiB of text, 65k nodes
        _write(path, _shard(notes=fan("A" * (32 << 10), 15)))
    elif case == "device":  # torch.device(fan): the unpickler used to str() it
        _write(path, _shard(device=Reduce(torch.device, fan([]))))
    elif case == "slice":  # pickled as __builtin__.slice (protocol 2), which the allowlist now maps
        _write(path, _shard(window=slice(None, fan([]))))
    elif case == "ordered-dict-state":
        _write(path, {**_shard(), "args": _metadata_args()})
    elif case == "long-int":  # 20,000 bits: str() refuses it (4300 digits at most), json.dumps too
        _write(path, _shard(seed=1 << 20_000))
    elif case == "stand-in-in-tensor-view":  # its repr in the error message unfolded the stand-ins
        rebuild = glob("torch._utils", "_rebuild_tensor_v2") + P.MARK + storage() + P.BININT1 + b"\x00"
        view = rebuild + stand_in_fan() + P.BINGET + bytes([LEVELS + 1]) + P.TUPLE + P.REDUCE
        write_torch_zip(path, program(model, s("w"), view, P.SETITEM, P.SETITEM))
    elif case == "stand-in-in-persistent-id":
        pid = P.MARK + s("storage") + stand_in_fan() + P.TUPLE + P.BINPERSID
        write_torch_zip(path, program(model, s("w"), pid, P.SETITEM, P.SETITEM))
    elif case == "control":  # the same shard, unmodified: must still be read
        _write(path, _shard())
    else:
        raise AssertionError(case)
    return path


CASES = [
    "text",
    "device",
    "slice",
    "ordered-dict-state",
    "long-int",
    "stand-in-in-tensor-view",
    "stand-in-in-persistent-id",
]
COMMANDS = ["inspect", "convert", "verify", "export"]
CASE_TIMEOUT_S = 60

# One interpreter runs every (case, command) under a 2 GiB address-space limit, in process through click's
# CliRunner, and prints one JSON line per run (a run over CASE_TIMEOUT_S is reported and the next one runs).
_RUN = textwrap.dedent(
    """
    import json, resource, signal, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from click.testing import CliRunner
    from persimmon_tools.cli import main
    import persimmon_tools.conversion.convert, persimmon_tools.export.export
    import persimmon_tools.verification.verify

    class RunTimeout(BaseException):
        pass

    def alarm(signum, frame):
        raise RunTimeout

    signal.signal(signal.SIGALRM, alarm)
    for run in json.loads(sys.argv[1]):
        start = time.monotonic()
        signal.alarm(int(sys.argv[2]))
        out = {"id": run["id"]}
        try:
            result = CliRunner().invoke(main, run["argv"])
            out.update(
                exit_code=result.exit_code,
                stderr=result.stderr[-3000:],
                stdout=result.stdout[-3000:],
                exception=None if result.exception is None else repr(result.exception)[:500],
            )
        except RunTimeout:
            out.update(exit_code="TIMEOUT")
        finally:
            signal.alarm(0)
        out["seconds"] = round(time.monotonic() - start, 2)
        print(json.dumps(out), flush=True)
    """
)


def _argv(command: str, pt: Path, work: Path) -> list[str]:
    return {
        "inspect": ["inspect", str(pt), "--no-tensors"],
        "convert": ["convert", str(pt), str(work / "converted")],
        "verify": ["verify", str(work / "empty"), "--reference", str(pt), "--device", "cpu"],
        "export": ["export", str(pt), str(work / "exported")],
    }[command]


def _run_every_case(background, base: Path) -> dict[str, dict]:
    """A ``background`` job (tests/conftest.py): every (case, command) run in one child process;
    ``"case/command"`` -> its JSON line, with what the command left in its folder."""
    plan = []
    for case in [*CASES, "control"]:
        folder = base / case
        folder.mkdir()
        pt = write_case(case, folder / "model_optim_rng.pt")
        for command in COMMANDS if case != "control" else ["inspect"]:
            work = folder / command
            (work / "empty").mkdir(parents=True)
            plan.append({"id": f"{case}/{command}", "argv": _argv(command, pt, work), "folder": str(work)})
    repo = Path(__file__).resolve().parents[2]
    proc = background.run(
        [background.python(), "-c", _RUN, json.dumps(plan), str(CASE_TIMEOUT_S)],
        cwd=repo,
        env=background.environ,
        timeout=CASE_TIMEOUT_S * len(plan),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(p["id"] for p in plan), proc.stdout[-3000:] + proc.stderr[-3000:]
    for p in plan:
        results[p["id"]]["left"] = sorted(x.name for x in Path(p["folder"]).iterdir())
    return results


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the child that runs every case,
    and the one that runs the walkers on a million nodes, start beside the tests."""
    background.start_for(items, "runs", __name__, _run_every_case, tmp_path_factory.mktemp("shared-graphs"))
    if any(item.originalname == "test_every_walker_spends_a_budget" for item in items):
        background.started[f"{__name__}: walkers"] = background.submit(_walk_in_a_child)


@pytest.fixture(scope="module")
def runs(background) -> dict[str, dict]:
    """Every (case, command) run in one child process: ``"case/command"`` -> its JSON line."""
    return background.result(__name__)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_commands_refuse_shared_graphs_fast_and_cleanly(runs, tmp_path, case, command):
    pt = write_case(case, tmp_path / "model_optim_rng.pt")
    assert pt.stat().st_size < 1 << 20
    result = runs[f"{case}/{command}"]
    assert result["exit_code"] in (1, 2), result
    assert result["exception"] is None or result["exception"].startswith("SystemExit"), result
    assert "Traceback" not in result["stderr"] + result["stdout"], result
    error = next(line for line in result["stderr"].splitlines() if line.startswith("Error: "))
    assert "model_optim_rng.pt" in error, error
    assert "Hint: " in result["stderr"], result
    assert result["seconds"] < 10, result
    assert result["left"] == ["empty"], result  # no output folder was left behind


def test_the_unmodified_shard_is_still_read(runs):
    result = runs["control/inspect"]
    assert result["exit_code"] == 0, result
    assert "model_backend" in result["stdout"], result


# ---- the pieces, one by one ----------------------------------------------------------------------------


def _stand_in_fan(name: str, levels: int = LEVELS) -> object:
    """``megatron.x.<name>(y, y, y, y)`` nested ``levels`` deep, built directly (4**levels paths)."""
    cls = _opaque_class("megatron.x", name)
    node = cls()
    for _ in range(levels):
        node = cls(node, node, node, node)
    return node


@pytest.mark.parametrize(
    "value",
    [
        argparse.Namespace(bomb=fan([])),  # a Namespace's values were not walked by the load-time check
        slice(None, fan([])),
        fan(slice(1, 2)),
        _metadata_args(),
        [fan("A" * (32 << 10), 15)],
        _stand_in_fan("Fan", 20),  # 4**20 paths, 40 levels deep (stand-in, args tuple, stand-in, ...)
        [1 << 5000],
    ],
    ids=["namespace", "slice", "slices", "ordered-dict-state", "text", "stand-ins", "long-int"],
)
def test_the_load_time_check_sees_every_kind_of_child(value):
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"x\.pt: the pickle .*(not a tree|integer of 5,001 bits)"):
        check_tree(value, what="x.pt: the pickle", error=CheckpointError, children_of=unpickle_children)
    assert time.monotonic() - start < 2


def test_budgets_cover_a_real_shard_with_room_to_spare():
    """An 8B-sized shard: ~600 tensors in the model dict, a few hundred args fields, RNG state."""
    args = argparse.Namespace(**{f"field_{i}": [i, f"value {i}", 1.5, None] for i in range(400)})
    model = {
        "language_model": {
            "encoder": {f"layers.{i}.w{j}": ("tensor", i, j) for i in range(36) for j in range(17)}
        }
    }
    rng = {
        "random_rng_state": (3, tuple(range(625)), None),
        "np_rng_state": ("MT19937", bytes(2500), 624, 0, 0.0),
    }
    obj = {"args": args, "model": model, "rng_state": [rng], "iteration": 1251}
    nodes = check_tree(obj, what="x", error=CheckpointError, children_of=unpickle_children)
    assert nodes < MAX_TREE_NODES // 100
    assert record_args(args)["args"]["field_3"] == [3, "value 3", 1.5, None]


@pytest.mark.parametrize("name", ["Fan", "str", "list", "dict", "int"])
def test_small_repr_of_stand_ins_is_bounded_whatever_their_class_is_named(name):
    start = time.monotonic()
    text = small_repr(_stand_in_fan(name), 120)
    assert text.startswith(f"megatron.x.{name}(megatron.x.{name}(") and len(text) <= 120
    assert repr(_stand_in_fan(name)).startswith(f"megatron.x.{name}(")
    assert time.monotonic() - start < 1


def test_small_repr_is_bounded_on_chains_of_slices_and_namespaces():
    chain, ns = slice(1, 2, 3), argparse.Namespace()
    for _ in range(60):
        chain, ns = slice(chain, chain, chain), argparse.Namespace(a=ns, b=ns, c=ns, d=ns)
    start = time.monotonic()
    texts = small_repr(chain, 40), small_repr(ns, 40)  # (pytest's own repr of them would never end)
    assert texts == ("slice(slice(slice(slice(...), slice(....", "Namespace(a=Namespace(a=Namespace(a=N...")
    assert time.monotonic() - start < 1


@pytest.mark.parametrize(
    "value, shown",
    [
        (slice(None, fan([])), "slice(None, [[[...], [...]], [[...], [...]]], None)"),
        (argparse.Namespace(a=fan([])), "Namespace(a=[[[...], [...]], [[...], [...]]])"),
        (collections.OrderedDict(a=fan([])), "OrderedDict({'a': [[[...], [...]], [[...], [...]]]})"),
        (1 << 5000, "<int of 5,001 bits>"),
        ("x" * 100, repr("x" * 60) + "..."),
        ((1,), "(1,)"),
        (set(), "set()"),
        (list(range(10)), "[0, 1, 2, 3, ...]"),
    ],
)
def test_small_repr_shows_containers_a_few_levels_deep(value, shown):
    text = small_repr(value, 200)
    assert text == shown


def walker_refusals() -> list[str | None]:
    """Each walker on an object that did not come through the load-time check: the CheckpointError's text
    (None when it did not refuse). Run in a child beside the tests (a million visits each, ~1 s apiece)."""

    def refusal(walk) -> str | None:
        try:
            walk()
        except CheckpointError as err:
            return str(err)
        return None

    wide_text = ["A" * (32 << 10)] * 3000  # 96 MiB of text in 3,001 values
    budget = Budget("x.pt: ckpt['args']", CheckpointError)
    return [
        refusal(lambda: record_args(argparse.Namespace(notes=wide_text))),
        refusal(lambda: record_args(argparse.Namespace(bomb=[[0] * 1000] * 1001))),
        refusal(lambda: _canon(fan([]))),
        refusal(lambda: _canon({"seed": 1 << 5000})),
        refusal(lambda: _jsonable(fan([]), budget)),
    ]


_WALKERS = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("shared_graph_walkers", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(module.walker_refusals()))
    """
)


def _walk_in_a_child(background) -> list[str | None]:
    """A ``background`` job: :func:`walker_refusals` in a child process."""
    repo = Path(__file__).resolve().parents[2]
    env = {**background.environ, "PYTHONPATH": str(repo / "tests")}
    done = background.run([background.python(), "-c", _WALKERS, __file__], cwd=repo, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_walker_spends_a_budget(background):
    """Walks of objects that did not come through the load-time check stop too (defence in depth)."""
    expected = [
        "more than 64 MiB of text",
        "more than 1,000,000 values",
        "too large or too deeply nested to compare",
        "integer of 5,001 bits",
        r"x\.pt: ckpt\['args'\] is not a tree: it holds more than 1,000,000",
    ]
    for text, pattern in zip(background.result(f"{__name__}: walkers"), expected, strict=True):
        assert text is not None and re.search(pattern, text), (pattern, text)


def test_torch_device_is_read_as_its_name(tmp_path):
    """``torch.device`` used to map to ``str``: ``str(fan)`` inside the unpickler, ``("cuda", 0)`` refused."""
    obj = {"model": {}, "devices": [torch.device("cpu"), torch.device("cuda", 0), torch.device("meta")]}
    path = write_pt_obj(tmp_path / "model_optim_rng.pt", obj)
    loaded = load_checkpoint(ByteSource.whole_file(path)).obj["devices"]
    assert (
        loaded
        == [str(d) for d in torch.load(path, weights_only=True)["devices"]]
        == ["cpu", "cuda:0", "meta"]
    )


def test_protocol_2_python_2_names_are_mapped_as_pickle_does(tmp_path):
    """torch.save pickles with protocol 2, which names ``__builtin__.set``; torch.load maps it, so do we."""
    obj = {"model": {}, "args": argparse.Namespace(tags={"a", "b"}, window=slice(1, 9), pair=frozenset({3}))}
    path = write_pt_obj(tmp_path / "model_optim_rng.pt", obj)
    assert b"__builtin__\nset" in zipfile.ZipFile(path).read("archive/data.pkl")
    ours = load_checkpoint(ByteSource.whole_file(path))
    assert vars(ours.obj["args"]) == vars(torch.load(path, weights_only=False)["args"])
    assert ours.globals_seen["builtins.set"] == "allowed"
