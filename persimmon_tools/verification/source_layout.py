"""verify's own discovery of a release's shards (spec §A), written apart from ``persimmon_tools.megatron``.

This is the first third of the *independent reference reader* (with :mod:`.source_pickle` and
:mod:`.source_merge`). ``convert`` reads the source with :mod:`persimmon_tools.megatron`; if ``verify``
read it with the same code, a bug there (stages swapped, a shard skipped, bytes misread) would write wrong
weights *and* give verify the same wrong weights to compare with, and verify would pass. So this reader
shares no code with ``persimmon_tools.megatron``, ``mapping``, ``ops`` or ``conversion``: only the spec, the
standard library and ``torch.frombuffer``. :mod:`persimmon_tools.verification.agreement` then checks that
both readers see the same thing, byte for byte.

SOURCE (spec §A) may be:

- a release tarball, read in place with :mod:`tarfile`: a member's bytes are the range ``offset_data``..
  ``offset_data + size`` of the tar (nothing is extracted; the 8B release is one 18.8 GB member);
- an extracted release folder (``latest_checkpointed_iteration.txt``, ``iter_XXXXXXX/``);
- one ``iter_XXXXXXX`` folder;
- one ``model_optim_rng.pt``.

Shards are ``iter_{it:07d}/mp_rank_{tp:02d}/model_optim_rng.pt`` without pipeline parallelism and
``iter_{it:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt`` with it (``model_rng.pt`` with ADEPT's
distributed optimizer). The iteration is the one asked for, else ``latest_checkpointed_iteration.txt`` (a
positive integer), else the only ``iter_*`` folder. The shards must form a complete TP x PP grid.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from persimmon_tools.errors import ReleaseError
from persimmon_tools.safe_read import describe_irregular, open_regular, open_regular_fd, scan_folder

log = logging.getLogger(__name__)

TRACKER_NAME = "latest_checkpointed_iteration.txt"
_SHARD_NAMES = ("model_optim_rng.pt", "model_rng.pt")
_SHARD_PATH = re.compile(
    r"^(?P<root>(?:[^/]+/)*?)iter_(?P<it>[0-9]+)/mp_rank_(?P<tp>[0-9]{2})(?:_(?P<pp>[0-9]{3}))?/"
    r"(?:model_optim_rng|model_rng)\.pt$"
)
_MAX_DEPTH = 4  # release/iter_X/mp_rank_Y/model_optim_rng.pt


@dataclass(frozen=True)
class FileSlice:
    """``size`` bytes at ``start`` of the file ``path`` (a whole file, or a tar member read in place)."""

    path: Path
    start: int
    size: int
    label: str  # for messages: "release.tar:NAME/iter_.../model_optim_rng.pt" or the file's path

    @classmethod
    def whole(cls, path: Path, *, follow_symlinks: bool = True) -> FileSlice:
        """All of ``path``: a regular file (``follow_symlinks=False`` for one found inside a folder)."""
        fd = open_regular_fd(
            path,
            what="a checkpoint file",
            max_bytes=None,
            follow_symlinks=follow_symlinks,
            error=ReleaseError,
        )
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        return cls(Path(path), 0, size, str(path))

    def _open(self) -> Any:
        return open_regular(self.path, what=self.label, max_bytes=None, error=ReleaseError)

    def pread(self, offset: int, size: int) -> bytearray:
        """Exactly ``size`` bytes at ``offset`` of this slice (seek + readinto; a short read is an error)."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ReleaseError(
                f"{self.label}: read of {size} bytes at {offset} runs past its {self.size} bytes",
                hint="the file is truncated or corrupt; download it again",
            )
        buf, got = bytearray(size), 0
        view = memoryview(buf)
        with self._open() as fh:
            fh.seek(self.start + offset)
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise ReleaseError(
                        f"{self.label}: unexpected end of file at byte {offset + got} of the slice",
                        hint="the file is truncated; download it again",
                    )
                got += n
        return buf

    def open(self) -> SliceIO:
        return SliceIO(self)


