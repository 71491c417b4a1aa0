"""A release's integrity manifest, ``integrity.json``: the sha256 and size of every file ``export`` wrote.

Form: Megatron-Core's manifest (``megatron/core/dist_checkpointing/validation.py``, NVIDIA/Megatron-LM
#4305, 2026-04-27: ``integrity.json`` beside a ``torch_dist`` checkpoint's files, written with
``--verify-integrity``) plus a ``sizes`` object, so that Megatron's own verifier reads ours too::

    {
      "algorithm": "sha256",
      "files": {"adept_vocab.model": "<64 hex digits>",
                "iter_0001251/mp_rank_00/model_optim_rng.pt": "<64 hex digits>", ...},
      "sizes": {"adept_vocab.model": 6129621, "iter_0001251/mp_rank_00/model_optim_rng.pt": 18791..., ...}
    }

It lies in the release folder (``NAME/integrity.json``, in a tarball too), beside the tracker; paths are
relative to that folder, ``/``-separated, sorted, and the manifest does not list itself. ADEPT's releases
carry none; ``export`` writes one (since 2026-12-07, 0.1.0), hashing each file while it writes it
(:class:`HashingSink`).

Checking (:func:`check_manifest`; :func:`~persimmon_tools.megatron.release.open_release` for a release
tarball or folder, so ``convert``, ``inspect``, ``verify`` and ``export`` from a Megatron source, and
:func:`~persimmon_tools.megatron.unpack.unpack`): a listed file that is missing, or whose size or sha256
differs, is a :class:`~persimmon_tools.errors.CheckpointError` naming it. ``open_release`` hashes the listed
files in one sequential pass when it opens the release (sha256 at about 1.8 GB/s on one core: a second read
of the shards for ``convert``, the only read of their tensors for ``inspect``); ``unpack`` hashes the members
as it extracts them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.safe_read import format_size, parse_json

log = logging.getLogger(__name__)

MANIFEST = "integrity.json"
ALGORITHM = "sha256"
MAX_MANIFEST_BYTES = 4 << 20
_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20
_HINT = "the file is damaged or was changed after export wrote it; copy or download the release again"

_DIGESTS = contextvars.ContextVar("persimmon_manifest_digests", default=True)


@dataclass(frozen=True)
class Listed:
    """What the manifest says of one file: its sha256 (hex) and, where recorded, its size."""

    sha256: str
    size: int | None


def manifest_bytes(files: Mapping[str, tuple[str, int]]) -> bytes:
    """The manifest of ``{relative path: (sha256 hex, size)}``, as written (keys sorted, 2-space indent)."""
    names = sorted(files)
    doc = {
        "algorithm": ALGORITHM,
        "files": {n: files[n][0] for n in names},
        "sizes": {n: files[n][1] for n in names},
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def parse_manifest(data: bytes, origin: str) -> dict[str, Listed]:
    """``{relative path: Listed}`` from a manifest's bytes; anything malformed is a CheckpointError."""
    doc = parse_json(data, origin=origin, error=CheckpointError, hint=_HINT)
    files, sizes = doc.get("files"), doc.get("sizes", {})
    if (
        doc.get("algorithm", ALGORITHM) != ALGORITHM
        or not isinstance(files, dict)
        or not isinstance(sizes, dict)
    ):
        raise CheckpointError(
            f'{origin} is not an integrity manifest this tool reads (expected "algorithm": "sha256" and a '
            '"files" object of relative path -> sha256)',
            hint=_HINT,
        )
    out = {}
    for name, digest in files.items():
        size = sizes.get(name)
        path = PurePosixPath(name)
        if (
            not isinstance(digest, str)
            or not _HEX.fullmatch(digest)
            or not (size is None or (type(size) is int and size >= 0))
            or not name
            or path.is_absolute()
            or ".." in path.parts
            or "\\" in name
            or "\0" in name
        ):
            raise CheckpointError(
                f"{origin}: the entry for {name[:120]!r} is malformed (a relative path inside the release, "
                "a sha256 of 64 hex digits, a size in bytes)",
                hint=_HINT,
            )
        out[str(path)] = Listed(digest, size)
    return out


def read_manifest(src: ByteSource) -> dict[str, Listed]:
    if src.size > MAX_MANIFEST_BYTES:
        raise CheckpointError(
            f"{src.name} is {format_size(src.size)}; an integrity manifest lists a few files", hint=_HINT
        )
    return parse_manifest(src.read_all(), src.name)


