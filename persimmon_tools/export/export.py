"""``export``: a Hugging Face Persimmon folder or a Megatron source → a release in ADEPT's layout at any TP/PP.

:func:`prepare` opens the source, checks the layout and decides ``args`` (printed by ``--dry-run``);
:func:`export` writes the release: a folder ``OUT/NAME/...`` (with ``OUT/export.json``, the record that lets
``--force`` prove the folder is an earlier export) or, with ``tar=True``, one uncompressed tarball at OUT.
Output appears complete or not at all (a private temporary beside OUT, renamed into place).
With ``format="torch_dist"`` (``--format torch_dist``, since 2026-12-07) OUT is a Megatron-Core
``torch_dist`` checkpoint instead, through the same staged output and input checks
(:mod:`persimmon_tools.export.torch_dist`).

The release carries ``NAME/integrity.json`` (since 2026-12-07, 0.1.0): the sha256 and size of every file,
computed while each file is written (:mod:`persimmon_tools.megatron.manifest`), which ``convert``,
``inspect``, ``verify`` and ``unpack`` check. Reading a Megatron source checks the CRC-32 of every zip record
it reads (:mod:`persimmon_tools.megatron.records`).

A release that export writes is one that ``convert`` accepts: before it is installed, the release in the
temporary is read back through convert's own reading and checks
(:func:`~persimmon_tools.export.checks.read_back`: the shards' consistency, args against shapes,
``inv_freq`` against the rotary base, the mapping table, the vocabulary) and must describe the source's
model; otherwise nothing is installed. Before anything is written, the source is held to what convert would
refuse in a release (:mod:`persimmon_tools.export.checks`, :mod:`persimmon_tools.export.args_check`), and
NaN/Inf weights are counted while writing and refused as convert refuses them (``allow_nonfinite``:
``--allow-nonfinite``).

``args`` come from the source's own args (Megatron source), from ``conversion.json`` (an HF folder that
``convert`` wrote: an exact round trip, refused where ``config.json`` now says otherwise), or are derived
from ``config.json`` (each derived value listed); ``--set KEY=VALUE`` sets a field the model does not
determine (checked: :mod:`persimmon_tools.export.args_check`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import CONVERSION_FILE
from persimmon_tools.conversion.values import output_dtype
from persimmon_tools.errors import UsageError
from persimmon_tools.export.checks import (
    MEGATRON_DEFAULT_DIVISIBLE_BY,
    ValueCounts,
    check_layout,
    check_vocab,
    padded_vocab,
    read_back,
    refuse_nonfinite,
)
from persimmon_tools.export.derive import derive_args, parse_sets
from persimmon_tools.export.layout import shard_objects
from persimmon_tools.export.output import (
    check_out,
    claim_export_dir,
    claim_export_tar,
    protected,
    write_record,
)
from persimmon_tools.export.source import ExportSource, open_source
from persimmon_tools.export.torch_dist import (
    LEGACY,
    TORCH_DIST,
    check_core_model,
    check_format_options,
    export_torch_dist,
    payload_bytes,
    summary_fields,
)
from persimmon_tools.mapping import parallel_kind
from persimmon_tools.megatron.consistency import check_checkpoint_version
from persimmon_tools.megatron.release_writer import (
    EMBEDDING,
    HEAD,
    ReleaseFiles,
    write_release_folder,
    write_release_tar,
)
from persimmon_tools.ops import Parallel
from persimmon_tools.tokenizer.spm import vocab_text

log = logging.getLogger(__name__)

DEFAULT_NAME = "persimmon_model_release"


@dataclass(frozen=True)
class ExportOptions:
    tp: int = 1
    pp: int = 1
    iteration: int | None = None  # the exported iteration (default: the source's, else 1)
    source_iteration: int | None = None  # which iteration of a Megatron source to read
    name: str | None = None
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    tar: bool = False
    force: bool = False
    vocab: Path | None = None
    sets: Sequence[str] = ()
    allow_nonfinite: bool = False  # write NaN/Inf weights (convert's --allow-nonfinite)
    format: str = LEGACY  # legacy (ADEPT's release) | torch_dist (Megatron-Core: export.torch_dist)


@dataclass
class ExportPlan:
    source: ExportSource
    options: ExportOptions
    name: str
    iteration: int
    dtype: torch.dtype
    vocab_rows: int
    args: dict[str, Any]
    derived: list[tuple[str, Any, str]]  # (field, value, where from) for --dry-run
    checkpoint_version: Any
    rope_base: float
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in all shards (replicated tensors once per tensor rank; vocab padding included)."""
        if self.options.format == TORCH_DIST:
            return payload_bytes(self)
        d, tp = self.source.dims, self.options.tp
        total = tp * d.num_layers * (d.rotary_dim // 2)  # inv_freq, every layer, every rank
        for key, tensor in self.source.tensors.items():
            if key.endswith("inv_freq"):
                continue
            numel = math.prod(tensor.shape)
            if key in (EMBEDDING, HEAD):
                numel = numel // tensor.shape[0] * self.vocab_rows
            copies = tp if (parallel_kind(key) or Parallel.REPLICATED) is Parallel.REPLICATED else 1
            total += numel * copies
        return total * self.dtype.itemsize

    def summary(self) -> dict[str, Any]:
        src = self.source
        summary = {
            "source": str(src.path),
            "source_kind": src.kind,
            "source_layout": {"tp": src.tp, "pp": src.pp} if src.kind == "megatron" else None,
            "name": self.name,
            "tp": self.options.tp,
            "pp": self.options.pp,
            "iteration": self.iteration,
            "dtype": str(self.dtype).removeprefix("torch."),
            "vocab_rows": self.vocab_rows,
            "vocab_padding_rows": self.vocab_rows - src.dims.vocab_size,
            "checkpoint_version": self.checkpoint_version,
            "args_from": src.args_from,
            "derived_args": [{"field": k, "value": _show(v), "from": why} for k, v, why in self.derived],
            "shards": [
                f"{self.name}/iter_{self.iteration:07d}/"
                + _rank(t, s, self.options.pp)
                + "/model_optim_rng.pt"
                for s in range(self.options.pp)
                for t in range(self.options.tp)
            ],
            "bytes": self.nbytes,
            "notes": self.notes,
            "tar": self.options.tar,
            "format": self.options.format,
        }
        return summary | summary_fields(self) if self.options.format == TORCH_DIST else summary


def _rank(t: int, s: int, pp: int) -> str:
    return f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "")


