"""Export round trips (issue 17, "Done when" 1): exact, CPU, offline.

a. release -> convert -> export at the release's layout gives the release's ``model`` tensors (names,
   nesting, dtypes, bytes), args (``model_backend`` as its plain value), iteration and checkpoint_version;
b. HF -> export at any layout -> convert gives bit-identical safetensors;
c. a Megatron TP=4 source exported at another layout (a reshard) converts to what the source converts to.

The full TP x PP grid runs for bf16, a diagonal for fp16 and fp32.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from export_helpers import DTYPES, assert_same_hf, flat, read_release, same_bits, structure

from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.synth.build import ReleaseOptions, build_release, make_release, write_release_folder

GRID = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 3)]
DIAGONAL = [(1, 1), (2, 2), (4, 3)]
CASES = [(tp, pp, "bf16") for tp, pp in GRID] + [
    (tp, pp, dt) for dt in ("fp16", "fp32") for tp, pp in DIAGONAL
]
NO_TOKENIZER = ConvertOptions(tokenizer=False)
REPO = Path(__file__).resolve().parents[2]


def _id(case):
    tp, pp, dt = case
    return f"tp{tp}-pp{pp}-{dt}"


def make_sources(work: Path) -> None:
    """What the tests start from, made in a child beside the tests (``start_in_background``): per case a
    release (seed 1) and its conversion (``a_<case>.tar``, ``a_<case>_hf``); per dtype a TP1 PP1 release
    (seed 3) converted with its tokenizer (``src_<dt>_hf``); a TP=4 bf16 release (seed 5) as a tar, as an
    extracted folder, and converted without tokenizer (``tp4_*``)."""
    for case in CASES:
        tp, pp, dt = case
        rel = make_release(
            work / f"a_{_id(case)}.tar", ReleaseOptions(tp=tp, pp=pp, dtype=DTYPES[dt], seed=1)
        )
        convert(rel, work / f"a_{_id(case)}_hf", ConvertOptions())
    for dt in DTYPES:
        rel = make_release(work / f"src_{dt}.tar", ReleaseOptions(tp=1, pp=1, dtype=DTYPES[dt], seed=3))
        convert(rel, work / f"src_{dt}_hf", ConvertOptions())
    tar = make_release(work / "tp4_release.tar", ReleaseOptions(tp=4, pp=1, seed=5))
    write_release_folder(build_release(tp=4, pp=1, seed=5), work / "tp4_folder" / "tp4_release")
    convert(tar, work / "tp4_hf", NO_TOKENIZER)


_SOURCES_CHILD = textwrap.dedent(
    """
    import importlib.util, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("export_round_trip_sources", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_sources(Path(sys.argv[2]))
    """
)


def _sources_in_a_child(background, work: Path) -> Path:
    """A ``background`` job (tests/conftest.py): :func:`make_sources` in a child process."""
    done = background.run(
        [background.python(), "-c", _SOURCES_CHILD, __file__, str(work)],
        cwd=REPO,
        env={**background.environ, "PYTHONPATH": str(REPO / "tests" / "export")},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the sources of every test here
    are made in a child beside the tests (``make_sources``)."""
    background.start_for(
        items, "work", f"{__name__}: sources", _sources_in_a_child, tmp_path_factory.mktemp("export_rt")
    )


@pytest.fixture(scope="module")
def work(background):
    """The folder :func:`make_sources` filled (each test writes its own outputs beside them)."""
    return background.result(f"{__name__}: sources")


@pytest.fixture(scope="module")
def hf_source(work):
    """dtype name -> an HF folder converted (with its tokenizer) from a TP1 PP1 release of that dtype."""
    return lambda dt: work / f"src_{dt}_hf"


def _assert_same_release(src_path, out_path, *, same_name=True):
    """Every shard of ``out_path`` holds what the same shard of ``src_path`` holds (see module docstring)."""
    name_a, shards_a, small_a = read_release(src_path)
    name_b, shards_b, small_b = read_release(out_path)
    if same_name:
        assert name_a == name_b
    assert sorted(shards_a) == sorted(shards_b)
    assert small_b["adept_vocab.model"] == small_a["adept_vocab.model"]
    assert small_b["latest_checkpointed_iteration.txt"] == small_a["latest_checkpointed_iteration.txt"]
    for rel, a in shards_a.items():
        b = shards_b[rel]
        assert set(b) == {"args", "checkpoint_version", "iteration", "model"}, rel  # no optimizer / rng
        assert structure(b["model"]) == structure(a["model"]), rel
        fa, fb = flat(a["model"]), flat(b["model"])
        assert [k for k in fa if not same_bits(fa[k], fb[k])] == [], rel
        assert b["iteration"] == a["iteration"] and type(b["iteration"]) is int
        assert b["checkpoint_version"] == a["checkpoint_version"]
        va, vb = vars(a["args"]), vars(b["args"])
        assert sorted(va) == sorted(vb), set(va) ^ set(vb)
        assert va["model_backend"].value == "megatron" and vb["model_backend"] == "megatron"
        diff = {k: (va[k], vb[k]) for k in va if k != "model_backend" and va[k] != vb[k]}
        assert diff == {}, (rel, diff)
        assert all(type(va[k]) is type(vb[k]) for k in va if k != "model_backend"), rel


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_release_convert_export_gives_the_release_back(case, work):
    tp, pp, dt = case
    rel, hf = work / f"a_{_id(case)}.tar", work / f"a_{_id(case)}_hf"  # made by make_sources
    out = work / f"a_{_id(case)}_out"
    result = export_release(hf, out, ExportOptions(tp=tp, pp=pp))
    assert result.plan.source.args_from == "conversion.json"
    assert result.plan.derived == []
    _assert_same_release(rel, out)
    _, shards, _ = read_release(out)
    for obj in shards.values():  # module order: layer by layer, as ADEPT's state_dict
        layers = [
            int(k.split(".")[1]) for k in obj["model"]["language_model"]["encoder"] if k[:7] == "layers."
        ]
        assert layers == sorted(layers)
    record = json.loads((out / "export.json").read_text())
    assert sorted(record["output_files"]) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_hf_export_convert_is_bit_identical(case, hf_source, work):
    tp, pp, dt = case
    hf = hf_source(dt)
    tar = (tp + pp) % 2 == 0
    out = work / (f"b_{_id(case)}.tar" if tar else f"b_{_id(case)}_out")
    export_release(hf, out, ExportOptions(tp=tp, pp=pp, tar=tar))
    back = work / f"b_{_id(case)}_hf"
    convert(out, back, NO_TOKENIZER)
    assert_same_hf(hf, back)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


@pytest.fixture(scope="module")
def tp4(work):
    """A TP=4 bf16 release (tar and extracted folder) and its conversion (made by ``make_sources``)."""
    folder = work / "tp4_folder" / "tp4_release"
    return {
        "tar": work / "tp4_release.tar",
        "folder": folder,
        "iter": folder / "iter_0001251",
        "hf": work / "tp4_hf",
    }


@pytest.mark.parametrize(
    "kind, tp, pp", [("tar", 1, 1), ("tar", 2, 3), ("folder", 2, 3), ("iter", 1, 2)], ids=str
)
def test_megatron_reshard_converts_like_the_source(kind, tp, pp, tp4, work):
    out = work / f"c_{kind}_{tp}{pp}.tar"
    result = export_release(tp4[kind], out, ExportOptions(tp=tp, pp=pp, tar=True))
    assert result.plan.source.kind == "megatron" and result.plan.source.tp == 4
    assert result.plan.name == "tp4_release"
    back = work / f"c_{kind}_{tp}{pp}_hf"
    convert(out, back, NO_TOKENIZER)
    assert_same_hf(tp4["hf"], back)
    # args: the source's, with the new layout's sizes and ranks
    _, src_shards, _ = read_release(tp4["tar"])
    _, shards, _ = read_release(out)
    src_args = vars(next(iter(src_shards.values()))["args"])
    assert len(shards) == tp * pp
    for rel, obj in shards.items():
        args = vars(obj["args"])
        t = int(rel.split("mp_rank_")[1][:2])
        s = int(rel.split("mp_rank_")[1][3:6]) if pp > 1 else 0
        assert args["tensor_model_parallel_size"] == tp and args["pipeline_model_parallel_size"] == pp
        assert args["rank"] == t + tp * s and args["world_size"] == tp * pp
        same = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "rank", "local_rank"}
        same |= {"world_size", "model_backend"}
        assert {k: v for k, v in args.items() if k not in same} == {
            k: v for k, v in src_args.items() if k not in same
        }
        assert obj["iteration"] == 1251 and obj["checkpoint_version"] == 3.0


