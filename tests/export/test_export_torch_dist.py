"""``export --format torch_dist`` (issue 25): a Megatron-Core ``torch_dist`` checkpoint, checked with torch's
own loaders, never the toolkit's reader: ``torch.distributed.checkpoint.load`` (one process, no process group)
into preallocated tensors, ``torch.load`` of ``common.pt`` and of each chunk's byte range. The expected keys are
written out here, independently of THE TABLE; the values come from the legacy shards read by ``torch.load``.

These tests need neither megatron-core nor a process group; the ``args`` are compared with what
Megatron-LM's own parser gives (``tests/megatron_core/megatron_lm_args.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from export_helpers import (  # noqa: F401 (outs: a fixture)
    edit_config,
    flat,
    killed_mid_write,
    left_by_the_kill,
    listing,
    outs,
    read_release,
    refused,
    run,
)

from persimmon_tools.errors import ConversionError, MappingError
from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.megatron.dist_writer import GlobalTensor, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "tiny_release.tar"
ITER = "iter_0001251"  # the fixture's iteration
LAYERS = 6

# ADEPT's key (after ``language_model.encoder.layers.{i}.``) -> Megatron-Core's (after ``decoder.layers.``)
_LAYER = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "post_attention_layernorm.": "mlp.linear_fc1.layer_norm_",
    "self_attention.query_key_value.": "self_attention.linear_qkv.",
    "self_attention.dense.": "self_attention.linear_proj.",
    "self_attention.q_layernorm.": "self_attention.q_layernorm.",
    "self_attention.k_layernorm.": "self_attention.k_layernorm.",
    "mlp.dense_h_to_4h.": "mlp.linear_fc1.",
    "mlp.dense_4h_to_h.": "mlp.linear_fc2.",
}
_TOP = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "language_model.encoder.final_layernorm.bias": "decoder.final_layernorm.bias",
    "word_embeddings_for_head.weight": "output_layer.weight",
}
_EXTRA = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


def expected_core() -> dict[str, torch.Tensor]:
    """The fixture's tensors as Megatron-Core stores them: per-layer tensors stacked ``[L, ...]``."""
    _, shards, _ = read_release(FIXTURE)
    (shard,) = shards.values()
    legacy = flat(shard["model"])
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, list[torch.Tensor]] = {}
    for key, value in legacy.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key.endswith("inv_freq"):
            continue
        else:
            rest = key.removeprefix("language_model.encoder.layers.")
            i, rest = rest.split(".", 1)
            old = next(o for o in _LAYER if rest.startswith(o))
            core = "decoder.layers." + _LAYER[old] + rest.removeprefix(old)
            layers.setdefault(core, [None] * LAYERS)[int(i)] = value
    out.update({k: torch.stack(v) for k, v in layers.items()})
    return out


def dcp_load(folder: Path) -> tuple[dict, object]:
    """Every entry of the checkpoint loaded by torch's DCP into preallocated tensors; and its metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    state = {
        k: torch.full(m.size, 7, dtype=m.properties.dtype)
        if isinstance(m, TensorStorageMetadata)
        else io.BytesIO()
        for k, m in meta.state_dict_metadata.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=str(folder))
    return state, meta


def load_common(folder: Path) -> dict:
    """``common.pt`` as Megatron-Core loads it: ``torch.load`` (weights_only) with ``argparse.Namespace``
    allowed (megatron.core registers it)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(folder / "common.pt", weights_only=True)


@pytest.fixture(scope="module")
def from_tar(tmp_path_factory):
    """The fixture exported through the CLI; (OUT, the CLI's result)."""
    out = tmp_path_factory.mktemp("torch-dist") / "out"
    return out, run("export", FIXTURE, out, "--format", "torch_dist")


@pytest.fixture(scope="module")
def from_hf(tmp_path_factory):
    """The fixture converted to HF, then exported from there (library call)."""
    from persimmon_tools.conversion.convert import ConvertOptions, convert

    base = tmp_path_factory.mktemp("torch-dist-hf")
    convert(FIXTURE, base / "hf", ConvertOptions())
    export_release(base / "hf", base / "out", ExportOptions(format="torch_dist"))
    return base / "out"


