"""Findings about a converted folder that need no forward pass: config values and tensor presence.

Every value of ``config.json`` the forward pass uses is compared with what the checkpoint says (args,
shapes, stored ``inv_freq``), naming both values and where each came from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from persimmon_tools.verification.hf_side import HFWeights
from persimmon_tools.verification.reference import (
    ATTENTION_FIELDS,
    INV_FREQ,
    LAYER_FIELDS,
    MLP_FIELDS,
    Hyper,
    MegatronWeights,
    rope_theta_from_inv_freq,
)

STRUCTURAL = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size")
_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "head_dim": "hidden_size / num_attention_heads",
    "intermediate_size": "intermediate_size",
}
FULL_SCAN_PARAMS = 500_000_000  # below this, every tensor is compared on failure; above, the failing stage's


@dataclass(frozen=True)
class Finding:
    kind: str  # "reader" | "structure" | "config" | "load" | "tensor" | "note" (notes never fail the verdict)
    where: str  # "config.json rope_theta" / "model.layers.3.mlp.dense_h_to_4h.weight"
    message: str
    part: str | None = None  # stage part it acts on: embedding / attention / mlp / logits / None (all)
    layer: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"{self.where}: {self.message}"


def config_findings(ref: Hyper, conv: Hyper) -> list[Finding]:
    """Differences between the checkpoint's hyper-parameters and the converted config.json's."""
    out = []
    for name in STRUCTURAL:
        a, b = getattr(ref, name), getattr(conv, name)
        if a != b:
            out.append(
                Finding(
                    "structure",
                    f"config.json {_CONFIG_NAMES[name]}",
                    f"gives {name} = {b}, but the checkpoint has {a}",
                )
            )
    if ref.head_dim == conv.head_dim and ref.rotary_dim != conv.rotary_dim:
        n = len(ref.stored_inv_freq) if ref.stored_inv_freq else None
        out.append(
            Finding(
                "config",
                "config.json partial_rotary_factor",
                f"rotates {conv.rotary_dim} of {conv.head_dim} dims per head ({conv.source_of('rotary_dim')}: "
                f"factor {conv.rotary_dim / conv.head_dim:g}), but the checkpoint rotates {ref.rotary_dim} "
                f"({ref.source_of('rotary_dim')}" + (f"; stored inv_freq has {n} entries" if n else "") + ")",
                part="attention",
            )
        )
    if not math.isclose(ref.rope_theta, conv.rope_theta, rel_tol=1e-6):
        implied = ""
        if ref.stored_inv_freq:
            theta = rope_theta_from_inv_freq(ref.stored_inv_freq, ref.rotary_dim)
            implied = f"; the stored inv_freq implies about {theta:.6g}"
        out.append(
            Finding(
                "config",
                "config.json rope_theta",
                f"is {conv.rope_theta:g} ({conv.source_of('rope_theta')}), but the checkpoint's rotary "
                f"base is {ref.rope_theta:g} ({ref.source_of('rope_theta')}{implied})",
                part="attention",
            )
        )
    if not math.isclose(ref.eps, conv.eps, rel_tol=1e-6):
        out.append(
            Finding(
                "config",
                "config.json layer_norm_eps",
                f"is {conv.eps:g}, but the checkpoint uses {ref.eps:g} ({ref.source_of('eps')})",
            )
        )
    if ref.untied != conv.untied:
        out.append(
            Finding(
                "config",
                "config.json tie_word_embeddings",
                f"is {not conv.untied}, but the checkpoint's head is "
                f"{'a separate tensor (word_embeddings_for_head)' if ref.untied else 'the embedding'}"
                + (
                    " (transformers versions differ on whether they then ignore lm_head.weight)"
                    if ref.untied
                    else ""
                ),
                part="logits",
            )
        )
    if conv.hidden_act != ref.hidden_act:
        out.append(
            Finding(
                "config",
                "config.json hidden_act",
                f"is {conv.hidden_act!r}; Persimmon's MLP uses "
                f"{ref.hidden_act!r} (squared ReLU, args.sq_relu)",
                part="mlp",
            )
        )
    if conv.rope_scaling is not None:
        out.append(
            Finding(
                "config",
                "config.json rope_scaling",
                f"asks for rope type {conv.rope_scaling!r}; the "
                "checkpoint uses plain RoPE (the toolkit's own loader does not apply it)",
                part="attention",
            )
        )
    if ref.max_positions and conv.max_positions and int(ref.max_positions) != int(conv.max_positions):
        out.append(
            Finding(
                "config",
                "config.json max_position_embeddings",
                f"is {conv.max_positions}, but the checkpoint was trained for {ref.max_positions} (args)",
            )
        )
    if ref.qk_layernorm != conv.qk_layernorm:
        out.append(
            Finding(
                "config",
                "config.json qk_layernorm",
                f"is {conv.qk_layernorm}; the checkpoint has q/k layernorms",
                part="attention",
            )
        )
    return out


def presence_findings(conv: HFWeights) -> list[Finding]:
    """Tensors config.json implies but the folder lacks (structure), and tensors nobody reads (note)."""
    hp = conv.hyper
    expected = {conv.name(f, i) for f, i in all_fields(hp)}
    out = [
        Finding("structure", conv.name(f, i), "is missing from the converted folder", part_of(f), i)
        for f, i in all_fields(hp)
        if conv.name(f, i) not in conv.st
    ]
    extra = sorted(set(conv.st.entries) - expected)
    if extra:
        out.append(
            Finding(
                "note",
                "model.safetensors",
                f"holds {len(extra)} tensor(s) a Persimmon model does not read, e.g. {', '.join(extra[:3])}",
            )
        )
    return out


def stage_part(stage: str) -> tuple[str, int | None]:
    """``"layer 3 mlp"`` → ``("mlp", 3)``; ``"embedding"`` → ``("embedding", None)``."""
    bits = stage.split()
    return (bits[2], int(bits[1])) if bits[0] == "layer" else (bits[0], None)


def stage_fields(stage: str, hp: Hyper) -> list[tuple[str, int | None]]:
    part, layer = stage_part(stage)
    if part == "attention":
        return [(f, layer) for f in ATTENTION_FIELDS]
    if part == "mlp":
        return [(f, layer) for f in MLP_FIELDS]
    if part == "embedding":
        return [("embed", None)] + ([("head", None)] if hp.untied else [])
    return [("final_ln_w", None), ("final_ln_b", None)] + [("head" if hp.untied else "embed", None)]


def all_fields(hp: Hyper) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = [("embed", None)]
    out += [(f, i) for i in range(hp.num_layers) for f in LAYER_FIELDS]
    out += [("final_ln_w", None), ("final_ln_b", None)] + ([("head", None)] if hp.untied else [])
    return out


def part_of(field: str) -> str:
    if field in ATTENTION_FIELDS:
        return "attention"
    if field in MLP_FIELDS:
        return "mlp"
    return "embedding" if field == "embed" else "logits"


def why_skipped(structural: list[Finding], wrong_reference: str | None) -> str | None:
    """Why no forward pass runs (None: it runs): what the verdict line, the table and the diagnosis say."""
    if not structural:
        return None
    if any(f.kind == "reader" for f in structural):
        return "no prompts were compared: the converter's and verify's own reading of the source disagree"
    if wrong_reference is not None:
        return (
            "no prompts were compared: --reference is likely not this folder's source (see the note), and its "
            "shapes differ from config.json's"
        )
    return "no prompts were compared: the checkpoint's shapes differ from config.json's"


def source_tensor_kinds(src: MegatronWeights, tensors: dict) -> dict[str, int]:
    """The checkpoint's tensors by what became of them: weights of the converted model, the rotary
    ``inv_freq`` buffers (not in the HF model: transformers computes them from rope_theta), others."""
    model = {src.key(name, i) for name, i in all_fields(src.hyper)}
    inv_freq = sum(k.endswith(INV_FREQ) for k in tensors)
    weights = sum(k in model for k in tensors)
    return {"weights": weights, "inv_freq_buffers": inv_freq, "other": len(tensors) - weights - inv_freq}
