"""One staged-output mechanism for every command that writes: ``convert``, ``export`` (folder and ``--tar``),
``tokenizer``, ``unpack`` and ``make-release``. What an output is and what ``--force`` may replace:
:mod:`persimmon_tools.staged_record`; the run marker and the recovery of a killed run's leftovers:
:mod:`persimmon_tools.staged_leftovers`.

* One writer per output: an exclusive lock ``.NAME.lock`` beside it (PID inside) for the whole run.
* Every name derived from the output's NAME uses :func:`~persimmon_tools.safe_write.temp_stem` (NAME, or its
  start and a hash when it is too long), so a 250-byte NAME still gets names within NAME_MAX.
* The folders above the output that a run makes are removed again when it fails, only those and only if
  they are empty (:func:`created_folders`); a path through a file is refused naming that file.
* The output is checked (the record, the ``--force`` rule) before anything is read, and again just before
  the new one is installed; something that appeared meanwhile is kept, the new result left beside it as
  ``NAME.new-TOKEN``.
* Modes follow the umask: the temp folder is private (0700) while it is written; just before it is installed
  it and everything in it get what ``mkdir``/``open()`` would give them (folders ``0o777 & ~umask``, files
  ``0o666 & ~umask``; :func:`~persimmon_tools.safe_write.publish_modes`), and so do files added to a folder.
* Everything is written into ``.NAME.tmp-TOKEN-*`` beside the output. A folder is swapped in atomically
  (``renameat2(RENAME_EXCHANGE)``, else two renames undone on error) and the old one's recorded files are
  removed by name (anything else that appeared there is kept in ``NAME.previous-TOKEN``); a tarball, written
  as ``NAME`` inside the temp folder, replaces the old file by one rename.
* Each temp folder holds a marker (PID + token), so that a later run can prove a leftover of a killed run
  is its own: it removes it, or restores an output that a killed swap left missing, and says so in a log
  line. A leftover it cannot prove (no marker, or its process still runs) is named and kept.
* Files added to an existing folder (``tokenizer``) are staged in ``.persimmon-tools-tmp-TOKEN-*`` inside it
  (marker included) and renamed into place; only files the folder's record lists are replaced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.safe_write import (
    LockHeld,
    acquire_lock,
    exchange,
    fsync_dir,
    open_new_file,
    publish_modes,
    refuse_file_in_path,
    refuse_symlink,
    temp_stem,
)
from persimmon_tools.staged_leftovers import (
    INNER_PREFIX,
    RUN_MARKER,
    marker_role,
    read_marker,
    recover_inner,
    recover_leftovers,
    remove_replaced,
    remove_tree,
    write_marker,
)
from persimmon_tools.staged_record import (
    OutputKind,
    check_output,
    foreign_entries,
    listing,
    refuse_overlap,
    refuse_unrecorded,
    refuse_unsafe_output,
    tar_is_ours,
)

__all__ = ["RUN_MARKER", "OutputClaim", "claim_output", "created_folders", "disk_full", "staged_files"]

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(out: Path, kind: OutputKind) -> PersimmonToolsError:
    return kind.error(
        f"no space left on the device while writing {out} (nothing was kept)",
        hint=f"free space on {out.parent}{kind.space_note} or choose another {kind.label}",
    )


class OutputClaim:
    """An output claimed by this process (lock held); :meth:`staging` / :meth:`staged_file` write it."""

    def __init__(self, out: Path, kind: OutputKind, force: bool) -> None:
        self.out, self.kind, self.force = out, kind, force

    def _blocking(self) -> list[str]:
        """What now stands in the way of installing the new output (empty: nothing)."""
        out, kind = self.out, self.kind
        if kind.tar:
            if not os.path.lexists(out) or self.force and tar_is_ours(out):
                return []
            return [out.name]
        if not out.is_dir() or out.is_symlink():
            return [f"{out} itself (now a file or a link)"] if os.path.lexists(out) else []
        if not self.force:
            return sorted(os.listdir(out))
        return foreign_entries(out, kind.record, [*kind.also_own, *_own_marker(out)])

    def _keep(self, tmp: Path, token: str, found: list[str]) -> PersimmonToolsError:
        out, kind = self.out, self.kind
        kept = out.with_name(f"{temp_stem(out.name)}.new-{token}")
        if kind.tar:
            os.rename(tmp / out.name, kept)
            remove_tree(tmp)
            what = "what is there now is not a tarball persimmon-tools wrote"
        else:
            os.unlink(tmp / RUN_MARKER)
            os.rename(tmp, kept)
            what = f"it now holds {listing(found)}, which persimmon-tools did not write"
        return kind.error(
            f"{kind.label} {out} changed during the {kind.run}: {what}; it was left as it is",
            hint=f"the new output is complete in {kept}: move your files out of the way and rename "
            f"{kept.name} to {out.name}",
        )

    def _install(self, tmp: Path, token: str) -> None:
        out = self.out
        publish_modes(tmp / out.name if self.kind.tar else tmp)  # private while written, not once installed
        found = self._blocking()
        if found:
            raise self._keep(tmp, token, found)
        if self.kind.tar:
            os.replace(tmp / out.name, out)  # rename never follows a link at OUT; it replaces the entry
            fsync_dir(out.parent)
            remove_tree(tmp)
            return
        if not os.path.lexists(out):
            os.unlink(tmp / RUN_MARKER)
            try:
                os.rename(tmp, out)
            except OSError as err:  # an output with content appeared in the last instant
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                write_marker(tmp, token, "new")
                raise self._keep(tmp, token, sorted(os.listdir(out))) from err
            fsync_dir(out.parent)
            return
        write_marker(out, token, "old")  # a killed swap leaves proof of which folder holds the old files
        try:
            if exchange(tmp, out):
                old = tmp
            else:
                old = out.with_name(f".{temp_stem(out.name)}.old-{token}")
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old, out)  # never leave the output missing
                    raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(out / RUN_MARKER)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / RUN_MARKER)
        fsync_dir(out.parent)
        remove_replaced(old, out, self.kind, token)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private temp folder beside the output that replaces it (a folder output) or holds it (a tarball,
        ``NAME`` inside) when the block succeeds; on any error (or Ctrl-C) it is deleted and the output is
        left exactly as it was."""
        token = secrets.token_hex(8)
        try:
            prefix = f".{temp_stem(self.out.name)}.tmp-{token}-"
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
            write_marker(tmp, token, "new")
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise disk_full(self.out, self.kind) from err
            raise
        installing = False
        try:
            yield tmp
            installing = True
            self._install(tmp, token)
        except BaseException as err:
            if not installing or marker_role(tmp) == "new":
                remove_tree(tmp)
            if isinstance(err, OSError) and err.errno in _DISK_FULL:
                raise disk_full(self.out, self.kind) from err
            raise

    @contextlib.contextmanager
    def staged_file(self) -> Iterator[BinaryIO]:
        """The new tarball, open for writing (in :meth:`staging`'s folder); durable before it is renamed."""
        with self.staging() as tmp, open_new_file(tmp / self.out.name) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def _own_marker(out: Path) -> tuple[str, ...]:
    return (RUN_MARKER,) if read_marker(out) is not None else ()


