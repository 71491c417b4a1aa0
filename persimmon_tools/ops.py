"""Tiny tensor operations, each paired with its inverse (merge ↔ split, cast ↔ cast back, renumber ↔ renumber).

Conversion uses the forward direction (merge tensor-parallel shards, renumber pipeline-stage layers);
``make-release`` uses the inverse to cut one logical tensor into shards, so tests can prove the round trip.

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
from enum import Enum

import torch

from persimmon_tools.errors import CheckpointError


class Parallel(str, Enum):
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"

    @property
    def concat_dim(self) -> int | None:
        """The dimension shards are concatenated along (``None`` for replicated tensors)."""
        return {Parallel.COLUMN: 0, Parallel.VOCAB: 0, Parallel.ROW: 1}.get(self)


def merge(parts: list[torch.Tensor], kind: Parallel, name: str = "tensor") -> torch.Tensor:
    """Merge the tensor-parallel shards of one tensor (inverse: :func:`split`)."""
    if kind.concat_dim is None:
        check_replicated(parts, name)
        return parts[0]
    return torch.cat(parts, dim=kind.concat_dim if parts[0].dim() > 1 else 0)


def shard_bounds(shape: tuple[int, ...], kind: Parallel, tp: int, rank: int) -> tuple[int | None, int, int]:
    """Where tensor-parallel rank ``rank`` of ``tp`` sits in the full tensor: ``(dim, start, stop)`` along
    the split dimension (``dim`` None: replicated, the whole tensor). Inverse of :func:`merge`'s concatenation.

    1-D tensors of a column or vocab kind are split along dim 0; a 1-D tensor of the row kind (never seen:
    row-parallel biases are replicated) also along dim 0, as :func:`merge` concatenates it.
    """
    if kind.concat_dim is None or not shape:
        return None, 0, shape[0] if shape else 1
    dim = kind.concat_dim if len(shape) > 1 else 0
    size = shape[dim]
    if size % tp:
        raise ValueError(f"dim {dim} of size {size} is not divisible by TP={tp}")
    return dim, rank * size // tp, (rank + 1) * size // tp


def split(tensor: torch.Tensor, kind: Parallel, tp: int) -> list[torch.Tensor]:
    """Cut one tensor into ``tp`` shards the way Megatron lays them out (inverse: :func:`merge`)."""
    out = []
    for rank in range(tp):
        dim, start, stop = shard_bounds(tuple(tensor.shape), kind, tp, rank)
        out.append(tensor.clone() if dim is None else tensor.narrow(dim, start, stop - start).contiguous())
    return out


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
