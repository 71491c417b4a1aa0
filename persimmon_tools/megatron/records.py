"""The CRC-32 of every torch-zip record a pass reads, checked in that same pass (no second read).

A torch zip's directory holds, for every record, the CRC-32 of its bytes (``zipfile.ZipInfo.CRC``; the
``<prefix>/data/<key>`` records hold the tensors' bytes, stored uncompressed). ``data.pkl`` and ``byteorder``
are read whole and checked where they are read (:mod:`persimmon_tools.megatron.torchzip`); a tensor record is
read in pieces (row blocks, chunks of a copy, one row of an embedding), so each keeps a :class:`RecordCheck`:
the next offset it expects and the running ``zlib.crc32`` of the bytes before it.

:func:`observe` sees every read of tensor bytes: :func:`~persimmon_tools.megatron.lazy.preadv_exact` calls
it, and every reader of checkpoint bytes goes through that function (``StorageRef.read``, the converter's
copy of ``byte_ranges()``, verify's :class:`~persimmon_tools.megatron.hashing.HashingReader`). For each
record the read overlaps:

- a read at the expected offset (or across it) extends the CRC;
- a read ahead of it first reads and CRCs the gap, when the gap is at most :data:`AHEAD` times the read or
  :data:`NEAR` bytes; a read further ahead (one row of a 2 GB embedding looked up by token id) leaves the
  record open, as :class:`~persimmon_tools.megatron.hashing.HashingReader` does with its sha256 cursors;
- a read behind it is not CRC'd again;
- once the bytes the record's tensors cover are CRC'd (up to the end of the last tensor view of its storage;
  the storage's ``numel x itemsize`` bytes when no view is known), the rest of a longer record is read then;
- a record whose bytes are all CRC'd is compared with the directory's CRC; a mismatch raises
  :class:`~persimmon_tools.errors.CheckpointError` naming the file, the record and the tensors in it.

Records a pass started and did not complete are completed by :func:`finish_records` (or
``LoadedCheckpoint.finish_records()``) at the end of the pass; records never read (optimizer and RNG state)
are never checked. A file whose directory records no CRC at all (every non-empty record 0: written after
``torch.serialization.set_crc32_options(False)``) is not checked (logged).

A read is matched to records by the identity of the descriptor read (device, inode, size, modification time,
from ``fstat``), so the converter's own descriptors are recognised too; tables are held weakly and vanish
with the checkpoint that made them. Cost: ``zlib.crc32`` runs at about 3.5 GB/s on one core and releases the
GIL; bytes are read again only for gaps and tails no pass reads otherwise.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from persimmon_tools.errors import CheckpointError
from persimmon_tools.safe_graph import small_repr
from persimmon_tools.safe_read import open_regular_fd

if TYPE_CHECKING:
    from persimmon_tools.megatron.release import Release

log = logging.getLogger(__name__)

AHEAD = 64
NEAR = 1 << 20
_CHUNK = 8 << 20
DAMAGED_HINT = (
    "the file is damaged (changed since it was written: a bad download, copy or disk); download it again "
    "and check it with md5sum against the published checksum"
)

Identity = tuple[int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def crc_mismatch(file: str, record: str, got: int, want: int, what: str = "") -> CheckpointError:
    """The error for a record whose bytes do not have the CRC-32 the zip directory records."""
    return CheckpointError(
        f"{file}: record {record}{what} is damaged: its bytes have CRC-32 {got:08x}, the zip directory "
        f"records {want:08x}",
        hint=DAMAGED_HINT,
    )


def read_exact(fd: int, view: memoryview, offset: int, origin: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (``preadv`` loops over short reads); a short file is an error.
    Only the read: :func:`~persimmon_tools.megatron.lazy.preadv_exact` is this plus :func:`observe`."""
    got, size = 0, view.nbytes
    while got < size:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise CheckpointError(
                f"{origin}: unexpected end of file at byte {offset + got} (wanted {size} bytes at {offset})",
                hint="the file is truncated; download it again",
            )
        got += n


