"""Byte ranges of files: a whole file, or one member of an uncompressed tar read in place.

A :class:`ByteSource` names ``size`` bytes starting at ``offset`` of ``path``. Release tarballs are read
through these without extracting anything: a tar member's data is a contiguous byte range of the tar.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from persimmon_tools.errors import ReleaseError
from persimmon_tools.safe_read import open_regular, open_regular_fd


@dataclass(frozen=True)
class ByteSource:
    """``size`` bytes at ``offset`` of the file ``path``; ``name`` is what messages call it."""

    path: Path
    offset: int
    size: int
    name: str

    @classmethod
    def whole_file(
        cls,
        path: Path,
        *,
        what: str = "a release file",
        max_bytes: int | None = None,
        follow_symlinks: bool = True,
    ) -> ByteSource:
        """All of ``path``, which must be a regular file (of at most ``max_bytes``); ``follow_symlinks=False``
        for files found inside a release folder (a link there is refused)."""
        path = Path(path)
        with open_regular(
            path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks, error=ReleaseError
        ) as fh:
            size = os.fstat(fh.fileno()).st_size
        return cls(path, 0, size, str(path))

    def open(self) -> SliceReader:
        """A seekable binary reader over just this range (positions are relative to its start)."""
        return SliceReader(self)

    def sha256(self, chunk: int = 8 << 20) -> tuple[str, int]:
        """``(hex sha256, bytes read)`` of this range, read sequentially in ``chunk``-sized blocks; fewer bytes
        than :attr:`size` when the file is shorter now (the caller decides what that means)."""
        digest, read = hashlib.sha256(), 0
        with self.open() as fh:
            while block := fh.read(chunk):
                digest.update(block)
                read += len(block)
        return digest.hexdigest(), read

    def read_all(self) -> bytes:
        with self.open() as fh:
            data = fh.read()
        if len(data) != self.size:
            raise ReleaseError(
                f"{self.name} is truncated: expected {self.size} bytes, read {len(data)}",
                hint="the download is incomplete; download the release again",
            )
        return data


class SliceReader(io.RawIOBase):
    """Seekable read-only view of a :class:`ByteSource` (used by ``zipfile`` on tar members)."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__()
        self._src = source
        # Never blocks on a FIFO swapped in since the ByteSource was made; refuses anything not regular.
        self._fd = open_regular_fd(source.path, what=source.name, max_bytes=None, error=ReleaseError)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._src.size}[whence]
        new = base + pos
        if new < 0:
            raise OSError(f"negative seek position in {self._src.name}")
        self._pos = new
        return new

    def readinto(self, buf) -> int:  # type: ignore[override]
        want = min(len(buf), max(0, self._src.size - self._pos))
        if want == 0:
            return 0
        data = os.pread(self._fd, want, self._src.offset + self._pos)
        n = len(data)
        buf[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
