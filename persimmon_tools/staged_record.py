"""What an output of persimmon-tools is, and how it proves it was written by persimmon-tools.

* A folder output lists every file it wrote in its record (``conversion.json`` for ``convert``,
  ``export.json`` for ``export``): ``{"tool": "persimmon-tools", ..., "output_files": [relative paths]}``,
  the record itself included; nested paths (``NAME/iter_0001251/...``) are allowed.
* A tarball output starts with a pax global header whose ``PERSIMMON-TOOLS.record`` names the tool and
  lists every member in order. Tar readers (``tarfile``, GNU tar) apply or skip a global header, so the
  members read and extract as before; anything appended or missing makes the list disagree.
* The ``--force`` rule: an output is replaced only when everything in it is what the toolkit recorded
  writing (plus the files another command adds, e.g. ``verification.json``); a tarball only when it carries
  its record. Anything else is listed and refused, and nothing is changed.
* An output folder is never a symlink, and never is or contains SOURCE, the current folder or the home
  folder (:func:`refuse_unsafe_output`); paths are compared by identity, not as strings
  (:func:`refuse_overlap`: a symlinked folder or a bind mount shows one folder under two names).

Messages name the output the way its command does (``OUT_DIR``, ``OUT``, ``DEST``, ``OUT_TAR``) and raise
that command's error class (:class:`OutputKind`); the texts are the same for every command.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.safe_read import read_json
from persimmon_tools.safe_write import refuse_file_in_path, refuse_symlink, relation

ErrorType = type[PersimmonToolsError]

TOOL = "persimmon-tools"
#: The pax keyword of a tarball's record (``VENDOR.keyword``, the form POSIX leaves to vendors).
TAR_RECORD_KEY = "PERSIMMON-TOOLS.record"
SHOWN = 10  # entries named in a refusal; the rest are counted
_RECORD_LIMIT = 4 << 20  # a record lists at most a few thousand paths; anything bigger is not one
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class OutputKind:
    """One command's output: how messages name it, the error it raises, what proves it is the toolkit's.

    ``record`` is the record file inside a folder output (None: the output keeps no record, and ``--force``
    has nothing to replace); ``also_own`` names files other commands add to it that ``--force`` may replace;
    ``command`` is the command whose earlier output ``--force`` replaces (None: the command has no
    ``--force``); ``tar`` marks a tarball output.
    """

    label: str
    error: ErrorType
    run: str
    command: str | None = None
    record: str | None = None
    also_own: tuple[str, ...] = ()
    tar: bool = False
    space_note: str = ""
    example: str = ""


def listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _safe_relative(path: object) -> bool:
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def read_record(folder: Path, record: str | None) -> set[str] | None:
    """The relative paths ``folder/record`` lists as written by persimmon-tools (``output_files``), or None
    when the record is missing, not a regular file (links are not followed), too big or garbled, lists a
    path that could leave the folder, or does not list itself: then nothing in the folder is known to be
    the toolkit's own."""
    if record is None:
        return None
    try:
        parsed = read_json(
            Path(folder) / record, what="record", max_bytes=_RECORD_LIMIT, follow_symlinks=False
        )
    except (OSError, PersimmonToolsError):
        return None
    files = parsed.get("output_files")
    if parsed.get("tool") != TOOL or not isinstance(files, list) or record not in files:
        return None
    return set(files) if all(_safe_relative(f) for f in files) else None


def output_files(folder: Path, record: str, skip: Iterable[str] = ()) -> list[str]:
    """Every regular file under ``folder`` as a sorted relative path, plus ``record`` (what a command lists in
    its record); the top-level names in ``skip`` (the run marker) are left out."""
    found, skipped = {record}, set(skip)
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = [d for d in dirs if not (rel_root == Path(".") and d in skipped)]
        for name in names:
            rel = (rel_root / name).as_posix()
            if rel not in skipped and stat.S_ISREG(os.lstat(Path(root, name)).st_mode):
                found.add(rel)
    return sorted(found)


