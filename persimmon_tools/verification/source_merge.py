"""verify's own interpretation of a release's TP x PP shards: one Megatron-keyed view (spec §A, §B.2).

The bytes come from the toolkit's one byte layer (:func:`persimmon_tools.megatron.release.open_release`
finds the shards, :func:`persimmon_tools.megatron.torchzip.load_checkpoint` unpickles each one into
:class:`~persimmon_tools.megatron.lazy.LazyTensor` leaves); ``tests/megatron/test_byte_layer_oracle.py``
proves that layer against ``torch.load`` and ``tarfile``. What the bytes *mean* is decided here, written
from the spec and Megatron's parallel layers, apart from the converter's merge
(:mod:`persimmon_tools.megatron.checkpoint`, :mod:`~persimmon_tools.megatron.consistency`), its mapping
table and its ops (an import-linter contract in ``pyproject.toml`` keeps it so):

- the shard grid: every ``(tp_rank, pp_rank)`` of a ``TP x PP`` grid is present, and no other;
- ``ckpt["model"]`` is flattened with dots: ``language_model.embedding.word_embeddings.weight``,
  ``language_model.encoder.<flat OrderedDict key>``, ``word_embeddings_for_head.weight``;
- stage roles: the word embedding lives on the first pipeline stage only, the final layernorm and the
  untied head on the last only;
- pipeline stage ``s`` numbers its layers ``0..n_s-1``; its global layer ``i`` is ``i + n_0 + ... +
  n_{s-1}``. A stage whose layers are not ``0..n-1`` or a key held by two stages is refused;
- tensor-parallel kinds (Megatron's ``VocabParallelEmbedding``, ``ColumnParallelLinear``,
  ``RowParallelLinear``): split on dim 0 are the word embedding and the untied head (vocab rows), and
  ``self_attention.query_key_value`` and ``mlp.dense_h_to_4h`` (weight and bias: output features); split
  on dim 1 are ``self_attention.dense.weight`` and ``mlp.dense_4h_to_h.weight`` (input features);
  everything else is replicated and must be byte-identical on every TP rank (checked here, in blocks);
- ``ckpt["checkpoint_version"]``: the same in every shard (or in none), and none below 2.0
  (:func:`persimmon_tools.verification.source_checks.checkpoint_version`).

:class:`SourceTensor` is lazy: rows are read on demand from every part, so neither merging nor reading an
8B model ever holds more than one block. :meth:`SourceTensor.read_plan` says which bytes of which file this
interpretation reads, so :mod:`persimmon_tools.verification.agreement` can compare it with the converter's
without reading the weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.lazy import LazyTensor, Reader
from persimmon_tools.megatron.release import Release, open_release
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.safe_graph import small_repr
from persimmon_tools.verification.source_checks import checkpoint_version

_LAYER = re.compile(r"^language_model\.encoder\.layers\.([0-9]+)\.")
_ROWS_SPLIT = re.compile(
    r"^(?:language_model\.embedding\.word_embeddings\.weight|word_embeddings_for_head\.weight|"
    r"language_model\.encoder\.layers\.[0-9]+\.(?:self_attention\.query_key_value|mlp\.dense_h_to_4h)\."
    r"(?:weight|bias))$"
)
_COLS_SPLIT = re.compile(
    r"^language_model\.encoder\.layers\.[0-9]+\.(?:self_attention\.dense|mlp\.dense_4h_to_h)\.weight$"
)
_FIRST_STAGE = ("language_model.embedding.",)
_LAST_STAGE = ("language_model.encoder.final_layernorm.", "word_embeddings_for_head.")
_MAX_NESTING = 16
_CHECK_BLOCK = 16 << 20

#: ``(how the parts are joined, ((file, byte offset, length) of each part read, in merge order)``.
ReadPlan = tuple[str, tuple[tuple[str, int, int], ...]]


def split_dim(key: str) -> int | None:
    """The dim a Megatron key is split on across TP ranks: 0, 1, or None (replicated)."""
    return 0 if _ROWS_SPLIT.match(key) else 1 if _COLS_SPLIT.match(key) else None


def part_range(part: LazyTensor) -> tuple[str, int, int] | None:
    """``(file, byte offset, length)`` a contiguous part is read from; None for a strided view."""
    if not part.is_contiguous:
        return None
    return (str(part.storage.path), part.byte_offset, part.nbytes)


@dataclass(frozen=True)
class SourceTensor:
    """One logical tensor: its TP parts in rank order, joined along ``dim`` (None: replicated, part 0)."""

    key: str
    parts: tuple[LazyTensor, ...]
    dim: int | None

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        if self.dim is not None:
            shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the merged tensor: the parts' bytes, or one copy's for a replicated tensor."""
        copies = self.parts[:1] if self.dim is None else self.parts
        return sum(p.nbytes for p in copies)

    def read_plans(self) -> list[ReadPlan] | None:
        """What this interpretation reads, as byte ranges: the parts joined on dim 0 (or the one part) as
        ``"concatenated"`` ranges, or the parts' rows joined on dim 1 (``"dim 1"``). A replicated tensor
        has one plan per TP rank: their copies were checked byte-identical, so any of them is the tensor.
        None when a part is a strided view (its bytes are not one range)."""
        ranges = [part_range(p) for p in self.parts]
        if any(r is None for r in ranges):
            return None
        if self.dim is None:
            return [("concatenated", (r,)) for r in ranges]  # type: ignore[misc]
        return [("dim 1" if self.dim == 1 else "concatenated", tuple(ranges))]  # type: ignore[arg-type]

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop`` of dim 0 of the merged tensor (elements for 1-D)."""
        if self.dim == 1:
            return torch.cat([p.read_rows(start, stop) for p in self.parts], dim=1)
        if self.dim is None:
            return self.parts[0].read_rows(start, stop)
        pieces, base = [], 0
        for p in self.parts:
            lo, hi = max(start, base), min(stop, base + p.shape[0])
            if lo < hi:
                pieces.append(p.read_rows(lo - base, hi - base))
            base += p.shape[0]
        if not pieces:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def iter_rows(self, max_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """Consecutive row blocks (dim 0) of about ``max_bytes`` each; a 0-d tensor comes whole."""
        if not self.shape:
            yield self.materialize()
            return
        rows = self.shape[0]
        step = max(1, max_bytes // max(1, self.nbytes // max(1, rows)))
        if not all(p.is_contiguous for p in self.parts):  # never seen in Megatron files: read it once, whole
            whole = self.materialize()
            yield from (whole[s : s + step] for s in range(0, rows, step))
            return
        for start in range(0, rows, step):
            yield self.read_rows(start, min(rows, start + step))

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Rows ``ids`` (e.g. token ids of an embedding), reading only those rows: (len(ids), ...)."""
        n = self.shape[0] if self.shape else 0
        got: dict[int, torch.Tensor] = {}
        for r in sorted(set(ids)):
            if not 0 <= r < n:
                raise IndexError(f"row {r} is outside the {n} rows of {self.key}")
            got[r] = self.read_rows(r, r + 1)[0]
        return torch.stack([got[r] for r in ids])

    def materialize(self) -> torch.Tensor:
        if self.dim is None:
            return self.parts[0].materialize()
        return torch.cat([p.materialize() for p in self.parts], dim=self.dim)


