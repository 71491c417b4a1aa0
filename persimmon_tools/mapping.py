"""THE TABLE: Megatron key templates ↔ Hugging Face Persimmon key templates (spec §D), and its one lookup.

``{i}`` is the layer index. Shapes are written with symbols evaluated against the model's dimensions:
``V`` vocab rows (padded), ``H`` hidden, ``F`` ffn, ``A`` heads × head_dim, ``QKV`` 3 × A, ``D`` head_dim,
``R`` rotary_dim / 2 (length of ``inv_freq``). ``when`` names the config flag a rule depends on.

Layouts (all ``[out, in]`` like ``nn.Linear``):
- ``query_key_value.weight``: ``[n_heads*3*head_dim, hidden]``, per-head ``[q|k|v]`` (spec §C), copied as is.
- ``dense.weight``: ``[hidden, n_heads*head_dim]``; ``dense_h_to_4h.weight``: ``[ffn, hidden]``;
  ``dense_4h_to_h.weight``: ``[hidden, ffn]``; embeddings and head ``[vocab, hidden]``.

:data:`RULES` is data. The lookup below it is the only place the templates become patterns, in both
directions and one dialect (anchored; ``{i}`` = a canonical ASCII decimal, no leading zeros), compiled once:
:func:`match_source` / :func:`source_matches` (Megatron key → rule and layer), :func:`match_target`
(HF key → rule and layer), :func:`expand` and :meth:`Rule.source_key` / :meth:`Rule.target_key` (rule and
layer → key), :func:`parallel_kind`; :func:`match_core` / :func:`core_matches` (Megatron-Core key → rule)
and :attr:`Rule.core_key` (rule → Megatron-Core key).

Megatron-Core column (``Rule.core``, since 2026-12-07, 0.1.0): the key a Megatron-Core ``torch_dist``
checkpoint stores the tensor under (the sharded key in its ``.metadata``, GPTModel with the local layer
spec). Per-layer tensors are stored once, stacked on a leading layer axis: ``Rule.core`` has no ``{i}`` and
the stored global shape is ``[num_layers, *shape]`` (e.g. ``decoder.layers.self_attention.linear_qkv.weight``
``[L, n_heads*3*head_dim, hidden]``, per-head ``[q|k|v]`` as in ``query_key_value``). ADEPT's
``input_layernorm`` and ``post_attention_layernorm`` are fused into the following linear layer's
``layer_norm_weight`` / ``layer_norm_bias`` there. ``inv_freq`` is not stored (``core`` None).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from persimmon_tools.ops import Parallel

C, R, V, P = Parallel.COLUMN, Parallel.ROW, Parallel.VOCAB, Parallel.REPLICATED
LAYER = "{i}"


def expand(template: str, layer: int | None) -> str:
    """``template`` with ``{i}`` replaced by ``layer`` (None for a template without ``{i}``)."""
    if (LAYER in template) != (layer is not None):
        raise ValueError(
            f"{template!r} needs {'a' if LAYER in template else 'no'} layer index, got {layer!r}"
        )
    return template if layer is None else template.replace(LAYER, str(layer))


@dataclass(frozen=True)
class Rule:
    source: str  # Megatron key template (flattened ckpt["model"])
    target: str | None  # HF key template; None = dropped on purpose
    parallel: Parallel
    shape: tuple[str, ...]
    when: str | None = None  # "qk_layernorm" | "untied" | None (always)
    core: str | None = None  # Megatron-Core torch_dist key (per-layer: stacked, no {i}); None = not stored

    @property
    def per_layer(self) -> bool:
        """Whether the rule holds one tensor per layer (its templates contain ``{i}``)."""
        return LAYER in self.source

    @property
    def core_key(self) -> str | None:
        """The Megatron-Core ``torch_dist`` key (stacked on a leading layer axis for per-layer rules)."""
        return self.core

    def source_key(self, layer: int | None = None) -> str:
        return expand(self.source, layer)

    def target_key(self, layer: int | None = None) -> str | None:
        return None if self.target is None else expand(self.target, layer)

    def shape_for(self, symbols: Mapping[str, int]) -> tuple[int, ...]:
        """The tensor's shape for the model whose shape symbols are ``symbols`` (``ModelDims.symbols()``)."""
        return tuple(symbols[s] for s in self.shape)