@pytest.mark.parametrize("source", ["tar", "hf"])
def test_every_tensor_loads_bit_for_bit_with_torch_dcp(request, source):
    out = request.getfixturevalue("from_tar")[0] if source == "tar" else request.getfixturevalue("from_hf")
    state, meta = dcp_load(out / ITER)
    want = expected_core()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert sorted(tensors) == sorted(want)
    for key, value in want.items():
        assert value.dtype == tensors[key].dtype == torch.bfloat16, key
        assert torch.equal(value.view(torch.int16), tensors[key].view(torch.int16)), key
    objects = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert sorted(objects) == sorted(
        f"decoder.layers.{m}._extra_state/shard_{i}_{LAYERS}" for i in range(LAYERS) for m in _EXTRA
    )
    assert all(v == [None] for v in objects.values())  # a ShardedObject's data, saved as torch.save([None])
    # per-layer tensors: one chunk per layer at (i, 0, ...) of the stacked tensor; the rest one chunk
    qkv = meta.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert [tuple(c.offsets) for c in qkv.chunks] == [(i, 0, 0) for i in range(LAYERS)]
    assert {tuple(c.sizes) for c in qkv.chunks} == {(1, 192, 64)}
    emb = meta.state_dict_metadata["embedding.word_embeddings.weight"]
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in emb.chunks] == [((0, 0), (1024, 64))]


def test_layout_common_state_and_cli_output(from_tar):
    out, result = from_tar
    assert result.exit_code == 0, result.output
    it = out / ITER
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [
            "export.json",
            "latest_checkpointed_iteration.txt",
            "megatron_lm_args.txt",
            f"{ITER}/.metadata",
            f"{ITER}/__0_0.distcp",
            f"{ITER}/common.pt",
            f"{ITER}/metadata.json",
            f"{ITER}/tokenizer/tokenizer.model",
        ]
    )
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1251"
    assert json.loads((it / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    _, _, small = read_release(FIXTURE)
    assert (it / "tokenizer" / "tokenizer.model").read_bytes() == small["adept_vocab.model"]
    common = load_common(it)
    assert {k: v for k, v in common.items() if k != "args"} == {
        "checkpoint_version": 3.0,
        "iteration": 1251,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True},
    }
    args = vars(common["args"])
    assert {k: args[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels")} == {
        "num_layers": 6,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "kv_channels": 16,
    }
    assert args["params_dtype"] is torch.bfloat16 and args["rotary_base"] == 25000
    assert type(args["rotary_base"]) is int  # Megatron-LM's --rotary-base is an int
    assert args["no_save_optim"] is args["no_save_rng"] is True
    assert args["add_position_embedding"] is True  # the parser's default: check_checkpoint_args compares it
    # the chunks lie one after another in the one data file, each a complete torch.save zip
    data = (it / "__0_0.distcp").read_bytes()
    _, meta = dcp_load(it)
    ranges = sorted((s.offset, s.length) for s in meta.storage_data.values())
    assert ranges[0][0] == 0 and sum(n for _, n in ranges) == len(data)
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
    assert all(data[a : a + 4] == b"PK\x03\x04" for a, _ in ranges)
    for index, info in meta.storage_data.items():  # each a complete torch.save zip of its box
        value = torch.load(io.BytesIO(data[info.offset : info.offset + info.length]), weights_only=True)
        if index.offset is not None:
            sizes = next(
                c.sizes for c in meta.state_dict_metadata[index.fqn].chunks if c.offsets == index.offset
            )
            assert value.shape == sizes, index
    # the flags: in the file, printed on stdout, and what the common state's args say
    flags = shlex.split((out / "megatron_lm_args.txt").read_text())
    assert shlex.split(result.stdout.replace("\\\n", " ")) == flags
    assert "megatron_lm_args.txt" in result.stderr
    pairs = dict(zip(flags, [*flags[1:], ""], strict=True))
    assert pairs["--num-layers"] == "6" and pairs["--ffn-hidden-size"] == "256"
    assert pairs["--rotary-percent"] == "0.5" and pairs["--rotary-base"] == "25000"
    assert pairs["--norm-epsilon"] == "1e-05" and pairs["--seq-length"] == "2048"
    assert pairs["--tokenizer-model"] == str(it / "tokenizer" / "tokenizer.model")
    assert pairs["--load"] == str(out) and pairs["--ckpt-format"] == "torch_dist"
    for flag in ("--squared-relu", "--qk-layernorm", "--untie-embeddings-and-output-weights", "--bf16"):
        assert flag in flags
    for flag in ("--no-bias-gelu-fusion", "--no-load-optim", "--no-load-rng"):
        assert flag in flags
    assert pairs["--transformer-impl"] == "local" and pairs["--position-embedding-type"] == "rope"
    # Megatron-LM pads the vocabulary's pieces to the 1024 rows with this divisor
    pieces = args["padded_vocab_size"]
    divisor = int(pairs["--make-vocab-size-divisible-by"])
    assert pieces == 1024 and args["make_vocab_size_divisible_by"] == divisor and 1024 % divisor == 0


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--tp", "2"], "--tp 2 --pp 1 with --format torch_dist"),
        (["--pp", "2"], "--tp 1 --pp 2 with --format torch_dist"),
        (["--tar"], "--tar with --format torch_dist"),
        (["--name", "x"], "--name with --format torch_dist"),
    ],
)
def test_options_that_do_not_fit_torch_dist_are_refused(outs, extra, said):  # noqa: F811
    result = run("export", FIXTURE, outs / "out", "--format", "torch_dist", *extra)
    assert result.exit_code == 2, result.output
    assert said in result.stderr and "Hint:" in result.stderr
    assert listing(outs) == []


