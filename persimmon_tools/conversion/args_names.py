"""A checkpoint's ``args`` in both spellings: ADEPT's Megatron fork (spec §B.5) and current Megatron-LM.

ADEPT's releases carry ADEPT's field names; a Megatron-Core ``torch_dist`` checkpoint's ``common.pt`` carries
Megatron-LM's (``megatron/training/arguments.py``), which name some of the same facts differently and add
fields for architectures Persimmon is not. This module is the one place that knows both:

- :func:`arg` is the lookup ``conversion`` reads every field through (:func:`~persimmon_tools.conversion.
  config.derive_dims`): ADEPT's name, else Megatron-LM's name for it (:data:`ALIASES`), its value read in
  ADEPT's terms (``position_embedding_type="rope"`` is ``pos_emb="rotary"``); :func:`spelled` says which
  name held it, for messages;
- :func:`alias_conflicts`: both spellings present and disagreeing;
- :func:`architecture_problems`: Megatron-LM fields that describe another architecture (RMSNorm, a gated
  MLP, grouped-query attention, no QK-layernorm, no linear biases, zero-centred LayerNorm weights,
  interleaved or scaled rotary, experts, multi-latent attention, ...);
- :func:`adept_fields`: a Megatron-LM args dict with ADEPT's names added (export writes ADEPT's layout).

Megatron-LM fields of the same name as ADEPT's (``num_layers``, ``hidden_size``, ``ffn_hidden_size``,
``num_attention_heads``, ``kv_channels``, ``padded_vocab_size``, ``seq_length``, ``max_position_embeddings``,
``apply_residual_connection_post_layernorm``) need no alias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _rope(value: Any) -> Any:
    return "rotary" if value == "rope" else value


#: ADEPT name -> (Megatron-LM name, how its value reads in ADEPT's terms).
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "layernorm_epsilon": ("norm_epsilon", lambda v: v),
    "rotary_emb_base": ("rotary_base", lambda v: v),
    "rotary_pct": ("rotary_percent", lambda v: v),
    "untie_embeddings": ("untie_embeddings_and_output_weights", lambda v: v),
    "pos_emb": ("position_embedding_type", _rope),
    "sq_relu": ("squared_relu", lambda v: v),
}


def raw_arg(args: Any, name: str) -> Any:
    """``args.name`` for a Namespace, stand-in or dict, exactly as spelled; None when absent."""
    if args is None:
        return None
    if isinstance(args, dict):
        return args.get(name)
    value = getattr(args, name, None)
    if value is None and isinstance(getattr(args, "state", None), dict):  # an Opaque stand-in
        value = args.state.get(name)
    return value


def arg(args: Any, name: str) -> Any:
    """``args.name`` by ADEPT's ``name``, else by its Megatron-LM alias (value in ADEPT's terms); None when
    neither is there."""
    value = raw_arg(args, name)
    if value is None and name in ALIASES:
        alias, read = ALIASES[name]
        other = raw_arg(args, alias)
        value = None if other is None else read(other)
    return value


def spelled(args: Any, name: str) -> str:
    """The name :func:`arg` found ``name`` under (ADEPT's unless only the alias is there)."""
    if raw_arg(args, name) is None and name in ALIASES and raw_arg(args, ALIASES[name][0]) is not None:
        return ALIASES[name][0]
    return name


def alias_conflicts(args: Any) -> list[str]:
    """One line per fact the args hold under both names with different values."""
    out = []
    for name, (alias, read) in ALIASES.items():
        ours, theirs = raw_arg(args, name), raw_arg(args, alias)
        if ours is not None and theirs is not None and ours != read(theirs):
            out.append(f"args.{name} = {str(ours)[:40]} but args.{alias} = {str(theirs)[:40]}")
    return out


def _is(value: Any, *wanted: Any) -> bool:
    return any(value is w or (type(value) is type(w) and value == w) for w in wanted)


def architecture_problems(args: Any) -> list[str]:
    """Megatron-LM args that describe an architecture Persimmon is not (module docstring); [] for ADEPT's
    args, which hold none of these fields."""

    def get(name: str) -> Any:
        return raw_arg(args, name)

    out = []
    norm = get("normalization")
    if norm is not None and norm != "LayerNorm":
        out.append(f"args.normalization = {str(norm)[:40]}; Persimmon uses LayerNorm")
    for name in ("swiglu", "gated_linear_unit", "quick_geglu"):
        if _is(get(name), True):
            out.append(f"args.{name} = True (a gated MLP); Persimmon's MLP is squared ReLU of one projection")
    heads, groups = get("num_attention_heads"), get("num_query_groups")
    if _is(get("group_query_attention"), True) and groups != heads:
        out.append(
            f"args.group_query_attention with num_query_groups = {str(groups)[:20]} of {str(heads)[:20]} "
            "heads; "
            "Persimmon's attention has as many key/value heads as query heads"
        )
    if _is(get("qk_layernorm"), False):
        out.append("args.qk_layernorm = False; Persimmon normalises queries and keys (QK-layernorm)")
    if _is(get("add_bias_linear"), False):
        out.append("args.add_bias_linear = False; Persimmon's linear layers have biases")
    for name in ("apply_layernorm_1p", "layernorm_zero_centered_gamma"):
        if _is(get(name), True):
            out.append(
                f"args.{name} = True (LayerNorm weights stored as weight - 1); HF Persimmon stores them whole"
            )
    if _is(get("rotary_interleaved"), True):
        out.append("args.rotary_interleaved = True; Persimmon rotates the two halves of the rotary dims")
    if _is(get("use_rope_scaling"), True) or get("rotary_seq_len_interpolation_factor") not in (None, 1):
        out.append("args: rotary position scaling (use_rope_scaling / rotary_seq_len_interpolation_factor)")
    for name in ("num_experts", "num_moe_experts", "mtp_num_layers"):
        if get(name) not in (None, 0):
            out.append(f"args.{name} = {str(get(name))[:20]}; Persimmon has none")
    for name in ("multi_latent_attention", "qk_l2_norm", "attention_output_gate"):
        if _is(get(name), True):
            out.append(f"args.{name} = True; Persimmon has no such attention")
    softmax = get("softmax_type")
    if softmax is not None and softmax != "vanilla":
        out.append(f"args.softmax_type = {str(softmax)[:40]}; Persimmon uses the plain softmax")
    return out


def adept_fields(fields: dict[str, Any] | None) -> dict[str, Any] | None:
    """``fields`` with ADEPT's name added for each fact only Megatron-LM's name holds (values in ADEPT's
    terms); ADEPT's own fields are kept as they are."""
    if fields is None:
        return None
    out = dict(fields)
    for name in ALIASES:
        if out.get(name) is None and (value := arg(fields, name)) is not None:
            out[name] = value
    return out