class RecordCheck:
    """The running CRC-32 of one record.

    Byte layout (absolute offsets of the file read, a tar member's offset included): the record's data is
    ``[start, end)`` (its zip directory entry's size; ``expected`` its CRC-32); the storage torch builds from
    it is ``[start, storage_end)`` (``numel x itemsize``, at most the record); the tensor views of that storage
    end at ``cover_end`` at the latest. ``[start, pos)`` has been CRC'd into ``crc``. Shared by a storage's
    :class:`~persimmon_tools.megatron.lazy.StorageRef` and every ``dataclasses.replace`` copy of it.
    """

    def __init__(self, file: str, name: str, start: int, size: int, crc: int, storage_bytes: int) -> None:
        self.file, self.name, self.expected = file, name, crc
        self.start, self.end = start, start + size
        self.storage_end = start + storage_bytes
        self.cover_end: int | None = None  # end of the last tensor view of the storage
        self.pos, self.crc = start, 0
        self.tensors: list[str] = []
        self.failed: CheckpointError | None = None
        self.table: RecordTable | None = None
        self.lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.pos >= self.end

    @property
    def started(self) -> bool:
        return self.pos > self.start

    def cover(self, end: int) -> None:
        """A tensor view of the storage ends at absolute offset ``end``."""
        self.cover_end = end if self.cover_end is None else max(self.cover_end, end)

    def feed(self, fd: int, offset: int, view: memoryview) -> None:
        """``view`` holds the file's bytes at ``offset`` (read from ``fd``); see the module docstring."""
        lo, hi = max(offset, self.start), min(offset + view.nbytes, self.end)
        if hi <= lo:
            return
        with self.lock:
            if self.failed is not None:
                raise self.failed  # every later read of a damaged record fails too
            if hi <= self.pos:
                return  # behind: already CRC'd
            if lo > self.pos:
                if lo - self.pos > max(NEAR, AHEAD * (hi - lo)):
                    return  # far ahead: the record stays open
                self._read(fd, lo)
            self.crc = zlib.crc32(view[self.pos - offset : hi - offset], self.crc)
            self.pos = hi
            trigger = self.cover_end if self.cover_end is not None else self.storage_end
            if self.start < self.pos < self.end and self.pos >= trigger:
                self._read(fd, self.end)  # the tail no tensor covers
            if self.done:
                self._compare()

    def finish(self, fd: int) -> int:
        """Read and CRC the rest of a started record, then compare; returns the bytes read."""
        with self.lock:
            if self.done or not self.started:
                return 0
            before = self.pos
            self._read(fd, self.end)
            self._compare()
            return self.end - before

    def _read(self, fd: int, stop: int) -> None:
        """CRC ``[pos, stop)`` read from ``fd`` in bounded chunks (:func:`read_exact`: not observed again)."""
        buf = np.empty(min(_CHUNK, stop - self.pos), dtype=np.uint8)
        while self.pos < stop:
            view = memoryview(buf)[: min(buf.nbytes, stop - self.pos)]
            read_exact(fd, view, self.pos, f"{self.file}: record {self.name}")
            self.crc = zlib.crc32(view, self.crc)
            self.pos += view.nbytes

    def _compare(self) -> None:
        if self.crc != self.expected:
            more = len(self.tensors) - 2
            shown = ", ".join(self.tensors[:2]) + (f" and {more} more" if more > 0 else "")
            what = f" (tensor {shown})" if shown else ""
            self.failed = crc_mismatch(self.file, self.name, self.crc, self.expected, what)
            raise self.failed