_L = "language_model.encoder.layers.{i}."
_T = "model.layers.{i}."
_A = "decoder.layers.self_attention."
_M = "decoder.layers.mlp."

RULES: tuple[Rule, ...] = (
    Rule(
        "language_model.embedding.word_embeddings.weight",
        "model.embed_tokens.weight",
        V,
        ("V", "H"),
        core="embedding.word_embeddings.weight",
    ),
    Rule(
        _L + "input_layernorm.weight",
        _T + "input_layernorm.weight",
        P,
        ("H",),
        core=_A + "linear_qkv.layer_norm_weight",
    ),
    Rule(
        _L + "input_layernorm.bias",
        _T + "input_layernorm.bias",
        P,
        ("H",),
        core=_A + "linear_qkv.layer_norm_bias",
    ),
    Rule(
        _L + "self_attention.query_key_value.weight",
        _T + "self_attn.query_key_value.weight",
        C,
        ("QKV", "H"),
        core=_A + "linear_qkv.weight",
    ),
    Rule(
        _L + "self_attention.query_key_value.bias",
        _T + "self_attn.query_key_value.bias",
        C,
        ("QKV",),
        core=_A + "linear_qkv.bias",
    ),
    Rule(
        _L + "self_attention.q_layernorm.weight",
        _T + "self_attn.q_layernorm.weight",
        P,
        ("D",),
        "qk_layernorm",
        core=_A + "q_layernorm.weight",
    ),
    Rule(
        _L + "self_attention.q_layernorm.bias",
        _T + "self_attn.q_layernorm.bias",
        P,
        ("D",),
        "qk_layernorm",
        core=_A + "q_layernorm.bias",
    ),
    Rule(
        _L + "self_attention.k_layernorm.weight",
        _T + "self_attn.k_layernorm.weight",
        P,
        ("D",),
        "qk_layernorm",
        core=_A + "k_layernorm.weight",
    ),
    Rule(
        _L + "self_attention.k_layernorm.bias",
        _T + "self_attn.k_layernorm.bias",
        P,
        ("D",),
        "qk_layernorm",
        core=_A + "k_layernorm.bias",
    ),
    Rule(
        _L + "self_attention.dense.weight",
        _T + "self_attn.dense.weight",
        R,
        ("H", "A"),
        core=_A + "linear_proj.weight",
    ),
    Rule(
        _L + "self_attention.dense.bias", _T + "self_attn.dense.bias", P, ("H",), core=_A + "linear_proj.bias"
    ),
    Rule(
        _L + "post_attention_layernorm.weight",
        _T + "post_attention_layernorm.weight",
        P,
        ("H",),
        core=_M + "linear_fc1.layer_norm_weight",
    ),
    Rule(
        _L + "post_attention_layernorm.bias",
        _T + "post_attention_layernorm.bias",
        P,
        ("H",),
        core=_M + "linear_fc1.layer_norm_bias",
    ),
    Rule(
        _L + "mlp.dense_h_to_4h.weight",
        _T + "mlp.dense_h_to_4h.weight",
        C,
        ("F", "H"),
        core=_M + "linear_fc1.weight",
    ),
    Rule(
        _L + "mlp.dense_h_to_4h.bias", _T + "mlp.dense_h_to_4h.bias", C, ("F",), core=_M + "linear_fc1.bias"
    ),
    Rule(
        _L + "mlp.dense_4h_to_h.weight",
        _T + "mlp.dense_4h_to_h.weight",
        R,
        ("H", "F"),
        core=_M + "linear_fc2.weight",
    ),
    Rule(
        _L + "mlp.dense_4h_to_h.bias", _T + "mlp.dense_4h_to_h.bias", P, ("H",), core=_M + "linear_fc2.bias"
    ),
    Rule(
        "language_model.encoder.final_layernorm.weight",
        "model.final_layernorm.weight",
        P,
        ("H",),
        core="decoder.final_layernorm.weight",
    ),
    Rule(
        "language_model.encoder.final_layernorm.bias",
        "model.final_layernorm.bias",
        P,
        ("H",),
        core="decoder.final_layernorm.bias",
    ),
    Rule(
        "word_embeddings_for_head.weight",
        "lm_head.weight",
        V,
        ("V", "H"),
        "untied",
        core="output_layer.weight",
    ),
    # HF recomputes inv_freq from rope_theta / partial_rotary_factor (a non-persistent buffer); Megatron-Core
    # does not store it either.
    Rule(_L + "self_attention.rotary_emb.inv_freq", None, P, ("R",)),
)


