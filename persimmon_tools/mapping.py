"""THE TABLE: Megatron key templates ↔ Hugging Face Persimmon key templates (data only; spec §D).

``{i}`` is the layer index. Shapes are written with symbols evaluated against the model's dimensions:
``V`` vocab rows (padded), ``H`` hidden, ``F`` ffn, ``A`` heads × head_dim, ``QKV`` 3 × A, ``D`` head_dim,
``R`` rotary_dim / 2 (length of ``inv_freq``). ``when`` names the config flag a rule depends on.

Layouts (all ``[out, in]`` like ``nn.Linear``):
- ``query_key_value.weight``: ``[n_heads*3*head_dim, hidden]``, per-head ``[q|k|v]`` (spec §C), copied as is.
- ``dense.weight``: ``[hidden, n_heads*head_dim]``; ``dense_h_to_4h.weight``: ``[ffn, hidden]``;
  ``dense_4h_to_h.weight``: ``[hidden, ffn]``; embeddings and head ``[vocab, hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from persimmon_tools.ops import Parallel

C, R, V, P = Parallel.COLUMN, Parallel.ROW, Parallel.VOCAB, Parallel.REPLICATED


@dataclass(frozen=True)
class Rule:
    source: str  # Megatron key template (flattened ckpt["model"])
    target: str | None  # HF key template; None = dropped on purpose
    parallel: Parallel
    shape: tuple[str, ...]
    when: str | None = None  # "qk_layernorm" | "untied" | None (always)


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
