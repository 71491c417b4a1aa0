"""``convert``'s output folder: the shared staged output (:mod:`persimmon_tools.staged_output`) with
``conversion.json`` as its record.

OUT_DIR may not be a symlink, nor be or contain SOURCE, ``--vocab``, the current folder or the home folder
(compared by identity, not as strings: a symlinked folder or a bind mount is the same place);
``--force`` replaces only an OUT_DIR holding nothing but the files ``conversion.json`` lists (plus
``verification.json`` and ``verification_reference.record``, which ``verify`` adds); the new folder is
written beside it and swapped in whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from persimmon_tools.conversion.fingerprint import CONVERSION_FILE, REFERENCE_RECORD_FILE, VERIFICATION_FILE
from persimmon_tools.errors import ConversionError
from persimmon_tools.staged_output import RUN_MARKER, OutputClaim, claim_output
from persimmon_tools.staged_record import OutputKind, output_files
from persimmon_tools.staged_record import refuse_unsafe_output as _refuse_unsafe

__all__ = [
    "CONVERT_OUTPUT",
    "RUN_MARKER",
    "OutputClaim",
    "claim_output_dir",
    "recorded_files",
    "refuse_unsafe_output",
]

CONVERT_OUTPUT = OutputKind(
    label="OUT_DIR",
    error=ConversionError,
    run="conversion",
    command="convert",
    record=CONVERSION_FILE,
    also_own=(VERIFICATION_FILE, REFERENCE_RECORD_FILE),
    space_note=" (an 8B bf16 model needs about 19 GB)",
    example="./persimmon-8b-hf",
)


def refuse_unsafe_output(out_dir: Path, *, source: Path | None = None, vocab: Path | None = None) -> Path:
    """Refuse an OUT_DIR that is a symlink or a file, or that is or contains SOURCE, ``--vocab``, the
    current folder or the home folder (nothing is read). Returns OUT_DIR as an absolute path."""
    return _refuse_unsafe(out_dir, CONVERT_OUTPUT, [("SOURCE", source), ("the --vocab file", vocab)])


@contextlib.contextmanager
def claim_output_dir(out_dir: Path, force: bool) -> Iterator[OutputClaim]:
    """Lock OUT_DIR for this run, deal with leftovers of interrupted runs, then check what it holds
    (:func:`refuse_unsafe_output` first, before anything is read)."""
    with claim_output(out_dir, CONVERT_OUTPUT, force=force) as claim:
        yield claim


def recorded_files(tmp: Path) -> list[str]:
    """What ``conversion.json`` lists: every file written into the staging folder (relative paths), itself
    included."""
    return output_files(tmp, CONVERSION_FILE, skip=[RUN_MARKER])
