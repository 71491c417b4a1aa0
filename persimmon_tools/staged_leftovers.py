"""The run marker every temporary output holds, and what happens to leftovers of a killed run.

A temp folder (``.NAME.tmp-TOKEN-*`` beside an output, NAME shortened by
:func:`~persimmon_tools.safe_write.temp_stem` when long; ``.persimmon-tools-tmp-TOKEN-*`` inside a folder
that files are added to) holds :data:`RUN_MARKER`: ``{"tool", "pid", "token", "role"}``. A later run, holding the
output's lock, removes a leftover whose marker is valid, whose name carries the marker's token and whose
process is gone; restores an output that a killed swap left missing (role ``old``); and names, but keeps,
anything it cannot prove is ours. Used by :mod:`persimmon_tools.staged_output`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path

from persimmon_tools.safe_write import pid_alive, temp_stem, write_new_file
from persimmon_tools.staged_record import OutputKind, read_record

log = logging.getLogger(__name__)

RUN_MARKER = ".persimmon-tools-run.json"  # inside temp folders; never part of a finished output
INNER_PREFIX = ".persimmon-tools-tmp-"


def read_marker(folder: Path) -> dict | None:
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


def marker_role(folder: Path) -> str | None:
    marker = read_marker(folder) if folder.is_dir() else None
    return marker["role"] if marker else None


def write_marker(folder: Path, token: str, role: str) -> None:
    data = {"tool": "persimmon-tools", "pid": os.getpid(), "token": token, "role": role}
    write_new_file(folder / RUN_MARKER, json.dumps(data).encode())


def remove_tree(tmp: Path) -> None:
    """Delete a temporary folder even if Ctrl-C is pressed again (or SIGTERM repeated) meanwhile: the first
    interrupt is already being handled, and stopping half-way would leave a partial folder. A thread that was
    abandoned while it wrote into the folder may add an entry during the removal (the folder is then not
    empty): the removal is repeated, a bounded number of times, until the folder is gone."""
    for _ in range(_REMOVE_ATTEMPTS):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        except KeyboardInterrupt:
            continue
        if not os.path.lexists(tmp):
            return
        time.sleep(0.01)


_REMOVE_ATTEMPTS = 100


def _unlink_inside(root: Path, rel: str) -> None:
    """Remove the regular file ``root/rel``, only through real folders (never through a planted link)."""
    path = root
    for part in rel.split("/")[:-1]:
        path = path / part
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        return
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if stat.S_ISREG(os.lstat(path / rel.rsplit("/", 1)[-1]).st_mode):
            os.unlink(path / rel.rsplit("/", 1)[-1])


def remove_replaced(old: Path, out: Path, kind: OutputKind, token: str) -> None:
    """Delete, by name, the files of a replaced output folder that persimmon-tools wrote; anything else that
    appeared there meanwhile is kept (the folder is then renamed to a visible ``NAME.previous-TOKEN``)."""
    ours = (read_record(old, kind.record) or set()) | set(kind.also_own)
    last = [n for n in (kind.record, RUN_MARKER) if n]
    for name in [n for n in sorted(ours) if n not in last] + last:
        _unlink_inside(old, name)
    parents = {p.as_posix() for f in ours for p in Path(f).parents if p != Path(".")}
    for folder in sorted(parents, key=lambda p: p.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(old / folder)  # only when empty; a link is not a folder and stays
    try:
        os.rmdir(old)
    except OSError:
        keep = out.with_name(f"{temp_stem(out.name)}.previous-{token}")
        os.rename(old, keep)
        log.warning(
            "files that persimmon-tools did not write appeared in %s during the run: kept in %s", out, keep
        )


def _proof(entry: Path, prefixes: tuple[str, ...]) -> tuple[dict | None, str]:
    """The marker of a leftover named like ours, and why it is not removable ("" when it is)."""
    marker = None if entry.is_symlink() or not entry.is_dir() else read_marker(entry)
    token = marker["token"] if marker else ""
    proven = marker is not None and (
        entry.name.startswith(f"{prefixes[0]}{token}-") or entry.name == f"{prefixes[-1]}{token}"
    )
    if not proven:
        return None, "it has no valid persimmon-tools marker"
    return marker, "its creating process is still running" if pid_alive(marker["pid"]) else ""


def _kept(entry: Path, out: Path, kind: OutputKind, why: str) -> None:
    log.warning(
        "%s looks like a leftover of an interrupted %s into %s but %s; left in place "
        "(delete it yourself if you do not need it)",
        entry,
        kind.run,
        out,
        why,
    )


def recover_leftovers(out: Path, kind: OutputKind) -> None:
    """Name every leftover of an interrupted run beside (or inside) ``out``; remove or restore the provably
    ours. Called with the lock held, so no live run of ours can own them."""
    with contextlib.suppress(FileNotFoundError):
        marker = read_marker(out)
        if marker is not None and not pid_alive(marker["pid"]):
            os.unlink(out / RUN_MARKER)
    if out.is_dir() and not out.is_symlink():
        recover_inner(out, kind)
    stem = temp_stem(out.name)  # the NAME part of the leftovers' names, as the run that made them wrote it
    prefixes = (f".{stem}.tmp-", f".{stem}.old-")
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith(prefixes):
            continue
        marker, why = _proof(entry, prefixes)
        if marker is None or why:
            _kept(entry, out, kind, why)
        elif marker["role"] == "new":
            remove_tree(entry)
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
            remove_replaced(entry, out, kind, marker["token"])
            log.warning("removed the files of the replaced %s left in %s by an interrupted run", out, entry)


def recover_inner(folder: Path, kind: OutputKind) -> None:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(INNER_PREFIX):
            marker, why = _proof(entry, (INNER_PREFIX,))
            if marker is None or why or marker["role"] != "new":
                _kept(entry, folder, kind, why or "it is not a temporary folder")
                continue
            remove_tree(entry)
            log.warning(
                "removed %s, the temporary folder of an interrupted run (PID %d)", entry, marker["pid"]
            )