def _show(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value)
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else repr(value)


def _out_dtype(name: str, source: ExportSource) -> torch.dtype:
    chosen = output_dtype(name)
    if chosen is not None:
        return chosen
    dtypes = {t.dtype for k, t in source.tensors.items() if not k.endswith("inv_freq")}
    if len(dtypes) != 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise UsageError(
            f"the source mixes dtypes ({names}); a Megatron checkpoint has one params_dtype",
            hint="choose one with --dtype bf16|fp16|fp32",
        )
    return dtypes.pop()


def prepare(source: Path, options: ExportOptions = ExportOptions()) -> ExportPlan:
    """Open and check everything; nothing is written."""
    check_format_options(options.format, tp=options.tp, pp=options.pp, tar=options.tar, name=options.name)
    sets = parse_sets(options.sets)
    src = open_source(Path(source), iteration=options.source_iteration, vocab=options.vocab)
    if src.vocab_bytes is None:
        raise UsageError(
            f"{source} holds no adept_vocab.model",
            hint="pass the SentencePiece model with --vocab; nothing was written",
        )
    check_vocab(src)
    check_layout(src, options.tp, options.pp)
    dtype = _out_dtype(options.dtype, src)
    iteration = options.iteration if options.iteration is not None else (src.iteration or 1)
    if type(iteration) is not int or iteration < 1:
        raise UsageError(
            f"--iteration {iteration!r}: expected a whole number >= 1", hint="e.g. --iteration 1000"
        )
    args, derived = derive_args(src, dtype, iteration, sets)
    divisible = args.get("make_vocab_size_divisible_by") or MEGATRON_DEFAULT_DIVISIBLE_BY
    vocab_rows = padded_vocab(src.dims.vocab_size, options.tp, divisible)
    notes = list(src.notes)
    if vocab_rows != src.dims.vocab_size:
        notes.append(
            f"TP={options.tp} does not divide the {src.dims.vocab_size} vocabulary rows: padded with "
            f"{vocab_rows - src.dims.vocab_size} zero rows to {vocab_rows} (a multiple of "
            f"make_vocab_size_divisible_by {divisible} x TP)"
        )
        log.warning("%s", notes[-1])
    where = src.path / CONVERSION_FILE if src.kind == "hf" else f"{src.path} (its shards)"
    check_checkpoint_version(src.checkpoint_version, str(where))  # refuses < 2.0 (issue 22)
    version = src.checkpoint_version if src.checkpoint_version is not None else 3.0
    name = options.name or src.release_name or DEFAULT_NAME
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise UsageError(f"--name {name!r}: expected a plain folder name", hint="e.g. --name my_release")
    base = args.get("rotary_emb_base") or src.dims.rope_theta
    plan = ExportPlan(
        src, options, name, iteration, dtype, vocab_rows, args, derived, version, float(base), notes
    )
    if options.format == TORCH_DIST:
        check_core_model(plan)  # one Megatron-LM can build (rotary, activation, vocab padding)
    return plan


