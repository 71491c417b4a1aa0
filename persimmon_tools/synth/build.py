"""Random-weight releases in ADEPT's exact layout (spec §A-§B), for tests, CI, demos and benchmarks.

Layout written (``NAME`` = the tar's stem)::

    NAME/adept_vocab.model  NAME/adept_vocab.vocab  NAME/latest_checkpointed_iteration.txt
    NAME/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt

Each ``model_optim_rng.pt`` holds ``{"args": Namespace(...ModelBackend.MEGATRON, params_dtype...),
"checkpoint_version": 3.0, "iteration": it, "model": {"language_model": {"embedding": ..., "encoder":
OrderedDict(flat keys)}, "word_embeddings_for_head": ...}, "rng_state": [...]}``; pipeline stages hold
their own layers numbered from 0, the first stage the embedding, the last the final norm and the head.

Values are a deterministic function of (seed, tensor name, element index) (:mod:`persimmon_tools.synth.values`):
a fixed pool of normal samples read from a per-tensor offset. Any block of any tensor can be produced on its own, so an 8B release is
written in bounded memory and TP/PP releases from the same seed hold exactly the same logical tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.errors import PersimmonToolsError, UsageError
from persimmon_tools.megatron.release_writer import (
    ReleaseFiles,
    rank_dir,
    write_release_tar,
)
from persimmon_tools.megatron.release_writer import write_release_folder as write_folder
from persimmon_tools.safe_write import refuse_symlink
from persimmon_tools.staged_output import claim_output
from persimmon_tools.staged_record import OutputKind
from persimmon_tools.synth.shard import dump_shard, shard_object
from persimmon_tools.synth.values import PRESETS, Preset, Values, logical_keys, shard_spec
from persimmon_tools.tokenizer.spm import eod_piece, load_sp_bytes
from persimmon_tools.tokenizer.spm import vocab_text as _vocab_text

log = logging.getLogger(__name__)

#: make-release's tarball, and an extracted release folder: an existing output is a failure (exit 1).
RELEASE_TAR = OutputKind(
    label="OUT_TAR", error=PersimmonToolsError, run="make-release", command="make-release", tar=True
)
RELEASE_FOLDER = OutputKind(label="the release folder", error=PersimmonToolsError, run="make-release")
#: :attr:`ReleaseOptions.dtype` by name (``make-release --dtype``).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ReleaseOptions:
    """Options of :func:`make_release` (the ``make-release`` command's flags).

    Attributes:
        preset: ``"tiny"`` (6 layers x 64 hidden), ``"mid"`` (~1 GB) or ``"8b"`` (the real shapes).
        tp: tensor-parallel shards; must divide the preset's heads, FFN width and (padded) vocab.
        pp: pipeline stages; must divide the preset's layers.
        dtype: a ``torch.dtype``, or ``"bf16"`` / ``"fp16"`` / ``"fp32"``.
        seed: 0 to 2**32 - 1; the same seed gives the same logical tensors for any TP/PP.
        vocab: SentencePiece model shipped as ``adept_vocab.model`` (default: :func:`bundled_vocab`).
        name: the tarball's top folder (default: the tar's name without ``.tar``).
        force: replace an existing output that is a tarball persimmon-tools wrote.
        overrides: :class:`~persimmon_tools.synth.values.Preset` fields to change, e.g. ``{"heads": 8}``.

    Checked when made (:class:`UsageError`): the preset, a TP/PP its shapes allow (:func:`check_layout`),
    the seed's range and the dtype.
    """

    preset: str = "tiny"
    tp: int = 1
    pp: int = 1
    dtype: torch.dtype | str = torch.bfloat16
    seed: int = 0
    vocab: Path | None = None
    name: str | None = None
    force: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked_preset(self.preset, self.tp, self.pp, self.seed, self.overrides)
        _dtype(self.dtype)


def bundled_vocab() -> bytes:
    """The small Unigram byte-fallback SentencePiece model shipped with the package (has ``|ENDOFTEXT|``)."""
    return resources.files("persimmon_tools").joinpath("data/tiny_vocab.model").read_bytes()


@dataclass(frozen=True)
class SyntheticRelease:
    """The pieces of a synthetic release before they are written: one checkpoint object per rank."""

    objects: dict[tuple[int, int], dict]  # (tp_rank, pp_rank) -> ckpt dict with TensorSpec leaves
    vocab_bytes: bytes
    iteration: int
    tp: int
    pp: int
    preset: Preset
    vocab_rows: int

    def rank_dir(self, tp_rank: int, pp_rank: int) -> str:
        return rank_dir(tp_rank, pp_rank, self.pp)

    def files(self, name: str) -> ReleaseFiles:
        """The release as :class:`ReleaseFiles` under the top folder ``name``."""
        small = {"adept_vocab.model": self.vocab_bytes, "adept_vocab.vocab": _vocab_text(self.vocab_bytes)}
        return ReleaseFiles(name, self.iteration, self.tp, self.pp, self.objects, small)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(preset: str, tp: int, pp: int, p: Preset | None = None) -> None:
    """``tp`` must divide the preset's heads, FFN width and (padded) vocab, ``pp`` its layers; ``p``: the
    preset with its overrides (default ``PRESETS[preset]``). Raises :class:`UsageError` listing the choices."""
    p = p or PRESETS[preset]
    vocab = p.vocab or 1024  # the tiny vocab is padded to a multiple of 1024 (128 x TP up to 8)
    tps = [d for d in _divisors(p.heads) if p.ffn % d == 0 and vocab % d == 0]
    if tp not in tps:
        raise UsageError(
            f"--tp {tp} does not divide the {preset} preset's {p.heads} heads, FFN width {p.ffn} and "
            f"vocab {vocab}",
            hint=f"choose --tp from {', '.join(map(str, tps))} (or another --preset)",
        )
    pps = _divisors(p.layers)
    if pp not in pps:
        raise UsageError(
            f"--pp {pp} does not divide the {preset} preset's {p.layers} layers",
            hint=f"choose --pp from {', '.join(map(str, pps))} (or another --preset)",
        )


def checked_preset(preset: str, tp: int, pp: int, seed: int, overrides: Mapping[str, Any]) -> Preset:
    """The preset with ``overrides`` applied, once the preset name, TP/PP (:func:`check_layout`) and the seed
    are known to be valid (:class:`UsageError` otherwise)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}", hint=f"choose one of {', '.join(PRESETS)}")
    for name, value in (("tp", tp), ("pp", pp)):
        if type(value) is not int or value < 1:
            raise UsageError(f"{name}={value!r}: expected a whole number >= 1", hint="e.g. tp=2, pp=2")
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise UsageError(f"seed={seed!r}: expected a whole number from 0 to 2**32 - 1", hint="e.g. seed=0")
    p = replace(PRESETS[preset], **overrides)
    check_layout(preset, tp, pp, p)
    return p


