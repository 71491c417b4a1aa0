"""File fingerprints (sha256 + size) shared by ``verify`` (which records them) and ``push`` (which checks them).

``verification.json`` records every file of a converted folder except the files listed in
:data:`UNFINGERPRINTED` (the report itself and the model card, which ``push`` may write later).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

VERIFICATION_FILE = "verification.json"
CONVERSION_FILE = "conversion.json"
MODEL_CARD_FILE = "README.md"
UNFINGERPRINTED = frozenset({VERIFICATION_FILE, MODEL_CARD_FILE})

_CHUNK = 8 << 20


def sha256_file(path: Path, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Regular files below ``folder`` (recursively, sorted), without the unfingerprinted ones at top level."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.is_symlink():
            continue
        if len(rel.parts) == 1 and rel.name in UNFINGERPRINTED:
            continue
        if any(part.startswith(".") for part in rel.parts):  # .cache/ of huggingface_hub, editor files
            continue
        files.append(path)
    return files


def fingerprint_folder(folder: Path) -> dict[str, dict[str, object]]:
    """``{relative posix path: {"sha256": hex, "size": bytes}}`` for every fingerprinted file."""
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in folder_files(folder)
    }


def fingerprint_mismatches(folder: Path, recorded: dict[str, dict[str, object]]) -> list[str]:
    """Human-readable differences between the folder now and a recorded fingerprint (empty = identical)."""
    problems = []
    current = {p.relative_to(folder).as_posix(): p for p in folder_files(folder)}
    for rel in sorted(set(recorded) - set(current)):
        problems.append(f"{rel}: recorded but missing")
    for rel in sorted(set(current) - set(recorded)):
        problems.append(f"{rel}: present but not recorded")
    for rel in sorted(set(current) & set(recorded)):
        path = current[rel]
        if path.stat().st_size != recorded[rel].get("size"):
            problems.append(f"{rel}: size {path.stat().st_size} != recorded {recorded[rel].get('size')}")
        elif sha256_file(path) != recorded[rel].get("sha256"):
            problems.append(f"{rel}: sha256 differs from the recorded one")
    return problems
