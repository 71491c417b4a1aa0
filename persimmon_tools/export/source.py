"""What ``export`` reads: a Hugging Face Persimmon folder or a Megatron source, as logical Megatron tensors.

Either way the result is :class:`ExportSource`: full (unsharded) tensors by flat Megatron key (spec §B.2,
``language_model.encoder.layers.{i}....``, global layer numbers), each readable by row ranges
(``read_rows(start, stop)``, dim 0) without loading the whole tensor, plus the model's dimensions, the args
it came with, its iteration and its SentencePiece model.

- Megatron (release tar, folder, ``iter_*``, ``.pt``; any TP/PP; or a Megatron-Core torch_dist
  checkpoint): the converter's own reader (:mod:`persimmon_tools.megatron.checkpoint`) merges the shards
  (or reads the torch_dist chunks by THE TABLE's Megatron-Core column); dims are derived and cross-checked
  by :func:`~persimmon_tools.conversion.config.derive_dims`. Megatron-LM's args names are given ADEPT's
  names too (:func:`~persimmon_tools.conversion.args_names.adept_fields`).
- Hugging Face: ``config.json`` (read and checked by :mod:`persimmon_tools.conversion.hf_config`, the reader
  verify's converted side uses too) + safetensors (sharded or single), read with ``pread``
  (:mod:`persimmon_tools.conversion.safetensors_read`); names go back through THE TABLE
  (:mod:`persimmon_tools.mapping`, target → source). Every tensor must map, every expected one must exist,
  every shape must match ``config.json``. ``conversion.json``, when ``convert`` wrote the folder, supplies
  the source's args, iteration, ``checkpoint_version`` and release name (its args are then checked against
  ``config.json``: :mod:`persimmon_tools.export.args_check`). The weights are the set transformers would
  load: one ``model.safetensors`` or the index's shards, never a folder holding both; a ``config.json``
  naming another file (``transformers_weights``) is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from persimmon_tools.conversion.args_names import adept_fields
from persimmon_tools.conversion.args_record import args_fields, restore_args
from persimmon_tools.conversion.config import ModelDims, derive_dims
from persimmon_tools.conversion.fingerprint import CONVERSION_FILE
from persimmon_tools.conversion.hf_config import HFConfig, parse_hf_config, read_config_json, short
from persimmon_tools.conversion.plan import expected_targets
from persimmon_tools.conversion.safetensors_read import SafetensorsFolder
from persimmon_tools.errors import ConfigError, ConversionError, MappingError, UsageError
from persimmon_tools.mapping import match_target
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release
from persimmon_tools.safe_read import read_json_record, read_small

log = logging.getLogger(__name__)

_VOCAB_FILES = ("tokenizer.model", "adept_vocab.model")
_MAX_VOCAB_BYTES = 64 << 20
_CONFIG_HINT = (
    "the folder's config.json is damaged or not a Persimmon config (only PersimmonForCausalLM folders can be "
    "exported)"
)


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
    config: HFConfig | None = None  # an HF folder's checked config.json
    vocab_origin: str = "the SentencePiece model"  # what messages call vocab_bytes
    #: complete the CRC-32 check of the zip records a pass started (a Megatron source; returns bytes read)
    finish_records: Callable[[], int] = lambda: 0


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
    vocab_origin = release.vocab.name if release.vocab is not None else ""
    # Megatron-LM's args (a torch_dist checkpoint) also get ADEPT's names, which ADEPT's layout is read by
    args = adept_fields(args_fields(ckpt.args))
    return ExportSource(
        kind="megatron",
        path=source,
        tensors=dict(ckpt.tensors),
        dims=dims,
        args=args,
        args_from="checkpoint" if args is not None else "tensor shapes (the checkpoint has no args)",
        iteration=ckpt.iteration,
        checkpoint_version=ckpt.checkpoint_version,
        vocab_bytes=vocab_bytes,
        release_name=_megatron_name(release.source, release.kind)
        if release.dist is None
        else _dist_name(release.dist.root, release.dist.tracker is not None),
        tp=release.tp,
        pp=release.pp,
        vocab_origin=vocab_origin,
        finish_records=ckpt.finish_records,
    )


def hf_dims(config: dict[str, Any], path: Path) -> ModelDims:
    """:class:`ModelDims` from a Persimmon ``config.json`` (:func:`hf_model_config`)."""
    return hf_model_config(config, path).dims()


def hf_model_config(config: dict[str, Any], path: Path) -> HFConfig:
    """A Persimmon ``config.json``, read the way transformers reads it (the shared reader,
    :func:`~persimmon_tools.conversion.hf_config.parse_hf_config`), refusing what ADEPT's layout cannot
    express: another activation than squared ReLU / GeLU, no q/k layernorm, RoPE scaling."""
    where = str(path / "config.json")
    cfg = parse_hf_config(config, where=where, error=ConfigError, hint=_CONFIG_HINT)
    cannot = "this model cannot be expressed in ADEPT's layout"
    if cfg.hidden_act not in ("relu2", "gelu"):
        raise ConfigError(
            f"{where}: hidden_act {short(cfg.hidden_act)}; ADEPT's MLP is squared ReLU (relu2) or GeLU",
            hint=cannot,
        )
    if not cfg.qk_layernorm:
        raise ConfigError(
            f"{where}: qk_layernorm is False; Persimmon's attention has a layernorm on queries and keys",
            hint=cannot,
        )
    if cfg.rope_scaling or cfg.rope_type != "default":
        raise ConfigError(
            f"{where}: RoPE scaling {cfg.rope_scaling or cfg.rope_parameters}; ADEPT's rotary has none",
            hint=cannot,
        )
    return cfg


def _hf_tensors(folder: Path, dims: ModelDims, config: dict[str, Any]) -> dict[str, RowTensor]:
    st = SafetensorsFolder(folder, ConversionError, redo="save the model again or check the folder")
    named = config.get("transformers_weights")
    if named is not None and named != st.weights_file:
        raise ConfigError(
            f"{folder / 'config.json'}: transformers_weights = {short(named)}, so transformers loads that "
            f"file, not {st.weights_file}, which export reads",
            hint="remove transformers_weights from config.json or keep only the weights it names as "
            "model.safetensors; nothing was written",
        )
    symbols = dims.symbols()
    expected = set(expected_targets(dims))
    problems: list[str] = []
    tensors: dict[str, RowTensor] = {}
    for name in sorted(st.entries):
        match = match_target(name)
        if match is None:
            problems.append(f"{name}: not a Persimmon weight (no rule of the mapping table names it)")
            continue
        if name not in expected:
            problems.append(f"{name}: not expected by config.json (layers, tie_word_embeddings)")
            continue
        want = match.rule.shape_for(symbols)
        if st.entry(name).shape != want:
            problems.append(f"{name}: shape {list(st.entry(name).shape)}, config.json implies {list(want)}")
            continue
        tensors[match.source] = HFTensor(st, name)
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


def _hf_vocab(folder: Path, vocab: Path | None) -> tuple[bytes, str]:
    if vocab is not None:
        data = read_small(
            Path(vocab), what="--vocab SentencePiece model", max_bytes=_MAX_VOCAB_BYTES, error=UsageError
        )
        return data, f"--vocab {vocab}"
    for name in _VOCAB_FILES:
        if os.path.lexists(folder / name):
            data = read_small(
                folder / name,
                what="SentencePiece model",
                max_bytes=_MAX_VOCAB_BYTES,
                follow_symlinks=False,
                error=ConversionError,
            )
            return data, str(folder / name)
    raise UsageError(
        f"{folder} has no tokenizer.model (the SentencePiece model a release ships as adept_vocab.model)",
        hint="pass it with --vocab: the release's adept_vocab.model, or the tokenizer.model of the folder "
        "`convert` wrote (transformers' save_pretrained does not copy it); nothing was written",
    )


def _open_hf(folder: Path, vocab: Path | None) -> ExportSource:
    raw_config = read_config_json(folder, error=ConfigError)
    config = hf_model_config(raw_config, folder)
    dims = config.dims()
    tensors = _hf_tensors(folder, dims, raw_config)
    vocab_bytes, vocab_origin = _hf_vocab(folder, vocab)
    record = _conversion_record(folder)
    args, args_from, iteration, version, name = None, "config.json", None, None, None
    if record is not None:
        args = restore_args(record)
        src = record.get("source") if isinstance(record.get("source"), dict) else {}
        iteration = src.get("iteration") if type(src.get("iteration")) is int else None
        version = record.get("checkpoint_version")  # checked by export.prepare
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
        config=config,
        vocab_origin=vocab_origin,
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


def _dist_name(root: Path, has_tracker: bool) -> str | None:
    """A torch_dist checkpoint's name: its root folder (the one holding the tracker), else none."""
    return (root.resolve().name or None) if has_tracker else None
