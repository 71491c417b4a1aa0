"""What a push would send: the local files (with the card and the verification report) compared with what
the target revision already holds (LFS sha256 or git blob id), and the Hub's LFS rule for new files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.fingerprint import MODEL_CARD_FILE, VERIFICATION_FILE
from persimmon_tools.errors import HubError
from persimmon_tools.safe_read import open_regular

DEFAULT_REVISION = "main"  # huggingface_hub.constants.DEFAULT_REVISION (not imported here: plan is light)
CARD_MODES = ("keep", "replace")  # push --card: keep the Hub's README.md, or replace it with ours

_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.model", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.npz")
_REGULAR_MAX = 10 * 1024 * 1024  # the Hub stores files of 10 MiB or more with LFS


@dataclass(frozen=True)
class PlannedFile:
    """One file of a push: path in the repo, size, sha256, LFS or not, and whether the remote has it."""

    path: str
    size: int
    sha256: str
    lfs: bool
    remote_identical: bool


@dataclass(frozen=True)
class PushPlan:
    """What a push does (or did): the target, every file, the card."""

    repo_id: str
    repo_url: str
    revision: str
    create_pr: bool
    private: bool | None
    repo_exists: bool
    revision_exists: bool
    verified: bool
    card_source: str  # "generated", or "kept" (the README.md already in the folder)
    card: str
    commit_message: str
    files: tuple[PlannedFile, ...]
    remote_unknown: str | None = None  # dry run without the Hub: why its state is unknown
    remote_private: bool | None = None  # dry run: the existing repo's visibility on the Hub (None: not known)
    token: str = ""  # where the token comes from, or that none was found (never the token itself)

    @property
    def is_default_revision(self) -> bool:
        """The target is the repo's main branch: it exists, or comes with the repo (never "from main")."""
        return self.revision == DEFAULT_REVISION

    def describe_repo(self) -> str:
        """The repository as the dry run found it: its visibility on the Hub when it exists, else the one
        --private/--public would give it; ``state unknown (offline)`` when the Hub was not reached."""
        asked = None if self.private is None else "private" if self.private else "public"
        if self.remote_unknown:
            return "state unknown (offline)" + (
                f"; would be created {asked} if missing (--{asked})" if asked else ""
            )
        if not self.repo_exists:
            if asked:
                return f"would be created, {asked} (from --{asked})"
            return "would be created, with the Hub's default visibility (neither --private nor --public)"
        actual = None if self.remote_private is None else "private" if self.remote_private else "public"
        if actual is None:
            return "exists, visibility unknown"
        if asked and asked != actual:
            return f"exists, {actual} (--{asked} applies only when push creates the repo; it stays {actual})"
        return f"exists, {actual}"

    def describe_revision(self) -> str:
        """The target revision as the dry run found it (main never "created from main")."""
        if self.remote_unknown:
            return "state unknown (offline)"
        if self.revision_exists:
            return "exists"
        if self.is_default_revision:
            if self.repo_exists:
                return "would be made by this commit (the repository has no commit yet)"
            return "would be created with the repository"
        if self.revision.startswith("refs/"):
            return "not found: push would refuse it (only a branch is created when missing)"
        if self.repo_exists:
            return "would be created from main"
        return "would be created from main, once the repository is created"

    @property
    def to_upload(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if not f.remote_identical)

    @property
    def skipped(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if f.remote_identical)


@dataclass(frozen=True)
class LocalFile:
    path: str
    source: Path | bytes
    size: int
    sha256: str


def local_files(
    folder: Path, files: dict[str, dict[str, Any]], card_text: str, report: bytes | None
) -> list[LocalFile]:
    """The files of the commit: the fingerprinted ones (``verify``'s reference record
    ``verification_reference.record`` among them when the folder holds one: verify fingerprints it like
    the weights), the card and ``report`` (verification.json's bytes, sent from memory: what was checked is
    what is sent)."""
    out = [LocalFile(rel, folder / rel, int(v["size"]), str(v["sha256"])) for rel, v in sorted(files.items())]
    extra = {MODEL_CARD_FILE: card_text.encode("utf-8")}
    if report is not None:
        extra[VERIFICATION_FILE] = report
    out += [
        LocalFile(p, data, len(data), hashlib.sha256(data).hexdigest()) for p, data in sorted(extra.items())
    ]
    return out


def _git_blob_oid(source: Path | bytes, size: int) -> str:
    digest = hashlib.sha1(b"blob %d\0" % size)
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with _open(source) as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _head(source: Path | bytes, n: int = 512) -> bytes:
    if isinstance(source, bytes):
        return source[:n]
    with _open(source) as fh:
        return fh.read(n)


def _open(path: Path) -> Any:
    return open_regular(path, what="a file to push", max_bytes=None, follow_symlinks=False, error=HubError)


def compare_with_remote(local: list[LocalFile], remote: dict[str, Any]) -> tuple[PlannedFile, ...]:
    """Compare with the remote ``RepoFile`` entries; new files get the Hub's LFS rule (pattern, size, binary)."""
    out = []
    for f in local:
        r = remote.get(f.path)
        if r is None:
            name = f.path.rsplit("/", 1)[-1]
            lfs = (
                any(fnmatch(name, p) for p in _LFS_PATTERNS)
                or f.size >= _REGULAR_MAX
                or b"\0" in _head(f.source)
            )
            out.append(PlannedFile(f.path, f.size, f.sha256, lfs, False))
        elif r.lfs is not None:
            out.append(
                PlannedFile(f.path, f.size, f.sha256, True, r.lfs.sha256 == f.sha256 and r.size == f.size)
            )
        else:
            same = r.size == f.size and r.blob_id == _git_blob_oid(f.source, f.size)
            out.append(PlannedFile(f.path, f.size, f.sha256, False, same))
    return tuple(out)
