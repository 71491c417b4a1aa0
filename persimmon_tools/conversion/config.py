"""Model dimensions and the HF ``config.json`` from the checkpoint itself: ``args`` cross-checked with shapes.

Shapes are the ground truth for sizes; ``ckpt["args"]`` (spec §B.5) supplies what shapes cannot tell
(``rotary_emb_base``, ``layernorm_epsilon``, ``seq_length``) and is cross-checked wherever both speak; every
layer's stored ``inv_freq``, on every shard, must be what the rotary base gives
(:mod:`persimmon_tools.conversion.rotary`).
Where ``args`` is silent we use what ADEPT's own inference code would use (its CLI defaults:
``layernorm_epsilon`` 1e-5, ``rotary_emb_base`` 25000) and log that we did. Every disagreement is collected
and reported in one :class:`ConfigError` naming both values.

``args`` are read by ADEPT's names or Megatron-LM's (a Megatron-Core torch_dist checkpoint's ``common.pt``:
``norm_epsilon``, ``rotary_base``, ``rotary_percent``, ``position_embedding_type``, ...), through the one
lookup of :mod:`persimmon_tools.conversion.args_names`, which also refuses Megatron-LM args that describe
another architecture (RMSNorm, SwiGLU, grouped-query attention, ...). A torch_dist checkpoint stores whole
tensors, so its ``tensor_model_parallel_size`` and ``pipeline_model_parallel_size`` are not compared with a
shard grid.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from persimmon_tools.conversion.args_names import alias_conflicts, architecture_problems, arg, spelled
from persimmon_tools.conversion.rotary import inv_freq_problems
from persimmon_tools.errors import ConfigError
from persimmon_tools.megatron.checkpoint import Checkpoint
from persimmon_tools.ops import layer_index

log = logging.getLogger(__name__)

EMBED = "language_model.embedding.word_embeddings.weight"
HEAD = "word_embeddings_for_head.weight"
_LAYER0 = "language_model.encoder.layers.0."
ADEPT_DEFAULT_EPS = 1e-5  # megatron/arguments.py --layernorm-epsilon default (not restored from checkpoints)
ADEPT_DEFAULT_ROPE_BASE = 25000.0  # megatron/arguments.py --rotary-emb-base default
HF_DEFAULT_MAX_POSITIONS = 16384
#: What transformers (>= 5) uses when a Persimmon config.json names no rope_theta / partial_rotary_factor;
#: verify's HF side and export read config.json the same way.
TRANSFORMERS_DEFAULT_THETA = 10000.0
TRANSFORMERS_DEFAULT_PARTIAL = 0.5  # PersimmonConfig's default


@dataclass(frozen=True)
class ModelDims:
    """Architecture of one checkpoint. Tensor layouts: see :mod:`persimmon_tools.mapping`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    layer_norm_eps: float
    max_position_embeddings: int
    untied: bool
    hidden_act: str = "relu2"
    qk_layernorm: bool = True

    @property
    def partial_rotary_factor(self) -> float:
        return self.rotary_dim / self.head_dim

    def symbols(self) -> dict[str, int]:
        """Values of the shape symbols used in the mapping table."""
        attn = self.num_heads * self.head_dim
        return {
            "V": self.vocab_size,
            "H": self.hidden_size,
            "F": self.intermediate_size,
            "A": attn,
            "QKV": 3 * attn,
            "D": self.head_dim,
            "R": self.rotary_dim // 2,
        }

    def flag(self, name: str | None) -> bool:
        return True if name is None else bool(getattr(self, name))

    def num_parameters(self) -> int:
        s = self.symbols()
        per_layer = (
            4 * s["H"]
            + s["QKV"] * (s["H"] + 1)
            + 4 * s["D"]
            + s["H"] * (s["A"] + 1)
            + s["F"] * (s["H"] + 1)
            + s["H"] * (s["F"] + 1)
        )
        return s["V"] * s["H"] * (2 if self.untied else 1) + self.num_layers * per_layer + 2 * s["H"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _not_persimmon(ckpt: Checkpoint, why: str) -> ConfigError:
    families = sorted(
        {
            ".".join(re.sub(r"^language_model\.encoder\.layers\.\d+\.", "layers.N.", k).split(".")[:4])
            for k in ckpt.tensors
        }
    )
    return ConfigError(
        f"not a Persimmon checkpoint: {why}. Found {len(ckpt.tensors)} tensor{'' if len(ckpt.tensors) == 1 else 's'}: "
        + ", ".join(families[:14])
        + (" ..." if len(families) > 14 else ""),
        hint="persimmon-tools converts ADEPT Persimmon checkpoints (rotary, QK-layernorm, squared ReLU)",
    )


#: ``args`` fields derive_dims reads as numbers: name -> (integer?, lowest, highest); floats must be > lowest.
_NUMERIC_ARGS: dict[str, tuple[bool, float, float]] = {
    **{
        name: (True, 1, 2**53)
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "padded_vocab_size",
            "kv_channels",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "max_position_embeddings",
            "seq_length",
        )
    },
    "rotary_pct": (False, 0.0, 1.0),
    "rotary_emb_base": (False, 0.0, math.inf),
    "layernorm_epsilon": (False, 0.0, math.inf),
}
#: Tensors derive_dims reads shapes from, and the rank each must have.
_RANKS = {
    EMBED: 2,
    HEAD: 2,
    _LAYER0 + "self_attention.query_key_value.weight": 2,
    _LAYER0 + "self_attention.q_layernorm.weight": 1,
    _LAYER0 + "mlp.dense_h_to_4h.weight": 2,
    _LAYER0 + "self_attention.rotary_emb.inv_freq": 1,
}


