"""The one reader of a Persimmon ``config.json``: what transformers (>= 5) takes from it, each value checked.

``export`` (an HF folder as its source) and verify's converted side
(:mod:`persimmon_tools.verification.hf_side`) both read ``config.json`` here, so they read it the same way
transformers does:

- sizes (``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
  ``num_attention_heads``) are required whole numbers >= 1, and ``hidden_size`` a multiple of the heads;
- ``rope_theta`` / ``partial_rotary_factor`` come from ``rope_parameters`` first, then the top level, then
  transformers' defaults (10000 / 0.5); ``layer_norm_eps`` defaults to 1e-5; all finite numbers > 0;
- ``max_position_embeddings`` a whole number >= 1 when given; ``hidden_act`` a string (default ``relu2``);
  ``tie_word_embeddings`` / ``qk_layernorm`` true or false (defaults false / true);
- ``rope_parameters`` / ``rope_scaling`` objects (null: none); ``rope_type`` is the type either names.

A value of the wrong type or range (``null`` included: transformers' config is a strict dataclass) raises
the caller's error class naming the key and the value. What each caller can run (export: ADEPT's layout;
verify: its activations) is the caller's own check; verify's independent reference never reads this.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.config import (
    HF_DEFAULT_MAX_POSITIONS,
    TRANSFORMERS_DEFAULT_PARTIAL,
    TRANSFORMERS_DEFAULT_THETA,
    ModelDims,
)
from persimmon_tools.errors import ConfigError, PersimmonToolsError
from persimmon_tools.safe_read import read_json

ErrorType = type[PersimmonToolsError]
_MISSING = object()


@dataclass(frozen=True)
class HFConfig:
    """A checked Persimmon ``config.json``. ``defaulted``: the fields it does not name (defaults apply)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rope_theta: float
    partial_rotary_factor: float
    layer_norm_eps: float
    max_position_embeddings: int | None  # None: not named (transformers' default 16384)
    untied: bool
    qk_layernorm: bool
    hidden_act: str
    rope_type: str  # "default" unless rope_parameters / rope_scaling name another
    rope_parameters: dict[str, Any]
    rope_scaling: dict[str, Any]
    defaulted: frozenset[str]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)

    def dims(self) -> ModelDims:
        """The model's dimensions (tensor layouts: :mod:`persimmon_tools.mapping`)."""
        return ModelDims(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            rotary_dim=self.rotary_dim,
            rope_theta=self.rope_theta,
            layer_norm_eps=self.layer_norm_eps,
            max_position_embeddings=self.max_position_embeddings or HF_DEFAULT_MAX_POSITIONS,
            untied=self.untied,
            hidden_act=self.hidden_act,
            qk_layernorm=self.qk_layernorm,
        )


def read_config_json(
    folder: Path, *, error: ErrorType = ConfigError, hint: str | None = None
) -> dict[str, Any]:
    """``folder/config.json`` as a JSON object (never through a link); ``hint`` goes with a missing file."""
    path = Path(folder) / "config.json"
    if not os.path.lexists(path):
        raise error(f"{folder} has no config.json", hint=hint)
    return read_json(path, what="model config", error=error, follow_symlinks=False)


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters (a hostile config.json can hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Typed lookups in one config object, raising ``error`` (with ``hint``) that names ``where``."""

    def __init__(self, config: dict[str, Any], where: str, error: ErrorType, hint: str | None) -> None:
        self.config, self.where, self.error, self.hint = config, where, error, hint
        self.defaulted: set[str] = set()

    def fail(self, message: str) -> PersimmonToolsError:
        return self.error(f"{self.where}: {message}", hint=self.hint)

    def get(self, key: str, default: Any, what: str, *, inside: dict[str, Any] | None = None) -> Any:
        value = (inside or {}).get(key, self.config.get(key, _MISSING))
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(f"{self.where} lacks {key!r} ({what})", hint=self.hint)
            self.defaulted.add(key)
            return default
        return value

    def whole(self, key: str) -> int:
        value = self.get(key, _MISSING, "a whole number >= 1")
        if type(value) is int and value >= 1:
            return value
        raise self.fail(f"{key} = {short(value)}; expected a whole number >= 1")

    def maybe_whole(self, key: str) -> int | None:
        if key not in self.config:
            self.defaulted.add(key)
            return None
        return self.whole(key)

    def positive(self, key: str, default: float, inside: dict[str, Any] | None = None) -> float:
        value = self.get(key, default, "a finite number > 0", inside=inside)
        if type(value) in (int, float) and math.isfinite(value) and value > 0:
            return float(value)
        raise self.fail(f"{key} = {short(value)}; expected a finite number > 0")

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default, "true or false")
        if type(value) is bool:
            return value
        raise self.fail(f"{key} = {short(value)}; expected true or false")

    def text(self, key: str, default: str) -> str:
        value = self.get(key, default, "a string")
        if isinstance(value, str):
            return value
        raise self.fail(f"{key} = {short(value)}; expected a string")

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.config.get(key)
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        raise self.fail(f"{key} = {short(value)}; expected an object")


def parse_hf_config(
    config: dict[str, Any],
    *,
    where: str = "config.json",
    error: ErrorType = ConfigError,
    hint: str | None = None,
) -> HFConfig:
    """Check ``config`` (a parsed ``config.json``) and return its values; ``where`` names it in messages,
    ``error`` / ``hint`` are the caller's (``ConfigError`` for export, ``VerificationError`` for verify)."""
    r = _Reader(config, where, error, hint)
    if config.get("model_type") not in (None, "persimmon"):
        raise r.fail(f"model_type is {short(config.get('model_type'))}, not 'persimmon'")
    rope, scaling = r.mapping("rope_parameters"), r.mapping("rope_scaling")
    hidden, heads = r.whole("hidden_size"), r.whole("num_attention_heads")
    if hidden % heads:
        raise r.fail(f"hidden_size {hidden} is not a multiple of {heads} heads (num_attention_heads)")
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return HFConfig(
        vocab_size=r.whole("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.whole("intermediate_size"),
        num_layers=r.whole("num_hidden_layers"),
        num_heads=heads,
        rope_theta=r.positive("rope_theta", TRANSFORMERS_DEFAULT_THETA, inside=rope),
        partial_rotary_factor=r.positive("partial_rotary_factor", TRANSFORMERS_DEFAULT_PARTIAL, inside=rope),
        layer_norm_eps=r.positive("layer_norm_eps", 1e-5),
        max_position_embeddings=r.maybe_whole("max_position_embeddings"),
        untied=not r.flag("tie_word_embeddings", False),
        qk_layernorm=r.flag("qk_layernorm", True),
        hidden_act=r.text("hidden_act", "relu2"),
        rope_type=str(rope_type)[:60],
        rope_parameters=rope,
        rope_scaling=scaling,
        defaulted=frozenset(r.defaulted),
    )
