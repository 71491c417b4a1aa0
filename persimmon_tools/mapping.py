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
layer → key), :func:`parallel_kind`.
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

    @property
    def per_layer(self) -> bool:
        """Whether the rule holds one tensor per layer (its templates contain ``{i}``)."""
        return LAYER in self.source

    def source_key(self, layer: int | None = None) -> str:
        return expand(self.source, layer)

    def target_key(self, layer: int | None = None) -> str | None:
        return None if self.target is None else expand(self.target, layer)

    def shape_for(self, symbols: Mapping[str, int]) -> tuple[int, ...]:
        """The tensor's shape for the model whose shape symbols are ``symbols`` (``ModelDims.symbols()``)."""
        return tuple(symbols[s] for s in self.shape)


_L = "language_model.encoder.layers.{i}."
_T = "model.layers.{i}."

RULES: tuple[Rule, ...] = (
    Rule("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight", V, ("V", "H")),
    Rule(_L + "input_layernorm.weight", _T + "input_layernorm.weight", P, ("H",)),
    Rule(_L + "input_layernorm.bias", _T + "input_layernorm.bias", P, ("H",)),
    Rule(
        _L + "self_attention.query_key_value.weight", _T + "self_attn.query_key_value.weight", C, ("QKV", "H")
    ),
    Rule(_L + "self_attention.query_key_value.bias", _T + "self_attn.query_key_value.bias", C, ("QKV",)),
    Rule(
        _L + "self_attention.q_layernorm.weight",
        _T + "self_attn.q_layernorm.weight",
        P,
        ("D",),
        "qk_layernorm",
    ),
    Rule(
        _L + "self_attention.q_layernorm.bias", _T + "self_attn.q_layernorm.bias", P, ("D",), "qk_layernorm"
    ),
    Rule(
        _L + "self_attention.k_layernorm.weight",
        _T + "self_attn.k_layernorm.weight",
        P,
        ("D",),
        "qk_layernorm",
    ),
    Rule(
        _L + "self_attention.k_layernorm.bias", _T + "self_attn.k_layernorm.bias", P, ("D",), "qk_layernorm"
    ),
    Rule(_L + "self_attention.dense.weight", _T + "self_attn.dense.weight", R, ("H", "A")),
    Rule(_L + "self_attention.dense.bias", _T + "self_attn.dense.bias", P, ("H",)),
    Rule(_L + "post_attention_layernorm.weight", _T + "post_attention_layernorm.weight", P, ("H",)),
    Rule(_L + "post_attention_layernorm.bias", _T + "post_attention_layernorm.bias", P, ("H",)),
    Rule(_L + "mlp.dense_h_to_4h.weight", _T + "mlp.dense_h_to_4h.weight", C, ("F", "H")),
    Rule(_L + "mlp.dense_h_to_4h.bias", _T + "mlp.dense_h_to_4h.bias", C, ("F",)),
    Rule(_L + "mlp.dense_4h_to_h.weight", _T + "mlp.dense_4h_to_h.weight", R, ("H", "F")),
    Rule(_L + "mlp.dense_4h_to_h.bias", _T + "mlp.dense_4h_to_h.bias", P, ("H",)),
    Rule("language_model.encoder.final_layernorm.weight", "model.final_layernorm.weight", P, ("H",)),
    Rule("language_model.encoder.final_layernorm.bias", "model.final_layernorm.bias", P, ("H",)),
    Rule("word_embeddings_for_head.weight", "lm_head.weight", V, ("V", "H"), "untied"),
    # HF recomputes inv_freq from rope_theta / partial_rotary_factor (a non-persistent buffer).
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