def build_release(
    *,
    preset: str = "tiny",
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    vocab_model: bytes | None = None,
    **overrides,
) -> SyntheticRelease:
    """Checkpoint objects of a random-weight release (nothing is generated until written)."""
    p = checked_preset(preset, tp, pp, seed, overrides)
    vocab_bytes = vocab_model if vocab_model is not None else bundled_vocab()
    sp = load_sp_bytes(vocab_bytes, "vocabulary model")
    eod_piece(sp, "vocabulary model")  # |ENDOFTEXT|, else the EOS piece (ADEPT's fallback); logs which
    multiple = 128 * 8  # make_vocab_size_divisible_by x TP, for any TP up to 8: same vocab for every layout
    vocab = p.vocab or -(-sp.get_piece_size() // multiple) * multiple
    if vocab < sp.get_piece_size():  # TP and PP were checked by check_layout
        raise UsageError(
            f"TP={tp} does not divide heads {p.heads} / ffn {p.ffn} / vocab {vocab}, or the vocab "
            f"({vocab}) is smaller than the tokenizer ({sp.get_piece_size()})"
        )
    values = Values(seed)
    keys = logical_keys(p, vocab)
    objects = {
        (t, s): shard_object(values, keys, p, tp, pp, t, s, dtype, vocab, p.iteration)
        for s in range(pp)
        for t in range(tp)
    }
    return SyntheticRelease(objects, vocab_bytes, p.iteration, tp, pp, p, vocab)


def logical_tensors(
    *,
    preset: str = "tiny",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    vocab_rows: int | None = None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """The full (unsharded) Megatron tensors a release made with the same seed holds, by flat key."""
    rel = build_release(preset=preset, dtype=dtype, seed=seed, **overrides) if vocab_rows is None else None
    p = replace(PRESETS[preset], **overrides)
    vocab = vocab_rows or rel.vocab_rows
    values = Values(seed)
    out = {}
    for key, (shape, kind) in logical_keys(p, vocab).items():
        spec = shard_spec(values, key, shape, kind, 1, 0, dtype, p)
        out[key] = torch.cat(list(spec.blocks())).reshape(spec.shape)
    return out


def write_release_folder(
    rel: SyntheticRelease, folder: Path, *, progress: Callable[[int], None] = lambda n: None
) -> Path:
    """Write ``rel`` as an extracted release folder (same layout as inside the tar) at ``folder``, which
    must be new or empty; it appears complete or not at all."""
    folder = Path(os.path.abspath(folder))
    with claim_output(folder, RELEASE_FOLDER, force=False) as claim, claim.staging() as tmp:
        write_folder(rel.files(folder.name), tmp, dump=dump_shard, progress=progress, top=False)
    return folder


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    """:attr:`ReleaseOptions.dtype` as a ``torch.dtype`` (:class:`UsageError` for an unknown name)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(
            f"dtype={dtype!r}: expected one of {', '.join(DTYPES)} or a torch.dtype", hint='e.g. dtype="bf16"'
        )
    return DTYPES[dtype]


def make_release(
    out: Path,
    options: ReleaseOptions = ReleaseOptions(),
    *,
    progress: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int], None] = lambda n: None,
) -> Path:
    """Write a random-weight release tar at ``out`` (see module docstring); returns ``out``.

    ``progress`` gets the tensor bytes as they are written; ``on_total`` their sum, once, before the first.

    An existing ``out`` is refused (:class:`PersimmonToolsError`), with ``options.force`` too unless it is a
    tarball persimmon-tools wrote (it carries the toolkit's record); ``out`` as a symlink is a
    :class:`UsageError`. The tarball is written beside ``out`` and renamed over it when complete.
    """
    o = options
    dtype = _dtype(o.dtype)
    vocab = Path(o.vocab).read_bytes() if o.vocab is not None else None
    out = Path(out)
    refuse_symlink(Path(os.path.abspath(out)), "OUT_TAR", UsageError)
    with claim_output(out, RELEASE_TAR, force=o.force) as claim:
        rel = build_release(
            preset=o.preset, tp=o.tp, pp=o.pp, dtype=dtype, seed=o.seed, vocab_model=vocab, **o.overrides
        )
        files = rel.files(o.name or out.name.removesuffix(".tar"))
        on_total(files.payload_bytes())
        with claim.staged_file() as fh:
            write_release_tar(files, fh, dump=dump_shard, progress=progress)
    # debug: the command's own summary line says what was written (one line, not two)
    log.debug("wrote %s (preset %s, TP=%d PP=%d, %s, seed %d)", out, o.preset, o.tp, o.pp, dtype, o.seed)
    return out
