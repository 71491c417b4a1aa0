"""The export's output: the shared staged output (:mod:`persimmon_tools.staged_output`), all or nothing.

A folder OUT holds ``NAME/...`` (the release) and ``export.json``, its record, which lists every file the
export wrote (relative paths); ``--force`` replaces an OUT holding nothing else. With ``--tar``, OUT is one
tarball that carries its own record (:func:`persimmon_tools.staged_record.tar_record_header`); ``--force``
replaces only such a tarball.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from persimmon_tools.errors import ConversionError, UsageError
from persimmon_tools.safe_write import open_new_file, write_new_file
from persimmon_tools.staged_output import RUN_MARKER, claim_output
from persimmon_tools.staged_record import (
    OutputKind,
    check_output,
    output_files,
    refuse_overlap,
    refuse_unsafe_output,
)

EXPORT_RECORD = "export.json"
EXPORT_FOLDER = OutputKind(
    label="OUT", error=ConversionError, run="export", command="export", record=EXPORT_RECORD
)
EXPORT_TAR = OutputKind(label="OUT", error=ConversionError, run="export", command="export --tar", tar=True)


def protected(source: Path, vocab: Path | None) -> list[tuple[str, Path | None]]:
    """What OUT may not be, contain or lie inside: SOURCE and the ``--vocab`` file."""
    return [("SOURCE", Path(source)), ("the --vocab file", vocab)]


def check_out(out: Path, protected: Sequence[tuple[str, Path | None]], *, tar: bool, force: bool) -> Path:
    """Refuse an OUT the run would refuse, before anything is read; returns the absolute OUT. OUT may not
    be, contain or lie inside what ``protected`` names, compared by identity: a symlinked folder or a bind
    mount showing SOURCE under another path is the same place."""
    out = Path(os.path.abspath(out))
    refuse_overlap(
        out,
        protected,
        label="OUT",
        error=UsageError,
        refuse=("is", "contains", "inside"),
        hint="choose a separate path for the exported release; nothing was written",
    )
    if tar:
        check_export_tar(out, force)
    else:
        check_export_dir(out, force)
    return out


def check_export_dir(out: Path, force: bool) -> None:
    """Refuse (before anything is read) a folder OUT the run would refuse."""
    refuse_unsafe_output(out, EXPORT_FOLDER)
    check_output(Path(os.path.abspath(out)), EXPORT_FOLDER, force)


def check_export_tar(out: Path, force: bool) -> None:
    """Refuse (before anything is read) a tarball OUT the run would refuse."""
    check_output(Path(os.path.abspath(out)), EXPORT_TAR, force)


@contextlib.contextmanager
def claim_export_dir(
    out: Path, force: bool, protected: Sequence[tuple[str, Path | None]] = ()
) -> Iterator[Path]:
    """Lock OUT, check it, yield a private temporary folder that replaces OUT when the block succeeds
    (``protected``: SOURCE and the like, see :func:`~persimmon_tools.staged_output.claim_output`)."""
    with claim_output(out, EXPORT_FOLDER, force=force, protected=protected) as claim, claim.staging() as tmp:
        yield tmp


@contextlib.contextmanager
def claim_export_tar(
    out: Path, force: bool, protected: Sequence[tuple[str, Path | None]] = ()
) -> Iterator[tuple[BinaryIO, Path]]:
    """Lock OUT, check it, yield the new tarball open for writing and its path (in the private temporary
    folder, so that it can be read back before it is installed); it replaces OUT when the block succeeds."""
    with claim_output(out, EXPORT_TAR, force=force, protected=protected) as claim, claim.staging() as tmp:
        path = tmp / Path(os.path.abspath(out)).name
        with open_new_file(path) as fh:
            yield fh, path
            fh.flush()
            os.fsync(fh.fileno())


def write_record(tmp: Path, summary: dict[str, Any], version: str) -> list[str]:
    """Write ``export.json`` into the staging folder, listing every file written; returns the list."""
    listed = output_files(tmp, EXPORT_RECORD, skip=[RUN_MARKER])
    record = {
        "tool": "persimmon-tools",
        "tool_version": version,
        "kind": "export",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export": summary,
        "output_files": listed,
    }
    write_new_file(tmp / EXPORT_RECORD, (json.dumps(record, indent=2, default=str) + "\n").encode())
    return listed
