"""The export's output folder: all or nothing, and ``--force`` replaces only an earlier export.

``OUT`` holds ``NAME/...`` (the release) and ``export.json``, which lists every file the export wrote
(relative paths). ``--force`` replaces an OUT whose every entry is a regular file (or folder) listed there;
anything else (a file of yours, a link, a FIFO) is named and refused before anything is read. The new
release is written into ``.OUT.tmp-TOKEN`` beside OUT and renamed (or atomically swapped) into place; a
lock ``.OUT.lock`` keeps a second run out.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from persimmon_tools.errors import ConversionError
from persimmon_tools.safe_read import read_json
from persimmon_tools.safe_write import acquire_lock, exchange, fsync_dir, refuse_symlink, write_new_file

EXPORT_RECORD = "export.json"
_SHOWN = 8


def _tree(folder: Path) -> tuple[list[str], list[str]]:
    """``(regular files, other entries)`` under ``folder`` as relative paths (links are never followed)."""
    files, odd = [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in dirs + names:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                odd.append(rel)
    return sorted(files), sorted(odd)


def recorded_files(folder: Path) -> set[str] | None:
    """The files ``folder/export.json`` lists as written by an export, or None when it is not ours."""
    path = folder / EXPORT_RECORD
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        record = read_json(path, what="export record", error=ConversionError, follow_symlinks=False)
    except (OSError, ConversionError):
        return None
    files = record.get("output_files")
    if record.get("tool") != "persimmon-tools" or not isinstance(files, list):
        return None
    if not all(
        isinstance(f, str) and f and not f.startswith("/") and ".." not in f.split("/") for f in files
    ):
        return None
    return set(files)


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` an earlier export did not write (empty: it may be replaced)."""
    files, odd = _tree(folder)
    ours = recorded_files(folder)
    if ours is None:
        return sorted(os.listdir(folder))
    parents = {str(Path(f).parent) for f in ours} | {str(p) for f in ours for p in Path(f).parents}
    dirs = [
        str(Path(root, d).relative_to(folder))
        for root, names, _ in os.walk(folder, followlinks=False)
        for d in names
        if not os.path.islink(Path(root, d))
    ]
    return odd + [d + "/" for d in dirs if d not in parents] + [f for f in files if f not in ours]


def check_export_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT without ``force``, and with it one holding anything an export did not write."""
    refuse_symlink(out, "OUT", ConversionError)
    if os.path.lexists(out) and not out.is_dir():
        raise ConversionError(
            f"OUT {out} exists and is not a folder", hint="choose another path (or --tar to write a tarball)"
        )
    if not out.is_dir() or not os.listdir(out):
        return
    if not force:
        raise ConversionError(
            f"OUT {out} is not empty",
            hint="choose a new folder, or pass --force to replace an earlier export (listed in its export.json)",
        )
    foreign = foreign_entries(out)
    if foreign:
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        raise ConversionError(
            f"OUT {out} holds {len(foreign)} entries that no earlier export wrote: "
            f"{', '.join(foreign[:_SHOWN])}{more}; --force replaces only an earlier export",
            hint="move them elsewhere or choose another OUT; nothing was changed",
        )


@contextlib.contextmanager
def claim_export_dir(out: Path, force: bool) -> Iterator[Path]:
    """Lock OUT, check it, yield a private temporary folder that replaces OUT when the block succeeds."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out.with_name(f".{out.name}.lock"), f"OUT {out}", ConversionError)
    try:
        check_export_dir(out, force)
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(8)}")
        tmp.mkdir()
        try:
            yield tmp
            check_export_dir(out, force)  # again: something may have appeared during the run
            _install(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()


def _install(tmp: Path, out: Path) -> None:
    if not os.path.lexists(out) or not os.listdir(out):
        with contextlib.suppress(FileNotFoundError):
            out.rmdir()
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    if not exchange(tmp, out):
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(8)}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        tmp = old
    fsync_dir(out.parent)
    shutil.rmtree(tmp, ignore_errors=True)  # the earlier export, proven ours by check_export_dir


def write_record(tmp: Path, summary: dict[str, Any], version: str) -> list[str]:
    """Write ``export.json`` into the staging folder, listing every file written; returns the list."""
    files, _ = _tree(tmp)
    listed = sorted([*files, EXPORT_RECORD])
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