def mismatch(name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{name} does not match the release's {MANIFEST}: {what}", hint=_HINT)


def check_file(name: str, listed: Listed, size: int, sha256: str | None) -> None:
    """Compare one file's size and sha256 (None: not hashed) with its manifest entry."""
    if listed.size is not None and size != listed.size:
        raise mismatch(name, f"it is {size:,} bytes, the manifest lists {listed.size:,}")
    if sha256 is not None and sha256 != listed.sha256:
        raise mismatch(name, f"its sha256 is {sha256}, the manifest lists {listed.sha256}")


def sha256_of(src: ByteSource) -> str:
    """The sha256 of ``src``'s bytes (:meth:`ByteSource.sha256`); a file shorter now is a mismatch."""
    digest, read = src.sha256(_CHUNK)
    if read < src.size:
        raise mismatch(src.name, f"it ends after {read:,} of {src.size:,} bytes")
    return digest


def check_manifest(listed: Mapping[str, Listed], files: Mapping[str, ByteSource | None], where: str) -> None:
    """Check every file the manifest lists: ``files`` maps each listed relative path to its bytes (None or
    absent: missing). The sha256s are computed (one sequential read of each file) unless :func:`sizes_only`
    is in effect. ``where``: the release, for messages."""
    for name, entry in listed.items():
        src = files.get(name)
        if src is None:
            raise CheckpointError(
                f"{where}: {name} is missing; the release's {MANIFEST} lists it", hint=_HINT
            )
        check_file(src.name, entry, src.size, sha256_of(src) if _DIGESTS.get() else None)
    log.debug("%s: %d file(s) match %s", where, len(listed), MANIFEST)


def check_release_manifest(source: Path, root: str, members: Mapping[str, ByteSource] | None) -> None:
    """Check the release folder ``root`` of SOURCE against its ``integrity.json``, when it has one:
    ``members`` lists a tarball's regular members (None: SOURCE is a folder, whose listed files are found as
    regular files, links refused, below ``SOURCE/root``)."""
    if members is not None:
        manifest = members.get(root + MANIFEST)
        if manifest is None:
            return
        listed = read_manifest(manifest)
        files = {name: members.get(root + name) for name in listed}
    else:
        base = Path(source) / root
        if not os.path.lexists(base / MANIFEST):
            return
        listed = read_manifest(
            ByteSource.whole_file(
                base / MANIFEST,
                what="the integrity manifest",
                max_bytes=MAX_MANIFEST_BYTES,
                follow_symlinks=False,
            )
        )
        files = {
            name: ByteSource.whole_file(base / name, what="a file the manifest lists", follow_symlinks=False)
            if os.path.lexists(base / name)
            else None
            for name in listed
        }
    check_manifest(listed, files, str(source))


@contextlib.contextmanager
def sizes_only() -> Iterator[None]:
    """Within the block, :func:`check_manifest` checks presence and sizes, not sha256s (``export`` reads back
    the release it has just written and hashed: hashing it again would read every byte a second time)."""
    token = _DIGESTS.set(False)
    try:
        yield
    finally:
        _DIGESTS.reset(token)


class HashingSink(io.RawIOBase):
    """A write-only, non-seekable stream into ``fh`` that counts and (``hash=True``) sha256s what passes.

    Non-seekable on purpose: :mod:`zipfile` then writes each record's CRC and sizes in a data descriptor
    after its bytes instead of seeking back to patch the local header (what ``torch.save`` itself writes
    since torch 2.x), so the file's bytes pass once, in order, and the digest is the file's sha256.
    """

    def __init__(self, fh: io.RawIOBase | io.BufferedIOBase | object, *, hash: bool = True) -> None:
        super().__init__()
        self._fh = fh
        self._digest = hashlib.sha256() if hash else None
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        if self._digest is not None:
            self._digest.update(view)
        rest = view
        while rest.nbytes:
            n = self._fh.write(rest)  # type: ignore[attr-defined]
            rest = rest[n if n is not None else rest.nbytes :]
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        if not self.closed and not getattr(self._fh, "closed", False):
            self._fh.flush()  # type: ignore[attr-defined]

    def hexdigest(self) -> str:
        if self._digest is None:
            raise ValueError("this sink does not hash")
        return self._digest.hexdigest()


def tar_manifests(tar_path: Path) -> dict[str, dict[str, Listed]] | None:
    """The manifests of an uncompressed tarball, found by listing its headers (cheap: tarfile seeks over
    member data): ``{release folder ("NAME/" or ""): listing}``. None when it cannot be listed ahead (a
    compressed or damaged tar): ``unpack`` then hashes every member and reads any manifest it extracts."""
    import tarfile

    found: dict[str, dict[str, Listed]] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            for member in tf:
                parts = [p for p in PurePosixPath(member.name).parts if p not in ("", ".")]
                if member.isreg() and parts and parts[-1] == MANIFEST and len(parts) <= 2:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise CheckpointError(
                            f"{tar_path}:{member.name} is {format_size(member.size)}; an integrity manifest "
                            "lists a few files",
                            hint=_HINT,
                        )
                    fh = tf.extractfile(member)
                    data = fh.read(MAX_MANIFEST_BYTES + 1) if fh is not None else b""
                    root = parts[0] + "/" if len(parts) == 2 else ""
                    found[root] = parse_manifest(data, f"{tar_path}:{'/'.join(parts)}")
    except (tarfile.TarError, OSError, EOFError):
        return None
    return found


def check_members(
    manifests: Mapping[str, Mapping[str, Listed]], digests: Mapping[str, tuple[str, int]], where: str
) -> None:
    """Check extracted members (``digests``: member path -> (sha256, size)) against each manifest."""
    for root, listed in manifests.items():
        for name, entry in listed.items():
            got = digests.get(root + name)
            if got is None:
                raise CheckpointError(
                    f"{where}: {root}{name} is missing; the release's {MANIFEST} lists it", hint=_HINT
                )
            check_file(f"{where}:{root}{name}", entry, got[1], got[0])
