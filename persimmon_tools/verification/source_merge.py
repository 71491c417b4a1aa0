"""verify's own merge of a release's TP x PP shards into one Megatron-keyed view (spec §A, §B.2).

Part of the independent reference reader (see :mod:`.source_layout` for why it shares no code with
``persimmon_tools.megatron``, ``mapping``, ``ops`` or ``conversion``; :mod:`.source_pickle` reads each
shard). Written from the spec and Megatron's parallel layers, not from the converter's mapping table:

- ``ckpt["model"]`` is flattened with dots: ``language_model.embedding.word_embeddings.weight``,
  ``language_model.encoder.<flat OrderedDict key>``, ``word_embeddings_for_head.weight``;
- pipeline stage ``s`` numbers its layers ``0..n_s-1``; its global layer ``i`` is ``i + n_0 + ... +
  n_{s-1}``. A stage whose layers are not ``0..n-1`` or a key held by two stages is refused;
- tensor-parallel kinds (Megatron's ``VocabParallelEmbedding``, ``ColumnParallelLinear``,
  ``RowParallelLinear``): split on dim 0 are the word embedding and the untied head (vocab rows), and
  ``self_attention.query_key_value`` and ``mlp.dense_h_to_4h`` (weight and bias: output features); split
  on dim 1 are ``self_attention.dense.weight`` and ``mlp.dense_4h_to_h.weight`` (input features);
  everything else is replicated and must be byte-identical on every TP rank (checked here, in blocks).

:class:`SourceTensor` is lazy: rows are read on demand from every part (one seek + read per part and
block), so neither merging nor reading an 8B model ever holds more than one block.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.safe_graph import small_repr
from persimmon_tools.verification.source_layout import SourceLayout, discover
from persimmon_tools.verification.source_pickle import TensorView, read_shard

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^language_model\.encoder\.layers\.([0-9]+)\.")
_ROWS_SPLIT = re.compile(
    r"^(?:language_model\.embedding\.word_embeddings\.weight|word_embeddings_for_head\.weight|"
    r"language_model\.encoder\.layers\.[0-9]+\.(?:self_attention\.query_key_value|mlp\.dense_h_to_4h)\."
    r"(?:weight|bias))$"
)
_COLS_SPLIT = re.compile(
    r"^language_model\.encoder\.layers\.[0-9]+\.(?:self_attention\.dense|mlp\.dense_4h_to_h)\.weight$"
)
_MAX_NESTING = 16
_CHECK_BLOCK = 16 << 20


def split_dim(key: str) -> int | None:
    """The dim a Megatron key is split on across TP ranks: 0, 1, or None (replicated)."""
    return 0 if _ROWS_SPLIT.match(key) else 1 if _COLS_SPLIT.match(key) else None


@dataclass(frozen=True)
class SourceTensor:
    """One logical tensor: its TP parts in rank order, joined along ``dim`` (None: replicated, part 0)."""

    key: str
    parts: tuple[TensorView, ...]
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
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

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
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def iter_rows(self, max_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """Consecutive row blocks (dim 0) of about ``max_bytes`` each; a 0-d tensor comes whole."""
        if not self.shape:
            yield self.materialize()
            return
        rows = self.shape[0]
        step = max(1, max_bytes // max(1, self.nbytes // max(1, rows)))
        if not all(p.contiguous for p in self.parts):  # never seen in Megatron files: read it once, whole
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
    """A release read by verify's own reader: merged lazy tensors by Megatron key, args, iteration."""

    layout: SourceLayout
    tensors: dict[str, SourceTensor]
    args: Any  # argparse.Namespace, or None
    iteration: int | None
    globals_seen: set[str] = field(default_factory=set)


def _flatten(
    obj: Any, prefix: str, out: dict[str, TensorView], label: str, seen: set[int], depth: int
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
    elif isinstance(obj, TensorView):
        if prefix in out:
            raise CheckpointError(
                f"{label}: tensor {prefix} occurs twice in ckpt['model']", hint="the file is corrupt"
            )
        out[prefix] = obj


def _model(obj: Any, label: str) -> dict[str, TensorView]:
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(
            f"{label}: not a Megatron checkpoint (no ckpt['model'] dict, spec §B.1)",
            hint="pass ADEPT's model_optim_rng.pt",
        )
    flat: dict[str, TensorView] = {}
    _flatten(obj["model"], "", flat, label, set(), 0)
    return flat


def _same_bytes(a: TensorView, b: TensorView) -> bool:
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


def _merge(key: str, parts: tuple[TensorView, ...]) -> SourceTensor:
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
            raise CheckpointError(
                f"{key} is replicated across tensor-parallel ranks, but rank {rank} differs from rank 0",
                hint="the shards come from different checkpoints, or one is damaged",
            )
    return SourceTensor(key, parts, dim)


def load_source(source: Path, *, iteration: int | None = None) -> SourceCheckpoint:
    """Read ``source`` with verify's own reader: discovery, unpickling and the TP/PP merge (lazy)."""
    layout = discover(Path(source), iteration=iteration)
    objs, flats, seen = {}, {}, set()
    for rank, piece in sorted(layout.shards.items()):
        objs[rank], globals_seen = read_shard(piece)
        seen |= globals_seen
        flats[rank] = _model(objs[rank], piece.label)
    recorded = {small_repr(o.get("iteration")) for o in objs.values()}
    if len(recorded) > 1:
        raise CheckpointError(
            f"{source}: the shards record different iterations ({', '.join(sorted(recorded))})",
            hint="the shards come from different checkpoints",
        )
    merged: dict[str, tuple[TensorView, ...]] = {}
    offset = 0
    for s in range(layout.pp):
        keys = flats[(0, s)]
        local = {int(m[1]) for k in keys if (m := _LAYER.match(k))}
        if local != set(range(len(local))):
            raise CheckpointError(
                f"{layout.shards[(0, s)].label}: pipeline stage {s} holds layers {sorted(local)}, "
                f"not 0..{len(local) - 1}",
                hint="each mp_rank_XX_YYY shard numbers its own layers from 0",
            )
        for t in range(1, layout.tp):
            if set(flats[(t, s)]) != set(keys):
                odd = sorted(set(flats[(t, s)]) ^ set(keys))[:4]
                raise CheckpointError(
                    f"{layout.shards[(t, s)].label}: TP rank {t} of stage {s} holds other keys than rank 0 "
                    f"(e.g. {odd})",
                    hint="the shards come from different checkpoints",
                )
        for key in keys:
            name = _LAYER.sub(
                lambda m, o=offset: f"language_model.encoder.layers.{int(m[1]) + o}.", key, count=1
            )
            if name in merged:
                raise CheckpointError(
                    f"{source}: {name} is held by two pipeline stages", hint="the shards overlap"
                )
            merged[name] = tuple(flats[(t, s)][key] for t in range(layout.tp))
        offset += len(local)
    it = objs[(0, 0)].get("iteration")
    return SourceCheckpoint(
        layout=layout,
        tensors={k: _merge(k, parts) for k, parts in merged.items()},
        args=objs[(0, 0)].get("args"),
        iteration=it if type(it) is int else layout.iteration,
        globals_seen=seen,
    )
