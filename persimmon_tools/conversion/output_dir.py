"""The all-or-nothing output folder, which never deletes what persimmon-tools did not write.

* Before anything is read: OUT_DIR may not be a symlink, nor be or contain SOURCE, ``--vocab``, the current
  folder or the home folder.
* One writer per OUT_DIR: an exclusive lock ``.NAME.lock`` beside it (PID inside) for the whole run.
* ``--force`` replaces only an OUT_DIR that is empty or holds only the files a previous run recorded in its
  ``conversion.json`` (``output_files``; plus ``verification.json``, which ``verify`` adds); anything else
  is listed and refused, also when it appears during the run (the new result is then kept beside OUT_DIR).
* Everything is written into ``.NAME.tmp-TOKEN-*`` beside OUT_DIR, which is swapped in atomically
  (``renameat2(RENAME_EXCHANGE)``, else two renames undone on error); old files are removed by name.
* Each temp folder holds a marker (PID + token) so that a later run can prove a leftover of a killed run
  is its own: it removes it, or restores an OUT_DIR that a killed swap left missing, and says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from persimmon_tools.conversion.fingerprint import CONVERSION_FILE, VERIFICATION_FILE
from persimmon_tools.errors import ConversionError
from persimmon_tools.safe_write import (
    acquire_lock,
    exchange,
    fsync_dir,
    pid_alive,
    recorded_outputs,
    refuse_symlink,
    write_new_file,
)

log = logging.getLogger(__name__)

RUN_MARKER = ".persimmon-tools-run.json"  # inside temp folders; never part of a finished OUT_DIR
_SHOWN = 10
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def refuse_unsafe_output(out_dir: Path, *, source: Path | None = None, vocab: Path | None = None) -> Path:
    """Refuse an OUT_DIR that is a symlink or a file, or that is or contains SOURCE, ``--vocab``, the
    current folder or the home folder (nothing is read). Returns OUT_DIR as an absolute path."""
    out = Path(os.path.abspath(out_dir))
    refuse_symlink(out, "OUT_DIR", ConversionError)
    if os.path.lexists(out) and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder", hint="choose another OUT_DIR")
    real = out.parent.resolve() / out.name
    protected: list[tuple[str, Path | None]] = [("SOURCE", source), ("the --vocab file", vocab)]
    protected.append(("the current folder", Path.cwd()))
    with contextlib.suppress(RuntimeError, KeyError):
        protected.append(("your home folder", Path.home()))
    for label, path in protected:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved == real or real in resolved.parents:
            raise ConversionError(
                f"OUT_DIR {out_dir} {'is' if resolved == real else 'contains'} {label} ({path}); "
                "refusing to write there: replacing OUT_DIR would delete it",
                hint="choose a new, separate folder for OUT_DIR, e.g. ./persimmon-8b-hf",
            )
    return out


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that persimmon-tools did not write (sorted; empty: safe to replace)."""
    names = sorted(os.listdir(folder))
    ours = recorded_outputs(folder, CONVERSION_FILE)
    if ours is None:
        return names
    ours |= {VERIFICATION_FILE}
    if _marker(folder) is not None:
        ours.add(RUN_MARKER)
    return [n for n in names if n not in ours or not stat.S_ISREG(os.lstat(folder / n).st_mode)]


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty OUT_DIR without ``force``, and with it one holding anything not ours."""
    out_dir = Path(out_dir)
    refuse_symlink(out_dir, "OUT_DIR", ConversionError)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder", hint="choose another OUT_DIR")
    if not out_dir.is_dir() or not os.listdir(out_dir):
        return
    if not force:
        raise ConversionError(
            f"{out_dir} is not empty",
            hint="choose an empty/new folder, or pass --force to replace an earlier conversion "
            "(the old content is kept until the new one is complete)",
        )
    foreign = foreign_entries(out_dir)
    if foreign:
        raise ConversionError(
            f"{out_dir} holds {len(foreign)} entries that persimmon-tools did not write: {_listing(foreign)}; "
            "--force replaces only a folder written by an earlier `convert` (listed in its conversion.json)",
            hint="move them elsewhere or choose another OUT_DIR; nothing was changed",
        )


def _disk_full(out_dir: Path) -> ConversionError:
    return ConversionError(
        f"no space left on the device while writing {out_dir} (nothing was kept)",
        hint=f"free space on {out_dir.parent} (an 8B bf16 model needs about 19 GB) or choose another OUT_DIR",
    )


def _marker(folder: Path) -> dict | None:
    """The run marker in ``folder`` if it is ours: a regular file of our format, owned by this user."""
    try:
        st = os.lstat(folder / RUN_MARKER)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > 4096:
            return None
        data = json.loads((folder / RUN_MARKER).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "persimmon-tools":
        return None
    if not isinstance(data.get("pid"), int) or not isinstance(data.get("token"), str) or not data["token"]:
        return None
    return data if data.get("role") in ("new", "old") else None


def _write_marker(folder: Path, token: str, role: str) -> None:
    data = {"tool": "persimmon-tools", "pid": os.getpid(), "token": token, "role": role}
    write_new_file(folder / RUN_MARKER, json.dumps(data).encode())


def _remove_old(old: Path, out: Path, token: str) -> None:
    """Delete, by name, the files of a replaced OUT_DIR that persimmon-tools wrote; anything else that
    appeared there meanwhile is kept (the folder is then renamed to a visible ``NAME.previous-TOKEN``)."""
    ours = (recorded_outputs(old, CONVERSION_FILE) or set()) | {VERIFICATION_FILE}
    last = [CONVERSION_FILE, RUN_MARKER]
    for name in [n for n in sorted(ours) if n not in last] + last:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(old / name).st_mode):
                os.unlink(old / name)
    try:
        os.rmdir(old)
    except OSError:
        keep = out.with_name(f"{out.name}.previous-{token}")
        os.rename(old, keep)
        log.warning(
            "files that persimmon-tools did not write appeared in %s during the run: kept in %s", out, keep
        )


def _remove(tmp: Path) -> None:
    """Delete the temporary folder even if Ctrl-C is pressed again (or SIGTERM repeated) meanwhile: the
    first interrupt is already being handled, and stopping half-way would leave a partial folder."""
    while True:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue


def recover_leftovers(out: Path) -> None:
    """Name every leftover of an interrupted run beside ``out``; remove (or restore) the provably ours."""
    with contextlib.suppress(FileNotFoundError):
        marker = _marker(out)
        if marker is not None and not pid_alive(marker["pid"]):
            os.unlink(out / RUN_MARKER)
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith(prefixes):
            continue
        marker = None if entry.is_symlink() or not entry.is_dir() else _marker(entry)
        token = marker["token"] if marker else ""
        proven = marker is not None and (
            entry.name.startswith(f"{prefixes[0]}{token}-") or entry.name == f"{prefixes[1]}{token}"
        )
        if not proven or pid_alive(marker["pid"]):
            why = (
                "its creating process is still running"
                if proven
                else "it has no valid persimmon-tools marker"
            )
            log.warning(
                "%s looks like a leftover of an interrupted conversion into %s but %s; left in place "
                "(delete it yourself if you do not need it)",
                entry,
                out,
                why,
            )
        elif marker["role"] == "new":
            _remove(entry)
            log.warning(
                "removed %s, the temporary folder of an interrupted run (PID %d)", entry, marker["pid"]
            )
        elif not os.path.lexists(out):
            os.rename(entry, out)
            os.unlink(out / RUN_MARKER)
            log.warning(
                "restored %s from %s, where an interrupted run (PID %d) left it", out, entry, marker["pid"]
            )
        else:
            _remove_old(entry, out, token)
            log.warning("removed the files of the replaced %s left in %s by an interrupted run", out, entry)


class OutputClaim:
    """OUT_DIR claimed by this process (lock held); :meth:`staging` yields the temp folder to write."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.force = out, force

    def _blocking_entries(self) -> list[str]:
        if not self.out.is_dir() or self.out.is_symlink():
            return [f"{self.out} itself (now a file or a link)"] if os.path.lexists(self.out) else []
        return foreign_entries(self.out) if self.force else sorted(os.listdir(self.out))

    def _keep(self, tmp: Path, token: str, found: list[str]) -> ConversionError:
        kept = self.out.with_name(f"{self.out.name}.new-{token}")
        os.unlink(tmp / RUN_MARKER)
        os.rename(tmp, kept)
        return ConversionError(
            f"{self.out} changed during the conversion: it now holds {_listing(found)}, which persimmon-tools "
            "did not write; it was left as it is",
            hint=f"the new conversion is complete in {kept}: move your files out of {self.out} and rename "
            f"{kept.name} to {self.out.name}",
        )

    def _install(self, tmp: Path, token: str) -> None:
        found = self._blocking_entries()
        if found:
            raise self._keep(tmp, token, found)
        out = self.out
        if not os.path.lexists(out):
            os.unlink(tmp / RUN_MARKER)
            try:
                os.rename(tmp, out)
            except OSError as err:  # an OUT_DIR with content appeared in the last instant
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                _write_marker(tmp, token, "new")
                raise self._keep(tmp, token, sorted(os.listdir(out))) from err
            fsync_dir(out.parent)
            return
        _write_marker(out, token, "old")  # a killed swap leaves proof of which folder holds the old files
        try:
            if exchange(tmp, out):
                old = tmp
            else:
                old = out.with_name(f".{out.name}.old-{token}")
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old, out)  # never leave OUT_DIR missing
                    raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(out / RUN_MARKER)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / RUN_MARKER)
        fsync_dir(out.parent)
        _remove_old(old, out, token)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private temp folder beside OUT_DIR that replaces it when the block succeeds; on any error
        (or Ctrl-C) it is deleted and OUT_DIR is left exactly as it was."""
        token = secrets.token_hex(8)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{token}-", dir=self.out.parent))
            _write_marker(tmp, token, "new")
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(self.out) from err
            raise
        installing = False
        try:
            yield tmp
            installing = True
            self._install(tmp, token)
        except OSError as err:
            if not installing or tmp.is_dir() and _marker(tmp) and _marker(tmp)["role"] == "new":
                _remove(tmp)
            if err.errno in _DISK_FULL:
                raise _disk_full(self.out) from err
            raise
        except BaseException:
            if not installing or tmp.is_dir() and _marker(tmp) and _marker(tmp)["role"] == "new":
                _remove(tmp)
            raise


@contextlib.contextmanager
def claim_output_dir(out_dir: Path, force: bool) -> Iterator[OutputClaim]:
    """Lock OUT_DIR for this run, deal with leftovers of interrupted runs, then check what it holds."""
    out = Path(os.path.abspath(out_dir))
    missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out.with_name(f".{out.name}.lock"), f"OUT_DIR {out}", ConversionError)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise _disk_full(out) from err
        raise
    try:
        recover_leftovers(out)
        check_output_dir(out, force)
        yield OutputClaim(out, force)
    except BaseException:
        lock.release()
        for folder in missing:  # the parents this run created, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    lock.release()


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Claim OUT_DIR and yield its temp folder (see :class:`OutputClaim.staging`)."""
    with claim_output_dir(out_dir, force) as claim, claim.staging() as tmp:
        yield tmp
