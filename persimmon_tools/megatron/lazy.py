"""Lazy tensors: a shape, dtype and byte range of a checkpoint file, read only when asked for.

A :class:`LazyTensor` never holds data. :meth:`LazyTensor.read_rows` reads a range of rows (dim 0) straight
from the file with ``pread`` (no ``mmap``, so the bytes never count towards the process's RSS), which is
how conversion streams an 8B model in bounded memory.

Every read of checkpoint bytes ends in :func:`preadv_exact`, which hands what it read to
:func:`persimmon_tools.megatron.records.observe`: the CRC-32 of each zip record is checked in the pass
that reads it (since 2026-12-07, version 0.1.0). A :class:`StorageRef` carries its record's
:class:`~persimmon_tools.megatron.records.RecordCheck` (shared by its ``dataclasses.replace`` copies).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.records import RecordCheck, observe, read_exact
from persimmon_tools.safe_read import open_regular_fd


def preadv_exact(fd: int, view: memoryview, offset: int, origin: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (``preadv`` loops over short reads); a short file is an error.
    The bytes read are then checked against the CRC-32 of the zip records they belong to
    (:func:`~persimmon_tools.megatron.records.observe`: a damaged record raises ``CheckpointError``)."""
    read_exact(fd, view, offset, origin)
    observe(fd, offset, view)


def pread_exact(path: Path, offset: int, size: int, origin: str) -> memoryview:
    """Read exactly ``size`` bytes at ``offset`` of ``path`` into a new buffer (a writable memoryview).

    The file is opened as a regular file only (``O_NONBLOCK`` + ``fstat`` of the opened descriptor), so a
    FIFO or device swapped in after the release was listed cannot hang or feed the read. The buffer is not
    zero-filled first (``numpy.empty``, not ``bytearray(size)``): ``preadv`` overwrites every byte or the
    read fails; that memset would cost about 0.4 s of CPU per GB read.
    """
    buf = memoryview(np.empty(size, dtype=np.uint8))
    fd = open_regular_fd(path, what=origin, max_bytes=None, error=CheckpointError)
    try:
        preadv_exact(fd, buf, offset, origin)
    finally:
        os.close(fd)
    return buf


#: ``read(path, offset, size, origin)``: ``size`` bytes at ``offset`` of ``path``, as :func:`pread_exact`.
Reader = Callable[[Path, int, int, str], memoryview]


@dataclass(frozen=True)
class StorageRef:
    """One storage record of a torch zip checkpoint: ``nbytes`` at absolute ``data_offset`` of ``path``."""

    path: Path
    data_offset: int
    nbytes: int
    dtype: torch.dtype
    key: str
    origin: str  # for messages: "<file>:archive/data/<key>"
    #: How the bytes are read (``read(path, offset, size, origin) -> memoryview``); None: :func:`pread_exact`.
    #: verify's reference side reads through a :class:`~persimmon_tools.megatron.hashing.HashingReader`.
    reader: Reader | None = field(default=None, compare=False, repr=False)
    #: The CRC-32 state of the zip record holding the bytes (None: not checked, e.g. made by hand).
    record: RecordCheck | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize

    def read(self, offset: int, size: int) -> memoryview:
        """``size`` bytes at absolute ``offset`` of :attr:`path`, through :attr:`reader`."""
        return (self.reader or pread_exact)(self.path, offset, size, self.origin)

    def with_dtype(self, dtype: torch.dtype) -> StorageRef:
        return replace(self, dtype=dtype)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor view ``(offset, shape, stride)`` into a :class:`StorageRef`, read on demand.

    Only row-major contiguous views can be streamed by rows; other views are materialised whole.
    """

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def from_storage(
        cls, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> LazyTensor:
        if not all(isinstance(v, int) and v >= 0 for v in (offset, *shape, *stride)) or len(shape) != len(
            stride
        ):
            raise CheckpointError(
                f"{storage.origin}: malformed tensor view offset={offset} shape={shape} stride={stride}",
                hint="the checkpoint is corrupt",
            )
        numel = math.prod(shape)
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
            if last >= storage.numel:
                raise CheckpointError(
                    f"{storage.origin}: tensor view (offset {offset}, shape {list(shape)}) runs past its storage "
                    f"of {storage.numel} elements",
                    hint="the checkpoint is corrupt or was tampered with",
                )
            if numel > storage.numel - offset:  # zero or overlapping strides: reading it would amplify
                raise CheckpointError(
                    f"{storage.origin}: tensor view (shape {list(shape)}, stride {list(stride)}) has {numel} "
                    f"elements but its storage holds {storage.numel - offset} from offset {offset}",
                    hint="model weights are never stored as overlapping views; the checkpoint is corrupt or was "
                    "tampered with",
                )
            if storage.record is not None:  # the record's CRC completes once its views are read
                storage.record.cover(storage.data_offset + (last + 1) * storage.dtype.itemsize)
        return cls(storage, offset, tuple(shape), tuple(stride))

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def through(self, reader: Reader | None) -> LazyTensor:
        """The same view, its bytes read through ``reader`` (None: :func:`pread_exact`)."""
        return replace(self, storage=replace(self.storage, reader=reader))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def row_nbytes(self) -> int:
        return (self.nbytes // self.shape[0]) if self.shape and self.shape[0] else self.nbytes

    @property
    def is_contiguous(self) -> bool:
        expected, acc = [], 1
        for n in reversed(self.shape):
            expected.append(acc)
            acc *= n
        return all(
            n <= 1 or s == e for n, s, e in zip(self.shape, self.stride, reversed(expected), strict=True)
        )

    @property
    def byte_offset(self) -> int:
        """Absolute file offset of the first element (meaningful for contiguous views)."""
        return self.storage.data_offset + self.offset * self.dtype.itemsize

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 as a fresh CPU tensor (0-d/1-d: elements)."""
        if not self.shape:
            return self.materialize()
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(
                f"{self.storage.origin}: rows [{start}, {stop}) of a tensor with {self.shape[0]} rows"
            )
        if not self.is_contiguous:
            return self.materialize()[start:stop].clone()
        rows = stop - start
        buf = self.storage.read(self.byte_offset + start * self.row_nbytes, rows * self.row_nbytes)
        if not buf:
            return torch.empty((rows, *self.shape[1:]), dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).view(rows, *self.shape[1:])

    def materialize(self) -> torch.Tensor:
        """The whole tensor as a CPU tensor."""
        if not self.numel:
            return torch.empty(self.shape, dtype=self.dtype)
        if not self.shape:
            buf = self.storage.read(self.byte_offset, self.dtype.itemsize)
            return torch.frombuffer(buf, dtype=self.dtype).reshape(())
        if self.is_contiguous:
            return self.read_rows(0, self.shape[0])
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        buf = self.storage.read(self.byte_offset, span * self.dtype.itemsize)
        flat = torch.frombuffer(buf, dtype=self.dtype)
        return torch.as_strided(flat, self.shape, self.stride).clone()