def test_a_checkpoint_that_reads_back_wrong_is_not_installed(outs, monkeypatch):  # noqa: F811
    """The read-back: args in common.pt that contradict the shapes (as convert reads them) install nothing."""
    import persimmon_tools.export.torch_dist as torch_dist

    real = torch_dist.common_state

    def damaged(namespace, iteration):
        common = real(namespace, iteration)
        common["args"] = argparse.Namespace(**{**vars(namespace), "hidden_size": 999})
        return common

    monkeypatch.setattr(torch_dist, "common_state", damaged)
    err = refused(FIXTURE, outs, ExportOptions(format="torch_dist"), ConversionError)
    assert "args.hidden_size = 999 (written: 64)" in err.message


def test_a_rotary_base_megatron_lm_cannot_take_is_refused_before_writing(from_hf, outs, tmp_path):  # noqa: F811
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(from_hf.parent / "hf", hf)
    (hf / "conversion.json").unlink()  # args derived from config.json
    edit_config(hf, rope_theta=25000.5)
    err = refused(hf, outs, ExportOptions(format="torch_dist"), ConversionError)
    assert "rotary base 25000.5: Megatron-LM's --rotary-base takes a whole number" in err.message
    assert "--format legacy" in err.hint
    result = run("export", hf, outs / "out", "--format", "torch_dist", "--dry-run")
    assert result.exit_code == 1 and "--rotary-base takes a whole number" in result.stderr


def _chunks(folder: Path):
    """Chunks of a two-layer tensor and a plain one, each made only once the one before is on disk."""
    data, before = folder / "__0_0.distcp", -1
    for n, (key, layer) in enumerate([("w", 0), ("w", 1), ("b", None)]):
        size = data.stat().st_size
        assert size > before, "the chunk before was not written before the next was asked for"
        before = size
        yield key, layer, torch.full((3, 4) if key == "w" else (5,), float(n))


