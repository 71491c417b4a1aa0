"""What export refuses about the release it would write, beyond ``args`` (:mod:`persimmon_tools.export.
args_check`): a TP/PP that does not divide the model, a vocabulary with more pieces than the embedding has
rows, vocab padding that would drop rows, and NaN/Inf weights (counted while writing, as ``convert`` counts
them; ``--allow-nonfinite`` writes them anyway, as it converts them anyway). And, once written, the
release itself: :func:`read_back` reads it as ``convert`` reads a release, before it is installed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.conversion.convert import ConvertOptions, check_vocab_fits
from persimmon_tools.conversion.convert import prepare as convert_prepare
from persimmon_tools.conversion.values import WriteStats, count_nonfinite, refuse_bad_values
from persimmon_tools.errors import ConversionError, PersimmonToolsError, UsageError
from persimmon_tools.export.source import ExportSource
from persimmon_tools.megatron.manifest import sizes_only

log = logging.getLogger(__name__)

MEGATRON_DEFAULT_DIVISIBLE_BY = 128  # megatron/arguments.py --make-vocab-size-divisible-by


def check_layout(source: ExportSource, tp: int, pp: int) -> None:
    """Refuse a TP/PP that does not divide the model, naming the numbers."""
    d = source.dims
    problems = []
    if tp < 1 or pp < 1:
        raise UsageError(f"--tp {tp} / --pp {pp}: expected whole numbers >= 1", hint="e.g. --tp 2 --pp 2")
    if d.num_heads % tp:
        problems.append(
            f"TP={tp} does not divide the {d.num_heads} attention heads (each rank holds whole heads)"
        )
    if d.intermediate_size % tp:
        problems.append(f"TP={tp} does not divide the MLP width (ffn_hidden_size) {d.intermediate_size}")
    if d.num_layers % pp:
        problems.append(f"PP={pp} does not divide the {d.num_layers} layers (every stage holds as many)")
    if not d.untied and pp > 1:
        problems.append(
            f"PP={pp} with tied embeddings: Megatron keeps a copy of the embedding on the last stage, which "
            "ADEPT's release layout does not describe"
        )
    if problems:
        divisors = [n for n in range(1, 9) if not d.num_heads % n and not d.intermediate_size % n]
        raise UsageError(
            "the requested layout does not fit the model:\n  - " + "\n  - ".join(problems),
            hint=f"TP values that fit: {', '.join(map(str, divisors))}; PP values must divide {d.num_layers}; "
            "nothing was written",
        )


def padded_vocab(rows: int, tp: int, divisible_by: Any) -> int:
    """Rows of the exported embedding: the source's rows when TP divides them, else Megatron's own padding
    (``_vocab_size_with_padding``: the next multiple of ``make_vocab_size_divisible_by × TP``). Never fewer
    rows than the source's: a ``divisible_by`` that is not a whole number >= 1 is refused."""
    if type(divisible_by) is not int or divisible_by < 1:
        raise UsageError(
            f"args.make_vocab_size_divisible_by = {divisible_by!r}: expected a whole number >= 1",
            hint="e.g. --set make_vocab_size_divisible_by=128 (Megatron's default)",
        )
    if rows % tp == 0:
        return rows
    multiple = divisible_by * tp
    padded = -(-rows // multiple) * multiple
    assert padded >= rows and padded % tp == 0, (rows, tp, divisible_by)
    return padded


class ValueCounts:
    """NaN/Inf counts of the source values an export writes, per Megatron key (:func:`count_nonfinite` on
    every block before its cast, as convert counts them); a replicated tensor counts once, not per rank.
    Shared by the writer threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.nonfinite: dict[str, int] = {}

    def add(self, key: str, block: torch.Tensor) -> None:
        bad = count_nonfinite(block)
        if bad:
            with self._lock:
                self.nonfinite[key] = self.nonfinite.get(key, 0) + bad


def check_vocab(source: ExportSource) -> None:
    """The SentencePiece model fits the embedding (convert's own check:
    :func:`~persimmon_tools.conversion.convert.check_vocab_fits`)."""
    check_vocab_fits(source.vocab_bytes or b"", source.vocab_origin, source.dims.vocab_size)


def refuse_nonfinite(counts: ValueCounts, allow: bool) -> None:
    """convert's refusal of NaN/Inf source values (:func:`~persimmon_tools.conversion.values.
    refuse_bad_values`), with export's flag in the hint."""
    try:
        refuse_bad_values(
            WriteStats(nonfinite=dict(counts.nonfinite)), allow_nonfinite=allow, allow_overflow=True
        )
    except ConversionError as err:
        raise ConversionError(
            err.message.replace("the checkpoint holds", "the source holds"),
            hint="the weights are damaged or diverged in training; --allow-nonfinite exports them anyway "
            "(convert then needs --allow-nonfinite too)",
        ) from None


def read_back(release: Path, source: ExportSource, vocab_rows: int, *, vocab: Path | None = None) -> float:
    """Read the release just written (still in the private temporary) the way ``convert`` reads a release
    (:func:`persimmon_tools.conversion.convert.prepare`: every shard's pickle, the consistency checks, args
    against shapes, ``inv_freq`` against the rotary base, the mapping table, the vocabulary; no weights are
    copied) and check that it describes the source's model. Raises :class:`ConversionError` otherwise, so
    that nothing is installed. Returns the seconds it took. ``vocab``: the SentencePiece model where convert
    would not find it by itself (a torch_dist checkpoint keeps it as ``iter_*/tokenizer/tokenizer.model``)."""
    start = time.perf_counter()
    try:
        with sizes_only():  # its integrity.json: sizes and presence (the sha256s were computed as written)
            back = convert_prepare(release, ConvertOptions(vocab=vocab)).dims
    except PersimmonToolsError as err:
        raise ConversionError(
            f"convert would refuse the release this export wrote, so it was not installed: {err.message}",
            hint="the source holds something export does not check yet; please report it with the source's "
            "config.json or args; nothing was written",
        ) from err
    want = dataclasses.replace(source.dims, vocab_size=vocab_rows)
    if source.kind == "megatron" or (
        source.config is not None and "max_position_embeddings" in source.config.defaulted
    ):
        want = dataclasses.replace(want, max_position_embeddings=back.max_position_embeddings)
    differ = [
        f"{name} {getattr(back, name)!r} (the source: {getattr(want, name)!r})"
        for name in want.to_dict()
        if getattr(back, name) != getattr(want, name)
    ]
    if differ:
        raise ConversionError(
            "the release this export wrote converts to another model than the source, so it was not "
            "installed: " + "; ".join(differ),
            hint="please report it with the source's config.json or args; nothing was written",
        )
    seconds = time.perf_counter() - start
    log.debug("read back %s as convert reads it: %.2f s", release.name, seconds)
    return seconds