@dataclass
class SourceCheckpoint:
    """A release as verify interprets it: merged lazy tensors by Megatron key, args, iteration."""

    release: Release
    tensors: dict[str, SourceTensor]
    args: Any  # argparse.Namespace, or None
    iteration: int | None
    globals_seen: set[str] = field(default_factory=set)
    checkpoint_version: float | None = None  # None: no shard records one
    #: merged key -> the shard of each TP rank that holds it (with the stage-local key, when renumbered)
    shards: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """The shard(s) a merged tensor comes from, for messages."""
        held = self.shards.get(key, ())
        return " and ".join(held) if held else str(self.release.source)


def _flatten(
    obj: Any, prefix: str, out: dict[str, LazyTensor], label: str, seen: set[int], depth: int
) -> None:
    if isinstance(obj, dict):
        if id(obj) in seen or depth > _MAX_NESTING:
            raise CheckpointError(
                f"{label}: ckpt['model'] is not a tree of dicts (at {prefix or 'model'})",
                hint="the file is corrupt or was tampered with",
            )
        seen.add(id(obj))
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, label, seen, depth + 1)
    elif isinstance(obj, LazyTensor):
        if prefix in out:
            raise CheckpointError(
                f"{label}: tensor {prefix} occurs twice in ckpt['model']", hint="the file is corrupt"
            )
        out[prefix] = obj


