"""convert, inspect and export's source read Megatron-Core ``torch_dist`` checkpoints: the same HF folder as
the legacy release holding the same weights, bit for bit; other architectures and odd chunk grids refused.

The checkpoints are written by torch's own ``torch.distributed.checkpoint.save`` from the weights of
``fixtures/tiny_release.tar`` (read with ``torch.load``): the builder lives in
``tests/megatron/test_torch_dist_read.py``.
"""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert, prepare
from persimmon_tools.errors import CheckpointError, ConfigError, MappingError
from persimmon_tools.export.source import open_source

_spec = importlib.util.spec_from_file_location(
    "torch_dist_builder", Path(__file__).resolve().parents[1] / "megatron" / "test_torch_dist_read.py"
)
builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builder)

_A, _M = "decoder.layers.self_attention.", "decoder.layers.mlp."


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))
        for k in a
    )


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab") / "adept_vocab.model"
    with tarfile.open(builder.FIXTURE_TAR) as tf:
        out.write_bytes(tf.extractfile("tiny_release/adept_vocab.model").read())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The legacy release converted (weights and config; the tokenizer is tested elsewhere)."""
    out = tmp_path_factory.mktemp("legacy") / "hf"
    convert(builder.FIXTURE_TAR, out, ConvertOptions(tokenizer=False))
    return out


@pytest.mark.parametrize(
    "tp, args, per_layer",
    [(2, "megatron-lm", True), (1, "adept", False)],
    ids=["tp2-megatron-lm-args", "tp1-adept-args"],
)
def test_the_same_folder_as_the_legacy_release(tmp_path, reference, vocab, tp, args, per_layer):
    folder, _ = builder.make_torch_dist(tmp_path / "ckpt", tp=tp, args=args, per_layer=per_layer)
    out = tmp_path / "hf"
    convert(folder.parent, out, ConvertOptions(tokenizer=False, vocab=vocab))
    assert _same_bits(_tensors(out), _tensors(reference))
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (reference / "config.json").read_text()
    )
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"]["kind"] == "torch_dist" and record["source"]["iteration"] == builder.ITERATION
    names = [f["name"] for f in record["source"]["checkpoint_files"]]
    assert names[:3] == ["iter_0000007/metadata.json", "iter_0000007/.metadata", "iter_0000007/common.pt"]
    assert "iter_0000007/__0_0.distcp" in names and record["checkpoint_version"] == 3.0


def test_the_cli_converts_and_inspects_a_torch_dist_checkpoint(tmp_path, reference, vocab):
    folder, _ = builder.make_torch_dist(tmp_path / "ckpt", tp=2)
    (folder.parent / "adept_vocab.model").write_bytes(vocab.read_bytes())  # found beside the tracker
    runner = CliRunner()
    result = runner.invoke(
        main, ["convert", str(folder), str(tmp_path / "hf"), "--no-verify", "--no-tokenizer"]
    )
    assert result.exit_code == 0, result.output
    assert _same_bits(_tensors(tmp_path / "hf"), _tensors(reference))
    result = runner.invoke(main, ["inspect", str(folder.parent), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "torch_dist" and info["iteration"] == 7 and info["dims"]["num_layers"] == 6
    assert info["args"]["rotary_percent"] == 0.5 and info["torch_dist"]["byte_objects"] == 24
    assert info["vocab"].endswith("adept_vocab.model")


def test_export_reads_a_torch_dist_source_with_adept_args(tmp_path):
    folder, legacy = builder.make_torch_dist(tmp_path / "ckpt", tp=2)
    source = open_source(folder.parent)
    assert set(source.tensors) == {k for k in legacy if not k.endswith("inv_freq")}
    key = "language_model.encoder.layers.5.mlp.dense_4h_to_h.weight"
    assert torch.equal(source.tensors[key].read_rows(0, 64), legacy[key])
    assert source.args["rotary_emb_base"] == source.args["rotary_base"] == source.dims.rope_theta
    assert (
        source.args["pos_emb"] == "rotary" and source.args["layernorm_epsilon"] == source.args["norm_epsilon"]
    )
    assert source.iteration == 7 and source.checkpoint_version == 3.0


def test_export_to_adept_layout_and_back_gives_the_same_weights(tmp_path, reference, vocab):
    folder, _ = builder.make_torch_dist(tmp_path / "ckpt", tp=2)
    runner = CliRunner()
    result = runner.invoke(
        main, ["export", str(folder.parent), str(tmp_path / "rel"), "--tp", "2", "--vocab", str(vocab)]
    )
    assert result.exit_code == 0, result.output
    convert(tmp_path / "rel", tmp_path / "hf", ConvertOptions(tokenizer=False))
    assert _same_bits(_tensors(tmp_path / "hf"), _tensors(reference))


def _edited(tmp_path: Path, edit, *, args_changes=None, split_changes=None) -> Path:
    legacy, legacy_args = builder.legacy_release()
    state, split = builder.core_state(legacy)
    edit(state)
    split.update(split_changes or {})
    args = builder.megatron_lm_args(legacy_args, **(args_changes or {}))
    common = {"args": args, "checkpoint_version": 3.0, "iteration": builder.ITERATION}
    return builder.write_torch_dist(tmp_path / "ckpt", state, split, tp=2, common=common).parent


def _gated(state):
    for name in ("weight", "bias"):
        state[_M + f"linear_fc1.{name}"] = torch.cat([state[_M + f"linear_fc1.{name}"]] * 2, dim=1)


def _grouped(state):
    state[_A + "linear_qkv.weight"] = state[_A + "linear_qkv.weight"][:, :128]
    state[_A + "linear_qkv.bias"] = state[_A + "linear_qkv.bias"][:, :128]


def _no_qk_layernorm(state):
    for key in [k for k in state if "q_layernorm" in k or "k_layernorm" in k]:
        del state[key]


def _rms_norm(state):
    del state[_A + "linear_qkv.layer_norm_bias"]


@pytest.mark.parametrize(
    "edit, args_changes, expected",
    [
        (
            _gated,
            {},
            "linear_fc1.weight has 512 rows per layer but linear_fc2.weight 256 columns \\(a gated MLP",
        ),
        (_grouped, {}, "linear_qkv.weight has 128 rows per layer, not 3 x 64 .*grouped-query"),
        (_no_qk_layernorm, {}, "no q_layernorm / k_layernorm"),
        (_rms_norm, {}, "linear_qkv.layer_norm_weight has no .*layer_norm_bias: RMSNorm"),
        (
            lambda s: None,
            {"normalization": "RMSNorm"},
            "args.normalization = RMSNorm; Persimmon uses LayerNorm",
        ),
        (lambda s: None, {"swiglu": True}, "args.swiglu = True \\(a gated MLP\\)"),
        (lambda s: None, {"group_query_attention": True}, "num_query_groups = 1 of 4 heads"),
        (lambda s: None, {"position_embedding_type": "learned_absolute"}, "args.position_embedding_type = "),
        (
            lambda s: None,
            {"norm_epsilon": 1e-6, "layernorm_epsilon": 1e-5},
            "args.layernorm_epsilon = 1e-05 but",
        ),
    ],
    ids=[
        "gated",
        "gqa",
        "no-qk-norm",
        "rmsnorm",
        "args-rmsnorm",
        "args-swiglu",
        "args-gqa",
        "args-pos",
        "both-eps",
    ],
)
def test_another_architecture_is_refused_naming_what_differs(tmp_path, edit, args_changes, expected):
    root = _edited(tmp_path, edit, args_changes=args_changes)
    with pytest.raises(ConfigError, match=expected):
        prepare(root, ConvertOptions(tokenizer=False))


def test_an_unknown_key_is_reported_and_can_be_dropped(tmp_path):
    root = _edited(
        tmp_path, lambda s: s.update({_A + "mystery.weight": torch.zeros(6, 3, dtype=torch.bfloat16)})
    )
    with pytest.raises(MappingError, match=f"unknown source key {_A}mystery.weight \\[6, 3\\]"):
        prepare(root, ConvertOptions(tokenizer=False))
    plan = prepare(root, ConvertOptions(tokenizer=False, drop_keys=(_A + "mystery.*",)))
    assert plan.dropped_keys == [_A + "mystery.weight"]


def test_a_chunk_grid_that_is_not_the_tensor_parallel_split_is_refused(tmp_path):
    root = _edited(tmp_path, lambda s: None, split_changes={_A + "linear_qkv.weight": 2})
    with pytest.raises(
        CheckpointError,
        match="linear_qkv.weight \\(layer 0\\) \\[192, 64\\] is stored in 2 chunks split "
        "along dim\\(s\\) \\[1\\]; a column tensor is read only when split along dim 0",
    ):
        prepare(root, ConvertOptions(tokenizer=False))


def test_no_args_and_no_inv_freq_leave_the_rotary_dimension_unknown(tmp_path):
    folder, _ = builder.make_torch_dist(tmp_path / "ckpt", tp=1, args=None)
    with pytest.raises(ConfigError, match="cannot tell the rotary dimension"):
        prepare(folder.parent, ConvertOptions(tokenizer=False))


def test_an_old_checkpoint_version_is_refused(tmp_path):
    folder, _ = builder.make_torch_dist(tmp_path / "ckpt", tp=1, common={"checkpoint_version": 1.0})
    with pytest.raises(CheckpointError, match="common.pt: checkpoint_version is 1.0, older than 2.0"):
        prepare(folder.parent, ConvertOptions(tokenizer=False))
