"""The all-or-nothing output folder: everything is written into a temporary folder beside OUT_DIR, which
replaces OUT_DIR by rename only when complete; on any error, full disk or Ctrl-C it is removed and OUT_DIR is
left exactly as it was."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from persimmon_tools.errors import ConversionError


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty OUT_DIR without ``force`` (before any work is done)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder", hint="choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConversionError(
            f"{out_dir} is not empty",
            hint="choose an empty/new folder, or pass --force to "
            "replace it (the old content is kept until the new one is complete)",
        )


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(out_dir: Path) -> ConversionError:
    return ConversionError(
        f"no space left on the device while writing {out_dir} (nothing was kept)",
        hint=f"free space on {out_dir.parent} (an 8B bf16 model needs about 19 GB) or choose another OUT_DIR",
    )


@contextmanager
def atomic_output_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir`` by rename,
    on any error (or Ctrl-C) it is deleted and ``out_dir`` is left exactly as it was."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, force)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise _disk_full(out_dir) from err
        raise
    try:
        yield tmp
        old = None
        if out_dir.exists():
            if any(out_dir.iterdir()):
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                os.rename(out_dir, old)
            else:
                out_dir.rmdir()
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        _remove(tmp)
        if err.errno in _DISK_FULL:
            raise _disk_full(out_dir) from err
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    """Delete the temporary folder even if Ctrl-C is pressed again (or SIGTERM repeated) meanwhile: the
    first interrupt is already being handled, and stopping half-way would leave a partial folder."""
    while True:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue
