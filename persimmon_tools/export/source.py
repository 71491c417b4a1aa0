"""What ``export`` reads: a Hugging Face Persimmon folder or a Megatron source, as logical Megatron tensors.

Either way the result is :class:`ExportSource`: full (unsharded) tensors by flat Megatron key (spec §B.2,
``language_model.encoder.layers.{i}....``, global layer numbers), each readable by row ranges
(``read_rows(start, stop)``, dim 0) without loading the whole tensor, plus the model's dimensions, the args
it came with, its iteration and its SentencePiece model.

- Megatron (release tar, folder, ``iter_*``, ``.pt``; any TP/PP): the converter's own reader
  (:mod:`persimmon_tools.megatron.checkpoint`) merges the shards; dims are derived and cross-checked by
  :func:`~persimmon_tools.conversion.config.derive_dims`.
- Hugging Face: ``config.json`` + safetensors (sharded or single), read with ``pread``
  (:mod:`persimmon_tools.conversion.safetensors_read`); names go back through THE TABLE
  (:mod:`persimmon_tools.mapping`, target → source). Every tensor must map, every expected one must exist,
  every shape must match ``config.json``. ``conversion.json``, when ``convert`` wrote the folder, supplies
  the source's args, iteration and release name.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from persimmon_tools.conversion.args_record import args_fields, restore_args
from persimmon_tools.conversion.config import (
    TRANSFORMERS_DEFAULT_PARTIAL,
    TRANSFORMERS_DEFAULT_THETA,
    ModelDims,
    derive_dims,
)
from persimmon_tools.conversion.fingerprint import CONVERSION_FILE
from persimmon_tools.conversion.plan import expected_targets
from persimmon_tools.conversion.safetensors_read import SafetensorsFolder
from persimmon_tools.errors import ConfigError, ConversionError, MappingError, UsageError
from persimmon_tools.mapping import RULES, Rule
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release
from persimmon_tools.safe_read import read_json, read_json_record, read_small

log = logging.getLogger(__name__)

_VOCAB_FILES = ("tokenizer.model", "adept_vocab.model")
_MAX_VOCAB_BYTES = 64 << 20


class RowTensor(Protocol):
    """A full logical tensor read by row ranges (dim 0); 1-D tensors by element ranges."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def read_rows(self, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class HFTensor:
    """One tensor of a safetensors folder, by its HF name (``[out, in]`` like ``nn.Linear``)."""

    folder: SafetensorsFolder
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.folder.entry(self.name).shape

    @property
    def dtype(self) -> torch.dtype:
        return self.folder.entry(self.name).dtype

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.folder.read_rows(self.name, start, stop)


@dataclass
class ExportSource:
    """A source of logical Megatron tensors and what is known about how they were made."""

    kind: str  # "hf" | "megatron"
    path: Path
    tensors: dict[str, RowTensor]  # flat Megatron key -> full tensor (global layer numbers)
    dims: ModelDims
    args: dict[str, Any] | None  # the source's args fields (None: derive from config.json)
    args_from: str  # "checkpoint" | "conversion.json" | "config.json"
    iteration: int | None
    checkpoint_version: Any
    vocab_bytes: bytes | None
    release_name: str | None
    tp: int = 1
    pp: int = 1
    notes: list[str] = field(default_factory=list)


def is_hf_folder(path: Path) -> bool:
    """A folder holding ``config.json`` and safetensors weights (what ``save_pretrained`` writes)."""
    return (
        path.is_dir()
        and os.path.lexists(path / "config.json")
        and (
            os.path.lexists(path / "model.safetensors")
            or os.path.lexists(path / "model.safetensors.index.json")
        )
    )


def open_source(source: Path, *, iteration: int | None = None, vocab: Path | None = None) -> ExportSource:
    """Open ``source`` (HF folder or any Megatron source ``convert`` accepts) for export."""
    source = Path(source)
    if is_hf_folder(source):
        if iteration is not None:
            log.info("--source-iteration applies to Megatron sources only; ignored for %s", source)
        return _open_hf(source, vocab)
    return _open_megatron(source, iteration, vocab)


def _open_megatron(source: Path, iteration: int | None, vocab: Path | None) -> ExportSource:
    release = open_release(source, iteration=iteration, vocab=vocab)
    ckpt = load_release_checkpoint(release)
    dims = derive_dims(ckpt)
    vocab_bytes = release.vocab.read_all() if release.vocab is not None else None
    return ExportSource(
        kind="megatron",
        path=source,
        tensors=dict(ckpt.tensors),
        dims=dims,
        args=args_fields(ckpt.args),
        args_from="checkpoint"
        if args_fields(ckpt.args) is not None
        else "tensor shapes (the checkpoint has no args)",
        iteration=ckpt.iteration,
        checkpoint_version=ckpt.checkpoint_version,
        vocab_bytes=vocab_bytes,
        release_name=_megatron_name(release.source, release.kind),
        tp=release.tp,
        pp=release.pp,
    )


def _compile_target(rule: Rule) -> re.Pattern[str]:
    assert rule.target is not None
    return re.compile("^" + re.escape(rule.target).replace(r"\{i\}", r"(?P<i>0|[1-9][0-9]*)") + "$")


_TARGETS = [(_compile_target(r), r) for r in RULES if r.target is not None]


def megatron_key(hf_name: str) -> str | None:
    """The Megatron key THE TABLE maps to ``hf_name`` (the inverse direction of ``convert``), or None."""
    for pattern, rule in _TARGETS:
        m = pattern.match(hf_name)
        if m:
            i = m.groupdict().get("i")
            return rule.source.replace("{i}", i) if i is not None else rule.source
    return None