def _model(obj: Any, label: str) -> dict[str, LazyTensor]:
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(
            f"{label}: not a Megatron checkpoint (no ckpt['model'] dict, spec §B.1)",
            hint="pass ADEPT's model_optim_rng.pt",
        )
    flat: dict[str, LazyTensor] = {}
    _flatten(obj["model"], "", flat, label, set(), 0)
    return flat


def _same_bytes(a: LazyTensor, b: LazyTensor) -> bool:
    """Bitwise equality (NaN payloads included), read in blocks of ~16 MB."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.shape:
        return torch.equal(
            a.materialize().reshape(1).view(torch.uint8), b.materialize().reshape(1).view(torch.uint8)
        )
    step = max(1, _CHECK_BLOCK // max(1, a.numel * a.dtype.itemsize // max(1, a.shape[0])))
    for s in range(0, a.shape[0], step):
        stop = min(a.shape[0], s + step)
        x, y = a.read_rows(s, stop), b.read_rows(s, stop)
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def _merge(key: str, parts: tuple[LazyTensor, ...], shards: tuple[str, ...] = ()) -> SourceTensor:
    dim = split_dim(key) if len(parts) > 1 else None
    first = parts[0]
    for rank, p in enumerate(parts[1:], 1):
        same_rest = len(p.shape) == len(first.shape) and all(
            n == m for d, (n, m) in enumerate(zip(p.shape, first.shape, strict=True)) if d != dim
        )
        if p.dtype != first.dtype or not same_rest or (dim is not None and dim >= len(first.shape)):
            raise CheckpointError(
                f"{key}: TP rank {rank} has {list(p.shape)} {p.dtype}, rank 0 {list(first.shape)} "
                f"{first.dtype}; they do not join " + (f"on dim {dim}" if dim is not None else "as copies"),
                hint="the shards come from different checkpoints",
            )
        if dim is None and not _same_bytes(first, p):
            named = f" ({shards[rank]} vs {shards[0]})" if len(shards) == len(parts) else ""
            raise CheckpointError(
                f"{key} is replicated across tensor-parallel ranks, but rank {rank} differs from rank 0{named}",
                hint="the shards come from different checkpoints, or one is damaged",
            )
    return SourceTensor(key, parts, dim)


def _grid(release: Release) -> tuple[int, int]:
    """``(TP, PP)`` from the ranks found, which must fill the grid exactly."""
    ranks = set(release.shards)
    tp, pp = 1 + max(t for t, _ in ranks), 1 + max(p for _, p in ranks)
    missing = sorted({(t, p) for t in range(tp) for p in range(pp)} - ranks)
    if missing or (tp, pp) != (release.tp, release.pp):
        raise CheckpointError(
            f"{release.source}: the shards found, {sorted(ranks)}, are not a complete TP={tp} x PP={pp} grid "
            f"(missing {missing})",
            hint="every tensor- and pipeline-parallel shard of the iteration is needed",
        )
    return tp, pp


def _check_roles(keys: Sequence[str], stage: int, pp: int, label: str) -> None:
    """Embedding on the first stage only; final layernorm and head on the last only (spec §B.2)."""
    for key in keys:
        wrong = (key.startswith(_FIRST_STAGE) and stage != 0) or (
            key.startswith(_LAST_STAGE) and stage != pp - 1
        )
        if wrong:
            where = "first" if key.startswith(_FIRST_STAGE) else "last"
            raise CheckpointError(
                f"{label}: pipeline stage {stage} of {pp} holds {key}, which only the {where} stage holds",
                hint="the mp_rank_XX_YYY folders are out of order, or come from different checkpoints",
            )


def load_source(
    source: Path | Release, *, iteration: int | None = None, reader: Reader | None = None
) -> SourceCheckpoint:
    """Interpret ``source`` (a path, or a release already opened) with verify's own grid, stage roles,
    renumbering and TP merge; tensors stay lazy, their bytes read through ``reader`` when given (verify's
    :class:`~persimmon_tools.megatron.hashing.HashingReader`, which hashes the files in the same pass)."""
    release = source if isinstance(source, Release) else open_release(Path(source), iteration=iteration)
    tp, pp = _grid(release)
    objs, flats, seen = {}, {}, set()
    for rank, src in sorted(release.shards.items()):
        loaded = load_checkpoint(src)
        objs[rank], seen = loaded.obj, seen | set(loaded.globals_seen)
        flats[rank] = _model(objs[rank], src.name)
        if reader is not None:
            flats[rank] = {k: t.through(reader) for k, t in flats[rank].items()}
    version = checkpoint_version(objs, {rank: release.shard_label(rank) for rank in objs})
    recorded = {small_repr(o.get("iteration")) for o in objs.values()}
    if len(recorded) > 1:
        raise CheckpointError(
            f"{release.source}: the shards record different iterations ({', '.join(sorted(recorded))})",
            hint="the shards come from different checkpoints",
        )
    merged: dict[str, tuple[LazyTensor, ...]] = {}
    shards: dict[str, tuple[str, ...]] = {}
    offset = 0
    for s in range(pp):
        keys, label = flats[(0, s)], release.shards[(0, s)].name
        local = {int(m[1]) for k in keys if (m := _LAYER.match(k))}
        if local != set(range(len(local))):
            raise CheckpointError(
                f"{label}: pipeline stage {s} holds layers {sorted(local)}, not 0..{len(local) - 1}",
                hint="each mp_rank_XX_YYY shard numbers its own layers from 0",
            )
        _check_roles(list(keys), s, pp, label)
        for t in range(1, tp):
            if set(flats[(t, s)]) != set(keys):
                odd = sorted(set(flats[(t, s)]) ^ set(keys))[:4]
                raise CheckpointError(
                    f"{release.shards[(t, s)].name}: TP rank {t} of stage {s} holds other keys than rank 0 "
                    f"(e.g. {odd})",
                    hint="the shards come from different checkpoints",
                )
        for key in keys:
            name = _LAYER.sub(
                lambda m, o=offset: f"language_model.encoder.layers.{int(m[1]) + o}.", key, count=1
            )
            if name in merged:
                raise CheckpointError(
                    f"{release.source}: {name} is held by two pipeline stages", hint="the shards overlap"
                )
            merged[name] = tuple(flats[(t, s)][key] for t in range(tp))
            spelled = f" (as {key})" if name != key else ""
            shards[name] = tuple(release.shard_label((t, s)) + spelled for t in range(tp))
        offset += len(local)
    it = objs[(0, 0)].get("iteration")
    return SourceCheckpoint(
        release=release,
        tensors={k: _merge(k, parts, shards[k]) for k, parts in merged.items()},
        args=objs[(0, 0)].get("args"),
        iteration=it if type(it) is int else release.iteration,
        globals_seen=seen,
        checkpoint_version=version,
        shards=shards,
    )
