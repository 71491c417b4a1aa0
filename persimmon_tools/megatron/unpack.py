"""``unpack``: safe extraction of a release tarball, with the published md5 checked for known releases.

DEST: an existing folder, or a path ending in ``/``, is a parent: the release goes into ``DEST/NAME/``,
NAME being the archive's top folder (``8b_chat_model_release``) or, for an archive without one, its file
name without ``.tar``; only ``DEST/NAME`` must be new (or empty), and nothing else in DEST is touched, so
several releases unpack side by side. A DEST that does not exist yet is made and the archive extracted into
it as it is (a release with a top folder then also lands in ``DEST/NAME/``).

Safety rules: only regular files and folders are extracted; absolute paths, ``..`` components, symlinks,
hard links, devices, FIFOs and sparse members make the whole extraction fail, as does a member bigger than
the free space left; DEST may not be a symlink, and files are created with O_EXCL | O_NOFOLLOW. Files are
written by our own code (never by ``tarfile.extract``) into the shared staged output
(:mod:`persimmon_tools.staged_output`: a marked temporary folder next to DEST, DEST locked), which becomes
DEST by rename only when every member was extracted and the checksum matched; on any error nothing is left
behind, and a killed run's leftover is removed by the next one. The archive must end
with a valid end-of-archive marker: a damaged header in the middle (which ``tarfile`` would take for the
end) fails the extraction instead of silently dropping every later member.

A release that carries ``integrity.json`` (``export`` writes one; :mod:`persimmon_tools.megatron.manifest`)
is checked against it: the files it lists are hashed (sha256) as they are extracted, and a file that is
missing or differs fails the extraction (CheckpointError naming it). An uncompressed tar is listed first
(headers only) to find the manifest, so a tar without one costs no hashing; a compressed one has every
member hashed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.manifest import MANIFEST, check_members, read_manifest, tar_manifests
from persimmon_tools.megatron.tarlist import RecordingTarInfo, check_end_of_archive
from persimmon_tools.safe_write import check_free_space, open_new_file, refuse_symlink
from persimmon_tools.staged_output import RUN_MARKER, claim_output
from persimmon_tools.staged_record import OutputKind

#: md5 checksums published in ADEPT's README (spec §A).
KNOWN_RELEASES = {
    "8b_base_model_release.tar": "cd0320cba9efad9ccd18e9ec4d16ae1b",
    "8b_chat_model_release.tar": "663aeace07269c44e90f4e8bcd07f32a",
}
_CHUNK = 8 << 20
#: The folder unpack writes (DEST, or DEST/NAME): new or empty (``unpack`` has no --force); the shared staged
#: output writes it (lock, marked temp folder beside it, recovery of a killed run's leftovers, rename).
UNPACK_OUTPUT = OutputKind(label="DEST", error=ReleaseError, run="extraction")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar")


@dataclass(frozen=True)
class UnpackOptions:
    """Options of :func:`unpack` (the ``unpack`` command's flags).

    Attributes:
        check_md5: check ADEPT's published md5 for the known release names (:data:`KNOWN_RELEASES`); a
            mismatch extracts nothing. ``False``: the md5 is computed and reported, never compared.
    """

    check_md5: bool = True


@dataclass(frozen=True)
class UnpackResult:
    """``dest``: the folder written (DEST, or ``DEST/NAME`` when DEST was a parent folder)."""

    dest: Path
    files: int
    bytes: int
    md5: str
    md5_expected: str | None


class _HashingReader:
    """File wrapper that feeds every byte read through md5 (tarfile stream mode reads sequentially)."""

    def __init__(self, fh, progress: Callable[[int], None]) -> None:
        self._fh, self._progress = fh, progress
        self.md5 = hashlib.md5()

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.md5.update(data)
        self._progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def safe_member_path(name: str, origin: str) -> PurePosixPath:
    """The relative path a member may be written to, or ReleaseError for anything that could escape."""
    path = PurePosixPath(name)
    if (
        path.is_absolute()
        or name.startswith(("/", "\\"))
        or ".." in path.parts
        or "\\" in name
        or "\0" in name
    ):
        raise ReleaseError(
            f"{origin}: member {name!r} would be written outside the destination",
            hint="the archive is not a genuine release; nothing was extracted",
        )
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _refuse_sparse(member: tarfile.TarInfo, tar_path: Path) -> None:
    """A sparse member (GNU ``S`` or PAX ``GNU.sparse.*``) expands a few KB into gigabytes of zeros."""
    if member.issparse() or any(k.startswith("GNU.sparse.") for k in member.pax_headers):
        raise ReleaseError(
            f"{tar_path}: member {member.name!r} is a sparse file ({member.size:,} bytes once expanded); "
            "refusing to extract",
            hint="a genuine release holds no sparse files; nothing was extracted",
        )


def unpack(
    tar_path: Path,
    dest: Path | str,
    options: UnpackOptions = UnpackOptions(),
    *,
    progress: Callable[[int], None] = lambda n: None,
) -> UnpackResult:
    """Extract ``tar_path`` into ``dest``: a new folder, or ``dest/NAME`` when ``dest`` is an existing folder
    or a ``str`` ending in ``/`` (module docstring); the folder written must be new or empty."""
    parent = str(dest).endswith(("/", os.sep))
    tar_path, dest = Path(tar_path), Path(dest).absolute()
    refuse_symlink(dest, "DEST", ReleaseError)
    if not tar_path.is_file():
        raise ReleaseError(f"{tar_path} does not exist or is not a file", hint="check the path")
    strip = None
    if parent or dest.is_dir():
        name, strip = _release_name(tar_path)
        dest = dest / name
    expected = KNOWN_RELEASES.get(tar_path.name) if options.check_md5 else None
    protected = [("RELEASE_TAR", tar_path)]
    with (
        claim_output(dest, UNPACK_OUTPUT, force=False, protected=protected) as claim,
        claim.staging() as tmp,
    ):
        files, total, digest = _extract(tar_path, tmp, dest, progress, strip)
        if expected and digest != expected:
            raise ReleaseError(
                f"{tar_path.name}: md5 {digest} does not match the published {expected}; nothing was extracted",
                hint="the download is corrupt or incomplete; download it again",
            )
    return UnpackResult(dest, files, total, digest, expected)


def _release_name(tar_path: Path) -> tuple[str, str | None]:
    """The folder a release goes into below a parent DEST, and the top folder to strip from the members:
    the archive's top folder (from its first member; reading it costs one header), else the file's name
    without its ``.tar`` suffix (nothing stripped)."""
    try:
        with open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for member in tf:
                rel = safe_member_path(member.name, str(tar_path))
                if rel == PurePosixPath("."):
                    continue
                if len(rel.parts) > 1 or member.isdir():
                    return rel.parts[0], rel.parts[0]
                break
    except (tarfile.TarError, EOFError) as err:
        raise ReleaseError(
            f"{tar_path} is not a readable tar archive ({err})",
            hint="the download is truncated or corrupt; download it again",
        ) from err
    stem = next((tar_path.name[: -len(s)] for s in _TAR_SUFFIXES if tar_path.name.endswith(s)), tar_path.name)
    return (stem if stem not in ("", ".", "..") else "release"), None


def _inside(rel: PurePosixPath, strip: str | None, member: str, tar_path: Path) -> PurePosixPath:
    """``rel`` below the release folder ``strip`` (None: as it is); a member outside it is refused."""
    if strip is None or rel == PurePosixPath("."):
        return rel
    if rel.parts[:1] != (strip,):
        raise ReleaseError(
            f"{tar_path}: member {member!r} lies outside {strip}/, the release folder the archive starts "
            "with; nothing was extracted",
            hint="unpack into a DEST that does not exist yet: the archive is then extracted as it is",
        )
    return PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 else PurePosixPath(".")


def _extract(
    tar_path: Path, tmp: Path, dest: Path, progress: Callable[[int], None], strip: str | None
) -> tuple[int, int, str]:
    """Extract every member (below ``strip``, which is left out) into the staging folder ``tmp``;
    ``(files, bytes, md5 of the whole tar)``."""
    files = total = 0
    manifests = tar_manifests(tar_path)  # None: not listable ahead; hash every member
    wanted = {root + name for root, listed in (manifests or {}).items() for name in listed}
    digests: dict[str, tuple[str, int]] = {}
    with open(tar_path, "rb") as raw:
        reader = _HashingReader(raw, progress)
        try:
            with tarfile.open(fileobj=reader, mode="r|*", tarinfo=RecordingTarInfo) as tf:  # type: ignore[call-overload]
                for member in tf:
                    rel = _inside(safe_member_path(member.name, str(tar_path)), strip, member.name, tar_path)
                    target = tmp / rel
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isreg():
                        kind = (
                            "symlink" if member.issym() else "hard link" if member.islnk() else "device/FIFO"
                        )
                        raise ReleaseError(
                            f"{tar_path}: member {member.name!r} is a {kind}; refusing to extract",
                            hint="a genuine release holds regular files only; nothing was extracted",
                        )
                    _refuse_sparse(member, tar_path)
                    if str(rel) == RUN_MARKER:
                        raise ReleaseError(
                            f"{tar_path}: member {member.name!r} has the name of persimmon-tools' own run "
                            "marker; refusing to extract",
                            hint="a genuine release holds no such file; nothing was extracted",
                        )
                    if os.path.lexists(target):
                        raise ReleaseError(
                            f"{tar_path}: member {member.name!r} appears twice",
                            hint="the archive is not a genuine release",
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    check_free_space(
                        dest.parent, member.size, f"{tar_path}: member {member.name!r}", ReleaseError
                    )
                    src = tf.extractfile(member)
                    name = str(safe_member_path(member.name, str(tar_path)))
                    digest = hashlib.sha256() if manifests is None or name in wanted else None
                    with open_new_file(target) as out:  # O_EXCL | O_NOFOLLOW
                        if digest is None:
                            shutil.copyfileobj(src, out, _CHUNK)
                        else:
                            while block := src.read(_CHUNK):
                                digest.update(block)
                                out.write(block)
                    if digest is not None:
                        digests[name] = (digest.hexdigest(), member.size)
                    if target.stat().st_size != member.size:
                        raise ReleaseError(
                            f"{tar_path}: member {member.name} is truncated",
                            hint="download the release again",
                        )
                    files += 1
                    total += member.size
                # tarfile stops silently at a damaged header; the rest must be the end-of-archive marker
                head = getattr(tf, "last_header_block", b"")
                check_end_of_archive(tf.fileobj.read, tf.offset, str(tar_path), head=head)
        except (tarfile.TarError, EOFError) as err:
            raise ReleaseError(
                f"{tar_path} is not a readable tar archive ({err})",
                hint="the download is truncated or corrupt; download it again",
            ) from err
        reader.drain()
    if manifests is None:  # read the manifests extracted (at most one level down, as a release has it)
        manifests = {}
        prefix = f"{strip}/" if strip else ""
        for path in [tmp / MANIFEST, *([] if strip else tmp.glob(f"*/{MANIFEST}"))]:
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(tmp).parent
                root = prefix + ("" if str(rel) == "." else f"{rel}/")
                manifests[root] = read_manifest(ByteSource.whole_file(path, what="the integrity manifest"))
    check_members(manifests, digests, str(tar_path))
    return files, total, reader.md5.hexdigest()
