"""File fingerprints (sha256 + size) shared by ``verify`` (which records them) and ``push`` (which checks them).

``verification.json`` records every file of a converted folder except the files listed in
:data:`UNFINGERPRINTED` (the report itself and the model card, which ``push`` may write later).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from persimmon_tools.errors import ConversionError, PersimmonToolsError
from persimmon_tools.safe_read import describe_irregular, open_regular, scan_folder

VERIFICATION_FILE = "verification.json"
CONVERSION_FILE = "conversion.json"
MODEL_CARD_FILE = "README.md"
UNFINGERPRINTED = frozenset({VERIFICATION_FILE, MODEL_CARD_FILE})

_CHUNK = 8 << 20


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
