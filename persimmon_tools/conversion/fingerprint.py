"""File fingerprints (sha256 + size) shared by ``verify`` (which records them) and ``push`` (which checks them).

``verification.json`` records every file of a converted folder except the files listed in
:data:`UNFINGERPRINTED` (the report itself and the model card, which ``push`` may write later).
:func:`verification_status` is the one judgement of whether a folder is still what was verified: ``push``
refuses what it does not call verified, and ``inspect`` reports the same status.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persimmon_tools.errors import ConversionError, PersimmonToolsError
from persimmon_tools.safe_read import describe_irregular, open_regular, scan_folder

VERIFICATION_FILE = "verification.json"
#: verify's stored record of the reference side (top-k logits per position); fingerprinted like the weights,
#: so ``push`` publishes it and a folder whose record changed is stale.
REFERENCE_RECORD_FILE = "verification_reference.record"
CONVERSION_FILE = "conversion.json"
MODEL_CARD_FILE = "README.md"
UNFINGERPRINTED = frozenset({VERIFICATION_FILE, MODEL_CARD_FILE})

_CHUNK = 8 << 20


def verify_command(
    out_dir: Path | str, source: Path | str, *, iteration: int | None = None, vocab: Path | str | None = None
) -> str:
    """The ``persimmon-tools verify`` command line that checks ``out_dir`` against ``source``, quoted for a
    shell (``--iteration``/``--vocab`` when the conversion was given them): what convert, an interrupted
    automatic verify and ``inspect`` tell the user to run."""
    words = ["persimmon-tools", "verify", str(out_dir), "--reference", str(source)]
    if iteration is not None:
        words += ["--iteration", str(iteration)]
    if vocab is not None:
        words += ["--vocab", str(vocab)]
    return shlex.join(words)


def sha256_file(
    path: Path, chunk_size: int = _CHUNK, *, error: type[PersimmonToolsError] = ConversionError
) -> str:
    """Hex sha256 of a regular file (never through a link, never a FIFO or device), read in bounded chunks."""
    digest = hashlib.sha256()
    with open_regular(
        path, what="a file of the folder", max_bytes=None, follow_symlinks=False, error=error
    ) as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _fingerprinted(rel: str) -> bool:
    parts = rel.split("/")
    if len(parts) == 1 and rel in UNFINGERPRINTED:
        return False
    return not any(part.startswith(".") for part in parts)  # .cache/ of huggingface_hub, editor files


def folder_files(folder: Path) -> list[Path]:
    """Regular files below ``folder`` (recursively, sorted), without the unfingerprinted ones at top level.
    Links, FIFOs, devices and sockets are not listed (see :func:`irregular_files`)."""
    return [folder / rel for rel in scan_folder(folder).files if _fingerprinted(rel)]


def irregular_files(folder: Path) -> dict[str, str]:
    """``{relative path: "a symbolic link" | "a FIFO (named pipe)" | ...}``: entries that are never read."""
    return {rel: kind for rel, kind in scan_folder(folder).irregular.items() if _fingerprinted(rel)}


def fingerprint_folder(folder: Path) -> dict[str, dict[str, object]]:
    """``{relative posix path: {"sha256": hex, "size": bytes}}`` for every fingerprinted file; a link or
    other non-regular file in the folder raises ConversionError (it would be neither read nor recorded)."""
    odd = irregular_files(folder)
    if odd:
        raise ConversionError(
            f"{folder} holds {describe_irregular(odd)}; a converted folder holds only regular files",
            hint="replace links with the files themselves (cp --dereference) or remove them",
        )
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": os.lstat(p).st_size}
        for p in folder_files(folder)
    }


def fingerprint_mismatches(folder: Path, recorded: dict[str, dict[str, object]]) -> list[str]:
    """Human-readable differences between the folder now and a recorded fingerprint (empty = identical)."""
    problems = []
    current = {p.relative_to(folder).as_posix(): p for p in folder_files(folder)}
    for rel, kind in sorted(irregular_files(folder).items()):
        problems.append(f"{rel}: {kind}, not a regular file (not read)")
    for rel in sorted(set(recorded) - set(current)):
        problems.append(f"{rel}: recorded but missing")
    for rel in sorted(set(current) - set(recorded)):
        problems.append(f"{rel}: present but not recorded")
    for rel in sorted(set(current) & set(recorded)):
        path = current[rel]
        size = os.lstat(path).st_size
        entry = recorded[rel] if isinstance(recorded[rel], dict) else {}
        if size != entry.get("size"):
            problems.append(f"{rel}: size {size} != recorded {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the recorded one")
    return problems


#: :attr:`VerificationStatus.state` values: the folder matches a passing report, or why it does not.
VERIFICATION_STATES = ("verified", "missing", "failed", "unrecorded", "stale")
_LISTED = 5


@dataclass(frozen=True)
class VerificationStatus:
    """Whether a folder is still what a passing ``verification.json`` checked (:func:`verification_status`).

    ``state``: ``verified`` (verdict pass, and every recorded file is there with its size and sha256, no
    other file), ``missing`` (no report), ``failed`` (verdict not pass), ``unrecorded`` (the report records
    no file fingerprints) or ``stale`` (files changed, were added or removed after verification).
    ``problems``: one line per reason (empty when verified); ``recorded``: the recorded fingerprint when
    verified.
    """

    state: str
    problems: tuple[str, ...] = ()
    recorded: dict[str, dict[str, object]] | None = None

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    def describe(self) -> str:
        """One line: ``pass (...)``, ``stale (files changed after verification: ...)``, ``fail (...)``, ..."""
        listed = "; ".join(self.problems[:_LISTED])
        if len(self.problems) > _LISTED:
            listed += f" (and {len(self.problems) - _LISTED} more)"
        return {
            "verified": "pass (every file as verified)",
            "missing": f"none ({listed})",
            "failed": f"fail ({listed})",
            "unrecorded": f"unusable ({listed})",
            "stale": f"stale (files changed after verification: {listed})",
        }[self.state]

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "status": self.describe(), "problems": list(self.problems)}


def verification_status(folder: Path, report: Any) -> VerificationStatus:
    """Judge ``folder`` against ``report`` (``verification.json`` as read by the caller; ``None``: absent).

    The callers read the report with their own error type (``push``: HubError; ``inspect``: ConversionError)
    and both judge with this function, so ``inspect`` says stale exactly when ``push`` refuses a folder as
    stale. Every recorded file of the right size is hashed (sha256), as ``push`` does.
    """
    if not isinstance(report, dict):
        return VerificationStatus("missing", (f"{VERIFICATION_FILE} is missing or unreadable",))
    if report.get("verdict") != "pass":
        return VerificationStatus(
            "failed", (f"{VERIFICATION_FILE} has verdict {report.get('verdict')!r}, not 'pass'",)
        )
    recorded = report.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return VerificationStatus("unrecorded", (f"{VERIFICATION_FILE} records no file fingerprints",))
    problems = fingerprint_mismatches(Path(folder), recorded)
    if problems:
        return VerificationStatus("stale", tuple(problems))
    return VerificationStatus("verified", (), recorded)
