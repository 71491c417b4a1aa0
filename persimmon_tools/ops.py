"""Tiny tensor operations, each paired with its inverse (merge ↔ split, cast ↔ cast back, renumber ↔ renumber).

Every production merge and split goes through the row-range primitives here, so the round-trip tests run
on the code that ships:

- :func:`merge_rows` (convert's :class:`~persimmon_tools.megatron.checkpoint.MergedTensor`): rows
  ``[start, stop)`` of the merged tensor, reading only the rows of each part that make them
  (:func:`merge_pieces` says which);
- :func:`shard_rows` (export's ``ShardTensor``, ``make-release``'s synthetic shards), its inverse: rows
  ``[start, stop)`` of one rank's piece, reading only those rows of the full tensor (:func:`shard_bounds`).

:func:`merge` and :func:`split` are the same primitives over in-memory tensors. Both sides read by rows
(dim 0; 1-D tensors by elements), so an 8B tensor is never materialised whole.

Tensor-parallel kinds (Megatron ``mpu/layers.py``):
- ``column``: ColumnParallelLinear — weight ``[out, in]`` and bias ``[out]`` split along dim 0 (out).
  The fused QKV is per-head interleaved (``row = h*3*hd + t*hd + d``, spec §C), and each rank holds
  whole heads, so concatenating along dim 0 restores the head order.
- ``row``: RowParallelLinear — weight ``[out, in]`` split along dim 1 (in); its bias is replicated.
- ``vocab``: VocabParallelEmbedding / untied head — ``[vocab, hidden]`` split along dim 0.
- ``replicated``: every rank holds the same tensor (layernorms, row-parallel biases, ``inv_freq``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from enum import Enum

import torch

from persimmon_tools.errors import CheckpointError

Shape = tuple[int, ...]
#: ``read(part, start, stop)``: rows ``[start, stop)`` (dim 0) of tensor-parallel part ``part``.
PartReader = Callable[[int, int, int], torch.Tensor]
#: ``read(start, stop)``: rows ``[start, stop)`` (dim 0) of the full tensor.
RowReader = Callable[[int, int], torch.Tensor]


class Parallel(str, Enum):
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"

    @property
    def concat_dim(self) -> int | None:
        """The dimension shards are concatenated along (``None`` for replicated tensors)."""
        return {Parallel.COLUMN: 0, Parallel.VOCAB: 0, Parallel.ROW: 1}.get(self)


def merge_dim(kind: Parallel | None, ndim: int) -> int | None:
    """The dimension the parts of a ``kind`` tensor with ``ndim`` dims are joined along (None: replicated,
    unknown or 0-d). 1-D tensors join along dim 0 (a 1-D row-parallel tensor never occurs: those biases
    are replicated)."""
    if kind is None or kind.concat_dim is None or ndim == 0:
        return None
    return min(kind.concat_dim, ndim - 1)


# ---- merge: parts -> one tensor ------------------------------------------------------------------------


def merged_shape(shapes: Sequence[Shape], kind: Parallel | None, name: str = "tensor") -> Shape:
    """The shape of the tensor merged from parts of ``shapes`` (rank order). Raises CheckpointError when
    they do not fit: a different number of dims, or sizes that differ outside the merge dimension."""
    first = tuple(shapes[0])
    dim = merge_dim(kind, len(first)) if len(shapes) > 1 else None
    for rank, shape in enumerate(shapes):
        if len(shape) != len(first) or any(
            n != m for d, (n, m) in enumerate(zip(shape, first, strict=True)) if d != dim
        ):
            raise CheckpointError(
                f"{name}: shard shapes do not fit together (rank 0 {list(first)}, rank {rank} {list(shape)})",
                hint="the shards come from different checkpoints",
            )
    if dim is None:
        return first
    return tuple(sum(s[dim] for s in shapes) if d == dim else n for d, n in enumerate(first))


def merge_pieces(
    shapes: Sequence[Shape], kind: Parallel | None, start: int, stop: int
) -> list[tuple[int, int, int]]:
    """Which parts, and which of their rows, make rows ``[start, stop)`` of the merged tensor:
    ``[(part, lo, hi), ...]`` in the order they are joined.

    Column/vocab (dim 0): the parts whose rows overlap the range, each cut to it. Row (dim 1): every part,
    the same rows, joined side by side. Replicated or a single part: part 0. An empty range gives rows
    ``[0, 0)`` of part 0 (an empty tensor of the right trailing shape).
    """
    dim = merge_dim(kind, len(shapes[0])) if len(shapes) > 1 else None
    if dim is None:
        return [(0, start, stop)]
    if dim == 1:
        return [(p, start, stop) for p in range(len(shapes))]
    out, base = [], 0
    for p, shape in enumerate(shapes):
        lo, hi = max(start, base), min(stop, base + shape[0])
        if lo < hi:
            out.append((p, lo - base, hi - base))
        base += shape[0]
    return out or [(0, 0, 0)]


def merge_rows(
    read: PartReader, shapes: Sequence[Shape], kind: Parallel | None, start: int, stop: int
) -> torch.Tensor:
    """Rows ``[start, stop)`` of the merged tensor from ``read(part, lo, hi)`` of the parts (inverse:
    :func:`shard_rows`). Memory: those rows only."""
    pieces = [read(p, lo, hi) for p, lo, hi in merge_pieces(shapes, kind, start, stop)]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=merge_dim(kind, len(shapes[0])))


def row_blocks(
    shapes: Sequence[Shape], kind: Parallel | None, rows_per_block: int
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering the merged tensor, at most ``rows_per_block`` rows each; none
    straddles two dim-0 parts, so each block is a single read (no copy to join)."""
    step = max(1, rows_per_block)
    dim = merge_dim(kind, len(shapes[0])) if len(shapes) > 1 else None
    spans = [s[0] for s in shapes] if dim == 0 else [shapes[0][0]] if shapes[0] else []
    base = 0
    for rows in spans:
        for a in range(base, base + rows, step):
            yield a, min(base + rows, a + step)
        base += rows


