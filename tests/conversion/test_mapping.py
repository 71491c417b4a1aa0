"""The mapping table and engine: every key accounted for, every problem reported together; ops round trips."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from persimmon_tools.conversion.config import derive_dims
from persimmon_tools.conversion.convert import ConvertOptions, prepare
from persimmon_tools.conversion.plan import expected_targets
from persimmon_tools.errors import CheckpointError, ConfigError, MappingError
from persimmon_tools.mapping import RULES
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release
from persimmon_tools.ops import Parallel, merge, renumber_layer, split
from persimmon_tools.synth.build import build_release, write_release_folder


def _edited(tmp_path, edit, **kw):
    rel = build_release(seed=0, **kw)
    edit(rel.objects)
    return write_release_folder(rel, tmp_path / "rel")


def _encoder(objects, rank=(0, 0)):
    return objects[rank]["model"]["language_model"]["encoder"]


def test_every_rule_has_a_unique_source_and_target():
    sources = [r.source for r in RULES]
    targets = [r.target for r in RULES if r.target]
    assert len(set(sources)) == len(sources) and len(set(targets)) == len(targets)


def test_unknown_missing_and_wrong_shape_are_reported_together(tmp_path):
    def edit(objects):
        enc = _encoder(objects)
        enc["layers.1.self_attention.mystery.weight"] = torch.zeros(3)
        del enc["layers.4.mlp.dense_h_to_4h.bias"]
        enc["layers.2.self_attention.dense.bias"] = torch.zeros(65, dtype=torch.bfloat16)

    folder = _edited(tmp_path, edit)
    with pytest.raises(MappingError) as err:
        prepare(folder, ConvertOptions())
    msg = err.value.message
    assert "3 problem(s)" in msg
    assert "unknown source key language_model.encoder.layers.1.self_attention.mystery.weight" in msg
    assert "missing: no source tensor for model.layers.4.mlp.dense_h_to_4h.bias" in msg
    assert "layers.2.self_attention.dense.bias: shape [65], expected [64]" in msg
    assert "inspect" in err.value.hint


def test_inconsistent_replicated_tensor_across_tp_ranks(tmp_path):
    def edit(objects):
        _encoder(objects, (1, 0))["layers.3.post_attention_layernorm.weight"] = torch.ones(
            64, dtype=torch.bfloat16
        )

    folder = _edited(tmp_path, edit, tp=2)
    with pytest.raises(CheckpointError) as err:
        load_release_checkpoint(open_release(folder))
    assert "layers.3.post_attention_layernorm.weight" in err.value.message and "rank 1" in err.value.message


def test_args_disagreeing_with_shapes_names_both_values(tmp_path):
    def edit(objects):
        args = objects[(0, 0)]["args"]
        args.num_attention_heads = 8
        args.rotary_emb_base = 10000.0

    folder = _edited(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        derive_dims(load_release_checkpoint(open_release(folder)))
    assert "args.num_attention_heads = 8" in err.value.message and "= 4" in err.value.message
    assert "rotary base 10000.0" in err.value.message and re.search(
        r"implies about 2[45]\d\d\d", err.value.message
    )


def test_tp_degree_is_cross_checked_with_args(tmp_path):
    folder = write_release_folder(build_release(seed=0, tp=2), tmp_path / "rel")
    one_shard = folder / "iter_0001251" / "mp_rank_01" / "model_optim_rng.pt"
    with pytest.raises(ConfigError, match="args.tensor_model_parallel_size = 2"):
        prepare(one_shard, ConvertOptions())


def test_checkpoint_without_args_uses_adept_defaults(tmp_path):
    def edit(objects):
        del objects[(0, 0)]["args"]

    plan = prepare(_edited(tmp_path, edit), ConvertOptions())
    assert plan.config["rope_theta"] == 25000.0 and plan.config["layer_norm_eps"] == 1e-5


def test_gpt2_style_megatron_checkpoint_is_not_persimmon(tmp_path):
    def edit(objects):
        obj = objects[(0, 0)]
        obj["model"]["language_model"]["embedding"]["position_embeddings"] = {"weight": torch.zeros(16, 64)}
        obj["args"] = argparse.Namespace(num_layers=6, pos_emb="learned_absolute")

    with pytest.raises(ConfigError) as err:
        prepare(_edited(tmp_path, edit), ConvertOptions())
    assert (
        err.value.message.startswith("not a Persimmon checkpoint")
        and "position_embeddings" in err.value.message
    )


@pytest.mark.parametrize("kind", list(Parallel))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_merge_round_trip(kind, tp):
    t = torch.randn(8, 12)
    assert torch.equal(merge(split(t, kind, tp), kind), t)
    b = torch.randn(8)
    assert torch.equal(merge(split(b, kind, tp), kind), b)


def test_column_split_keeps_whole_heads():
    heads, hd, hidden = 4, 3, 5
    # row = h*3*hd + t*hd + d: each rank must get whole [q k v] head blocks
    w = torch.arange(heads * 3 * hd).repeat_interleave(hidden).view(heads * 3 * hd, hidden).float()
    parts = split(w, Parallel.COLUMN, 2)
    assert torch.equal(parts[1][0], w[2 * 3 * hd])
    assert torch.equal(parts[0].view(2, 3, hd, hidden), w.view(heads, 3, hd, hidden)[:2])


def test_renumber_round_trip():
    key = "language_model.encoder.layers.2.mlp.dense_h_to_4h.weight"
    assert renumber_layer(key, 4) == "language_model.encoder.layers.6.mlp.dense_h_to_4h.weight"
    assert renumber_layer(renumber_layer(key, 4), -4) == key


def test_expected_targets_count(releases):
    dims = derive_dims(load_release_checkpoint(open_release(releases["tar"])))
    assert len(expected_targets(dims)) == 4 + 6 * 16