def foreign_entries(folder: Path, record: str | None, also_own: Iterable[str] = ()) -> list[str]:
    """What in ``folder`` persimmon-tools did not write (empty: it may be replaced): links, FIFOs and other
    non-regular files, unrecorded files, and folders holding no recorded file (``name/``, not entered).
    Without a valid record every top-level entry is foreign."""
    ours = read_record(folder, record)
    if ours is None:
        return sorted(os.listdir(folder))
    ours |= set(also_own)
    parents = {p.as_posix() for f in ours for p in Path(f).parents if p != Path(".")}
    found: list[str] = []

    def walk(rel_dir: str) -> None:
        with os.scandir(Path(folder, rel_dir)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode) and rel in parents:
                    walk(rel)
                elif stat.S_ISDIR(mode):
                    found.append(rel + "/")
                elif not stat.S_ISREG(mode) or rel not in ours:
                    found.append(rel)

    walk("")
    return found


def refuse_overlap(
    out: Path,
    protected: Sequence[tuple[str, Path | None]],
    *,
    label: str,
    error: ErrorType,
    refuse: Sequence[str] = ("is", "contains"),
    hint: str = "choose a separate path; nothing was written",
) -> None:
    """Raise ``error`` when ``out`` is, contains or is inside (the relations in ``refuse``) one of
    ``protected`` (``(label, path)``; None is skipped), compared by identity (device and inode, links
    followed: a symlinked folder, a bind mount or a hard link is the same place;
    :func:`persimmon_tools.safe_write.relation`), never as strings."""
    words = {"is": "is", "contains": "contains", "inside": "is inside"}
    for what, place in protected:
        found = None if place is None else relation(out, Path(place))
        if found in refuse:
            harm = (
                "writing there would change it" if found == "inside" else f"replacing {label} would delete it"
            )
            raise error(
                f"{label} {out} {words[found]} {what} ({place}); refusing to write there: {harm}", hint=hint
            )


def refuse_unsafe_output(
    out: Path, kind: OutputKind, protected: Sequence[tuple[str, Path | None]] = ()
) -> Path:
    """Refuse a folder output that is a symlink or a file, whose path runs through a file, or that is or
    contains one of ``protected`` (``(label, path)``, e.g. SOURCE), the current folder or the home folder:
    replacing it would delete them (compared by identity: :func:`refuse_overlap`). Nothing is read or
    written. Returns the output as an absolute path."""
    path = Path(os.path.abspath(out))
    refuse_symlink(path, kind.label, kind.error)
    refuse_file_in_path(path, kind.label, kind.error)
    if os.path.lexists(path) and not path.is_dir():
        raise kind.error(
            f"{kind.label} {path} exists and is not a folder", hint=f"choose another {kind.label}"
        )
    places = [*protected, ("the current folder", Path.cwd())]
    with contextlib.suppress(RuntimeError, KeyError):
        places.append(("your home folder", Path.home()))
    example = f", e.g. {kind.example}" if kind.example else ""
    refuse_overlap(
        Path(out),
        places,
        label=kind.label,
        error=kind.error,
        hint=f"choose a new, separate folder for {kind.label}{example}",
    )
    return path


def check_output(out: Path, kind: OutputKind, force: bool, also_own: Iterable[str] = ()) -> None:
    """Refuse an existing output unless ``force`` and it is provably the toolkit's own (see the module
    docstring); a folder that is missing or empty is always fine."""
    out = Path(out)
    refuse_symlink(out, kind.label, kind.error)
    refuse_file_in_path(out, kind.label, kind.error)
    if kind.tar:
        _check_tar(out, kind, force)
        return
    if os.path.lexists(out) and not out.is_dir():
        raise kind.error(
            f"{kind.label} {out} exists and is not a folder", hint=f"choose another {kind.label}"
        )
    if not out.is_dir() or not os.listdir(out):
        return
    if not force or kind.command is None:
        replace = (
            f", or pass --force to replace an earlier `{kind.command}` (only the files its {kind.record} "
            "lists; the old content is kept until the new one is complete)"
            if kind.command
            else ""
        )
        raise kind.error(f"{kind.label} {out} is not empty", hint=f"choose a new or empty folder{replace}")
    foreign = foreign_entries(out, kind.record, [*kind.also_own, *also_own])
    if foreign:
        raise kind.error(
            f"{kind.label} {out} holds {len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} that persimmon-tools did not write: "
            f"{listing(foreign)}; --force replaces only a folder written by an earlier `{kind.command}` "
            f"(listed in its {kind.record})",
            hint=f"move them elsewhere or choose another {kind.label}; nothing was changed",
        )


