"""List an uncompressed release tar in place, and refuse damage that :mod:`tarfile` treats as the end.

:func:`tar_tree` maps every regular-file member to a :class:`ByteSource` (a byte range of the tar itself);
links, devices, FIFOs, absolute names and ``..`` are refused for release files. ``tarfile`` stops listing,
without an error, at the first header after the first member that is invalid (bad checksum, garbage),
truncated or a zero block: a damaged header in the middle of a release would silently hide every later
member (a later ``iter_*`` folder, the tracker file). So after listing, the bytes from the listing's stop
offset to the end must be a valid end-of-archive (:func:`check_end_of_archive`): zero bytes only, at least
the two 512-byte zero blocks that end every tar, plus the usual padding to the record size. Everything is
read in bounded chunks; at most :data:`MAX_TRAILER` bytes are examined.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.bytesource import ByteSource

log = logging.getLogger(__name__)

#: Names of the files a release is made of (refused when they are links, devices, ... in a tar).
RELEASE_FILES = (
    "model_optim_rng.pt",
    "model_rng.pt",
    "latest_checkpointed_iteration.txt",
    "adept_vocab.model",
)

#: The end-of-archive marker: two zero blocks.
END_MARKER = 2 * tarfile.BLOCKSIZE
#: Largest zero tail accepted after the last member (GNU tar pads to 10 kB records; 64 MiB is far beyond any
#: blocking factor in use).
MAX_TRAILER = 64 << 20
_CHUNK = 1 << 20
_HINT = (
    "the tarball is damaged (a corrupt header block, or bytes that are not part of it); "
    "download it again and check its md5"
)


def check_end_of_archive(read: Callable[[int], bytes], offset: int, origin: str, head: bytes = b"") -> int:
    """Check that what follows the last member (starting at ``offset``) is a valid end-of-archive.

    ``head`` holds bytes at ``offset`` that were already consumed (a stream that cannot seek back);
    ``read(n)`` returns up to ``n`` of the following bytes (``b""`` at the end). Returns the number of bytes
    examined; raises :class:`ReleaseError` naming ``origin`` and the offset otherwise.
    """
    seen = 0
    pending = head
    while True:
        if not pending:
            pending = read(_CHUNK)
            if not pending:
                break
        stripped = pending.lstrip(b"\0")
        if stripped:
            at = offset + seen + len(pending) - len(stripped)
            where = "" if at == offset else f"; the first non-zero byte, at offset {at}, follows a zero block"
            raise ReleaseError(
                f"{origin}: the bytes after offset {offset} are not a valid tar header: the archive is damaged "
                f"(tar listing stops there, so every later member would be silently ignored{where})",
                hint=_HINT,
            )
        seen += len(pending)
        pending = b""
        if seen > MAX_TRAILER:
            raise ReleaseError(
                f"{origin}: more than {MAX_TRAILER} zero bytes follow the last tar member (from offset {offset}); "
                "a tar archive ends with two zero blocks and at most one record of padding",
                hint=_HINT,
            )
    if seen < END_MARKER:
        raise ReleaseError(
            f"{origin}: the archive ends {seen} bytes after offset {offset}, without the two zero blocks that end "
            "a tar archive: it is truncated (later members may be missing)",
            hint="the download is incomplete; download it again and check its md5",
        )
    return seen


class RecordingTarInfo(tarfile.TarInfo):
    """A TarInfo that remembers the last header block read on its TarFile (``last_header_block``), so a
    stream-mode listing (which cannot seek back) can still examine the block at which it stopped."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        tarfile_.last_header_block = buf  # type: ignore[attr-defined]
        obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        obj.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(tarfile_)  # the standard library's own continuation of fromtarfile


def tar_tree(path: Path) -> dict[str, ByteSource]:
    """Regular-file members of an uncompressed tar as byte ranges of the tar file itself."""
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the `with tf` below
    except tarfile.ReadError as err:
        raise ReleaseError(
            f"{path} is not an uncompressed tar archive ({err})",
            hint="ADEPT's releases are plain .tar files; decompress first, or run `persimmon-tools unpack`",
        ) from err
    tree: dict[str, ByteSource] = {}
    tar_size = path.stat().st_size
    try:
        with tf:
            for member in tf:
                name = _member_name(path, member)
                if not member.isreg() or member.issparse():
                    if member.isdir():
                        continue
                    if _is_release_file(name):
                        raise ReleaseError(
                            f"{path}: member {member.name!r} is a {_member_kind(member)}, not a regular file; "
                            "refusing to read it",
                            hint="a genuine release holds regular files only; download it again",
                        )
                    log.debug("ignoring %s member %s", _member_kind(member), member.name)
                    continue
                if member.offset_data + member.size > tar_size:
                    raise ReleaseError(
                        f"{path}: member {member.name} runs past the end of the file "
                        f"({member.offset_data + member.size} > {tar_size} bytes)",
                        hint="the tarball is truncated; download it again (and check its md5)",
                    )
                if name in tree and _is_release_file(name):
                    raise ReleaseError(
                        f"{path}: member {name} appears twice", hint="the archive is not a genuine release"
                    )
                tree[name] = ByteSource(path, member.offset_data, member.size, f"{path}:{name}")
            # tarfile stops silently at a damaged header: what follows the last member must be the end.
            tf.fileobj.seek(tf.offset)
            check_end_of_archive(tf.fileobj.read, tf.offset, str(path))
    except tarfile.TarError as err:
        raise ReleaseError(
            f"{path} is not a readable tar archive ({err})",
            hint="the tarball is truncated or corrupt; download it again (and check its md5)",
        ) from err
    return tree


def _member_name(path: Path, member: tarfile.TarInfo) -> str:
    """The member's name relative to the archive root; absolute names and ``..`` are refused (a genuine
    release has neither, and ``unpack`` would refuse to extract them)."""
    raw = member.name
    parts = PurePosixPath(raw).parts
    if raw.startswith(("/", "\\")) or ".." in parts or "\\" in raw or "\0" in raw:
        raise ReleaseError(
            f"{path}: member {raw!r} points outside the archive (absolute path or '..')",
            hint="the archive is not a genuine release; nothing was read from it",
        )
    return "/".join(p for p in parts if p not in ("", "."))


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symlink (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.issparse():
        return "sparse file"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return f"tar member of type {member.type!r}"


def _is_release_file(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in RELEASE_FILES
