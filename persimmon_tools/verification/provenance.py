"""Is ``--reference`` the source this folder was converted from? And may a run replace the folder's report?

``conversion.json`` records the checkpoint files a conversion read (``source.checkpoint_files``: name and
size) and its iteration; ``verification.json`` records the files a verify read (name, size, sha256). Files
are compared by their last three path parts (``iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt``) and size, so a
tarball and its extracted folder count as the same source.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.fingerprint import CONVERSION_FILE
from persimmon_tools.errors import VerificationError
from persimmon_tools.safe_read import read_json_record

log = logging.getLogger(__name__)


def _record(path: Path) -> dict[str, Any] | None:
    try:
        return read_json_record(path, what=path.name, error=VerificationError)
    except VerificationError as err:
        log.warning("%s", err.message)
        return None


def _shards(entries: Any, *, sha256: bool) -> set[tuple[str, int, str | None]]:
    """Checkpoint shards (``.pt``) by (last three path parts, size, sha256). Without ``sha256``, or when any
    entry was not hashed (verify without source hashing), the third part is None for all."""
    out = set()
    for f in entries if isinstance(entries, list) else []:
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)):
            continue
        if f["name"].endswith(".pt"):
            sha = f.get("sha256") if sha256 and isinstance(f.get("sha256"), str) else None
            out.add(("/".join(f["name"].split("/")[-3:]), f["size"], sha))
    if any(sha is None for *_, sha in out):
        out = {(name, size, None) for name, size, _ in out}
    return out


def reference_mismatch(out_dir: Path, source: dict[str, Any]) -> str | None:
    """Why ``source`` (this run's source fingerprint) is not what ``conversion.json`` says the folder was
    converted from, or None when they agree or the folder has no usable record."""
    record = _record(Path(out_dir) / CONVERSION_FILE)
    recorded = (record or {}).get("source") or {}
    if not isinstance(recorded, dict):
        return None
    was = _shards(recorded.get("checkpoint_files"), sha256=False)
    now = _shards(source.get("files"), sha256=False)
    if was and now and was != now:
        only_was = sorted(was - now)[:2]
        return (
            f"conversion.json says the folder was converted from {recorded.get('name') or recorded.get('path')} "
            f"(e.g. {only_was[0][0]}, {only_was[0][1]:,} bytes), which --reference does not hold"
            if only_was
            else f"--reference holds other checkpoint files than {recorded.get('name')} did"
        )
    it_was, it_now = recorded.get("iteration"), source.get("iteration")
    if isinstance(it_was, int) and isinstance(it_now, int) and it_was != it_now:
        return f"conversion.json says iteration {it_was}, --reference gives iteration {it_now}"
    return None


def keep_existing_report(report_path: Path, source: dict[str, Any], passed: bool) -> str | None:
    """Why a run must not replace the report at ``report_path``: it passed, and this run (which did not
    pass) read another source. None when replacing it is fine."""
    if passed:
        return None
    old = _record(report_path)
    if not old or old.get("verdict") != "pass":
        return None
    before = _shards((old.get("source") or {}).get("files"), sha256=True)
    now = _shards(source.get("files"), sha256=True)
    if before and now and before != now:
        return (
            f"{report_path} records a passing verification against {(old.get('source') or {}).get('path')}; "
            "this failing run read another source, so it was not written over it"
        )
    return None
