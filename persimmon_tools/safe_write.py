"""Writing without harming what is already there: no writes through symlinks, no predictable temp names,
atomic replacement, one writer per destination, and a free-space check before a big write.

Every helper takes the error class to raise (``error=``), so each wing keeps its own exit code and wording.
Only the standard library and :mod:`persimmon_tools.errors` are used.

Paths are compared by identity (:func:`relation`: device and inode, links followed), never as strings: a
symlinked folder or a bind mount shows one folder under two names. Every name derived from an output name
(temporary files, locks, leftovers) goes through :func:`temp_stem`, so it fits NAME_MAX.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from persimmon_tools.errors import PersimmonToolsError

ErrorType = type[PersimmonToolsError]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_RENAME_EXCHANGE = 2  # linux/fs.h
_LOCK_PID_BYTES = 64
NAME_MAX = 255  # bytes of one path component on Linux filesystems
#: Bytes of an output's name used as they are in the names the toolkit derives from it (``.NAME.lock``,
#: ``.NAME.tmp-TOKEN-XXXXXXXX``, ``.NAME.XXXXXXXX.partial``, ``NAME.new-TOKEN``, ``NAME.previous-TOKEN``). The
#: longest of them adds 31 bytes to NAME, so a longer NAME is shortened (:func:`temp_stem`) to stay within
#: NAME_MAX.
STEM_BYTES = 200
_STEM_HASH = 12


def temp_stem(name: str) -> str:
    """The NAME part of every temporary, lock and leftover name derived from the output name ``name``: the
    name itself when it has at most :data:`STEM_BYTES` bytes, else its start (whole characters) + ``~`` + 12
    hex digits of its sha256. Deterministic, so a later run finds the leftovers of a killed one."""
    raw = os.fsencode(name)
    if len(raw) <= STEM_BYTES:
        return name
    budget, head = STEM_BYTES - _STEM_HASH - 1, []
    for char in name:
        budget -= len(os.fsencode(char))
        if budget < 0:
            break
        head.append(char)
    return "".join(head) + "~" + hashlib.sha256(raw).hexdigest()[:_STEM_HASH]


def refuse_symlink(path: Path, what: str, error: ErrorType) -> None:
    """Raise ``error`` when ``path`` itself (not its parents) is a symbolic link."""
    if os.path.islink(path):
        raise error(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); refusing to write through it",
            hint=f"pass the real path instead of the link, or remove the link {path}",
        )


def _not_a_folder(path: Path) -> str:
    with contextlib.suppress(OSError):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return "a symbolic link to something that is not a folder"
        return "a file" if stat.S_ISREG(mode) else "not a folder (a FIFO, socket or device)"
    return "not a folder"


def refuse_file_in_path(path: Path, what: str, error: ErrorType) -> None:
    """Raise ``error`` naming the component when a folder on the way to ``path`` (one of its parents) exists
    but is not a folder, e.g. OUT_DIR ``notes.txt/out``: the OS would only say "File exists"."""
    path = Path(os.path.abspath(path))
    for parent in path.parents:  # nearest first; the first one that is a folder ends the walk
        if os.path.isdir(parent):
            return
        if os.path.lexists(parent):
            raise error(
                f"{what} {path} cannot be made: {parent} is {_not_a_folder(parent)}, not a folder",
                hint=f"choose a path whose folders exist or can be created; {parent} is in the way",
            )


def identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` names (links followed); None when it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _ancestors(path: Path) -> list[tuple[int, int]]:
    """The identities of the folders above ``path`` (links resolved first), nearest first."""
    found = []
    for parent in Path(os.path.realpath(path)).parents:
        ident = identity(parent)
        if ident is not None:
            found.append(ident)
    return found


def relation(out: Path, place: Path) -> str | None:
    """How ``out`` (which may not exist yet) and the existing ``place`` overlap, by identity (device and
    inode, links followed), never by spelling: ``"is"`` (the same file or folder, also through a symlinked
    folder, a bind mount or a hard link), ``"contains"`` (``place`` is below the folder ``out``),
    ``"inside"`` (``out`` is, or would be made, below the folder ``place``), or None."""
    place_id = identity(place)
    if place_id is None:
        return None
    out = Path(os.path.abspath(out))
    out_id = identity(out)
    if out_id == place_id:
        return "is"
    if out_id is not None and os.path.isdir(out) and out_id in _ancestors(place):
        return "contains"
    if os.path.isdir(place):
        nearest = next((p for p in (out, *out.parents) if identity(p) is not None), None)
        if nearest is not None and place_id in (identity(nearest), *_ancestors(nearest)):
            return "inside"
    return None


def check_file_destination(path: Path, what: str, error: ErrorType) -> Path:
    """Refuse, before any work, a file destination that :func:`atomic_file` could not replace: a symbolic
    link, a folder, a path through a file, a folder that does not exist or is not writable, or a name
    longer than NAME_MAX. Returns the absolute path."""
    path = Path(os.path.abspath(path))
    refuse_symlink(path, what, error)
    if os.path.isdir(path):
        raise error(
            f"{what} {path} is a folder", hint="pass a file path, e.g. report.json inside that folder"
        )
    refuse_file_in_path(path, what, error)
    if not os.path.isdir(path.parent):
        raise error(
            f"{what} {path}: the folder {path.parent} does not exist",
            hint=f"create it first (mkdir -p {path.parent}) or choose another path",
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise error(
            f"{what} {path}: the folder {path.parent} is not writable",
            hint="choose a folder you can write to",
        )
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise error(
            f"{what} {path}: the name has {len(os.fsencode(path.name))} bytes, more than a file name may "
            f"have ({NAME_MAX})",
            hint="choose a shorter name",
        )
    return path


def open_new_file(path: Path, mode: int = 0o666) -> BinaryIO:
    """Create ``path`` for writing; fails if anything (a file, a dangling or live symlink) is already there.
    ``mode`` goes through the umask, as for ``open()``: the default gives ``0o666 & ~umask``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    return os.fdopen(fd, "wb")


def write_new_file(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to a file that must not exist yet (never follows a link planted at ``path``)."""
    with open_new_file(path, mode) as fh:
        fh.write(data)


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``Umask:`` in
    ``/proc/self/status``, Linux >= 4.7); elsewhere by an ``os.umask`` round trip under a lock, through the
    stricter 0o077 (a file another thread creates in that instant is more private, never less)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8) & 0o777
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def publish_modes(root: Path) -> None:
    """Give a staged output (a folder and everything in it, or one file) the modes a plain ``mkdir`` /
    ``open()`` would have given it under the current umask, just before it is installed: temporary folders
    (``mkdtemp``: 0700) and files (``mkstemp``: 0600) are private while they are written, never once they
    are the output. Links are never followed nor changed; children first, ``root`` last."""
    mask = current_umask()

    def fix(path: str) -> None:
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode) and mode & 0o111:
            want = 0o777 & ~mask
        elif stat.S_ISREG(mode):
            want = 0o666 & ~mask
        else:
            return
        if stat.S_IMODE(mode) != want:
            os.chmod(path, want)  # not a link (lstat), inside a folder only this user can enter

    if os.path.isdir(root) and not os.path.islink(root):
        for top, folders, names in os.walk(root, topdown=False):
            for name in [*names, *folders]:
                fix(os.path.join(top, name))
    fix(os.fspath(root))


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
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{temp_stem(target.name)}.", suffix=".partial", dir=target.parent
        )
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        check_file_destination(target, what, error)  # names the folder in the way (or not writable)
        raise error(f"{what} {target} cannot be written ({err.strerror})", hint="check the path") from err
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the file gets what open() would give it
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
