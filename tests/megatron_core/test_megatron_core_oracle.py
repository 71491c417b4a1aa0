"""Megatron-Core itself as the oracle for ``torch_dist`` checkpoints (issue 25), in and out.

a. Megatron-Core 0.16.1 saves Persimmon-shaped ``GPTModel`` checkpoints the way Megatron-LM's training loop
   does (odd sizes; fp32 at TP=1 with Adam's state, bf16 at TP=2 with the ``norm_epsilon`` of Megatron-LM up
   to core 0.15, a non-default epsilon and rotary base); ``persimmon-tools convert`` reads them, and
   transformers' ``PersimmonForCausalLM`` on the output gives Megatron-Core's own logits.
b. ``persimmon-tools export --format torch_dist`` of the bundled release loads into a ``GPTModel`` with
   ``dist_checkpointing.load`` at Megatron-LM's default strictness, at TP=1 and TP=2 and with twice the
   vocabulary rows (padding), with no key left over on either side, and gives transformers' logits on the
   converted release; the export of the HF folder converted from (a)'s TP=2 checkpoint gives back the logits
   Megatron-Core saved, and its args and flags file carry the model's epsilon and rotary base.

Megatron-Core runs in one child beside the other tests (``mcore_oracle.py``, started by
``start_in_background``); the converts and exports run inside that child, between its Megatron-Core jobs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path

import pytest
from forkserver_clients import shim_folder


def _installed(dist: str) -> bool:
    """Whether ``dist`` is installed, without importing it (``find_spec("megatron.core")`` would import the
    ``megatron`` package into pytest's process, where tests/reliability checks that nothing imports it)."""
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if not _installed("megatron-core"):
    pytest.skip(
        "megatron-core is not installed (it is in the test extra: pip install -c constraints.txt -e '.[test]')",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[2]
ORACLE = Path(__file__).resolve().parent / "mcore_oracle.py"
FIXTURE_TAR = REPO / "fixtures" / "tiny_release.tar"
VOCAB = str(resources.files("persimmon_tools").joinpath("data/tiny_vocab.model"))
KEY = f"{__name__}: oracle"
TOL = 1e-5  # max |logit difference|: both sides compute in fp32

# Checkpoints Megatron-Core saves (test a): model dims, and how each is saved and converted.
SAVED = {
    "fp32-tp1": dict(
        dims=dict(layers=3, hidden=48, heads=3, ffn=136, vocab=100, seq=64),
        save=dict(dtype="fp32", seed=11, optimizer=True),
        # 100 rows: fewer than the bundled vocabulary's 600 pieces; the test compares the logits itself
        convert=["--no-tokenizer", "--no-verify"],
    ),
    "bf16-tp2": dict(
        dims=dict(layers=2, hidden=40, heads=2, ffn=88, vocab=640, seq=64, eps=1e-3, rotary_base=10000),
        save=dict(dtype="bf16", seed=12, tp=2, args_names="0.15"),
        convert=["--vocab", VOCAB],  # and the automatic verify: its own reading of a TP=2 checkpoint
    ),
}
ROUND_TRIP = "bf16-tp2"  # converted (with its tokenizer), exported, loaded again at TP=1
# The bundled release (6 layers, hidden 64, 4 heads, ffn 256, 1024 rows, bf16, iteration 1251).
TINY = dict(layers=6, hidden=64, heads=4, ffn=256, vocab=1024, seq=2048, dtype="bf16")


def _ids(vocab: int) -> list[list[int]]:
    """Two prompts of 7 tokens over the whole vocabulary."""
    return [[(7 * i * i + 3) % vocab for i in range(7)], [(vocab - 1 - 5 * i) % vocab for i in range(7)]]


def oracle_jobs(work: Path, cli: list[str]) -> tuple[list[dict], dict[str, int]]:
    """The one child's jobs, in order, and where each result lands (name -> index); ``cli`` runs
    ``persimmon-tools``."""
    jobs: list[dict] = []
    where: dict[str, int] = {}

    def _cli(*args: str) -> dict:
        return {"command": "run", "argv": [*cli, *args], "cwd": str(REPO)}

    def add(name: str, job: dict) -> None:
        where[name] = len(jobs)
        jobs.append(job)

    for name, case in SAVED.items():
        dims = case["dims"]
        add(
            f"save {name}",
            {"command": "save", "root": str(work / name), **dims, **case["save"], "ids": _ids(dims["vocab"])},
        )
    for name, case in SAVED.items():
        add(
            f"convert {name}",
            _cli("convert", str(work / name), str(work / f"{name}-hf"), "-q", *case["convert"]),
        )
    add(
        "export tar", _cli("export", str(FIXTURE_TAR), str(work / "tar-dist"), "--format", "torch_dist", "-q")
    )
    add(
        "export hf",
        _cli("export", str(work / f"{ROUND_TRIP}-hf"), str(work / "hf-dist"), "--format", "torch_dist", "-q"),
    )
    for tp in (1, 2):
        add(
            f"load tar tp{tp}",
            {"command": "load_logits", "folder": str(work / "tar-dist"), "tp": tp, **TINY, "ids": _ids(600)},
        )
    padded = {**TINY, "vocab": 2 * TINY["vocab"]}  # a TP whose vocabulary padding gives more rows
    add(
        "load tar padded",
        {"command": "load_logits", "folder": str(work / "tar-dist"), **padded, "ids": _ids(600)},
    )
    back = SAVED[ROUND_TRIP]["dims"]
    add(
        "load hf",
        {
            "command": "load_logits",
            "folder": str(work / "hf-dist"),
            **back,
            "dtype": SAVED[ROUND_TRIP]["save"]["dtype"],
            "ids": _ids(back["vocab"]),
        },
    )
    return jobs, where


def _oracle_child(background, work: Path) -> dict:
    """A ``background`` job (tests/conftest.py): ``mcore_oracle.py jobs`` in one child; name -> result."""
    shims = shim_folder(background, work.parent)  # persimmon-tools through tests/cli_forkserver.py
    cli = [str(shims / "persimmon-tools")] if shims else [sys.executable, "-m", "persimmon_tools.cli"]
    jobs, where = oracle_jobs(work, cli)
    (work / "jobs.json").write_text(json.dumps(jobs))
    done = background.run(
        [background.python(), str(ORACLE), "jobs", f"@{work / 'jobs.json'}"],
        cwd=REPO,
        env=background.environ,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Megatron-Core child failed (exit {done.returncode}):\n{done.stderr[-5000:]}")
    results = json.loads(done.stdout)["results"]
    return {name: results[i] for name, i in where.items()}


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the converted bundled release
    (transformers' side of test b), then the Megatron-Core child with every save, convert, export and load."""
    if any("converted" in item.fixturenames for item in items):
        background.converted_tiny(tmp_path_factory)
    background.started[KEY] = background.submit(_oracle_child, tmp_path_factory.mktemp("mcore_oracle"))


@pytest.fixture(scope="module")
def oracle(background) -> dict:
    return background.result(KEY)


@pytest.fixture(scope="module")
def converted(background) -> Path:
    return background.result("converted_tiny")


def _ok(result: dict, what: str) -> dict:
    assert "error" not in result, f"{what}: Megatron-Core raised:\n{result['error']}"
    assert result.get("returncode", 0) == 0, f"{what} failed:\n{result['stderr'][-3000:]}"
    return result


def _transformers_logits(folder: Path, ids: list[list[int]]):
    import torch
    from transformers import PersimmonForCausalLM

    model = PersimmonForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def _assert_close(got, want, what: str) -> None:
    import torch

    got, want = torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32)
    assert got.shape == want.shape, what
    # not vacuous: real logits, different per prompt and per position
    assert want.abs().max() > 0.1 and (want[0] - want[1]).abs().max() > 1e-2, what
    assert (want[:, 1:] - want[:, :-1]).abs().amax(dim=-1).min() > 1e-3, what
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{what}: max |logit difference| {diff:.3g} > {TOL}"


@pytest.mark.parametrize("name", list(SAVED))
def test_convert_reads_what_megatron_core_saves(name, oracle):
    pytest.importorskip("transformers")
    saved = _ok(oracle[f"save {name}"], f"saving {name}")
    case = SAVED[name]
    ranks = case["save"].get("tp", 1)
    assert {f"__{r}_{t}.distcp" for r in range(ranks) for t in (0, 1)} <= set(saved["files"])
    assert {".metadata", "common.pt", "metadata.json"} <= set(saved["files"])
    _ok(oracle[f"convert {name}"], f"convert {name}")
    hf = Path(saved["folder"]).parent.parent / f"{name}-hf"
    config = json.loads((hf / "config.json").read_text())
    dims = case["dims"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (
        dims["layers"],
        dims["hidden"],
        dims["heads"],
    )
    assert (config["intermediate_size"], config["vocab_size"]) == (dims["ffn"], dims["vocab"])
    assert (config["layer_norm_eps"], config["rope_theta"]) == (
        dims.get("eps", 1e-5),
        dims.get("rotary_base", 25000),
    )
    assert (config["partial_rotary_factor"], config["max_position_embeddings"]) == (0.5, dims["seq"])
    _assert_close(
        _transformers_logits(hf, _ids(dims["vocab"])), saved["logits"], f"{name}: transformers vs GPTModel"
    )


def _assert_clean_load(loaded: dict, what: str) -> None:
    assert loaded["checkpoint_only_keys"] == [], f"{what}: in the checkpoint, not loaded"
    assert loaded["model_only_keys"] == [], f"{what}: not in the checkpoint"
    assert loaded["module_missing"] == [] and loaded["module_unexpected"] == [], what


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_loads_the_export_of_the_bundled_release(tp, oracle, converted):
    pytest.importorskip("transformers")
    _ok(oracle["export tar"], "export --format torch_dist")
    loaded = _ok(oracle[f"load tar tp{tp}"], f"loading the export at TP={tp}")
    _assert_clean_load(loaded, f"TP={tp}")
    common = loaded["common"]
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 1251
    assert common["args_type"] == "argparse.Namespace"
    args = common["args"]
    assert {k: args.get(k) for k in ("num_layers", "hidden_size", "num_attention_heads")} == {
        "num_layers": TINY["layers"],
        "hidden_size": TINY["hidden"],
        "num_attention_heads": TINY["heads"],
    }  # what Megatron-LM's check_checkpoint_args asserts against the run's flags
    assert (args.get("ffn_hidden_size"), args.get("padded_vocab_size")) == (TINY["ffn"], TINY["vocab"])
    want = _transformers_logits(converted, _ids(600))
    _assert_close(loaded["logits"], want, f"GPTModel at TP={tp} on the export vs transformers on the release")


def test_megatron_core_pads_the_vocabulary_of_the_export(oracle, converted):
    """A GPTModel with twice the checkpoint's vocabulary rows (Megatron-LM's padding at a larger TP) loads
    the export: the checkpoint's rows give transformers' logits."""
    pytest.importorskip("transformers")
    _ok(oracle["export tar"], "export --format torch_dist")
    loaded = _ok(oracle["load tar padded"], "loading the export into a larger vocabulary")
    _assert_clean_load(loaded, "padded vocabulary")
    logits = loaded["logits"]
    assert len(logits[0][0]) == 2 * TINY["vocab"]
    got = [[row[: TINY["vocab"]] for row in prompt] for prompt in logits]
    _assert_close(got, _transformers_logits(converted, _ids(600)), "the checkpoint's rows vs transformers")


def _flags(path: Path) -> dict[str, str | None]:
    """``megatron_lm_args.txt``: flag -> its value (None for a switch)."""
    words, flags = path.read_text().split(), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            flags[word] = value
    return flags


def test_megatron_core_loads_the_export_of_an_hf_folder(oracle):
    """Megatron-Core (TP=2) -> convert -> export -> Megatron-Core (TP=1): the model it saved comes back, with
    its non-default epsilon and rotary base in the args and in the flags that build it."""
    saved = _ok(oracle[f"save {ROUND_TRIP}"], f"saving {ROUND_TRIP}")
    _ok(oracle[f"convert {ROUND_TRIP}"], f"convert {ROUND_TRIP}")
    _ok(oracle["export hf"], "export --format torch_dist of the converted folder")
    loaded = _ok(oracle["load hf"], "loading the export")
    _assert_clean_load(loaded, "HF export")
    _assert_close(loaded["logits"], saved["logits"], "GPTModel on the round trip vs GPTModel saved")
    dims, args = SAVED[ROUND_TRIP]["dims"], loaded["common"]["args"]
    eps = args.get("layernorm_epsilon", args.get("norm_epsilon"))
    assert (eps, args.get("rotary_base"), args.get("rotary_percent")) == (
        dims["eps"],
        dims["rotary_base"],
        0.5,
    )
    flags = _flags(Path(saved["folder"]).parent.parent / "hf-dist" / "megatron_lm_args.txt")
    assert (
        float(flags["--norm-epsilon"]) == dims["eps"] and int(flags["--rotary-base"]) == dims["rotary_base"]
    )
    assert {f: int(flags[f]) for f in ("--num-layers", "--hidden-size", "--num-attention-heads")} == {
        "--num-layers": dims["layers"],
        "--hidden-size": dims["hidden"],
        "--num-attention-heads": dims["heads"],
    }
    assert int(flags["--ffn-hidden-size"]) == dims["ffn"] and "--qk-layernorm" in flags