#: The one buffer the table drops on purpose (``inv_freq``, shape ``[R]``, replicated).
INV_FREQ: Rule = next(r for r in RULES if r.target is None)


@dataclass(frozen=True)
class Match:
    """A key matched by a rule: the rule and the layer index (None for a rule without ``{i}``)."""

    rule: Rule
    layer: int | None

    @property
    def source(self) -> str:
        """The Megatron key."""
        return self.rule.source_key(self.layer)

    @property
    def target(self) -> str | None:
        """The HF key (None: the rule drops the tensor)."""
        return self.rule.target_key(self.layer)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape(LAYER), r"(?P<i>0|[1-9][0-9]*)"))


_SOURCES = tuple((_pattern(r.source), r) for r in RULES)
_TARGETS = tuple((_pattern(r.target), r) for r in RULES if r.target is not None)
_CORES = tuple((_pattern(r.core), r) for r in RULES if r.core is not None)


def _matches(patterns: tuple[tuple[re.Pattern[str], Rule], ...], key: str) -> tuple[Match, ...]:
    out = []
    for pattern, rule in patterns:
        if m := pattern.fullmatch(key):
            layer = m.groupdict().get("i")
            out.append(Match(rule, None if layer is None else int(layer)))
    return tuple(out)


def source_matches(key: str) -> tuple[Match, ...]:
    """Every rule whose Megatron template matches ``key`` (the engine reports none or several as errors)."""
    return _matches(_SOURCES, key)


def match_source(key: str) -> Match | None:
    """The one rule (and layer) THE TABLE has for Megatron ``key``; None when no rule, or several, match."""
    found = _matches(_SOURCES, key)
    return found[0] if len(found) == 1 else None


def match_target(name: str) -> Match | None:
    """The one rule (and layer) that produces HF key ``name`` (the inverse direction); None if none does."""
    found = _matches(_TARGETS, name)
    return found[0] if len(found) == 1 else None


def parallel_kind(key: str) -> Parallel | None:
    """The tensor-parallel kind of Megatron ``key`` per THE TABLE (None for keys no rule names)."""
    found = match_source(key)
    return None if found is None else found.rule.parallel


def core_matches(key: str) -> tuple[Rule, ...]:
    """Every rule whose Megatron-Core key is ``key`` (a ``torch_dist`` key: per-layer rules are stacked, so
    the key names no layer)."""
    return tuple(rule for pattern, rule in _CORES if pattern.fullmatch(key))


def match_core(key: str) -> Rule | None:
    """The one rule THE TABLE has for Megatron-Core key ``key``; None when no rule, or several, match. The
    layer is not part of the key: a per-layer rule's tensor is stacked, ``[num_layers, *rule.shape]``."""
    found = core_matches(key)
    return found[0] if len(found) == 1 else None
