"""Reading what a user (or a hostile file) hands us: regular files only, bounded sizes, bounded work.

- :func:`open_regular` opens with ``O_NONBLOCK`` (a FIFO cannot hang the open) and, for files found inside a
  folder the toolkit walks, ``O_NOFOLLOW``; then it ``fstat`` s the *opened* descriptor (no stat-then-open
  race) and refuses anything that is not a regular file or is larger than the caller's bound.
- :func:`read_small` / :func:`read_json` read small metadata files (tracker, JSON records, prompts) whole,
  after those checks; a malformed, non-UTF-8 or wrong-typed JSON raises the caller's error type naming the
  file, never a traceback.
- :func:`scan_folder` lists a folder without following links: regular files and, separately, every link,
  FIFO, device or socket found (reported, never read).
- Bounded work on pickled object graphs is :mod:`persimmon_tools.safe_graph`.

Only :mod:`persimmon_tools.errors` and the standard library are imported (the byte layer in
:mod:`persimmon_tools.megatron` and the other readers of the toolkit use this module).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from persimmon_tools.errors import PersimmonToolsError

KiB, MiB = 1 << 10, 1 << 20
#: ``latest_checkpointed_iteration.txt`` holds one decimal number.
MAX_TRACKER_BYTES = 1 * KiB
#: A SentencePiece model; ADEPT's ``adept_vocab.model`` is 6.13 MB (spec §A).
MAX_VOCAB_BYTES = 64 * MiB
#: ``config.json``, ``model.safetensors.index.json``, ``conversion.json``, ``verification.json``,
#: ``tokenizer_config.json``, ``generation_config.json`` (the 8B index is about 60 kB).
MAX_JSON_BYTES = 16 * MiB
#: ``verify --prompts-file``.
MAX_PROMPTS_BYTES = 16 * MiB
#: A safetensors JSON header (the safetensors library's own limit is 100 MB; a 580-tensor shard needs ~60 kB).
MAX_SAFETENSORS_HEADER_BYTES = 16 * MiB

ErrorType = type[PersimmonToolsError]

_KIND = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def file_kind(mode: int) -> str:
    """``'a FIFO (named pipe)'``, ``'a folder'``, ... for an ``st_mode``; ``'a regular file'`` for one."""
    return "a regular file" if stat.S_ISREG(mode) else _KIND.get(stat.S_IFMT(mode), "a special file")


def format_size(n: float | None, *, digits: int = 1) -> str:
    """A byte count in binary units, the one formatter of the toolkit: ``1536 -> '1.5 KiB'``,
    ``5 * 2**30 -> '5.0 GiB'``, ``0 -> '0 B'``, ``None -> 'unknown'``; ``digits`` after the point
    (the CLI's summaries use 2)."""
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def open_regular_fd(
    path: Path | str,
    *,
    what: str,
    max_bytes: int | None,
    follow_symlinks: bool = True,
    error: ErrorType = PersimmonToolsError,
    hint: str | None = None,
) -> int:
    """A read-only descriptor of ``path`` if it is a regular file of at most ``max_bytes`` (None: any size).

    ``what`` says what the file is for in messages (``"the vocabulary (--vocab)"``). ``follow_symlinks``:
    False for files found inside a folder the toolkit walks (a link there is refused); True for a path the
    user named (HF caches hand out links to regular files). The type and size come from ``fstat`` of the
    opened descriptor, so a file swapped after a check cannot slip through; ``O_NONBLOCK`` keeps a FIFO
    from blocking the open itself.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_symlinks:
            raise error(
                f"{path} ({what}) is a symbolic link; links inside a folder the toolkit reads are not followed",
                hint=hint or "replace the link with the file itself (cp --dereference)",
            ) from None
        if err.errno == errno.ENXIO:  # a socket, or a device without a driver
            raise error(
                f"{path} ({what}) is not a regular file (a socket or device); nothing was read from it",
                hint=hint or "pass a regular file",
            ) from None
        reason = err.strerror or str(err)
        raise error(f"cannot read {path} ({what}): {reason}", hint=hint or "check the path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{path} ({what}) is {file_kind(st.st_mode)}, not a regular file; nothing was read from it",
                hint=hint or "pass a regular file (a FIFO, device or socket could block or never end)",
            )
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(
                f"{path} ({what}) is {format_size(st.st_size)}; at most {format_size(max_bytes)} is expected, so it was "
                "not read",
                hint=hint or "the file is not what its name says (or is damaged); pass the right file",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(
    path: Path | str,
    *,
    what: str,
    max_bytes: int | None,
    follow_symlinks: bool = True,
    error: ErrorType = PersimmonToolsError,
    hint: str | None = None,
) -> BinaryIO:
    """:func:`open_regular_fd` as a binary file object (``os.fstat(fh.fileno()).st_size`` is its size)."""
    fd = open_regular_fd(
        path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks, error=error, hint=hint
    )
    return os.fdopen(fd, "rb")


def read_small(
    path: Path | str,
    *,
    what: str,
    max_bytes: int,
    follow_symlinks: bool = True,
    error: ErrorType = PersimmonToolsError,
    hint: str | None = None,
) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` (see :func:`open_regular`)."""
    with open_regular(
        path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks, error=error, hint=hint
    ) as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as err:
            raise error(f"cannot read {path} ({what}): {err.strerror or err}", hint=hint) from None
    if len(data) > max_bytes:  # grew after the fstat
        raise error(f"{path} ({what}) is larger than {format_size(max_bytes)}; it was not read", hint=hint)
    return data


def read_text(
    path: Path | str,
    *,
    what: str,
    max_bytes: int,
    follow_symlinks: bool = True,
    error: ErrorType = PersimmonToolsError,
    hint: str | None = None,
) -> str:
    """:func:`read_small` decoded as UTF-8 (a decoding failure raises ``error`` naming the byte offset)."""
    data = read_small(
        path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks, error=error, hint=hint
    )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{path} ({what}) is not UTF-8 text (byte {err.start}: {err.reason})",
            hint=hint or "save the file as UTF-8",
        ) from None