def _check_tar(out: Path, kind: OutputKind, force: bool) -> None:
    if not os.path.lexists(out):
        return
    mode = os.lstat(out).st_mode
    if not stat.S_ISREG(mode):
        raise kind.error(
            f"{kind.label} {out} exists and is "
            + ("a directory" if stat.S_ISDIR(mode) else "not a regular file"),
            hint=f"choose another path for {kind.label}; it is never replaced",
        )
    if not force:
        raise kind.error(
            f"{kind.label} {out} exists",
            hint="choose another path, or pass --force to replace a tarball persimmon-tools wrote",
        )
    if not tar_is_ours(out):
        raise kind.error(
            f"{kind.label} {out} exists and is not a tarball persimmon-tools wrote (it carries no "
            "persimmon-tools record of its members); --force replaces only such a tarball",
            hint=f"remove {out} yourself or choose another name; nothing was changed",
        )


def refuse_unrecorded(folder: Path, kind: OutputKind, names: Sequence[str]) -> None:
    """Before files ``names`` are written into an existing ``folder`` (not replacing it): each one already
    there must be a regular file the folder's record lists (like ``git``, which refuses to clobber files it
    does not track); anything else is listed and refused before writing."""
    present = [n for n in names if os.path.lexists(Path(folder, n))]
    if not present:
        return
    ours = read_record(folder, kind.record) or set()
    foreign = [n for n in present if n not in ours or not stat.S_ISREG(os.lstat(Path(folder, n)).st_mode)]
    if foreign:
        raise kind.error(
            f"{folder} already holds {listing(foreign)}, which persimmon-tools did not write (no "
            f"{kind.record} output_files lists {'it' if len(foreign) == 1 else 'them'}); refusing to replace "
            f"{'it' if len(foreign) == 1 else 'them'}",
            hint=f"choose another {kind.label}, or move those files away first",
        )


# ---- the tarball's own record ---------------------------------------------------------------------------


def tar_record_header(members: Sequence[str]) -> bytes:
    """The pax global header a tarball the toolkit writes starts with: its record, listing ``members`` in the
    order they follow. Deterministic (no time, owner or version), so a release is written byte for byte the
    same each time."""
    record = json.dumps({"tool": TOOL, "members": list(members)}, separators=(",", ":"))
    return tarfile.TarInfo.create_pax_global_header({TAR_RECORD_KEY: record})


def tar_is_ours(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) holding an uncompressed tarball that starts with the
    toolkit's record, whose members are exactly the ones the record lists, in order, followed only by the
    end-of-archive zero blocks. Reads headers only (an 8B release's few hundred); never raises for a file
    that is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as fh:
        try:
            size = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            head = fh.read(tarfile.BLOCKSIZE)
            if len(head) < tarfile.BLOCKSIZE or head[156:157] != tarfile.XGLTYPE:
                return False
            if not 0 < tarfile.nti(head[124:136]) <= _RECORD_LIMIT:
                return False
            fh.seek(0)
            with tarfile.open(fileobj=fh, mode="r:") as tf:
                names = tf.getnames()
                raw = tf.pax_headers.get(TAR_RECORD_KEY)
                end = tf.offset
            record = json.loads(raw) if isinstance(raw, str) else None
            fh.seek(end)
            trailer = fh.read(2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE + 1)
        except (OSError, EOFError, ValueError, tarfile.TarError):
            return False
    if not isinstance(record, dict) or record.get("tool") != TOOL or record.get("members") != names:
        return False
    return size - end == len(trailer) >= 2 * tarfile.BLOCKSIZE and not trailer.strip(b"\0")