def numeric_arg_problem(name: str, value: Any) -> str | None:
    """What ``args.<name>`` must be, when ``value`` is not what :func:`derive_dims` accepts for that field
    (None: it is, or derive_dims does not read ``name`` as a number). The one rule for these fields: export
    checks ``--set`` values with it too."""
    rule = _NUMERIC_ARGS.get(name)
    if rule is None:
        return None
    integer, low, high = rule
    if integer:
        return None if type(value) is int and low <= value <= high else "a positive integer"
    finite = type(value) is int or (type(value) is float and math.isfinite(value))
    return None if finite and low < value <= high else f"a number in ({low:g}, {high:g}]"


def _input_problems(ckpt: Checkpoint) -> list[str]:
    """Args that are not numbers in range, and shape-defining tensors of the wrong rank (a corrupt or
    hostile pickle can hold anything); checked before any of them is used in arithmetic."""
    problems = []
    for name in _NUMERIC_ARGS:
        value = arg(ckpt.args, name)
        if value is None:
            continue
        need = numeric_arg_problem(name, value)
        if need is not None:
            huge = type(value) is int and abs(value) > 2**64
            shown = f"<{value.bit_length()}-bit integer>" if huge else str(value)[:60]
            problems.append(
                f"args.{spelled(ckpt.args, name)} = {shown} ({type(value).__name__}), expected {need}"
            )
    for key, rank in _RANKS.items():
        if key in ckpt.tensors and len(ckpt.tensors[key].shape) != rank:
            problems.append(f"{key} has shape {list(ckpt.tensors[key].shape)}, expected {rank}-D")
    return problems


