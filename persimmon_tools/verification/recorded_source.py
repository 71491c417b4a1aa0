"""``verify OUT_DIR`` without ``--reference``: the source ``conversion.json`` records, if it is still that source.

``convert`` records in ``OUT_DIR/conversion.json`` the source's absolute path, its iteration and every
checkpoint shard it read (``source.checkpoint_files``: name and size); the automatic verify at the end of
``convert`` records in ``verification.json`` the sha256 of each shard it read, under the same path. Without
``--reference`` verify uses that path, and only while it is the same source:

1. before anything is read (:func:`recorded_source`, :func:`check_release`): the path still exists and opens
   as a release, with the recorded iteration and exactly the recorded shards (the last three parts of each
   name, ``iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt``, and the size);
2. after the weights were read (:func:`check_digests`): each shard's sha256, computed while reading, equals
   the sha256 recorded for it (in ``conversion.json`` when it holds one, else in a ``verification.json`` of
   the same path), so a file rewritten in place with the same size is caught before any report is written.

Anything else is a :class:`~persimmon_tools.errors.UsageError` (exit 2: the command needs ``--reference``)
naming the recorded path and what differs; since 2026-12-07 ``verify`` checks the folder against its
stored reference record instead when it has one (:mod:`persimmon_tools.verification.stored`).
``--reference`` is the way to verify against a copy that moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.fingerprint import CONVERSION_FILE, VERIFICATION_FILE
from persimmon_tools.errors import PersimmonToolsError, UsageError
from persimmon_tools.megatron.release import Release, open_release
from persimmon_tools.safe_read import read_json_record
from persimmon_tools.verification.report import member_name

log = logging.getLogger(__name__)

_HINT = "pass --reference SOURCE (the release this folder was converted from, wherever it is now)"


def _tail(name: str) -> str:
    return "/".join(name.split("/")[-3:])


@dataclass(frozen=True)
class RecordedSource:
    """The source ``OUT_DIR/conversion.json`` records: ``shards`` maps each shard's name tail to its size
    and, where recorded, sha256 (``sha256_from`` names the record)."""

    path: Path
    record: Path
    iteration: int | None
    shards: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    sha256_from: str | None = None

    def describe(self, *, hashed: bool) -> str:
        """For the info line: what was checked before reading, and what will be after."""
        n = len(self.shards)
        checked = f"{n} checkpoint shard(s) with the recorded names and sizes"
        if self.sha256_from is None:
            return checked + "; no sha256 recorded to compare"
        if not hashed:
            return checked + f"; the sha256 recorded in {self.sha256_from} not compared (--no-source-hash)"
        return checked + f"; their sha256 is compared with {self.sha256_from} as they are read"


def _fail(recorded: Path | str, record: Path, what: str) -> UsageError:
    return UsageError(
        f"no --reference given, and the source recorded in {record}, {recorded}, {what}", hint=_HINT
    )


def _record(path: Path) -> dict[str, Any] | None:
    return read_json_record(path, what=f"the {path.name} record", error=UsageError, hint=_HINT)


def _recorded_digests(out_dir: Path, path: str, entries: list[Any]) -> tuple[dict[str, str], str | None]:
    """``{shard tail: sha256}`` from conversion.json's entries, else from a verification.json of ``path``."""
    found = {_tail(f["name"]): f["sha256"] for f in entries if isinstance(f.get("sha256"), str)}
    if found:
        return found, CONVERSION_FILE
    try:
        report = _record(out_dir / VERIFICATION_FILE) or {}
    except PersimmonToolsError as err:  # a damaged report is no record: sizes are still compared
        log.warning("%s", err.message)
        return {}, None
    source = report.get("source") if isinstance(report.get("source"), dict) else {}
    if source.get("path") != path or not isinstance(source.get("files"), list):
        return {}, None
    found = {
        _tail(f["name"]): f["sha256"]
        for f in source["files"]
        if isinstance(f, dict) and isinstance(f.get("name"), str) and str(f["name"]).endswith(".pt")
        if isinstance(f.get("sha256"), str)
    }
    return found, VERIFICATION_FILE if found else None


