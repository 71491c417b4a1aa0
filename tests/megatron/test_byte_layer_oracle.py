"""The one byte layer against outside oracles: ``torch.load`` and ``tarfile``, on every synthetic layout.

convert, inspect, export and verify's reference side all read checkpoints through
:mod:`persimmon_tools.megatron` (tar listing, torch zip records, restricted unpickler, lazy tensors, release
discovery). Its independence is here: for TP 1/2/4/8 x PP 1/2/3 (bf16 tarballs) and for bf16/fp16/fp32 x
tar/folder/``iter_*``/single ``.pt``, every shard is decoded by ``torch.load`` in one subprocess beside the tests (ADEPT's
``ModelBackend`` enum stubbed with ``sys.modules`` entries; nothing of persimmon_tools imported there), tar
members are listed and extracted with Python's ``tarfile``, and the byte layer must give the same members
and byte ranges, the same shard grid, and per shard the same tensor keys, shapes, dtypes and raw bytes, the
same ``args`` and the same ``iteration``. A last test breaks the byte layer on purpose and checks that
the comparison notices.
"""

from __future__ import annotations

import argparse
import enum
import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from persimmon_tools.megatron.lazy import LazyTensor
from persimmon_tools.megatron.release import open_release
from persimmon_tools.megatron.tarlist import tar_tree
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.megatron.unpickle import Opaque
from persimmon_tools.synth.build import ReleaseOptions, build_release, make_release, write_release_folder

ITER = "iter_0001251"
HEADS = 8  # the tiny preset with 8 heads, so that TP=8 divides them
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GRID = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 3)]
KINDS = ("tar", "folder", "iteration", "pt")
# Every TP x PP in one dtype and layout; every dtype x layout on TP=2 x PP=2 (one folder per dtype serves
# the folder, iter_* and single-.pt cases; the .pt is its first shard, read as a TP=1 x PP=1 release).
CASES = [("bf16", "tar", tp, pp) for tp, pp in GRID] + [
    (d, k, 2, 2) for d in DTYPES for k in KINDS if (d, k) != ("bf16", "tar")
]
PT_SHARD = f"{ITER}/mp_rank_00_000/model_optim_rng.pt"

# Runs in a fresh interpreter, started first so that importing torch overlaps with writing the releases:
# torch.load and tarfile only, ADEPT's enum stubbed as its own module. Reads the jobs from stdin; writes
# meta.json (listings, args, tensor index) and blob.bin (every tensor's and small file's raw bytes).
_ORACLE = textwrap.dedent(
    """
    import enum, io, json, sys, tarfile, types
    from pathlib import Path
    import torch

    class ModelBackend(enum.Enum):
        MEGATRON = "megatron"

    NAME = "tool_use.megatron.megatron_utils"
    for name in ("tool_use", "tool_use.megatron"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules[NAME] = types.ModuleType(NAME)
    sys.modules[NAME].ModelBackend = ModelBackend
    ModelBackend.__module__ = NAME
    out = Path(sys.argv[1])
    blob = open(out / "blob.bin", "wb")

    def put(data):
        at = blob.tell()
        blob.write(data)
        return [at, len(data)]

    def plain(v):
        if isinstance(v, torch.dtype):
            return "dtype:" + str(v)
        if isinstance(v, enum.Enum):
            return f"{type(v).__module__}.{type(v).__qualname__}:{v.value!r}"
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    def tensors(obj, prefix, index):
        if isinstance(obj, torch.Tensor):
            raw = obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            index[prefix] = [list(obj.shape), str(obj.dtype), *put(raw)]
        elif isinstance(obj, dict):
            for k, v in obj.items():
                tensors(v, f"{prefix}.{k}" if prefix else str(k), index)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                tensors(v, f"{prefix}.{i}" if prefix else str(i), index)
        return index

    def decode(data):
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        return {
            "top": sorted(ckpt),
            "iteration": ckpt["iteration"],
            "checkpoint_version": ckpt.get("checkpoint_version"),
            "args": {k: plain(v) for k, v in sorted(vars(ckpt["args"]).items())},
            "tensors": tensors(ckpt, "", {}),
        }

    jobs, results = json.load(sys.stdin), {}
    for job in jobs:
        if job["kind"] == "tar":
            with tarfile.open(job["path"]) as tf:
                members = [m for m in tf.getmembers() if m.isreg()]
                files = {m.name: tf.extractfile(m).read() for m in members}
            results[job["id"]] = {
                "members": [[m.name, m.offset_data, m.size] for m in members],
                "files": {n: put(d) for n, d in files.items() if not n.endswith(".pt")},
                "shards": {n: decode(d) for n, d in files.items() if n.endswith(".pt")},
            }
        else:
            results[job["id"]] = {"shards": {p: decode(open(p, "rb").read()) for p in job["files"]}}
    blob.close()
    (out / "meta.json").write_text(json.dumps(results))
    """
)