def derive_dims(ckpt: Checkpoint) -> ModelDims:
    """Dimensions from shapes, cross-checked with ``ckpt.args``; raises ConfigError listing every problem."""
    t, args = ckpt.tensors, ckpt.args
    other = architecture_problems(args)
    if other:
        raise ConfigError(
            "not a Persimmon checkpoint: its args describe another architecture:\n  - "
            + "\n  - ".join(other),
            hint="persimmon-tools converts Persimmon checkpoints (LayerNorm, QK-layernorm, full multi-head "
            "attention, squared ReLU MLP, rotary embeddings)",
        )
    if any("position_embeddings" in k for k in t):
        raise _not_persimmon(ckpt, "it has learned position embeddings (Persimmon uses rotary)")
    if EMBED not in t or (_LAYER0 + "self_attention.query_key_value.weight") not in t:
        raise _not_persimmon(ckpt, f"no {EMBED} or layer-0 fused query_key_value")
    if (_LAYER0 + "self_attention.q_layernorm.weight") not in t:
        raise _not_persimmon(ckpt, "layer 0 has no self_attention.q_layernorm (QK-layernorm)")
    problems = _input_problems(ckpt)
    if problems:
        raise ConfigError(
            "the checkpoint's args or tensors are malformed:\n  - " + "\n  - ".join(problems),
            hint="the checkpoint is damaged or was tampered with; `persimmon-tools inspect` shows both",
        )
    wrong = [
        f"args.{name} = {value} but {found} {what} found"
        for name, found, what in (
            ("tensor_model_parallel_size", ckpt.release.tp, "tensor-parallel rank(s) (mp_rank_XX) were"),
            ("pipeline_model_parallel_size", ckpt.release.pp, "pipeline stage(s) (mp_rank_XX_YYY) were"),
        )
        if (value := arg(args, name)) is not None and value != found and ckpt.release.kind != "torch_dist"
    ]
    if wrong:  # extra or missing shards: every shape below would disagree too; say the cause once
        raise ConfigError(
            f"{ckpt.release.source}: the shard grid does not match the checkpoint's args ({'; '.join(wrong)})",
            hint="remove extra mp_rank_* folders, copy missing ones, or pass one complete iteration",
        )
    problems += alias_conflicts(args)
    vocab, hidden = t[EMBED].shape
    layer_ids = sorted({i for k in t if (i := layer_index(k)) is not None})
    num_layers = len(layer_ids)
    if layer_ids != list(range(num_layers)):
        problems.append(f"layer numbers are not 0..{num_layers - 1}: {layer_ids[:10]}")
    head_dim = t[_LAYER0 + "self_attention.q_layernorm.weight"].shape[0]
    qkv_rows = t[_LAYER0 + "self_attention.query_key_value.weight"].shape[0]
    num_heads = qkv_rows // (3 * head_dim) if head_dim else 0
    if not head_dim or qkv_rows % (3 * head_dim):
        problems.append(f"query_key_value has {qkv_rows} rows, not a multiple of 3 x head_dim ({head_dim})")
    if num_heads * head_dim != hidden:
        problems.append(
            f"heads x head_dim = {num_heads} x {head_dim} != hidden_size {hidden}; "
            "HF PersimmonForCausalLM requires them equal"
        )
    ffn_key = _LAYER0 + "mlp.dense_h_to_4h.weight"
    ffn = t[ffn_key].shape[0] if ffn_key in t else 0

    def cross(name: str, found: Any, what: str) -> None:
        value = arg(args, name)
        if value is not None and found is not None and value != found:
            problems.append(f"args.{name} = {value} but {what} = {found}")

    cross("num_layers", num_layers, "the number of layers in the tensors")
    cross("hidden_size", hidden, "the embedding width")
    cross("num_attention_heads", num_heads, "query_key_value rows / (3 x q_layernorm size)")
    cross("ffn_hidden_size", ffn, "mlp.dense_h_to_4h rows")
    cross("padded_vocab_size", vocab, "the embedding rows")
    cross("kv_channels", head_dim, "the q_layernorm size (head_dim)")
    if arg(args, "apply_residual_connection_post_layernorm"):
        problems.append("args.apply_residual_connection_post_layernorm = True; HF Persimmon is pre-LN only")
    pos_emb = arg(args, "pos_emb")
    if pos_emb is not None and str(pos_emb) != "rotary":
        problems.append(f"args.{spelled(args, 'pos_emb')} = {pos_emb!r}; Persimmon uses rotary embeddings")
    untied = HEAD in t
    if arg(args, "untie_embeddings") is not None and bool(arg(args, "untie_embeddings")) != untied:
        problems.append(
            f"args.{spelled(args, 'untie_embeddings')} = {arg(args, 'untie_embeddings')} but "
            f"{HEAD} is {'present' if untied else 'absent'}"
        )
    hidden_act = "relu2"
    if arg(args, "sq_relu") is False:
        hidden_act = "gelu"
        log.warning(
            "args.%s is False: the MLP activation is GeLU (written as hidden_act='gelu')",
            spelled(args, "sq_relu"),
        )

    # Rotary: dims from inv_freq length and args.rotary_pct; base from args (or ADEPT's default), checked.
    inv_key = _LAYER0 + "self_attention.rotary_emb.inv_freq"
    inv = t[inv_key].materialize() if inv_key in t else None
    rotary_pct = arg(args, "rotary_pct")
    rd_args = int(rotary_pct * head_dim) if rotary_pct is not None else None
    rd_inv = 2 * inv.numel() if inv is not None else None
    if rd_args is not None and rd_inv is not None and rd_args != rd_inv:
        problems.append(
            f"args.{spelled(args, 'rotary_pct')} = {rotary_pct} gives rotary_dim {rd_args} but inv_freq has "
            f"{inv.numel()} entries (rotary_dim {rd_inv})"
        )
    rotary_dim = rd_args if rd_args is not None else rd_inv
    if rotary_dim is None:
        problems.append(
            "cannot tell the rotary dimension: args.rotary_pct (Megatron-LM: rotary_percent) is missing and "
            "there is no inv_freq"
        )
        rotary_dim = head_dim
    base, base_from = arg(args, "rotary_emb_base"), f"args.{spelled(args, 'rotary_emb_base')}"
    if base is None:
        base, base_from = ADEPT_DEFAULT_ROPE_BASE, "ADEPT's default"
        log.info("args has no rotary_emb_base; using ADEPT's default %s (checked against inv_freq)", base)
    if rotary_dim and (rd_inv is None or rd_inv == rotary_dim):  # every layer's buffer, on every rank
        problems += inv_freq_problems(ckpt, float(base), rotary_dim, base_from)
    eps = arg(args, "layernorm_epsilon")
    if eps is None:
        eps = ADEPT_DEFAULT_EPS
        log.info("args has no layernorm_epsilon; using ADEPT's inference default %s", eps)
    max_pos = arg(args, "max_position_embeddings") or arg(args, "seq_length")
    if max_pos is None:
        max_pos = HF_DEFAULT_MAX_POSITIONS
        log.warning("args has no max_position_embeddings/seq_length; writing %d", max_pos)
    if problems:
        raise ConfigError(
            "the checkpoint's args and tensors disagree:\n  - " + "\n  - ".join(problems),
            hint="the checkpoint may be damaged or mixed from different runs; `persimmon-tools inspect` shows both",
        )
    return ModelDims(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=float(base),
        layer_norm_eps=float(eps),
        max_position_embeddings=int(max_pos),
        untied=untied,
        hidden_act=hidden_act,
    )


