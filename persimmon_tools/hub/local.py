"""The local side of a push: which files of the folder may be sent, the verification check and the card.

``push`` publishes only the folder's own regular files, like ``hf upload``. :func:`scan_folder` walks the
folder without following links (:func:`persimmon_tools.safe_read.scan_folder`) and refuses, before anything
in it is read, a folder that holds a symbolic link or a non-regular file (FIFO, socket, device) anywhere
below it: a ``README.md`` linked to ``/etc/passwd`` must never become the model card (not even in a dry
run), a linked shard must not publish whatever it points to, and a FIFO would block the reader. What the
scan saw (device, inode, size, modification time) is checked again right before each file is handed to the
upload (:meth:`FolderScan.checked_path`), so a file swapped for a link after the scan is refused too.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import (
    CONVERSION_FILE,
    MODEL_CARD_FILE,
    VERIFICATION_FILE,
    VerificationStatus,
    verification_status,
)
from persimmon_tools.errors import HubError, UsageError
from persimmon_tools.hub.model_card import build_model_card, folder_digest, folder_variant, read_record
from persimmon_tools.safe_read import MAX_JSON_BYTES, describe_irregular, file_kind, read_small
from persimmon_tools.safe_read import scan_folder as _walk

logger = logging.getLogger("persimmon_tools.hub.push")

MAX_CARD_BYTES = 1 << 20  # a README.md kept as the model card (the Hub's own cards are a few kB)
_SHOWN = 10  # links / special files named in the refusal; the rest are counted
_FIX_LINKS = (
    'replace each link by a copy of the file it points to (cp --remove-destination "$(readlink -f FILE)" '
    "FILE), remove FIFOs, sockets and devices, then re-run `persimmon-tools verify` if a weight file changed"
)


@dataclass(frozen=True)
class _Identity:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class FolderScan:
    """The regular files below ``folder`` (relative posix path -> what ``lstat`` saw), from :func:`scan_folder`."""

    folder: Path
    files: dict[str, _Identity]

    def checked_path(self, rel: str) -> Path:
        """``folder / rel`` after checking that it is still the regular file the scan saw (not a link)."""
        path = self.folder / rel
        try:
            st = os.lstat(path)
        except OSError as err:
            raise HubError(
                f"{path} disappeared while pushing ({err.strerror})",
                hint="do not change the folder while `push` runs; re-run it",
            ) from err
        if not stat.S_ISREG(st.st_mode) or _Identity.of(st) != self.files.get(rel):
            raise HubError(
                f"{path} was replaced or changed since push checked the folder (now {file_kind(st.st_mode)})",
                hint="do not change the folder while `push` runs; re-run it",
            )
        return path


def scan_folder(folder: Path) -> FolderScan:
    """Every regular file below ``folder``, walked without following links.

    Raises:
        HubError: the folder holds symbolic links or non-regular files (all counted, the first ones named);
            none of them was opened.
    """
    walked = _walk(folder, max_depth=64)
    if walked.irregular:
        n = len(walked.irregular)
        raise HubError(
            f"refusing to publish {folder}: it holds {n} link(s) or special file(s), and push uploads only "
            f"the folder's own regular files: {describe_irregular(walked.irregular, _SHOWN)}",
            hint=_FIX_LINKS,
        )
    files = {}
    for rel in walked.files:
        st = os.lstat(folder / rel)
        if not stat.S_ISREG(st.st_mode):  # swapped between the walk and now
            raise HubError(f"refusing to publish {folder}: {rel} is {file_kind(st.st_mode)}", hint=_FIX_LINKS)
        files[rel] = _Identity.of(st)
    logger.debug("Scanned %s: %d regular files, no links", folder, len(files))
    return FolderScan(Path(folder), files)


#: Files only a Megatron release has (what ``export`` and ``unpack`` write, what ``convert`` reads).
_MEGATRON_FILES = ("model_optim_rng.pt", "latest_checkpointed_iteration.txt")
_EXPORT_RECORD = "export.json"


def refuse_megatron_release(scan: FolderScan) -> None:
    """Refuse a folder holding a Megatron release (``export``'s output, an extracted release) and no
    ``config.json``: it is no converted Hugging Face folder, whatever its verification says.

    Raises:
        UsageError: naming the Megatron files found, with a hint to convert it first.
    """
    found = sorted(
        rel for rel in scan.files if rel == _EXPORT_RECORD or rel.rsplit("/", 1)[-1] in _MEGATRON_FILES
    )
    if not found or "config.json" in scan.files:
        return
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    raise UsageError(
        f"{scan.folder} is not a converted Hugging Face folder: it holds a Megatron release "
        f"({', '.join(found[:3])}{more}; no config.json), which push does not publish",
        hint=f"convert it first (persimmon-tools convert {scan.folder} ./hf-out, then verify ./hf-out) and "
        "push that folder, or push the Hugging Face folder it was exported from",
    )


def check_records(folder: Path) -> None:
    """Read ``conversion.json`` and ``verification.json`` once before anything else is judged, so that a
    damaged record (not JSON, a link, a value of the wrong type) is named as such, key included, rather
    than reported as a stale verification (:func:`~persimmon_tools.hub.model_card.read_record`)."""
    for name in (CONVERSION_FILE, VERIFICATION_FILE):
        read_record(folder, name)


def read_verification_report(folder: Path) -> bytes | None:
    """The bytes of ``verification.json`` (sent as read, so what was checked is what is sent); None if absent."""
    path = folder / VERIFICATION_FILE
    if not os.path.lexists(path):
        return None
    return read_small(
        path, what="the verification report", max_bytes=MAX_JSON_BYTES, follow_symlinks=False, error=HubError
    )


def check_verification(folder: Path) -> tuple[list[str], dict[str, dict[str, Any]] | None]:
    """Why ``folder`` is not verified (empty list: it is), and the recorded fingerprint when it is.

    Verified means: ``verification.json`` exists, its verdict is ``pass``, it records files, and the folder
    still holds exactly those files with the recorded sizes and sha256 (:func:`verification_state`). Call :func:`scan_folder` first: the
    fingerprint check then meets no link to follow.
    """
    status = verification_state(folder)
    return list(status.problems), status.recorded


def verification_state(folder: Path) -> VerificationStatus:
    """The folder's verification status, judged by the same function as ``inspect``'s
    (:func:`persimmon_tools.conversion.fingerprint.verification_status`); the report is read as a HubError."""
    return verification_status(folder, read_record(folder, VERIFICATION_FILE))


def choose_card(
    folder: Path,
    repo_id: str,
    license: str | None,  # noqa: A002 - the Hub's metadata key
    mode: str,
    verified: bool,
    problems: list[str],
    files: dict[str, dict[str, Any]],
) -> tuple[str, str]:
    """The card text and its source: ``"kept"`` (the folder's regular README.md) or ``"generated"``."""
    existing = folder / MODEL_CARD_FILE
    if mode == "keep" and os.path.lexists(existing):
        if not verified:
            logger.warning("Keeping your %s although the upload is unverified; say so in it", MODEL_CARD_FILE)
        data = read_small(
            existing, what="the model card", max_bytes=MAX_CARD_BYTES, follow_symlinks=False, error=HubError
        )
        try:
            return data.decode("utf-8"), "kept"
        except UnicodeDecodeError as err:
            raise HubError(
                f"{existing} is not UTF-8 text (byte {err.start})",
                hint="save it as UTF-8, or pass --card replace to publish the generated card",
            ) from None
    reason = "; ".join(problems[:3]) or None
    card = build_model_card(
        folder, repo_id, license=license, verified=verified, unverified_reason=reason, files=files
    )
    return str(card), "generated"


def default_message(folder: Path, verified: bool) -> str:
    variant = folder_variant(folder).variant
    name = {"base": "Persimmon-8B base", "chat": "Persimmon-8B chat"}.get(variant, "Persimmon-8B")
    return f"Upload {name} converted by persimmon-tools {__version__}" + ("" if verified else " (unverified)")


def commit_description(folder: Path, verified: bool, files: dict[str, dict[str, Any]]) -> str:
    src = (read_record(folder, CONVERSION_FILE) or {}).get("source") or {}
    return (
        f"Source: {src.get('name', 'unknown')} (iteration {src.get('iteration')}, TP {src.get('tp')}, "
        f"PP {src.get('pp')})\nVerification: {'pass' if verified else 'NOT VERIFIED'}\n"
        f"Folder fingerprint: sha256:{folder_digest(files)}"
    )