def _case_id(case: tuple) -> str:
    dtype, kind, tp, pp = case
    return f"{dtype}-{kind}-tp{tp}pp{pp}"


def _rank_dir(tp: int, pp: int, t: int, p: int) -> str:
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")


def _expected_shards(tp: int, pp: int) -> dict[tuple[int, int], str]:
    """The layout the synthetic release is written in (spec §A), relative to the release folder."""
    return {
        (t, p): f"{ITER}/{_rank_dir(tp, pp, t, p)}/model_optim_rng.pt" for t in range(tp) for p in range(pp)
    }


def write_cases(base: Path) -> tuple[dict[str, str], list[dict]]:
    """Every case's release written under ``base``: (case id -> source path, the oracle's jobs)."""
    sources, folders, jobs = {}, {}, []
    for case in CASES:
        dtype, kind, tp, pp = case
        name = f"{dtype}_tp{tp}pp{pp}_release"
        if kind == "tar":
            source = make_release(
                base / f"{name}.tar",
                ReleaseOptions(tp=tp, pp=pp, dtype=DTYPES[dtype], overrides={"heads": HEADS}),
            )
            jobs.append({"id": _case_id(case), "kind": "tar", "path": str(source)})
        else:
            if name not in folders:
                rel = build_release(tp=tp, pp=pp, dtype=DTYPES[dtype], heads=HEADS)
                folders[name] = write_release_folder(rel, base / name)
            folder = folders[name]
            source = {"folder": folder, "iteration": folder / ITER, "pt": folder / PT_SHARD}[kind]
            files = [str(folder / rel) for rel in _expected_shards(tp, pp).values()]
            files = [str(source)] if kind == "pt" else files
            jobs.append({"id": _case_id(case), "kind": "files", "files": files})
        sources[_case_id(case)] = str(source)
    return sources, jobs


# Writes the releases in a child of its own (this module's write_cases), so that pytest's process does not.
_WRITER = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("byte_layer_oracle_cases", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(module.write_cases(Path(sys.argv[2]))))
    """
)


def _decode_every_case(background, base: Path) -> dict[str, Any]:
    """A ``background`` job (tests/conftest.py): every case written once by one child, then decoded by
    torch.load / tarfile in ONE other child (started first, so that its torch import overlaps the writing)."""
    popen = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    oracle_args = [background.python(), "-c", _ORACLE, str(base)]
    with background.spawn(oracle_args, cwd=base, env=background.environ, **popen) as proc:
        written = background.run(
            [background.python(), "-c", _WRITER, __file__, str(base)],
            cwd=base,
            env=background.environ,
            timeout=300,
        )
        assert written.returncode == 0, written.stderr[-3000:]
        sources, jobs = json.loads(written.stdout)
        _, err = proc.communicate(json.dumps(jobs), timeout=120)
    assert proc.returncode == 0, err[-3000:]
    meta = json.loads((base / "meta.json").read_text())
    sources = {case: Path(path) for case, path in sources.items()}
    return {"sources": sources, "results": meta, "blob": (base / "blob.bin").read_bytes()}


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: writing and decoding every case
    runs in children beside the tests."""
    background.start_for(items, "oracle", __name__, _decode_every_case, tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="module")
def oracle(background) -> dict[str, Any]:
    """Every case written once, then decoded by torch.load / tarfile in ONE subprocess."""
    return background.result(__name__)


