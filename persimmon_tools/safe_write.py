"""Writing without harming what is already there: no writes through symlinks, no predictable temp names,
atomic replacement, one writer per destination, and a free-space check before a big write.

Every helper takes the error class to raise (``error=``), so each wing keeps its own exit code and wording.
Only the standard library and :mod:`persimmon_tools.errors` are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from persimmon_tools.errors import PersimmonToolsError

ErrorType = type[PersimmonToolsError]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_RENAME_EXCHANGE = 2  # linux/fs.h
_LOCK_PID_BYTES = 64


def refuse_symlink(path: Path, what: str, error: ErrorType) -> None:
    """Raise ``error`` when ``path`` itself (not its parents) is a symbolic link."""
    if os.path.islink(path):
        raise error(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); refusing to write through it",
            hint=f"pass the real path instead of the link, or remove the link {path}",
        )


def open_new_file(path: Path, mode: int = 0o644) -> BinaryIO:
    """Create ``path`` for writing; fails if anything (a file, a dangling or live symlink) is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    return os.fdopen(fd, "wb")


def write_new_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a file that must not exist yet (never follows a link planted at ``path``)."""
    with open_new_file(path, mode) as fh:
        fh.write(data)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(target: Path, what: str, error: ErrorType) -> Iterator[BinaryIO]:
    """Yield a private temporary file beside ``target`` (``.NAME.*.partial``, created exclusively) that
    replaces ``target`` by rename when the block succeeds; on any error it is removed and ``target`` is left
    as it was. A ``target`` that is a symlink or a folder is refused before anything is written."""
    target = Path(os.path.abspath(target))
    refuse_symlink(target, what, error)
    if target.is_dir():
        raise error(f"{what} {target} is a folder", hint="pass a file path")
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # rename never follows a link at target; it replaces the entry
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def check_free_space(folder: Path, needed: int, what: str, error: ErrorType) -> None:
    """Raise ``error`` when ``folder``'s filesystem has fewer than ``needed`` free bytes."""
    free = free_bytes(folder)
    if needed > free:
        raise error(
            f"{what} needs {needed:,} bytes but {folder} has only {free:,} bytes free",
            hint=f"free space on {folder} or choose a destination on another disk",
        )


_renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``, Linux >= 3.15, glibc >= 2.28).

    Returns False, having changed nothing, where the kernel, libc or filesystem cannot do it."""
    global _renameat2
    if _renameat2 is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _renameat2 = func
        except (AttributeError, OSError):
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


class LockHeld:
    """An exclusive ``flock`` on a lock file; :meth:`release` removes the file and unlocks."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiting opener re-checks the inode and retries
        os.close(self._fd)
        self._fd = -1


def _holder_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, _LOCK_PID_BYTES, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
    return "unknown"


def acquire_lock(path: Path, what: str, error: ErrorType) -> LockHeld:
    """Take the lock file ``path`` (created with O_NOFOLLOW, the PID written into it) without waiting;
    raise ``error`` naming the lock and the PID holding it when another process has it."""
    path = Path(path)
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                refuse_symlink(path, "the lock file", error)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise error(
                f"another persimmon-tools process (PID {pid}) is writing {what}; lock {path} is held",
                hint="wait for it to finish or choose another destination; the lock is released when "
                "that process ends",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our flock: retry
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return LockHeld(path, fd)
    raise error(f"could not take the lock {path}", hint="another process keeps replacing it; try again")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