def parse_json(
    data: bytes | str,
    *,
    origin: str,
    error: ErrorType = PersimmonToolsError,
    expect: type = dict,
    hint: str | None = None,
) -> Any:
    """``json.loads`` whose every failure (syntax, encoding, nesting, top-level type) raises ``error``."""
    fix = hint or "the file is damaged; re-create it (convert or verify again) or restore it from a copy"
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError as err:
        raise error(f"{origin} is not UTF-8 JSON (byte {err.start}: {err.reason})", hint=fix) from None
    except json.JSONDecodeError as err:
        raise error(
            f"{origin} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", hint=fix
        ) from None
    except (RecursionError, ValueError) as err:  # absurd nesting; huge integer literals
        raise error(
            f"{origin} cannot be parsed as JSON ({type(err).__name__}: {str(err)[:80]})", hint=fix
        ) from None
    if not isinstance(value, expect):
        raise error(
            f"{origin} should hold a JSON {_json_name(expect)}, found a {_json_name(type(value))}", hint=fix
        )
    return value


def _json_name(tp: type) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
    }.get(tp, "null" if tp is type(None) else tp.__name__)


def read_json(
    path: Path | str,
    *,
    what: str,
    max_bytes: int = MAX_JSON_BYTES,
    error: ErrorType = PersimmonToolsError,
    expect: type = dict,
    follow_symlinks: bool = True,
    hint: str | None = None,
) -> Any:
    """Read and parse a small JSON file; the top-level value must be an ``expect`` (default: an object)."""
    data = read_small(
        path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks, error=error, hint=hint
    )
    return parse_json(data, origin=f"{path} ({what})", error=error, expect=expect, hint=hint)


def read_json_record(
    path: Path | str,
    *,
    what: str,
    error: ErrorType = PersimmonToolsError,
    max_bytes: int = MAX_JSON_BYTES,
    hint: str | None = None,
) -> Any:
    """A JSON object a folder may hold (``conversion.json``, ``verification.json``, ``config.json``): None
    when nothing is there; otherwise :func:`read_json` without following a link (a link, FIFO, oversized or
    garbled file raises ``error`` naming it)."""
    if not os.path.lexists(path):
        return None
    return read_json(path, what=what, max_bytes=max_bytes, error=error, follow_symlinks=False, hint=hint)


# ---- folders -----------------------------------------------------------------------------------------


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: regular files and everything else (never read), by relative path."""

    files: list[str] = field(default_factory=list)
    irregular: dict[str, str] = field(default_factory=dict)  # relative path -> "a symbolic link", ...


def scan_folder(folder: Path | str, *, max_depth: int = 8, max_entries: int = 100_000) -> FolderScan:
    """Walk ``folder`` without following links (``lstat`` only), at most ``max_depth`` levels below it.

    Sub-folders are entered; links (to anything), FIFOs, devices and sockets go to ``irregular``.
    Unreadable sub-folders are skipped. More than ``max_entries`` entries stop the walk.
    """
    scan = FolderScan()
    seen = 0

    def walk(here: str, rel: str, depth: int) -> None:
        nonlocal seen
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            seen += 1
            if seen > max_entries:
                return
            child = f"{rel}{entry.name}"
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                if depth < max_depth:
                    walk(entry.path, child + "/", depth + 1)
            elif stat.S_ISREG(mode):
                scan.files.append(child)
            else:
                scan.irregular[child] = file_kind(mode)

    walk(os.fspath(folder), "", 1)
    return scan


def describe_irregular(irregular: dict[str, str], limit: int = 4) -> str:
    """``"a (a symbolic link), b (a FIFO (named pipe))"``, at most ``limit`` names then a count."""
    items = [f"{name} ({kind})" for name, kind in sorted(irregular.items())]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