def _config_int(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value < 1:
        raise ConfigError(
            f"{path / 'config.json'}: {key} = {value!r}; expected a whole number >= 1",
            hint="the folder's config.json is damaged or not a Persimmon config",
        )
    return value


def _config_float(config: dict[str, Any], key: str, path: Path, default: float) -> float:
    value = config.get(key, default)
    if type(value) not in (int, float) or not value > 0 or value != value or value == float("inf"):
        raise ConfigError(
            f"{path / 'config.json'}: {key} = {value!r}; expected a positive number",
            hint="the folder's config.json is damaged",
        )
    return float(value)


def hf_dims(config: dict[str, Any], path: Path) -> ModelDims:
    """:class:`ModelDims` from a Persimmon ``config.json``, read the way transformers reads it."""
    if config.get("model_type") not in (None, "persimmon"):
        raise ConfigError(
            f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, not 'persimmon'",
            hint="export writes ADEPT's Persimmon layout; only PersimmonForCausalLM folders can be exported",
        )
    hidden = _config_int(config, "hidden_size", path)
    heads = _config_int(config, "num_attention_heads", path)
    if hidden % heads:
        raise ConfigError(f"{path / 'config.json'}: hidden_size {hidden} is not a multiple of {heads} heads")
    head_dim = hidden // heads
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    theta = rope.get("rope_theta", config.get("rope_theta", TRANSFORMERS_DEFAULT_THETA))
    partial = rope.get(
        "partial_rotary_factor", config.get("partial_rotary_factor", TRANSFORMERS_DEFAULT_PARTIAL)
    )
    act = config.get("hidden_act", "relu2")
    if act not in ("relu2", "gelu"):
        raise ConfigError(
            f"{path / 'config.json'}: hidden_act {act!r}; ADEPT's MLP is squared ReLU (relu2) or GeLU",
            hint="this model cannot be expressed in ADEPT's layout",
        )
    if config.get("qk_layernorm", True) is not True:
        raise ConfigError(
            f"{path / 'config.json'}: qk_layernorm is {config.get('qk_layernorm')!r}; Persimmon's attention has "
            "a layernorm on queries and keys",
            hint="this model cannot be expressed in ADEPT's layout",
        )
    if config.get("rope_scaling") not in (None, {}) or rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"{path / 'config.json'}: RoPE scaling {config.get('rope_scaling') or rope}; ADEPT's rotary has none",
            hint="this model cannot be expressed in ADEPT's layout",
        )
    theta = _config_float({"rope_theta": theta}, "rope_theta", path, TRANSFORMERS_DEFAULT_THETA)
    partial = _config_float(
        {"partial_rotary_factor": partial}, "partial_rotary_factor", path, TRANSFORMERS_DEFAULT_PARTIAL
    )
    return ModelDims(
        vocab_size=_config_int(config, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_config_int(config, "intermediate_size", path),
        num_layers=_config_int(config, "num_hidden_layers", path),
        num_heads=heads,
        head_dim=head_dim,
        rotary_dim=int(partial * head_dim),
        rope_theta=theta,
        layer_norm_eps=_config_float(config, "layer_norm_eps", path, 1e-5),
        max_position_embeddings=_config_int(config, "max_position_embeddings", path, 16384),
        untied=not bool(config.get("tie_word_embeddings", False)),
        hidden_act=act,
    )


def _hf_tensors(folder: Path, dims: ModelDims) -> dict[str, RowTensor]:
    st = SafetensorsFolder(folder, ConversionError, redo="save the model again or check the folder")
    symbols = dims.symbols()
    expected = set(expected_targets(dims))
    problems: list[str] = []
    tensors: dict[str, RowTensor] = {}
    for name in sorted(st.entries):
        key = megatron_key(name)
        if key is None:
            problems.append(f"{name}: not a Persimmon weight (no rule of the mapping table names it)")
            continue
        if name not in expected:
            problems.append(f"{name}: not expected by config.json (layers, tie_word_embeddings)")
            continue
        rule = next(r for p, r in _TARGETS if p.match(name))
        want = tuple(symbols[s] for s in rule.shape)
        if st.entry(name).shape != want:
            problems.append(f"{name}: shape {list(st.entry(name).shape)}, config.json implies {list(want)}")
            continue
        tensors[key] = HFTensor(st, name)
    missing = sorted(expected - set(st.entries))
    problems += [f"missing: {name}" for name in missing[:20]]
    if len(missing) > 20:
        problems.append(f"... and {len(missing) - 20} more missing")
    if problems:
        raise MappingError(
            f"{folder} cannot be exported: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:40]),
            hint="export needs a complete PersimmonForCausalLM folder (config.json and every weight); "
            "nothing was written",
        )
    return tensors


def _conversion_record(folder: Path) -> dict[str, Any] | None:
    record = read_json_record(folder / CONVERSION_FILE, what="conversion record", error=ConversionError)
    return record if record is not None and record.get("tool") == "persimmon-tools" else None


def _hf_vocab(folder: Path, vocab: Path | None) -> bytes:
    if vocab is not None:
        return read_small(
            Path(vocab), what="--vocab SentencePiece model", max_bytes=_MAX_VOCAB_BYTES, error=UsageError
        )
    for name in _VOCAB_FILES:
        if os.path.lexists(folder / name):
            return read_small(
                folder / name,
                what="SentencePiece model",
                max_bytes=_MAX_VOCAB_BYTES,
                follow_symlinks=False,
                error=ConversionError,
            )
    raise UsageError(
        f"{folder} has no tokenizer.model (the SentencePiece model a release ships as adept_vocab.model)",
        hint="pass it with --vocab: the release's adept_vocab.model, or the tokenizer.model of the folder "
        "`convert` wrote (transformers' save_pretrained does not copy it); nothing was written",
    )


def _open_hf(folder: Path, vocab: Path | None) -> ExportSource:
    config = read_json(folder / "config.json", what="model config", error=ConfigError, follow_symlinks=False)
    dims = hf_dims(config, folder)
    tensors = _hf_tensors(folder, dims)
    vocab_bytes = _hf_vocab(folder, vocab)
    record = _conversion_record(folder)
    args, args_from, iteration, version, name = None, "config.json", None, None, None
    if record is not None:
        args = restore_args(record)
        src = record.get("source") if isinstance(record.get("source"), dict) else {}
        iteration = src.get("iteration") if type(src.get("iteration")) is int else None
        version = record.get("checkpoint_version")
        name = _release_name(src)
        if args is not None:
            args_from = CONVERSION_FILE
    return ExportSource(
        kind="hf",
        path=folder,
        tensors=tensors,
        dims=dims,
        args=args,
        args_from=args_from,
        iteration=iteration,
        checkpoint_version=version,
        vocab_bytes=vocab_bytes,
        release_name=name,
    )


def _release_name(src: dict[str, Any]) -> str | None:
    name = src.get("name")
    if not isinstance(name, str) or not name:
        return None
    if src.get("kind") == "tar":
        name = name.removesuffix(".tar")
    return name if src.get("kind") in ("tar", "folder") else None


def _megatron_name(source: Path, kind: str) -> str | None:
    """The release's name: the tarball's stem, the release folder, or the folder above ``iter_*``."""
    if kind == "tar":
        return source.name.removesuffix(".tar")
    if kind == "folder":
        return source.resolve().name
    if kind == "iteration":
        return source.resolve().parent.name or None
    return None