def recorded_source(out_dir: Path) -> RecordedSource:
    """The source ``out_dir/conversion.json`` records, if that path still exists (reads nothing else).

    Raises:
        UsageError: no conversion.json, no source path in it, or the path is gone.
    """
    record = Path(out_dir) / CONVERSION_FILE
    conv = _record(record)
    src = (conv or {}).get("source")
    if not isinstance(src, dict) or not isinstance(src.get("path"), str) or not src["path"]:
        why = "does not exist" if conv is None else "records no source path"
        raise UsageError(
            f"no --reference given, and {record} {why}, so verify cannot tell what to compare with",
            hint=_HINT,
        )
    entries = [
        f
        for f in src.get("checkpoint_files") or []
        if isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)
    ]
    digests, sha_from = _recorded_digests(Path(out_dir), src["path"], entries)
    shards = {_tail(f["name"]): (f["size"], digests.get(_tail(f["name"]))) for f in entries}
    iteration = src.get("iteration") if isinstance(src.get("iteration"), int) else None
    path = Path(src["path"])
    if not path.exists():
        raise _fail(path, record, "no longer exists")
    return RecordedSource(path, record, iteration, shards, sha_from)


def open_recorded(recorded: RecordedSource, *, iteration: int | None, vocab: Path | None) -> Release:
    """The release at the recorded path (the recorded iteration unless ``iteration`` is given), refused
    unless it holds exactly the recorded shards with the recorded sizes (nothing of the weights is read)."""
    if iteration is not None and recorded.iteration is not None and iteration != recorded.iteration:
        raise _fail(
            recorded.path,
            recorded.record,
            f"was converted at iteration {recorded.iteration}; --iteration {iteration} asks for another checkpoint",
        )
    try:
        release = open_release(recorded.path, iteration=recorded.iteration, vocab=vocab)
    except PersimmonToolsError as err:
        what = f"cannot be opened as that release any more ({err.message})"
        raise _fail(recorded.path, recorded.record, what) from err
    check_release(recorded, release, [member_name(release, src) for src in release.source_files()])
    return release


def check_release(recorded: RecordedSource, release: Release, names: list[str]) -> None:
    """Refuse ``release`` unless it holds exactly the recorded shards, with the recorded sizes.

    ``names``: each checkpoint file's name as verify records it, in ``release.source_files()`` order.
    """
    now = {_tail(n): src.size for n, src in zip(names, release.source_files(), strict=True)}
    if not recorded.shards:
        raise _fail(recorded.path, recorded.record, "is recorded without its checkpoint files to check it by")
    problems = [f"lacks the recorded {name}" for name in sorted(set(recorded.shards) - set(now))]
    problems += [f"holds {name}, which is not recorded" for name in sorted(set(now) - set(recorded.shards))]
    problems += [
        f"{tail} is {now[tail]:,} bytes, the record says {size:,}"
        for tail, (size, _) in sorted(recorded.shards.items())
        if tail in now and now[tail] != size
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        what = "is not the recorded source any more: " + "; ".join(problems[:3]) + more
        raise _fail(recorded.path, recorded.record, what)


def check_digests(recorded: RecordedSource, files: list[dict[str, Any]]) -> None:
    """Refuse the run when a shard's sha256, computed while reading (``files``: the report's
    ``source.files``), differs from the recorded one. Unhashed runs (``--no-source-hash``) are not judged."""
    for f in files:
        tail = _tail(str(f.get("name")))
        want = recorded.shards.get(tail, (None, None))[1]
        got = f.get("sha256")
        if want is not None and got is not None and got != want:
            raise _fail(
                recorded.path,
                recorded.record,
                f"has changed since {recorded.sha256_from} recorded it: {tail} has the recorded size but sha256 "
                f"{got[:12]}…, not {want[:12]}…; no report was written",
            )
