"""One shard's ``model_optim_rng.pt`` object as ADEPT's training process saves it (spec §B.1), for synthetic
releases: ``{"args": Namespace(...), "checkpoint_version": 3.0, "iteration": it, "model": {...}, "rng_state":
[...]}`` with :class:`~persimmon_tools.megatron.ptwriter.TensorSpec` leaves, and ADEPT's ``ModelBackend`` enum
pickled under ADEPT's own module name.
"""

from __future__ import annotations

import argparse
import random
import sys
import types
from collections.abc import Callable
from enum import Enum

import numpy as np
import torch

from persimmon_tools.megatron.ptwriter import TensorSpec, write_pt
from persimmon_tools.megatron.release_writer import stage_layers, stage_model
from persimmon_tools.synth.values import Preset, Values, shard_spec


class ModelBackend(Enum):
    """Stand-in for ADEPT's ``tool_use.megatron.megatron_utils.ModelBackend`` (pickled under that name)."""

    MEGATRON = "megatron"


def with_adept_module(func: Callable[[], None]) -> None:
    """Run ``func`` with ``tool_use.megatron.megatron_utils.ModelBackend`` importable, so pickles name it."""
    names = ["tool_use", "tool_use.megatron", "tool_use.megatron.megatron_utils"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(names[-1])
    mod.ModelBackend = ModelBackend
    original = (ModelBackend.__module__, ModelBackend.__qualname__)
    ModelBackend.__module__ = names[-1]
    try:
        for n in names[:-1]:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[names[-1]] = mod
        func()
    finally:
        ModelBackend.__module__ = original[0]
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def training_args(
    p: Preset, vocab: int, tp: int, pp: int, dtype: torch.dtype, iteration: int, rank: int
) -> argparse.Namespace:
    """The training args as the process of global ``rank`` saves them: identical on every shard except the
    per-process ``rank`` / ``local_rank`` (Megatron's default order, one data-parallel replica:
    ``rank = tp_rank + tp * pp_rank``, ``world_size = tp * pp``)."""
    return argparse.Namespace(
        rank=rank,
        local_rank=rank % 8,
        world_size=tp * pp,
        num_layers=p.layers,
        hidden_size=p.hidden,
        ffn_hidden_size=p.ffn,
        num_attention_heads=p.heads,
        kv_channels=p.hidden // p.heads,
        seq_length=p.seq_length,
        max_position_embeddings=p.seq_length,
        pos_emb="rotary",
        rotary_pct=p.rotary_pct,
        rotary_emb_base=p.rope_base,
        layernorm_epsilon=p.eps,
        untie_embeddings=True,
        sq_relu=True,
        bias_gelu_fusion=False,
        bias_dropout_fusion=True,
        qk_layernorm="weights_per_layer",
        apply_query_key_layer_scaling=True,
        apply_residual_connection_post_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        tokenizer_type="SentencePiece",
        sp_model_file="adept_vocab.model",
        padded_vocab_size=vocab,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        consumed_train_samples=iteration * 8,
        consumed_valid_samples=0,
        iteration=iteration,
        model_backend=ModelBackend.MEGATRON,
    )


def shard_object(
    values: Values,
    keys: dict,
    p: Preset,
    tp: int,
    pp: int,
    tp_rank: int,
    pp_rank: int,
    dtype: torch.dtype,
    vocab: int,
    iteration: int,
) -> dict:
    specs = {
        key: shard_spec(values, key, shape, kind, tp, tp_rank, dtype, p)
        for key, (shape, kind) in keys.items()
    }
    layers = stage_layers(p.layers, pp)[pp_rank]
    model = stage_model(specs, layers, first=pp_rank == 0, last=pp_rank == pp - 1)
    gen = torch.Generator().manual_seed(values.seed + 7 * tp_rank + 1000 * pp_rank)
    rng_state = [
        {
            "random_rng_state": random.Random(values.seed).getstate(),
            "np_rng_state": np.random.RandomState(values.seed).get_state(),
            "torch_rng_state": TensorSpec.of(gen.get_state()),
            "cuda_rng_state": TensorSpec.of(gen.get_state()),
            "rng_tracker_states": {},
        }
    ]
    return {
        "args": training_args(p, vocab, tp, pp, dtype, iteration, rank=tp_rank + tp * pp_rank),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model,
        "rng_state": rng_state,
    }


def dump_shard(fh, obj, on_bytes) -> None:
    """``write_pt`` with ADEPT's ``ModelBackend`` importable, so the pickle names it as ADEPT's files do."""
    with_adept_module(lambda: write_pt(fh, obj, on_bytes=on_bytes))