def hf_config(dims: ModelDims, dtype: torch.dtype, special_id: int | None) -> dict[str, Any]:
    """``config.json`` for ``PersimmonForCausalLM`` (readable by transformers 4.x and 5.x)."""
    if not math.isclose(int(dims.partial_rotary_factor * dims.head_dim), dims.rotary_dim):
        raise ConfigError(
            f"rotary_dim {dims.rotary_dim} is not expressible as partial_rotary_factor x head_dim"
        )
    return {
        "architectures": ["PersimmonForCausalLM"],
        "model_type": "persimmon",
        "vocab_size": dims.vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "hidden_act": dims.hidden_act,
        "max_position_embeddings": dims.max_position_embeddings,
        "layer_norm_eps": dims.layer_norm_eps,
        "rope_theta": dims.rope_theta,
        "partial_rotary_factor": dims.partial_rotary_factor,
        "rope_scaling": None,
        "qk_layernorm": dims.qk_layernorm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": not dims.untied,
        "bos_token_id": special_id,
        "eos_token_id": special_id,
        "pad_token_id": special_id,  # ADEPT pads with EOD; the tokenizer's pad_token is the same piece
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def generation_config(special_id: int | None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """``generation_config.json``: BOS/EOS/pad ids and a default length from the checkpoint, ``max_new_tokens``
    = its sequence length (``convert`` passes config.json's ``max_position_embeddings``:
    ``args.max_position_embeddings``, else ``args.seq_length``; None: no length). A bare
    ``model.generate(**inputs)`` then writes up to one trained window of new tokens, silently, instead of
    transformers' model-agnostic 20 and its warning. Not ``max_length``: transformers 5 logs "Both
    `max_new_tokens` and `max_length` seem to have been set" on every ``generate(max_new_tokens=N)`` of a
    model whose generation_config.json sets ``max_length`` (docs/format.md)."""
    config: dict[str, Any] = {
        "_from_model_config": True,
        "bos_token_id": special_id,
        "eos_token_id": special_id,
        "pad_token_id": special_id,
    }
    if max_new_tokens is not None:
        config["max_new_tokens"] = int(max_new_tokens)
    return config
