"""Read a release's tensor bytes and hash its files in the same pass: each source byte is read once.

``verify`` reads the checkpoint's tensors for its reference forward pass and records the sha256 of every
shard (and of the vocabulary) in ``verification.json``. :class:`HashingReader` does both with one read:
it is the ``reader`` of the :class:`~persimmon_tools.megatron.lazy.StorageRef` objects verify reads
(``read(path, offset, size, origin)``, as :func:`~persimmon_tools.megatron.lazy.pread_exact`), and keeps,
for every :class:`~persimmon_tools.megatron.bytesource.ByteSource` it hashes (a shard file, or a tar
member's byte range), a sequential sha256 *cursor*:

- a read at or ahead of the cursor advances it to the end of the read: the gap and the read are read in
  one sequential pass (chunks of at most ``chunk`` bytes for the gap; the read itself straight into the
  buffer it returns) and hashed; nothing else is kept;
- a read behind the cursor, and a read further ahead of it than ``ahead`` times its own size (a layernorm,
  a ``rotary_emb.inv_freq`` or a replicated copy looked up before the layer is read: moving the cursor
  there would put the bytes in between behind it), is read as it is, without hashing: those bytes are read
  twice and counted in :attr:`bytes_reread`. Either way no more bytes are read than reading the weights and
  then hashing every file would read;
- :meth:`finish` hashes what lies after each cursor (the rest of the file: RNG state, optimizer, zip
  directory, and the whole vocabulary) and returns the hex digests, in the order the sources were given.

Every read, the gaps and :meth:`finish`'s included, is also seen by
:func:`persimmon_tools.megatron.records.observe`, which checks the zip records' CRC-32 in the same pass.

The digests equal the sha256 of each source's bytes whatever the read order; the order decides only how
many bytes are read twice. Megatron writes records in ``state_dict`` order (embedding, layer 0, 1, ...,
final layernorm, head) and verify reads layer by layer, so nearly every byte is read once. A file written
field by field (every layer's ``input_layernorm.weight``, then every layer's bias, ...) is read almost
twice, which is what reading the weights and then hashing costs without this reader.

With ``hash_files=False`` nothing is hashed; reads are passed through and counted (:attr:`bytes_reread`
is None). Files are opened per read, as :func:`~persimmon_tools.megatron.lazy.pread_exact` does: a regular
file only, so a FIFO swapped in meanwhile cannot hang the read. Not thread-safe (verify reads in one thread).
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.lazy import preadv_exact
from persimmon_tools.megatron.records import observe
from persimmon_tools.safe_read import open_regular_fd

CHUNK = 8 << 20
AHEAD = 64


class _Cursor:
    """The sha256 of ``src``'s bytes ``[src.offset, pos)`` (``pos`` is an absolute file offset)."""

    def __init__(self, src: ByteSource) -> None:
        self.src, self.pos, self.digest = src, src.offset, hashlib.sha256()

    @property
    def end(self) -> int:
        return self.src.offset + self.src.size


class HashingReader:
    """Reads byte ranges of ``sources``' files, hashing each source in one sequential pass (module doc)."""

    def __init__(
        self,
        sources: Sequence[ByteSource],
        *,
        hash_files: bool = True,
        chunk: int = CHUNK,
        ahead: int = AHEAD,
    ) -> None:
        if not 0 < chunk <= 64 << 20:
            raise ValueError(f"chunk {chunk}: expected 1 byte to 64 MiB")
        self.sources = tuple(sources)
        self.hash_files, self.chunk, self.ahead = hash_files, chunk, ahead
        self.bytes_read = 0
        self._reread = 0
        self._cursors = [_Cursor(s) for s in self.sources]
        self._by_path: dict[str, list[_Cursor]] = {}
        for c in self._cursors:
            self._by_path.setdefault(os.fspath(c.src.path), []).append(c)
        for cs in self._by_path.values():
            cs.sort(key=lambda c: c.src.offset)
        self._starts = {p: [c.src.offset for c in cs] for p, cs in self._by_path.items()}
        self._scratch: np.ndarray | None = None
        self._finished = False

    @property
    def bytes_reread(self) -> int | None:
        """Bytes read more than once (behind a cursor, or read early and hashed later); None unhashed."""
        return self._reread if self.hash_files else None

    def _cursor(self, path: Path, offset: int, size: int) -> _Cursor | None:
        """The source that holds ``[offset, offset + size)`` of ``path``, if one does."""
        key = os.fspath(path)
        cursors = self._by_path.get(key)
        if not cursors:
            return None
        i = bisect.bisect_right(self._starts[key], offset) - 1
        if i < 0 or offset + size > cursors[i].end:
            return None
        return cursors[i]

    def _fill(self, fd: int, view: memoryview, offset: int, origin: str) -> None:
        preadv_exact(fd, view, offset, origin)
        self.bytes_read += view.nbytes

    def _advance(self, fd: int, c: _Cursor, stop: int, origin: str) -> None:
        """Hash ``[c.pos, stop)``, read in chunks into the scratch buffer (the gap before a read)."""
        while c.pos < stop:
            n = min(self.chunk, stop - c.pos)
            if self._scratch is None:
                self._scratch = np.empty(self.chunk, dtype=np.uint8)
            view = memoryview(self._scratch)[:n]
            self._fill(fd, view, c.pos, origin)
            c.digest.update(view)
            c.pos += n

    def __call__(self, path: Path, offset: int, size: int, origin: str) -> memoryview:
        """Exactly ``size`` bytes at ``offset`` of ``path`` (a new writable buffer), hashing on the way."""
        buf = memoryview(np.empty(size, dtype=np.uint8))
        c = self._cursor(path, offset, size) if self.hash_files else None
        fd = open_regular_fd(path, what=origin, max_bytes=None, error=CheckpointError)
        try:
            end = offset + size
            if c is None:  # unhashed, or not inside one source: read as it is
                self._fill(fd, buf, offset, origin)
                if self.hash_files:
                    self._reread += size  # conservatively: a hashed source may hold these bytes too
            elif end <= c.pos or offset - c.pos > self.ahead * size:
                self._fill(fd, buf, offset, origin)
                self._reread += size
            else:
                head = max(0, c.pos - offset)  # the part behind the cursor
                if head:
                    self._fill(fd, buf[:head], offset, origin)
                    self._reread += head
                self._advance(fd, c, offset, origin)
                rest = buf[head:]
                self._fill(fd, rest, c.pos, origin)
                c.digest.update(rest)
                c.pos = end
        finally:
            os.close(fd)
        return buf

    def finish(self) -> list[str | None]:
        """Hash every source to its end and return the hex digests in ``sources`` order (None unhashed).

        The rest of a source is read until its end or the end of the file, whichever comes first (a
        truncated file is hashed as it is, as reading it whole would). Reads after this are still served:
        they lie behind every cursor, so they count as re-read."""
        if not self._finished:
            self._finished = True
            if self.hash_files:
                for c in self._cursors:
                    self._rest(c)
            self._scratch = None
        return [c.digest.hexdigest() if self.hash_files else None for c in self._cursors]

    def _rest(self, c: _Cursor) -> None:
        if c.pos >= c.end:
            return
        fd = open_regular_fd(c.src.path, what=c.src.name, max_bytes=None, error=CheckpointError)
        try:
            while c.pos < c.end:
                block = os.pread(fd, min(self.chunk, c.end - c.pos), c.pos)
                if not block:
                    break
                observe(fd, c.pos, memoryview(block))  # the records' CRC-32 in the same read
                self.bytes_read += len(block)
                c.digest.update(block)
                c.pos += len(block)
        finally:
            os.close(fd)
