"""The converted side, read without transformers: ``config.json`` + safetensors by HF names (spec §D/§E).

:class:`HFWeights` reads a converted folder one layer at a time (``pread`` on the safetensors files, no
mmap, so an 8B folder never sits in memory) and exposes it as a
:class:`~persimmon_tools.verification.run.WeightSource`.
Its hyper-parameters come from the folder's ``config.json`` only, interpreted the way transformers ≥ 5
interprets a Persimmon config (``rope_parameters`` or top-level ``rope_theta``/``partial_rotary_factor``,
defaults 10000 / 0.5), so a wrong config.json computes wrongly here too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.conversion.config import TRANSFORMERS_DEFAULT_PARTIAL, TRANSFORMERS_DEFAULT_THETA
from persimmon_tools.conversion.safetensors_read import SafetensorsFolder
from persimmon_tools.errors import VerificationError
from persimmon_tools.safe_read import read_json
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
    path = Path(folder) / "config.json"
    if not os.path.lexists(path):
        raise VerificationError(f"{folder} has no config.json", hint="pass the folder `convert` wrote")
    return read_json(path, what="model config", error=VerificationError, follow_symlinks=False)


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config[key]
    if type(value) is not int or value < 1:
        raise VerificationError(
            f"config.json has {key} = {_short(value)}; expected a whole number >= 1", hint="convert again"
        )
    return value


def _finite(value: Any, key: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise VerificationError(
            f"config.json has {key} = {_short(value)}; expected a finite number > 0", hint="convert again"
        )
    return float(value)


def _object(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise VerificationError(
            f"config.json has {key} = {_short(value)}; expected an object", hint="convert again"
        )
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def hf_hyper(config: dict[str, Any]) -> Hyper:
    """Hyper-parameters as transformers reads them from ``config.json`` (nothing from the tensors); a value of
    the wrong type or range is a VerificationError naming it."""
    if config.get("model_type") not in (None, "persimmon"):
        raise VerificationError(
            f"config.json has model_type {_short(config.get('model_type'))}, not 'persimmon'"
        )
    act = config.get("hidden_act", "relu2")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise VerificationError(
            f"config.json has hidden_act {_short(act)}, which verify cannot run; Persimmon uses 'relu2'"
        )
    rope = _object(config, "rope_parameters")
    scaling = _object(config, "rope_scaling")
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = rope.get("rope_theta", config.get("rope_theta"))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    origin = [
        ("rope_theta", "config.json" if theta is not None else "transformers' default 10000"),
        ("rotary_dim", "config.json" if partial is not None else "transformers' default 0.5"),
        ("eps", "config.json" if "layer_norm_eps" in config else "transformers' default 1e-5"),
    ]
    hidden, heads = _positive_int(config, "hidden_size"), _positive_int(config, "num_attention_heads")
    head_dim = hidden // heads
    partial_f = _finite(
        partial if partial is not None else TRANSFORMERS_DEFAULT_PARTIAL, "partial_rotary_factor"
    )
    max_positions = config.get("max_position_embeddings")
    if max_positions is not None:
        max_positions = _positive_int(config, "max_position_embeddings")
    return Hyper(
        vocab_size=_positive_int(config, "vocab_size"),
        hidden_size=hidden,
        num_layers=_positive_int(config, "num_hidden_layers"),
        num_heads=heads,
        head_dim=head_dim,
        intermediate_size=_positive_int(config, "intermediate_size"),
        rotary_dim=int(head_dim * partial_f),
        rope_theta=_finite(theta if theta is not None else TRANSFORMERS_DEFAULT_THETA, "rope_theta"),
        eps=_finite(config.get("layer_norm_eps", 1e-5), "layer_norm_eps"),
        untied=not bool(config.get("tie_word_embeddings", False)),
        qk_layernorm=bool(config.get("qk_layernorm", True)),
        hidden_act=act,
        rope_scaling=None if rope_type == "default" else str(rope_type)[:60],
        max_positions=max_positions,
        origin=tuple(origin),
    )


class HFWeights:
    """A converted folder as a :class:`~persimmon_tools.verification.reference.WeightSource` (HF names, config.json)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.st = SafetensorsFolder(self.folder, VerificationError)
        try:
            self.hyper = hf_hyper(self.config)
        except KeyError as err:
            raise VerificationError(f"config.json lacks {err.args[0]!r}", hint="convert again") from None

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
