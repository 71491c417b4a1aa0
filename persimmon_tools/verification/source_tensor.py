"""verify's own lazy tensors: a storage record of a torch zip checkpoint and a view into it (no bytes held).

Part of the independent reference reader (:mod:`.source_layout` says why it shares no code with
``persimmon_tools.megatron``). A :class:`Record` is one ``<prefix>/data/<key>`` record of a ``.pt``: its
byte range inside the shard (itself a byte range of a tar, or a whole file), its dtype and the file's
byte order. A :class:`TensorView` is ``torch._utils._rebuild_tensor_v2``'s ``(storage offset, size,
stride)`` into it, checked to stay inside the record. Rows are read on demand with one seek + read and
``torch.frombuffer``; records written big-endian (``<prefix>/byteorder`` = ``big``) are byte-swapped per
element (per component for complex dtypes), as ``torch.load`` does. Nothing is cached: memory is one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError, UnsafeCheckpointError
from persimmon_tools.verification.source_layout import FileSlice


@dataclass(frozen=True)
class Record:
    """One ``<prefix>/data/<key>`` record: ``nbytes`` at ``offset`` of ``file``, elements of ``dtype``."""

    file: FileSlice
    offset: int
    nbytes: int
    dtype: torch.dtype
    big_endian: bool
    name: str

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize

    def read(self, first: int, count: int) -> torch.Tensor:
        """Elements ``first .. first+count`` as a 1-D CPU tensor in native byte order (one seek + read)."""
        size = self.dtype.itemsize
        if first < 0 or first + count > self.numel:
            raise CheckpointError(
                f"{self.name}: elements {first}..{first + count} are outside its {self.numel}",
                hint="the file is corrupt",
            )
        if count == 0:
            return torch.empty(0, dtype=self.dtype)
        raw = torch.frombuffer(self.file.pread(self.offset + first * size, count * size), dtype=torch.uint8)
        if self.big_endian and size > 1:
            unit = size // 2 if self.dtype.is_complex else size  # complex: each component on its own
            raw = raw.view(-1, unit).flip(1).reshape(-1)
        return raw.view(self.dtype)


@dataclass(frozen=True)
class TensorView:
    """A tensor ``(offset, shape, stride)`` into a :class:`Record`; reads nothing until asked."""

    record: Record
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.record.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        want = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if n > 1 and s != want:
                return False
            want *= n
        return True

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop`` of dim 0 (elements for 1-D); row-major views read just those bytes."""
        if not self.shape:
            return self.materialize()
        if not self.contiguous:
            return self.materialize()[start:stop].clone()
        row = math.prod(self.shape[1:])
        return self.record.read(self.offset + start * row, (stop - start) * row).view(
            stop - start, *self.shape[1:]
        )

    def materialize(self) -> torch.Tensor:
        if not self.numel:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.contiguous:
            return self.record.read(self.offset, self.numel).view(self.shape)
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        flat = self.record.read(self.offset, span)
        return torch.as_strided(flat, self.shape, self.stride).clone()


def make_view(record: Record, offset: Any, size: Any, stride: Any) -> TensorView:
    if not isinstance(record, Record):
        raise UnsafeCheckpointError(f"a tensor rebuild got a {type(record).__name__}, not a storage")
    shape, strides = tuple(size), tuple(stride)
    if not all(type(v) is int and v >= 0 for v in (offset, *shape, *strides)) or len(shape) != len(strides):
        raise CheckpointError(
            f"{record.name}: malformed tensor view (offset {offset!r}, size {shape!r}, stride {strides!r})",
            hint="the file is corrupt",
        )
    if (
        math.prod(shape)
        and offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) >= record.numel
    ):
        raise CheckpointError(
            f"{record.name}: a tensor view of shape {list(shape)} at offset {offset} runs past the "
            f"{record.numel} elements of its storage",
            hint="the file is corrupt or was tampered with",
        )
    if math.prod(shape) > record.numel - offset:  # zero or overlapping strides: reading would amplify
        raise CheckpointError(
            f"{record.name}: a tensor view of shape {list(shape)} (stride {list(strides)}) has more elements "
            f"than its storage holds from offset {offset} ({record.numel - offset})",
            hint="weights are never stored as overlapping views; the file is corrupt or was tampered with",
        )
    return TensorView(record, offset, shape, strides)
