"""An exported release loads without the toolkit or ADEPT's code (issue 17, "Done when" 2).

Every shard loads with plain ``torch.load(weights_only=False)`` in a process where ``persimmon_tools``,
``tool_use`` and ``megatron`` cannot be imported, and holds the keys and shapes ADEPT's model at that TP/PP
expects (computed here from the preset's dimensions); the toolkit's restricted loader, ``inspect``,
``unpack`` and ``convert`` read the output too.

The grid of exports is made in a child beside the other tests, and so is the process that loads it without
the toolkit (``start_in_background``); the other readers run in process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from export_helpers import TINY, assert_same_hf, expected_shard, shard_paths

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.torchzip import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 3)]

# Runs in a fresh interpreter: blocks the toolkit and ADEPT before torch is imported, loads every shard
# named in argv[1] (a file, or "TAR::MEMBER"), prints keys, shapes, dtypes and args as JSON.
LOADER = r"""
import importlib.abc, io, json, sys
BLOCKED = ("persimmon_tools", "tool_use", "megatron")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable")

import tarfile, torch

def walk(obj, prefix=""):
    for k, v in obj.items():
        if isinstance(v, dict):
            yield from walk(v, prefix + k + ".")
        else:
            yield prefix + k, v

out = {}
for spec in json.loads(sys.argv[1]):
    if "::" in spec:
        tar, member = spec.split("::")
        with tarfile.open(tar) as tf:
            data = io.BytesIO(tf.extractfile(member).read())
    else:
        data = spec
    obj = torch.load(data, weights_only=False, map_location="cpu")
    args = vars(obj["args"])
    out[spec] = {
        "top": sorted(obj),
        "encoder_type": type(obj["model"]["language_model"]["encoder"]).__name__,
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in walk(obj["model"])},
        "args_types": sorted({type(v).__module__ + "." + type(v).__name__ for v in args.values()}),
        "args": {k: args[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                     "padded_vocab_size", "model_backend", "num_layers")},
        "params_dtype": str(args["params_dtype"]),
        "iteration": obj["iteration"],
        "checkpoint_version": obj["checkpoint_version"],
    }
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"shards": out, "leaked": leaked}))
"""


# Runs in a fresh interpreter: the fixture ``exported`` below, made beside the tests. argv: the folder, then
# [tp, pp, path, tar] for each layout.
EXPORT_GRID = r"""
import json, sys
from pathlib import Path
import torch
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.synth.build import ReleaseOptions, make_release

base = Path(sys.argv[1])
rel = make_release(base / "src.tar", ReleaseOptions(dtype=torch.float16, seed=2))
hf = base / "src_hf"
convert(rel, hf, ConvertOptions())
for tp, pp, path, tar in json.loads(sys.argv[2]):
    export_release(hf, Path(path), ExportOptions(tp=tp, pp=pp, tar=tar, name="rel"))
"""


def _export_grid(background, base: Path) -> dict:
    """A ``background`` job (tests/conftest.py): ``EXPORT_GRID`` in a child; the ``exported`` fixture."""
    out = {"hf": base / "src_hf"}
    layouts = []
    for tp, pp in LAYOUTS:
        tar = tp != 2
        path = base / (f"tp{tp}pp{pp}.tar" if tar else f"tp{tp}pp{pp}")
        layouts.append([tp, pp, str(path), tar])
        out[(tp, pp)] = path
    done = background.run(
        [background.python(), "-c", EXPORT_GRID, str(base), json.dumps(layouts)],
        cwd=REPO,
        env=background.environ,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"exporting the grid failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return out


def _shard_specs(path, tp, pp):
    specs = {}
    for rel, rank in shard_paths(1251, tp, pp).items():
        specs[f"{path}::rel/{rel}" if path.is_file() else str(path / "rel" / rel)] = rank
    return specs


def _all_specs(exported) -> dict[str, tuple[int, ...]]:
    """Every shard of every layout, as ``LOADER`` names it -> (tp, pp, tp rank, pp stage)."""
    specs = {}
    for tp, pp in LAYOUTS:
        for spec, rank in _shard_specs(exported[(tp, pp)], tp, pp).items():
            specs[spec] = (tp, pp, *rank)
    return specs


def _load_without_the_toolkit(background, grid_started) -> subprocess.CompletedProcess:
    """A ``background`` job: ``LOADER`` on every shard of the exported grid, in a child without PYTHONPATH."""
    exported = grid_started.result()
    env = {k: v for k, v in background.environ.items() if k != "PYTHONPATH"}
    return background.run(
        [sys.executable, "-c", LOADER, json.dumps(sorted(_all_specs(exported)))],
        cwd=exported["hf"].parent,
        env=env,
        timeout=300,
    )


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the grid is exported in a child
    beside the tests, then the child that loads it without the toolkit runs there too."""
    if not any("exported" in item.fixturenames for item in items):
        return
    grid = background.submit(_export_grid, tmp_path_factory.mktemp("export_load"))
    background.started[f"{__name__}: exported"] = grid
    if any(
        item.originalname == "test_every_shard_loads_without_the_toolkit_and_has_adepts_layout"
        for item in items
    ):
        background.started[f"{__name__}: loader"] = background.submit(_load_without_the_toolkit, grid)