def merge(parts: list[torch.Tensor], kind: Parallel, name: str = "tensor") -> torch.Tensor:
    """Merge the tensor-parallel shards of one tensor (inverse: :func:`split`)."""
    if kind.concat_dim is None:
        check_replicated(parts, name)
        return parts[0]
    shapes = [tuple(p.shape) for p in parts]
    full = merged_shape(shapes, kind, name)
    if not full:
        return parts[0]
    return merge_rows(lambda p, a, b: parts[p][a:b], shapes, kind, 0, full[0])


def check_replicated(parts: list[torch.Tensor], name: str) -> None:
    """Raise if the copies of a replicated tensor differ between tensor-parallel ranks."""
    for rank, part in enumerate(parts[1:], start=1):
        if part.shape != parts[0].shape or not torch.equal(_raw_bytes(part), _raw_bytes(parts[0])):
            raise CheckpointError(
                f"{name} should be identical on every tensor-parallel rank, but rank {rank} differs from rank 0",
                hint="the shards come from different checkpoints, or the run used per-rank weights "
                "(e.g. qk_layernorm=weights_per_tensor_parallel_rank_and_layer), which HF Persimmon cannot hold",
            )


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# ---- split: one tensor -> parts ------------------------------------------------------------------------


def shard_bounds(shape: Shape, kind: Parallel, tp: int, rank: int) -> tuple[int | None, int, int]:
    """Where tensor-parallel rank ``rank`` of ``tp`` sits in the full tensor: ``(dim, start, stop)`` along
    the split dimension (``dim`` None: replicated, the whole tensor). Inverse of :func:`merge_pieces`.

    1-D tensors of a column or vocab kind are split along dim 0; a 1-D tensor of the row kind (never seen:
    row-parallel biases are replicated) also along dim 0, as :func:`merge` concatenates it.
    """
    dim = merge_dim(kind, len(shape))
    if dim is None:
        return None, 0, shape[0] if shape else 1
    size = shape[dim]
    if size % tp:
        raise ValueError(f"dim {dim} of size {size} is not divisible by TP={tp}")
    return dim, rank * size // tp, (rank + 1) * size // tp


def shard_shape(shape: Shape, kind: Parallel, tp: int, rank: int) -> Shape:
    """The shape of rank ``rank``'s piece of a ``shape`` tensor."""
    dim, lo, hi = shard_bounds(shape, kind, tp, rank)
    return tuple(hi - lo if d == dim else n for d, n in enumerate(shape))


def shard_rows(
    read: RowReader, shape: Shape, kind: Parallel, tp: int, rank: int, start: int, stop: int
) -> torch.Tensor:
    """Rows ``[start, stop)`` of rank ``rank``'s piece of the full ``shape`` tensor, from ``read(lo, hi)`` of
    the full tensor (inverse: :func:`merge_rows`). Column/vocab: the full tensor's rows shifted by the
    rank's offset; row: the same rows, the rank's columns (a view; the caller copies); replicated: the
    same rows. Memory: those rows of the full tensor."""
    dim, lo, hi = shard_bounds(shape, kind, tp, rank)
    if dim == 0:
        return read(lo + start, lo + stop)
    block = read(start, stop)
    return block if dim is None else block[:, lo:hi]


def split(tensor: torch.Tensor, kind: Parallel, tp: int) -> list[torch.Tensor]:
    """Cut one tensor into ``tp`` shards the way Megatron lays them out (inverse: :func:`merge`)."""
    shape = tuple(tensor.shape)
    if not shape:
        return [tensor.clone() for _ in range(tp)]
    out = []
    for rank in range(tp):
        rows = shard_shape(shape, kind, tp, rank)[0]
        piece = shard_rows(lambda a, b: tensor[a:b], shape, kind, tp, rank, 0, rows)
        out.append(piece.clone(memory_format=torch.contiguous_format))
    return out


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype`` (inverse: cast back; lossless only when widening)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


_LAYER_RE = re.compile(r"(?<=\.layers\.)([0-9]+)(?=\.)")  # ASCII digits only (\d takes any Unicode digit)


def layer_index(key: str) -> int | None:
    """The layer number in ``...layers.{i}....``, or None."""
    m = _LAYER_RE.search(key)
    return int(m.group(1)) if m else None


def renumber_layer(key: str, offset: int) -> str:
    """Shift the layer number of a pipeline-stage-local key by ``offset`` (inverse: ``-offset``)."""
    return _LAYER_RE.sub(lambda m: str(int(m.group(1)) + offset), key, count=1)
