"""The mapping table and engine: every key accounted for, every problem reported together; ops round trips."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from persimmon_tools import ops
from persimmon_tools.conversion.config import derive_dims
from persimmon_tools.conversion.convert import ConvertOptions, prepare
from persimmon_tools.conversion.plan import expected_targets
from persimmon_tools.errors import CheckpointError, ConfigError, MappingError
from persimmon_tools.mapping import (
    RULES,
    Match,
    expand,
    match_source,
    match_target,
    parallel_kind,
    source_matches,
)
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release
from persimmon_tools.ops import Parallel, merge, renumber_layer, split
from persimmon_tools.synth.build import build_release, logical_tensors, write_release_folder


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


# ---- THE TABLE's one lookup, both directions ------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.source.removeprefix("language_model.encoder."))
def test_lookup_goes_both_ways_for_every_rule(rule):
    for layer in [0, 7, 35] if rule.per_layer else [None]:
        key = rule.source_key(layer)
        found = match_source(key)
        assert found == Match(rule, layer) and source_matches(key) == (found,) and found.source == key
        assert parallel_kind(key) is rule.parallel
        if rule.target is None:
            assert found.target is None
        else:
            assert found.target == expand(rule.target, layer)
            assert match_target(found.target) == found  # target -> the same rule and layer -> the same key


@pytest.mark.parametrize(
    "key",
    [
        "language_model.encoder.layers.01.input_layernorm.weight",  # leading zero: not Megatron's spelling
        "language_model.encoder.layers.+1.input_layernorm.weight",
        "language_model.encoder.layers.\u0661.input_layernorm.weight",  # a non-ASCII digit
        "language_model.encoder.layers.{i}.input_layernorm.weight",
        "language_model.encoder.layers.1.input_layernorm.weight\n",
        "x.language_model.encoder.layers.1.input_layernorm.weight",
        "language_model.encoder.layers.1.input_layernorm.weight.x",
        "model.layers.1.input_layernorm.weight",  # an HF name is not a Megatron key
    ],
)
def test_lookup_matches_whole_canonical_keys_only(key):
    assert match_source(key) is None and source_matches(key) == () and parallel_kind(key) is None
    hf = key.replace("language_model.encoder.", "model.") if "model.layers" not in key else "lm_head.weight.x"
    assert match_target(hf) is None


def test_expand_needs_a_layer_exactly_when_the_template_has_one():
    layered, flat = next(r for r in RULES if r.per_layer), next(r for r in RULES if not r.per_layer)
    assert layered.source_key(3) == layered.source.replace("{i}", "3") and flat.source_key() == flat.source
    with pytest.raises(ValueError):
        layered.source_key()
    with pytest.raises(ValueError):
        expand(flat.source, 3)


# ---- the row-range primitives every production merge and split uses ------------------------------------

_SHAPES = [(8, 12), (8,)]


@pytest.mark.parametrize("shape", _SHAPES, ids=["2d", "1d"])
@pytest.mark.parametrize("kind", list(Parallel))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_range_merge_and_split_are_inverse_and_read_only_what_they_need(kind, tp, shape):
    full = torch.randn(shape)
    parts = split(full, kind, tp)
    shapes = [tuple(p.shape) for p in parts]
    assert ops.merged_shape(shapes, kind) == shape
    assert shapes == [ops.shard_shape(shape, kind, tp, r) for r in range(tp)]
    joined_side_by_side = ops.merge_dim(kind, len(shape)) == 1 and tp > 1
    for start in range(shape[0] + 1):
        for stop in range(start, shape[0] + 1):
            rows_read = []

            def read(p, a, b, rows_read=rows_read):
                rows_read.append(b - a)
                return parts[p][a:b]

            assert torch.equal(ops.merge_rows(read, shapes, kind, start, stop), full[start:stop])
            assert sum(rows_read) == (stop - start) * (tp if joined_side_by_side else 1)
    for rank in range(tp):
        rows = shapes[rank][0]
        for start in range(rows + 1):
            for stop in range(start, rows + 1):
                got = ops.shard_rows(lambda a, b: full[a:b], shape, kind, tp, rank, start, stop)
                assert torch.equal(got, parts[rank][start:stop])


@pytest.mark.parametrize("kind", list(Parallel))
def test_row_blocks_cover_the_merged_rows_and_never_straddle_two_parts(kind):
    shapes = [(5, 3), (5, 3), (5, 3)]
    blocks = list(ops.row_blocks(shapes, kind, 2))
    rows = ops.merged_shape(shapes, kind)[0]
    assert [a for a, _ in blocks] == [0, *(b for _, b in blocks[:-1])] and blocks[-1][1] == rows
    assert all(0 < b - a <= 2 for a, b in blocks)
    if ops.merge_dim(kind, 2) == 0:
        assert all(len(ops.merge_pieces(shapes, kind, a, b)) == 1 for a, b in blocks)


def test_parts_that_do_not_fit_are_refused_by_name():
    with pytest.raises(CheckpointError, match="w: shard shapes do not fit together"):
        ops.merged_shape([(4, 3), (4, 2)], Parallel.COLUMN, "w")
    with pytest.raises(CheckpointError, match="rank 1 \\[4\\]"):
        ops.merged_shape([(4, 3), (4,)], Parallel.ROW, "w")
    assert ops.merged_shape([(4, 3), (4, 2)], Parallel.ROW, "w") == (4, 5)


@pytest.mark.parametrize("layout", ["tp2", "tp2pp3"])
def test_convert_reader_merges_what_make_release_split(releases, layout):
    """The shipping pair: make-release cuts with ``ops.shard_rows``; convert's MergedTensor joins with
    ``ops.merge_rows``. Every tensor, whole, by small blocks and by row ranges across the TP boundary."""
    want = logical_tensors(seed=0)
    ckpt = load_release_checkpoint(open_release(releases[layout]))
    assert set(ckpt.tensors) == set(want)
    for key, merged in ckpt.tensors.items():
        full = want[key]
        assert merged.shape == tuple(full.shape) and merged.dtype == full.dtype, key
        assert torch.equal(merged.materialize(), full), key
        assert torch.equal(torch.cat(list(merged.iter_rows(max_bytes=100))), full), key
        n = full.shape[0]
        for start, stop in [(0, n), (n // 2 - 1, n // 2 + 1), (1, n - 1), (n, n)]:
            assert torch.equal(merged.read_rows(start, stop), full[start:stop]), (key, start, stop)
        if len(merged.parts) > 1 and merged.kind is not Parallel.REPLICATED:
            parts = [p.materialize() for p in merged.parts]
            assert torch.equal(merge(parts, merged.kind), full), key


# ---- the Megatron-Core column (torch_dist keys) ----------------------------------------------------------


def test_every_stored_rule_has_a_distinct_core_key_and_only_inv_freq_has_none():
    from persimmon_tools.mapping import INV_FREQ

    cores = [r.core_key for r in RULES if r.core_key is not None]
    assert len(set(cores)) == len(cores) == len(RULES) - 1
    assert [r for r in RULES if r.core_key is None] == [INV_FREQ]
    # stacked on a leading layer axis: no layer index in the key, per-layer rules under decoder.layers.
    assert all("{i}" not in c and not re.search(r"\.\d+\.", c) for c in cores)
    assert all(r.core_key.startswith("decoder.layers.") == r.per_layer for r in RULES if r.core_key)


def test_core_keys_round_trip_through_the_one_lookup():
    from persimmon_tools.mapping import core_matches, match_core

    for rule in RULES:
        if rule.core_key is None:
            continue
        assert match_core(rule.core_key) is rule and core_matches(rule.core_key) == (rule,)
        assert match_core(rule.core_key).core_key == rule.core_key
    for key in (
        "decoder.layers.0.self_attention.linear_qkv.weight",  # one layer of a stacked key: not a core key
        "decoder.layers.self_attention.linear_qkv",
        "xdecoder.final_layernorm.weight",
        "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_3",
        "language_model.embedding.word_embeddings.weight",
    ):
        assert match_core(key) is None and core_matches(key) == (), key


def test_core_names_of_the_renamed_layers():
    from persimmon_tools.mapping import match_core

    def source(core, layer=2):
        return match_core(core).source_key(layer if match_core(core).per_layer else None)

    a, m = "decoder.layers.self_attention.", "decoder.layers.mlp."
    assert source(a + "linear_qkv.layer_norm_weight").endswith("layers.2.input_layernorm.weight")
    assert source(m + "linear_fc1.layer_norm_bias").endswith("layers.2.post_attention_layernorm.bias")
    assert source(a + "linear_proj.weight").endswith("layers.2.self_attention.dense.weight")
    assert source(m + "linear_fc1.weight").endswith("layers.2.mlp.dense_h_to_4h.weight")
    assert source(m + "linear_fc2.bias").endswith("layers.2.mlp.dense_4h_to_h.bias")
    assert source("output_layer.weight") == "word_embeddings_for_head.weight"
    assert source("decoder.final_layernorm.bias") == "language_model.encoder.final_layernorm.bias"