class SliceIO(io.RawIOBase):
    """A seekable read-only file over a :class:`FileSlice` (what :mod:`zipfile` reads a tar member through)."""

    def __init__(self, piece: FileSlice) -> None:
        super().__init__()
        self._piece, self._pos = piece, 0
        self._fh = piece._open()  # regular files only (never blocks on a FIFO); closed in close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._pos, self._piece.size)[whence]
        if base + pos < 0:
            raise OSError(f"seek before the start of {self._piece.label}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), max(0, self._piece.size - self._pos))
        if n == 0:
            return 0
        self._fh.seek(self._piece.start + self._pos)
        got = self._fh.readinto(memoryview(buf)[:n]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


@dataclass(frozen=True)
class SourceLayout:
    """The shards of one iteration: ``(tp_rank, pp_rank) -> FileSlice`` of its ``model_optim_rng.pt``."""

    source: Path
    kind: str  # "tar" | "folder" | "iteration" | "pt"
    iteration: int | None
    shards: dict[tuple[int, int], FileSlice]
    tp: int
    pp: int

    @property
    def variant(self) -> str:
        """``chat`` / ``base`` when the source's path names it (``8b_chat_model_release``), else ``unknown``."""
        for name in ("chat", "base"):
            if re.search(rf"(^|[^a-z]){name}([^a-z]|$)", str(self.source).lower()):
                return name
        return "unknown"


def _tar_members(path: Path) -> dict[str, FileSlice]:
    """Regular members of an uncompressed tar as slices of the tar itself; nothing is extracted."""
    size, out = path.stat().st_size, {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                name = PurePosixPath(m.name).as_posix().removeprefix("./")
                if not m.isreg() or m.issparse():
                    continue
                if name.startswith("/") or ".." in PurePosixPath(name).parts:
                    log.debug("ignoring tar member %r outside the archive root", m.name)
                    continue
                if m.offset_data + m.size > size:
                    raise ReleaseError(
                        f"{path}: member {m.name} ends at byte {m.offset_data + m.size}, past the end of the "
                        f"tar ({size} bytes)",
                        hint="the tarball is truncated; download it again",
                    )
                if name in out and name.endswith(_SHARD_NAMES + (TRACKER_NAME,)):
                    raise ReleaseError(
                        f"{path}: member {name} appears twice; which one is meant is ambiguous",
                        hint="the archive is not a genuine release",
                    )
                out[name] = FileSlice(path, m.offset_data, m.size, f"{path}:{name}")
    except tarfile.TarError as err:
        raise ReleaseError(
            f"{path} is not a readable uncompressed tar ({err})",
            hint="pass ADEPT's .tar as downloaded (not compressed), or its extracted folder",
        ) from err
    return out


def _folder_files(path: Path) -> dict[str, FileSlice]:
    """Shards and trackers below ``path``; links and other non-regular files named like them are refused."""
    scan = scan_folder(path, max_depth=_MAX_DEPTH + 1)
    wanted = _SHARD_NAMES + (TRACKER_NAME,)
    odd = {
        rel: kind
        for rel, kind in scan.irregular.items()
        if rel.rsplit("/", 1)[-1].startswith(("iter_", "mp_rank_")) or rel.endswith(wanted)
    }
    if odd:
        raise ReleaseError(
            f"{path}: {describe_irregular(odd)} inside the release folder; verify reads only regular files "
            "there (links are not followed)",
            hint="copy the real files into the release folder (cp --dereference)",
        )
    return {
        rel: FileSlice.whole(path / rel, follow_symlinks=False)
        for rel in scan.files
        if rel.rsplit("/", 1)[-1] in wanted
    }


def _tracker_value(piece: FileSlice) -> int:
    text = piece.pread(0, min(piece.size, 64)).decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) <= 0:
        raise ReleaseError(
            f"{piece.label} holds {text[:30]!r}, not a positive iteration number (spec §A)",
            hint="pass --iteration N to choose the iter_XXXXXXX folder",
        )
    return int(text)


def _grid(files: dict[str, FileSlice], source: Path, kind: str, iteration: int | None) -> SourceLayout:
    found: dict[tuple[str, int], dict[tuple[int, int], tuple[FileSlice, bool]]] = {}
    for name, piece in files.items():
        m = _SHARD_PATH.match(name)
        if m is None:
            continue
        rank = (int(m["tp"]), int(m["pp"] or 0))
        grid = found.setdefault((m["root"], int(m["it"])), {})
        if rank in grid:
            raise ReleaseError(
                f"{source}: rank {rank} has two checkpoint files ({grid[rank][0].label} and {piece.label})",
                hint="keep one of model_optim_rng.pt / model_rng.pt",
            )
        grid[rank] = (piece, m["pp"] is not None)
    if not found:
        raise ReleaseError(
            f"{source}: no iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt inside",
            hint="pass the release tarball, its folder, an iter_* folder or a model_optim_rng.pt",
        )
    roots = {root for root, _ in found}
    if len(roots) != 1:
        raise ReleaseError(
            f"{source} holds more than one release: {sorted(roots)}", hint="pass one of them as SOURCE"
        )
    root = roots.pop()
    if iteration is None and root + TRACKER_NAME in files:
        iteration = _tracker_value(files[root + TRACKER_NAME])
    its = sorted(it for _, it in found)
    if iteration is None:
        if len(its) != 1:
            raise ReleaseError(
                f"{source}: several iterations ({its}) and no {TRACKER_NAME}", hint="pass --iteration N"
            )
        iteration = its[0]
    grid = found.get((root, iteration))
    if grid is None:
        raise ReleaseError(
            f"{source}: no shards for iteration {iteration} (found {its})",
            hint=f"fix {TRACKER_NAME} or pass --iteration N",
        )
    named = {flag for _, flag in grid.values()}
    tp, pp = 1 + max(t for t, _ in grid), 1 + max(p for _, p in grid)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in grid]
    if len(named) > 1 or missing:
        raise ReleaseError(
            f"{source}: iter_{iteration:07d} is not a complete TP={tp} x PP={pp} grid of one naming "
            f"(missing ranks {missing}, mixed mp_rank_XX / mp_rank_XX_YYY: {len(named) > 1})",
            hint="every tensor- and pipeline-parallel shard is needed",
        )
    return SourceLayout(source, kind, iteration, {r: p for r, (p, _) in grid.items()}, tp, pp)


def discover(source: Path, *, iteration: int | None = None) -> SourceLayout:
    """The shard grid of ``source`` (tar, release folder, ``iter_*`` folder or one ``.pt`` file)."""
    source = Path(source)
    if source.is_dir():
        if re.fullmatch(r"iter_[0-9]+", source.name):
            files = {f"{source.name}/{k}": v for k, v in _folder_files(source).items()}
            return _grid(files, source, "iteration", iteration or int(source.name[5:]))
        return _grid(_folder_files(source), source, "folder", iteration)
    if not source.is_file():
        raise ReleaseError(f"{source} is not a file or folder", hint="check the path")
    if source.suffix == ".pt":
        m = re.fullmatch(r"iter_([0-9]+)", source.parent.parent.name)
        return SourceLayout(source, "pt", int(m[1]) if m else None, {(0, 0): FileSlice.whole(source)}, 1, 1)
    return _grid(_tar_members(source), source, "tar", iteration)
