"""verify on a Megatron-Core torch_dist source: its own reading of the chunks (``verification/source_core``).

The checkpoints are written by torch's own ``torch.distributed.checkpoint.save`` (the builder in
``tests/megatron/test_torch_dist_read.py``: the tiny fixture's weights under Megatron-Core's names, each layer a
chunk, split in two along the tensor-parallel dim), so neither side of verify wrote them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.megatron import dist_legacy
from persimmon_tools.megatron.release import open_release
from persimmon_tools.verification.reference import MegatronWeights
from persimmon_tools.verification.source_core import load_dist_source
from persimmon_tools.verification.verify import VerifyOptions, verify

_BUILDER = Path(__file__).resolve().parents[1] / "megatron" / "test_torch_dist_read.py"
_spec = importlib.util.spec_from_file_location("torch_dist_builder", _BUILDER)
builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builder)

VOCAB = Path(__file__).resolve().parents[2] / "persimmon_tools" / "data" / "tiny_vocab.model"


@pytest.fixture(scope="module")
def dist_and_hf(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A TP=2-chunked torch_dist checkpoint of the tiny fixture and its conversion (no automatic verify)."""
    base = tmp_path_factory.mktemp("verify-torch-dist")
    _, legacy = builder.make_torch_dist(base / "ckpt", tp=2)
    out = base / "hf"
    convert(base / "ckpt", out, ConvertOptions(vocab=VOCAB))
    return base / "ckpt", out, legacy


def _options(**kw) -> VerifyOptions:
    return VerifyOptions(new_tokens=2, **kw)


def test_verify_reads_the_chunks_itself_and_passes(dist_and_hf):
    ckpt, out, legacy = dist_and_hf
    release = open_release(ckpt)
    own = load_dist_source(release)
    stored = {k for k in legacy if not k.endswith("rotary_emb.inv_freq")}  # torch_dist stores no inv_freq
    assert set(own.tensors) == stored  # every legacy key, from Megatron-Core names, by verify's own table
    qkv = "language_model.encoder.layers.1.self_attention.query_key_value.weight"
    assert own.tensors[qkv].dim == 0 and len(own.tensors[qkv].parts) == 2  # two TP chunks joined on dim 0
    dense = "language_model.encoder.layers.1.self_attention.dense.weight"
    assert own.tensors[dense].dim == 1 and len(own.tensors[dense].parts) == 2
    for key in stored:
        tensor = legacy[key]
        assert torch.equal(own.tensors[key].materialize(), tensor), key
    report = verify(out, ckpt, _options())
    assert report.passed, report.to_json()
    source = report.to_dict()["source"]
    assert source["kind"] == "torch_dist"
    names = [f["name"] for f in source["files"]]
    assert "iter_0000007/.metadata" in names and "iter_0000007/common.pt" in names
    assert any(n.endswith(".distcp") for n in names)


def test_today_s_megatron_lm_arg_names_drive_the_reference(dist_and_hf):
    ckpt, _, _ = dist_and_hf
    hyper = MegatronWeights(load_dist_source(open_release(ckpt))).hyper
    origin = dict(hyper.origin)
    assert origin["rotary_dim"] == "args.rotary_percent"  # no inv_freq is stored in torch_dist
    assert origin["rope_theta"] == "args.rotary_base"
    assert origin["eps"] == "args.norm_epsilon"
    assert hyper.rotary_dim == hyper.head_dim // 2


def test_a_converter_that_joins_tp_chunks_in_the_wrong_order_is_caught(dist_and_hf, monkeypatch):
    """The converter's merge of torch_dist chunks reversed: verify's own reading disagrees before any forward
    pass, naming the tensor."""
    ckpt, out, _ = dist_and_hf
    original = dist_legacy._split

    def reversed_split(label, kind, shape, pieces):
        return tuple(reversed(original(label, kind, shape, pieces)))

    monkeypatch.setattr(dist_legacy, "_split", reversed_split)
    report = verify(out, ckpt, _options())
    assert not report.passed
    found = report.to_dict()
    assert found["readers"]["agree"] is False and found["metrics"] == []  # no forward pass on it
    diffs = [d for d in found["readers"]["differences"] if d["kind"] == "reader"]
    assert any("query_key_value" in d["where"] for d in diffs), diffs


def test_verify_refuses_a_chunk_grid_split_along_two_dims():
    """Chunks of one layer that differ along two dims are not tensor parallelism; verify's own reading refuses
    them rather than guess (the converter's refusal is tested in tests/conversion/test_convert_torch_dist.py)."""
    from types import SimpleNamespace

    from persimmon_tools.errors import CheckpointError
    from persimmon_tools.verification.source_core import _join

    box = SimpleNamespace(shape=(4, 4))
    pieces = [((0, 0), box), ((0, 4), box), ((4, 0), box), ((4, 4), box)]
    with pytest.raises(CheckpointError, match=r"split along dims \[0, 1\]"):
        _join("w", "decoder.layers.mlp.linear_fc1.weight (layer 0)", pieces, (8, 8))
    gap = [((0, 0), box), ((0, 8), box)]
    with pytest.raises(CheckpointError, match="does not continue"):
        _join("w", "decoder.layers.mlp.linear_fc2.weight (layer 0)", gap, (4, 12))
    short = [((0, 0), box), ((4, 0), box)]
    with pytest.raises(CheckpointError, match="cover 8 of 12"):
        _join("w", "output_layer.weight", short, (12, 4))