def _plain(v: Any) -> Any:
    """Args values as the oracle spells them (ADEPT's enum: its stand-in's name and value)."""
    if isinstance(v, torch.dtype):
        return "dtype:" + str(v)
    if isinstance(v, Opaque):
        return f"{v.qualname}:{v.value!r}"
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _lazy_tensors(obj: Any, prefix: str, out: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    if isinstance(obj, LazyTensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _lazy_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _lazy_tensors(v, f"{prefix}.{i}" if prefix else str(i), out)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _raw(blob: bytes, at: int, size: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob[at : at + size]), dtype=torch.uint8)


def _same_shard(src, want: dict, blob: bytes, label: str) -> None:
    """One shard through the byte layer equals torch.load's decoding of the same bytes."""
    obj = load_checkpoint(src).obj
    assert sorted(obj) == want["top"], label
    assert (
        obj["iteration"] == want["iteration"] and obj.get("checkpoint_version") == want["checkpoint_version"]
    )
    assert isinstance(obj["args"], argparse.Namespace), label
    assert {k: _plain(v) for k, v in sorted(vars(obj["args"]).items())} == want["args"], label
    got = _lazy_tensors(obj, "", {})
    assert sorted(got) == sorted(want["tensors"]), label
    for key, (shape, dtype, at, size) in want["tensors"].items():
        lazy, expected = got[key], _raw(blob, at, size)
        assert (list(lazy.shape), str(lazy.dtype)) == (shape, dtype), (label, key)
        assert torch.equal(_bits(lazy.materialize()), expected), (label, key)
        if len(shape) == 2 and shape[0] > 3:  # row reads, as convert streams them
            row = size // shape[0]
            assert torch.equal(_bits(lazy.read_rows(1, 3)), expected[row : 3 * row]), (label, key)


def _check_case(case: tuple, oracle: dict[str, Any]) -> None:
    dtype, kind, tp, pp = case
    source, want, blob = oracle["sources"][_case_id(case)], oracle["results"][_case_id(case)], oracle["blob"]
    release = open_release(source)
    tp, pp = (1, 1) if kind == "pt" else (tp, pp)
    assert (release.kind, release.iteration, release.tp, release.pp) == (kind, 1251, tp, pp)
    if kind == "tar":
        listed = tar_tree(source)
        members = {name: (offset, size) for name, offset, size in want["members"]}
        assert {n: (s.offset, s.size) for n, s in listed.items()} == members  # tarfile's own listing
        top = next(iter(members)).split("/", 1)[0]
        shards = {rank: f"{top}/{rel}" for rank, rel in _expected_shards(tp, pp).items()}
        assert {r: (s.offset, s.size) for r, s in release.shards.items()} == {
            r: members[m] for r, m in shards.items()
        }
        vocab = _raw(blob, *want["files"][f"{top}/adept_vocab.model"])
        assert release.vocab is not None and torch.equal(
            torch.frombuffer(bytearray(release.vocab.read_all()), dtype=torch.uint8), vocab
        )
        for rank, member in shards.items():
            _same_shard(release.shards[rank], want["shards"][member], blob, f"{source}:{member}")
        return
    root = source if kind == "folder" else source.parent if kind == "iteration" else source.parents[2]
    shards = {rank: root / rel for rank, rel in _expected_shards(tp, pp).items()}
    shards = {(0, 0): source} if kind == "pt" else shards
    assert {r: (s.path, s.offset, s.size) for r, s in release.shards.items()} == {
        r: (p, 0, p.stat().st_size) for r, p in shards.items()
    }
    for rank, path in shards.items():
        _same_shard(release.shards[rank], want["shards"][str(path)], blob, str(path))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_byte_layer_reads_what_torch_load_and_tarfile_read(case, oracle):
    _check_case(case, oracle)


def test_the_comparison_notices_a_byte_layer_that_misreads(oracle, monkeypatch):
    """Not vacuous: tensors read one element off, or an enum read as another value, fail the comparison."""
    import persimmon_tools.megatron.lazy as lazy

    case = ("bf16", "tar", 2, 2)
    _check_case(case, oracle)  # control
    real = lazy.LazyTensor.byte_offset
    with monkeypatch.context() as patch:
        patch.setattr(
            lazy.LazyTensor, "byte_offset", property(lambda self: real.fget(self) + self.dtype.itemsize)
        )
        with pytest.raises(AssertionError):
            _check_case(case, oracle)

    class Other(enum.Enum):
        X = "other"

    with monkeypatch.context() as patch:
        patch.setattr(Opaque, "value", property(lambda self: Other.X.value))
        with pytest.raises(AssertionError):
            _check_case(case, oracle)