def test_the_writer_streams_chunk_by_chunk_and_refuses_a_bad_plan(tmp_path):
    plan = [
        GlobalTensor("w", (2, 3, 4), torch.float32, stacked=True),
        GlobalTensor("b", (5,), torch.float32, stacked=False),
    ]
    files = write_checkpoint(tmp_path / "ok", plan, _chunks(tmp_path / "ok"), num_layers=2, common={})
    assert files == ["__0_0.distcp", ".metadata", "common.pt", "metadata.json"]
    state, meta = dcp_load(tmp_path / "ok")
    assert torch.equal(state["w"], torch.stack([torch.zeros(3, 4), torch.ones(3, 4)]))
    assert torch.equal(state["b"], torch.full((5,), 2.0)) and len(state) == 2 + 2 * 4
    missing = [("w", 1, torch.zeros(3, 4)), ("b", None, torch.zeros(5))]
    with pytest.raises(MappingError, match=r"lacks 1 chunk\(s\): w \(layer 0\)"):
        write_checkpoint(tmp_path / "missing", plan, missing, num_layers=2, common={})
    with pytest.raises(MappingError, match="arrived twice"):
        write_checkpoint(tmp_path / "twice", plan, [("b", None, torch.zeros(5))] * 2, num_layers=2, common={})
    with pytest.raises(MappingError, match="was not planned"):
        write_checkpoint(tmp_path / "unplanned", plan, [("x", None, torch.zeros(5))], num_layers=2, common={})


def _killed_export(background, scratch: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    """A ``background`` job: a torch_dist export of the fixture into ``scratch``, SIGKILLed mid-write."""
    args = ["export", str(FIXTURE), str(scratch / "out"), "--format", "torch_dist"]
    return args, killed_mid_write(background, "persimmon_tools.megatron.dist_writer", args)


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the test run begins: the killed export runs in a
    child beside the tests."""
    for item in items:
        if item.originalname == "test_sigkill_leftovers_are_removed_next_time_and_force_replaces":
            scratch = tmp_path_factory.mktemp("torch-dist-leftovers")
            background.started[f"{__name__}: killed"] = background.submit(_killed_export, scratch)


def test_sigkill_leftovers_are_removed_next_time_and_force_replaces(background):
    args, proc = background.result(f"{__name__}: killed")
    out, stale, marker = left_by_the_kill(args, proc)
    scratch = out.parent
    assert marker["role"] == "new"
    assert (stale / ITER / "__0_0.distcp").stat().st_size > 0  # killed mid-write

    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"removed {stale}" in result.stderr
    assert sorted(os.listdir(scratch)) == [out.name]  # no temp folder, no lock file
    assert run(*args).exit_code != 0  # OUT exists: refused without --force
    again = run(*args, "--force")
    assert again.exit_code == 0, again.output
    assert sorted(os.listdir(scratch)) == [out.name] and (out / ITER / ".metadata").is_file()


# Fields of ``args`` that the tiny model or the run sets (the rest must be what Megatron-LM's parser gives)
_RUN_OR_MODEL = {
    *("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "seq_length"),
    *("max_position_embeddings", "tokenizer_model", "make_vocab_size_divisible_by", "padded_vocab_size"),
    *("attention_dropout", "hidden_dropout", "iteration", "consumed_train_samples", "consumed_valid_samples"),
    "bias_gelu_fusion",  # the oracle's flags leave out --no-bias-gelu-fusion, which squared ReLU needs
    *("no_save_optim", "no_save_rng"),  # saved without optimizer and RNG state (--no-save-optim/-rng)
}
ORACLE = REPO / "tests" / "megatron_core" / "megatron_lm_args.json"


@pytest.mark.skipif(not ORACLE.is_file(), reason="no Megatron-LM args oracle in this checkout")
def test_args_agree_with_megatron_lm_own_parser(from_tar):
    """Megatron-LM's ``parse_args`` + ``validate_args`` (core_v0.16.1) for a Persimmon run, recorded by
    ``tests/megatron_core/make_megatron_lm_args.py``: every field export writes that neither the model's
    size nor the run decides has the parser's value and type."""
    oracle = json.loads(ORACLE.read_text())["args"]
    args = vars(load_common(from_tar[0] / ITER)["args"])
    compared = 0
    for name, value in args.items():
        if name in _RUN_OR_MODEL:
            continue
        want = oracle[name]
        if isinstance(want, dict) and "torch.dtype" in want:
            want = getattr(torch, want["torch.dtype"])
        assert (value, type(value)) == (want, type(want)), name
        compared += 1
    assert compared >= 25