class RecordTable:
    """The tensor records of one loaded ``.pt`` (a file, or a tar member's byte range) and its identity."""

    def __init__(
        self, path: Path, file: str, key: Identity, offset: int, size: int, records: Iterable[RecordCheck]
    ) -> None:
        self.path, self.file, self.key, self.offset, self.size = path, file, key, offset, size
        self.records = sorted(records, key=lambda r: r.start)
        self._starts = [r.start for r in self.records]
        for r in self.records:
            r.table = self  # the table lives as long as a storage of it does (registered weakly)

    def overlapping(self, lo: int, hi: int) -> list[RecordCheck]:
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        out = []
        while i < len(self.records) and self.records[i].start < hi:
            if self.records[i].end > lo:
                out.append(self.records[i])
            i += 1
        return out

    def finish(self) -> int:
        """Complete every record this table's pass started; returns the bytes read to do so."""
        todo = [r for r in self.records if r.started and not r.done]
        if not todo:
            return 0
        fd = open_regular_fd(self.path, what=self.file, max_bytes=None, error=CheckpointError)
        try:
            if identity(os.fstat(fd)) != self.key:
                log.info("%s changed since it was opened; its open records are not completed", self.file)
                return 0
            return sum(r.finish(fd) for r in todo)
        finally:
            os.close(fd)


_LOCK = threading.Lock()
_TABLES: dict[Identity, weakref.WeakSet[RecordTable]] = {}


def register(table: RecordTable) -> None:
    with _LOCK:
        _TABLES.setdefault(table.key, weakref.WeakSet()).add(table)


def _tables(key: Identity) -> list[RecordTable]:
    with _LOCK:
        found = _TABLES.get(key)
        if found is None:
            return []
        tables = list(found)
        if not tables:
            del _TABLES[key]
        return tables


def observe(fd: int, offset: int, view: memoryview) -> None:
    """Feed a read of ``fd`` (``view`` at absolute ``offset``) to the records it overlaps."""
    if not _TABLES or not view.nbytes:
        return
    hi = offset + view.nbytes
    for table in _tables(identity(os.fstat(fd))):
        for record in table.overlapping(offset, hi):
            record.feed(fd, offset, view)


def finish_records(release: Release) -> int:
    """Complete the records a pass over ``release``'s checkpoint files started and did not complete (a
    tensor view that covers part of its storage, rows looked up far apart), checking their CRC-32; returns
    the bytes read. The files are :meth:`Release.source_files`: the shards (one zip each), or a torch_dist
    checkpoint's files (a zip per stored chunk inside each ``.distcp``): every table whose zip lies inside one
    of them. Call it at the end of a pass: ``convert`` after the shards are written, ``verify`` after the
    reference was read."""
    done = 0
    for src in release.source_files():
        try:
            key = identity(os.stat(src.path))
        except OSError:
            continue
        for table in _tables(key):
            if src.offset <= table.offset and table.offset + table.size <= src.offset + src.size:
                done += table.finish()
    return done


def name_tensors(obj: Any, record_of: Callable[[Any], RecordCheck | None], limit: int = 200_000) -> None:
    """Give each record the dotted names of the tensors stored in it (``model.language_model....weight``),
    for messages: a bounded walk of dicts, lists and tuples (a shared or cyclic graph is walked once)."""
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    seen: set[int] = set()
    while stack and limit > 0:
        path, value, depth = stack.pop()
        limit -= 1
        record = record_of(value)
        if record is not None:
            if len(record.tensors) < 8:
                record.tensors.append(path or "(the top-level object)")
            continue
        if depth > 16 or id(value) in seen:
            continue
        if isinstance(value, dict):
            pairs: Iterable[tuple[Any, Any]] = value.items()
        elif isinstance(value, list | tuple):
            pairs = enumerate(value)
        else:
            continue
        seen.add(id(value))
        items = list(itertools.islice(pairs, limit))
        for k, v in reversed(items):
            short = (isinstance(k, str) and len(k) <= 80) or (type(k) is int and abs(k) < 1 << 63)
            key = k if short else small_repr(k, 40)
            stack.append((f"{path}.{key}" if path else str(key), v, depth + 1))