@dataclass(frozen=True)
class ExportResult:
    plan: ExportPlan
    out: Path
    files: list[str]
    bytes_written: int
    seconds: float
    read_back_seconds: float = 0.0  # read_back's share of ``seconds``
    megatron_lm_args: list[str] = field(default_factory=list)  # torch_dist: the flags file's lines


def export_release(
    source: Path,
    out: Path,
    options: ExportOptions = ExportOptions(),
    *,
    progress: Callable[[int], None] = lambda n: None,
    on_plan: Callable[[ExportPlan], None] = lambda p: None,
) -> ExportResult:
    """Write the release; see the module docstring."""
    start = time.perf_counter()
    out = check_destination(out, source, options)
    plan = prepare(source, options)
    on_plan(plan)
    written = [0]

    def count(n: int) -> None:
        written[0] += n
        progress(n)

    if options.format == TORCH_DIST:
        listed, lm, checked = export_torch_dist(plan, out, protected(source, options.vocab), progress=count)
        seconds = time.perf_counter() - start
        return ExportResult(plan, out, listed, written[0], seconds, checked, lm.text().splitlines())
    counts = ValueCounts()
    objects = shard_objects(
        plan.source,
        tp=options.tp,
        pp=options.pp,
        dtype=plan.dtype,
        vocab_rows=plan.vocab_rows,
        iteration=plan.iteration,
        base_args=plan.args,
        checkpoint_version=plan.checkpoint_version,
        rope_base=plan.rope_base,
        counts=counts,
    )
    files = ReleaseFiles(
        plan.name,
        plan.iteration,
        options.tp,
        options.pp,
        objects,
        {
            "adept_vocab.model": plan.source.vocab_bytes,
            "adept_vocab.vocab": vocab_text(
                plan.source.vocab_bytes, plan.source.vocab_origin or "the SentencePiece model"
            ),
        },
        integrity=True,
    )
    if options.tar:
        with claim_export_tar(out, options.force, protected(source, options.vocab)) as (
            fh,
            path,
        ):  # checked again: it may have appeared
            write_release_tar(files, fh, progress=count)
            fh.flush()
            plan.source.finish_records()  # the source's records this pass started, CRC-checked
            refuse_nonfinite(counts, options.allow_nonfinite)
            checked = read_back(path, plan.source, plan.vocab_rows)
        listed = [str(out)]
    else:
        with claim_export_dir(out, options.force, protected(source, options.vocab)) as tmp:
            write_release_folder(files, tmp, progress=count, workers=min(2, os.cpu_count() or 1))
            plan.source.finish_records()
            refuse_nonfinite(counts, options.allow_nonfinite)
            checked = read_back(tmp / plan.name, plan.source, plan.vocab_rows)
            listed = write_record(tmp, plan.summary(), __version__)
    return ExportResult(plan, out, listed, written[0], time.perf_counter() - start, checked)


def check_destination(out: Path, source: Path, options: ExportOptions) -> Path:
    """Refuse an OUT (or a ``--format`` combination) that the run would refuse, before anything is read
    (``--dry-run`` too). Returns the absolute OUT."""
    check_format_options(options.format, tp=options.tp, pp=options.pp, tar=options.tar, name=options.name)
    return check_out(out, protected(source, options.vocab), tar=options.tar, force=options.force)