def test_megatron_reshard_same_layout_is_the_source(tp4, work):
    """TP=4 -> TP=4 straight from the Megatron source: every shard equals the source's shard."""
    out = work / "c_same.tar"
    export_release(tp4["tar"], out, ExportOptions(tp=4, pp=1, tar=True))
    _assert_same_release(tp4["tar"], out)


def test_export_iteration_and_name_options(hf_source, work):
    out = work / "opts_out"
    export_release(hf_source("bf16"), out, ExportOptions(iteration=7, name="renamed"))
    name, shards, small = read_release(out)
    assert name == "renamed"
    assert list(shards) == ["iter_0000007/mp_rank_00/model_optim_rng.pt"]
    assert small["latest_checkpointed_iteration.txt"] == b"7"
    obj = shards["iter_0000007/mp_rank_00/model_optim_rng.pt"]
    assert obj["iteration"] == 7 and obj["args"].iteration == 7


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_dtype_option_casts_and_sets_args(dt, hf_source, work):
    out = work / f"dtype_{dt}.tar"
    export_release(hf_source("bf16"), out, ExportOptions(dtype=dt, tar=True))
    _, shards, _ = read_release(out)
    (obj,) = shards.values()
    want = DTYPES[dt]
    assert {t.dtype for t in flat(obj["model"]).values()} == {want}
    assert obj["args"].params_dtype == want
    assert obj["args"].bf16 is False and obj["args"].fp16 is (dt == "fp16")
    # bf16 -> fp32 is exact: converting back at bf16 gives the source's tensors
    if dt == "fp32":
        back = work / "dtype_fp32_hf"
        convert(out, back, ConvertOptions(dtype="bf16", tokenizer=False))
        assert_same_hf(hf_source("bf16"), back)
