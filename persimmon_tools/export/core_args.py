"""The Megatron-LM side of ``export --format torch_dist``: the ``args`` saved in ``common.pt`` and the
command-line flags that build and load the exported model (``megatron_lm_args.txt``), from one table so
that they agree.

What Megatron-LM (``megatron/training/checkpointing.py``, 2026) reads from a ``torch_dist`` checkpoint's
common state when it loads one with ``--ckpt-format torch_dist``:

- ``args``: ``check_checkpoint_args`` (a resume, not ``--finetune``) asserts that ``num_layers``,
  ``hidden_size``, ``num_attention_heads`` and ``add_position_embedding`` (and, with a vocab file,
  ``max_position_embeddings``, ``make_vocab_size_divisible_by``, ``tokenizer_type``) equal the run's;
  ``load_checkpoint`` reads ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``,
  ``world_size``, ``data_parallel_size`` (resharding, RNG and rerun state), ``no_save_optim`` /
  ``no_save_rng`` (no optimizer or RNG state to load) and ``consumed_train_samples`` /
  ``consumed_valid_samples``; ``--use-checkpoint-args`` copies the model fields (``load_args_from_checkpoint``);
- ``checkpoint_version``: 3.0 (below 3.0 the TP size is compared under an older name);
- ``iteration``: where a resume continues (``--finetune`` starts at 0);
- ``num_floating_point_operations_so_far`` and ``content_metadata`` (how the sharded state dict was laid out:
  ``singleton_local_shards`` False, layers stacked, as :mod:`persimmon_tools.megatron.dist_writer` writes).

Every ``args`` field holds the value Megatron-LM's own parser (``parse_args`` then ``validate_args``) gives
for the written flags, so that ``check_checkpoint_args`` holds on a resume. The flags always add
``--no-bias-gelu-fusion`` (Megatron-Core refuses the fused bias-GeLU with squared ReLU, and its fused GeLU is
the tanh approximation, not the exact GeLU Persimmon uses) and ``--transformer-impl local`` (the layer spec
whose keys the checkpoint holds), and load with ``--no-load-optim --no-load-rng`` (the checkpoint has
weights only; add ``--finetune`` to start again at iteration 0).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.conversion.config import ModelDims
from persimmon_tools.errors import ConversionError
from persimmon_tools.tokenizer.spm import load_sp_bytes

TOKENIZER_TYPE = "GPTSentencePieceTokenizer"  # SentencePiece, its own BOS/EOS, no added specials
#: ``content_metadata`` of the common state: the layout Megatron-LM's ``_build_sharded_state_dict_metadata``
#: records without a distributed optimizer.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
#: Flags of the run, not of the model (not in ``args``).
LOAD_FLAGS = ("--no-load-optim", "--no-load-rng", "--use-mcore-models")
_CANNOT = "Megatron-LM cannot build this model; export --format legacy writes ADEPT's layout instead"


@dataclass(frozen=True)
class MegatronLMArgs:
    """``args`` for ``common.pt``, the flags for ``megatron_lm_args.txt``, and notes for the plan."""

    namespace: argparse.Namespace
    flags: list[list[str]]  # one flag (with its value) per item
    notes: list[str]

    def text(self) -> str:
        """The flags file: one flag per line, each shell-quoted (``$(cat FILE)`` in a command line)."""
        return "".join(shlex.join(flag) + "\n" for flag in self.flags)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def vocab_divisor(rows: int, pieces: int, preferred: int) -> int:
    """``--make-vocab-size-divisible-by`` for which Megatron-LM pads ``pieces`` to exactly ``rows`` at TP=1
    (``_vocab_size_with_padding``: the next multiple): ``preferred`` when it does, else the smallest divisor
    of ``rows`` above ``rows - pieces`` (the smallest keeps the most TP sizes that pad to ``rows`` too)."""
    if -(-pieces // preferred) * preferred == rows:
        return preferred
    return next(n for n in range(rows - pieces + 1, rows + 1) if rows % n == 0)


def vocab_flag(rows: int, vocab_bytes: bytes, origin: str, args: Mapping[str, Any]) -> tuple[int, str | None]:
    """``(--make-vocab-size-divisible-by, a note when it is not the args' own value)`` for the SentencePiece
    model ``vocab_bytes`` and an embedding of ``rows`` rows."""
    pieces = load_sp_bytes(vocab_bytes, origin).get_piece_size()
    preferred = args.get("make_vocab_size_divisible_by") or 128
    divisor = vocab_divisor(rows, pieces, preferred)
    if divisor == preferred:
        return divisor, None
    return divisor, (
        f"--make-vocab-size-divisible-by {divisor}: Megatron-LM pads the {pieces} pieces of the SentencePiece "
        f"model to the embedding's {rows} rows with it (with {preferred} it would not); at a TP size "
        f"that does not divide {rows // divisor} it pads to more rows and the checkpoint does not load"
    )


def _rotary(dims: ModelDims, base: float) -> tuple[float, int]:
    """``(rotary_percent, rotary_base)``, refused when Megatron-Core would compute another rotary."""
    percent = dims.rotary_dim / dims.head_dim
    if int(dims.head_dim * percent) != dims.rotary_dim:  # RotaryEmbedding: dim = int(kv_channels * percent)
        raise ConversionError(
            f"rotary_dim {dims.rotary_dim} of head_dim {dims.head_dim} is no rotary_percent Megatron-Core "
            "rounds back to it",
            hint=_CANNOT,
        )
    if not float(base).is_integer():
        raise ConversionError(
            f"rotary base {base}: Megatron-LM's --rotary-base takes a whole number", hint=_CANNOT
        )
    return percent, int(base)


def megatron_lm_args(
    dims: ModelDims,
    args: Mapping[str, Any],
    *,
    dtype: torch.dtype,
    rope_base: float,
    vocab_rows: int,
    vocab_bytes: bytes,
    vocab_origin: str,
    iteration: int,
    load_dir: Path,
    tokenizer_model: Path,
) -> MegatronLMArgs:
    """The args and flags of the exported model. ``args`` are the export's own (ADEPT's names, checked by
    :func:`~persimmon_tools.export.derive.derive_args`): ``seq_length``, ``max_position_embeddings``,
    ``make_vocab_size_divisible_by``, dropout and the consumed samples come from there."""
    if dims.hidden_act not in ("relu2", "gelu") or not dims.qk_layernorm:
        raise ConversionError(
            f"activation {dims.hidden_act!r}, qk_layernorm {dims.qk_layernorm}: not a Persimmon model",
            hint=_CANNOT,
        )
    percent, base = _rotary(dims, rope_base)
    divisor, note = vocab_flag(vocab_rows, vocab_bytes, vocab_origin, args)
    seq = args.get("seq_length") or dims.max_position_embeddings
    positions = args.get("max_position_embeddings") or dims.max_position_embeddings
    relu2 = dims.hidden_act == "relu2"
    # Persimmon trains without dropout (ADEPT's args and HF's config say 0.0); Megatron-LM's default is 0.1
    attention_dropout = float(args.get("attention_dropout") or 0.0)
    hidden_dropout = float(args.get("hidden_dropout") or 0.0)

    def flag(name: str, value: Any = None) -> list[str]:
        return [name] if value is None else [name, str(value)]

    # (args field, value, flag or [] when Megatron-LM's default gives the value)
    table: list[tuple[str, Any, list[str]]] = [
        ("num_layers", dims.num_layers, flag("--num-layers", dims.num_layers)),
        ("hidden_size", dims.hidden_size, flag("--hidden-size", dims.hidden_size)),
        ("ffn_hidden_size", dims.intermediate_size, flag("--ffn-hidden-size", dims.intermediate_size)),
        ("num_attention_heads", dims.num_heads, flag("--num-attention-heads", dims.num_heads)),
        ("kv_channels", dims.head_dim, flag("--kv-channels", dims.head_dim)),
        ("group_query_attention", False, []),
        ("seq_length", seq, flag("--seq-length", seq)),
        ("max_position_embeddings", positions, flag("--max-position-embeddings", positions)),
        ("position_embedding_type", "rope", flag("--position-embedding-type", "rope")),
        ("add_position_embedding", True, []),  # the parser's default; a rope model has none anyway
        ("use_rotary_position_embeddings", False, []),
        ("rotary_percent", percent, flag("--rotary-percent", _number(percent))),
        ("rotary_base", base, flag("--rotary-base", base)),
        ("rotary_interleaved", False, []),
        ("squared_relu", relu2, flag("--squared-relu") if relu2 else []),
        ("swiglu", False, []),
        ("bias_gelu_fusion", False, flag("--no-bias-gelu-fusion")),
        ("add_bias_linear", True, []),
        ("add_qkv_bias", True, []),  # validate_args: follows add_bias_linear
        ("qk_layernorm", True, flag("--qk-layernorm")),
        ("normalization", "LayerNorm", flag("--normalization", "LayerNorm")),
        ("layernorm_epsilon", dims.layer_norm_eps, flag("--norm-epsilon", dims.layer_norm_eps)),
        ("apply_query_key_layer_scaling", False, []),
        ("apply_residual_connection_post_layernorm", False, []),
        (
            "untie_embeddings_and_output_weights",
            dims.untied,
            flag("--untie-embeddings-and-output-weights") if dims.untied else [],
        ),
        ("attention_dropout", attention_dropout, flag("--attention-dropout", _number(attention_dropout))),
        ("hidden_dropout", hidden_dropout, flag("--hidden-dropout", _number(hidden_dropout))),
        ("transformer_impl", "local", flag("--transformer-impl", "local")),
        ("tokenizer_type", TOKENIZER_TYPE, flag("--tokenizer-type", TOKENIZER_TYPE)),
        ("tokenizer_model", str(tokenizer_model), flag("--tokenizer-model", tokenizer_model)),
        ("make_vocab_size_divisible_by", divisor, flag("--make-vocab-size-divisible-by", divisor)),
        ("padded_vocab_size", vocab_rows, []),
        ("bf16", dtype == torch.bfloat16, flag("--bf16") if dtype == torch.bfloat16 else []),
        ("fp16", dtype == torch.float16, flag("--fp16") if dtype == torch.float16 else []),
        ("params_dtype", dtype, []),
        ("tensor_model_parallel_size", 1, []),
        ("pipeline_model_parallel_size", 1, []),
        ("world_size", 1, []),
        ("data_parallel_size", 1, []),
        ("ckpt_format", "torch_dist", flag("--ckpt-format", "torch_dist")),
        ("use_dist_ckpt", True, []),
        ("no_save_optim", True, []),
        ("no_save_rng", True, []),
        ("iteration", iteration, []),
        ("consumed_train_samples", int(args.get("consumed_train_samples") or 0), []),
        ("consumed_valid_samples", int(args.get("consumed_valid_samples") or 0), []),
        ("skipped_train_samples", 0, []),
    ]
    flags = [f for _, _, f in table if f] + [flag("--load", load_dir), *(flag(f) for f in LOAD_FLAGS)]
    namespace = argparse.Namespace(**{name: value for name, value, _ in table})
    return MegatronLMArgs(namespace, flags, [note] if note else [])


def common_state(namespace: argparse.Namespace, iteration: int) -> dict[str, Any]:
    """``common.pt``: what Megatron-LM's ``generate_state_dict`` and ``save_checkpoint`` put there, without
    optimizer, scheduler, RNG or rerun state."""
    return {
        "args": namespace,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": dict(CONTENT_METADATA),
    }