@pytest.fixture(scope="module")
def exported(background):
    """The tiny fp16 model exported at every layout of the grid: TP1/TP4 as tarballs, TP2 as folders (made in a
    child beside the tests: ``start_in_background``)."""
    return background.result(f"{__name__}: exported")


def test_every_shard_loads_without_the_toolkit_and_has_adepts_layout(exported, background):
    """The loading child ran beside the tests (``start_in_background``)."""
    specs = _all_specs(exported)
    proc = background.result(f"{__name__}: loader")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["leaked"] == []
    assert sorted(report["shards"]) == sorted(specs)
    for spec, (tp, pp, _t, s) in specs.items():
        got = report["shards"][spec]
        assert got["top"] == ["args", "checkpoint_version", "iteration", "model"], spec
        assert got["encoder_type"] == "OrderedDict"
        want = expected_shard(TINY, tp, pp, s)
        assert {k: v[0] for k, v in got["tensors"].items()} == want, spec
        assert {v[1] for v in got["tensors"].values()} == {"torch.float16"}
        assert got["args"] == {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "padded_vocab_size": TINY["V"],
            "model_backend": "megatron",
            "num_layers": TINY["L"],
        }
        assert got["params_dtype"] == "torch.float16"
        assert set(got["args_types"]) <= {
            "builtins.int",
            "builtins.float",
            "builtins.str",
            "builtins.bool",
            "builtins.NoneType",
            "torch.dtype",
        }, got["args_types"]
        assert got["iteration"] == 1251 and got["checkpoint_version"] == 3.0


@pytest.mark.parametrize("layout", [(2, 1), (2, 3)], ids=str)
def test_restricted_loader_reads_every_shard(layout, exported):
    tp, pp = layout
    path = exported[layout]
    for rel, (_, s) in shard_paths(1251, tp, pp).items():
        loaded = load_checkpoint(ByteSource.whole_file(path / "rel" / rel))
        assert sorted(loaded.obj) == ["args", "checkpoint_version", "iteration", "model"]
        assert not [g for g in loaded.globals_seen if g.split(".")[0] in ("tool_use", "megatron")]
        assert "argparse.Namespace" in loaded.globals_seen
        encoder = loaded.obj["model"]["language_model"]["encoder"]
        want = expected_shard(TINY, tp, pp, s)
        assert {f"language_model.encoder.{k}": list(v.shape) for k, v in encoder.items()} == {
            k: v for k, v in want.items() if k.startswith("language_model.encoder.")
        }


@pytest.mark.parametrize("layout", [(4, 3), (2, 2)], ids=str)
def test_inspect_reads_the_export(layout, exported):
    tp, pp = layout
    result = CliRunner().invoke(main, ["inspect", str(exported[layout]), "--json", "--no-tensors"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["type"], info["tp"], info["pp"], info["iteration"]) == ("release", tp, pp, 1251)
    assert info["kind"] == ("tar" if exported[layout].is_file() else "folder")
    assert len(info["shards"]) == tp * pp


def test_unpack_and_convert_read_the_tarball(exported, tmp_path):
    tar = exported[(4, 3)]
    dest = tmp_path / "unpacked"
    result = CliRunner().invoke(main, ["unpack", str(tar), str(dest), "--json"])
    assert result.exit_code == 0, result.output
    with tarfile.open(tar) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    assert all(n.startswith("rel/") for n in members)
    assert {n: (dest / n).read_bytes() for n in members} == members
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(members)
    for source in (tar, dest / "rel"):
        back = tmp_path / f"back_{source.name}"
        convert(source, back, ConvertOptions(tokenizer=False))
        assert_same_hf(exported["hf"], back)