def _lock(out: Path, kind: OutputKind) -> LockHeld:
    try:
        return acquire_lock(out.with_name(f".{temp_stem(out.name)}.lock"), f"{kind.label} {out}", kind.error)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise disk_full(out, kind) from err
        raise


@contextlib.contextmanager
def created_folders(folder: Path, kind: OutputKind, *, include_self: bool = True) -> Iterator[None]:
    """Make ``folder`` (``include_self=False``: only its parents) with the missing folders above it; when
    the block fails (or is interrupted), remove again the folders this call made, deepest first, each only
    if it is still empty. A path through a file is refused naming that file (the OS says "File exists")."""
    folder = Path(os.path.abspath(folder))
    refuse_file_in_path(folder, kind.label, kind.error)
    target = folder if include_self else folder.parent
    made = [p for p in (target, *target.parents) if not os.path.lexists(p)]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_empty(made)
        if err.errno in _DISK_FULL:
            raise disk_full(folder, kind) from err
        raise
    try:
        yield
    except BaseException:
        _remove_empty(made)
        raise


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:  # not empty (someone else's files, or another run's): kept, and so are those above
            return


@contextlib.contextmanager
def claim_output(
    out: Path, kind: OutputKind, *, force: bool, protected: Sequence[tuple[str, Path | None]] = ()
) -> Iterator[OutputClaim]:
    """Refuse an unsafe output, lock it for this run, deal with leftovers of interrupted runs, then check
    what it holds (``protected``: see :func:`~persimmon_tools.staged_record.refuse_unsafe_output`; a tarball
    output may not be one of them either). The folders above the output that this run makes are removed
    again when it fails."""
    out = Path(os.path.abspath(out))
    if kind.tar:
        refuse_symlink(out, kind.label, kind.error)
        refuse_overlap(
            out, protected, label=kind.label, error=kind.error, refuse=("is",), hint="choose another path"
        )
    else:
        refuse_unsafe_output(out, kind, protected)
    with created_folders(out, kind, include_self=False):
        lock = _lock(out, kind)
        try:
            recover_leftovers(out, kind)
            check_output(out, kind, force, _own_marker(out))
            yield OutputClaim(out, kind, force)
        finally:
            lock.release()


@contextlib.contextmanager
def staged_files(
    folder: Path, kind: OutputKind, names: Sequence[str], *, private: bool = False
) -> Iterator[Path]:
    """Add the files ``names`` to ``folder`` (created when missing, and removed again with the folders made
    for it, each if empty, when the block fails) without replacing the folder: yields a
    marked temp folder inside it; when the block succeeds each file is renamed into place. Files of those
    names already there are replaced only when the folder's record lists them. ``private``: ``folder`` is
    the caller's own existing staging folder (no lock, nothing to check, never created here: a job that its
    caller abandoned then fails once the folder is removed, rather than making it again)."""
    folder = Path(os.path.abspath(folder))
    refuse_symlink(folder, kind.label, kind.error)
    if private:
        with _stage_into(folder, kind, names, private=True) as stage:
            yield stage
        return
    with created_folders(folder, kind, include_self=False):
        lock = _lock(folder, kind)
        try:
            if folder.is_dir():
                recover_inner(folder, kind)
            refuse_unrecorded(folder, kind, names)
            with created_folders(folder, kind), _stage_into(folder, kind, names, private=False) as stage:
                yield stage
        finally:
            lock.release()


@contextlib.contextmanager
def _stage_into(folder: Path, kind: OutputKind, names: Sequence[str], *, private: bool) -> Iterator[Path]:
    token = secrets.token_hex(8)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{INNER_PREFIX}{token}-", dir=folder))
        try:
            write_marker(stage, token, "new")
            yield stage
            if not private:
                refuse_unrecorded(folder, kind, names)  # again: files may have appeared meanwhile
            for name in names:
                publish_modes(stage / name)  # the umask's mode, whatever mode its writer gave it
                os.replace(stage / name, folder / name)  # replaces a link of that name, never follows it
            fsync_dir(folder)
        finally:
            remove_tree(stage)
    except OSError as err:
        if not private and err.errno in _DISK_FULL:
            raise disk_full(folder, kind) from err
        raise
