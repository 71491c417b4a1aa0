"""The converted side, read without transformers: ``config.json`` + safetensors by HF names (spec §D/§E).

:class:`HFWeights` reads a converted folder one layer at a time (``pread`` on the safetensors files, no
mmap, so an 8B folder never sits in memory) and exposes it as a
:class:`~persimmon_tools.verification.run.WeightSource`.
Its hyper-parameters come from the folder's ``config.json`` only, interpreted the way transformers ≥ 5
interprets a Persimmon config (``rope_parameters`` or top-level ``rope_theta``/``partial_rotary_factor``,
defaults 10000 / 0.5), so a wrong config.json computes wrongly here too. ``config.json`` is read and checked
by :mod:`persimmon_tools.conversion.hf_config`, the one reader export uses too (this is the converted side,
not the independent reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.conversion.hf_config import parse_hf_config, read_config_json, short
from persimmon_tools.conversion.safetensors_read import SafetensorsFolder
from persimmon_tools.errors import VerificationError
from persimmon_tools.verification.reference import ACTIVATIONS, LAYER_FIELDS, Hyper, LayerWeights

HF_LAYER = "model.layers.{i}."
HF_FIELDS = {
    "input_ln_w": "input_layernorm.weight",
    "input_ln_b": "input_layernorm.bias",
    "qkv_w": "self_attn.query_key_value.weight",
    "qkv_b": "self_attn.query_key_value.bias",
    "q_ln_w": "self_attn.q_layernorm.weight",
    "q_ln_b": "self_attn.q_layernorm.bias",
    "k_ln_w": "self_attn.k_layernorm.weight",
    "k_ln_b": "self_attn.k_layernorm.bias",
    "dense_w": "self_attn.dense.weight",
    "dense_b": "self_attn.dense.bias",
    "post_ln_w": "post_attention_layernorm.weight",
    "post_ln_b": "post_attention_layernorm.bias",
    "fc1_w": "mlp.dense_h_to_4h.weight",
    "fc1_b": "mlp.dense_h_to_4h.bias",
    "fc2_w": "mlp.dense_4h_to_h.weight",
    "fc2_b": "mlp.dense_4h_to_h.bias",
}
HF_GLOBALS = {
    "embed": "model.embed_tokens.weight",
    "final_ln_w": "model.final_layernorm.weight",
    "final_ln_b": "model.final_layernorm.bias",
    "head": "lm_head.weight",
}


def read_config(folder: Path) -> dict[str, Any]:
    return read_config_json(folder, error=VerificationError, hint="pass the folder `convert` wrote")


def hf_hyper(config: dict[str, Any], where: str = "config.json") -> Hyper:
    """Hyper-parameters as transformers reads them from ``config.json`` (nothing from the tensors), through
    the shared reader (:func:`~persimmon_tools.conversion.hf_config.parse_hf_config`); a value of the wrong
    type or range is a VerificationError naming it."""
    cfg = parse_hf_config(config, where=where, error=VerificationError, hint="convert again")
    if cfg.hidden_act not in ACTIVATIONS:
        raise VerificationError(
            f"{where} has hidden_act {short(cfg.hidden_act)}, which verify cannot run; Persimmon uses 'relu2'"
        )

    def origin(name: str, default: str) -> str:
        return f"transformers' default {default}" if name in cfg.defaulted else "config.json"

    return Hyper(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        rotary_dim=cfg.rotary_dim,
        rope_theta=cfg.rope_theta,
        eps=cfg.layer_norm_eps,
        untied=cfg.untied,
        qk_layernorm=cfg.qk_layernorm,
        hidden_act=cfg.hidden_act,
        rope_scaling=None if cfg.rope_type == "default" else cfg.rope_type,
        max_positions=cfg.max_position_embeddings,
        origin=(
            ("rope_theta", origin("rope_theta", "10000")),
            ("rotary_dim", origin("partial_rotary_factor", "0.5")),
            ("eps", origin("layer_norm_eps", "1e-5")),
        ),
    )


class HFWeights:
    """A converted folder as a :class:`~persimmon_tools.verification.reference.WeightSource` (HF names, config.json)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.st = SafetensorsFolder(self.folder, VerificationError)
        self.hyper = hf_hyper(self.config)

    def name(self, field: str, i: int | None = None) -> str:
        return HF_GLOBALS[field] if i is None else HF_LAYER.format(i=i) + HF_FIELDS[field]

    def tensor(self, field: str, i: int | None = None) -> torch.Tensor:
        return self.st.read(self.name(field, i))

    def layer(self, i: int) -> LayerWeights:
        return LayerWeights(**{f: self.tensor(f, i) for f in LAYER_FIELDS})

    def embedding_rows(self, ids: Sequence[int]) -> torch.Tensor:
        name = HF_GLOBALS["embed"]
        rows = {r: self.st.read_rows(name, r, r + 1)[0] for r in sorted(set(ids))}
        return torch.stack([rows[r] for r in ids])

    def final_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor("final_ln_w"), self.tensor("final_ln_b")

    def head_blocks(self) -> Iterator[torch.Tensor]:
        yield from self.st.iter_rows(HF_GLOBALS["head" if self.hyper.untied else "embed"])

    def storage_dtype(self) -> torch.dtype:
        """The dtype most parameters are stored in."""
        counts: dict[torch.dtype, int] = {}
        for e in self.st.entries.values():
            counts[e.dtype] = counts.get(e.dtype, 0) + math.prod(e.shape)
        return max(counts, key=counts.get) if counts else torch.float32
