"""Where a Megatron-Core ``torch_dist`` checkpoint is, and whether a folder is one (no tensor is opened).

A torch_dist iteration folder holds ``metadata.json`` (the backends), ``.metadata``, the ``*.distcp`` data
files and ``common.pt``; Megatron-LM puts it at ``ROOT/iter_{iteration:07d}/`` beside
``ROOT/latest_checkpointed_iteration.txt`` (:mod:`persimmon_tools.megatron.dist_checkpoint` has the whole
layout). SOURCE may be the iteration folder or ROOT: ROOT's tracker, ``--iteration``, or its only
``iter_*`` folder holding ``metadata.json`` chooses the iteration (:func:`locate`, the ASCII-digit folder
names of :mod:`persimmon_tools.megatron.release`; one iteration under two spellings is refused).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from persimmon_tools.errors import PersimmonToolsError, ReleaseError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.release import TRACKER, _parse_tracker, release_file
from persimmon_tools.safe_graph import small_repr
from persimmon_tools.safe_read import parse_json, read_small

METADATA_JSON = "metadata.json"
METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
_MAX_JSON = 64 << 10
_ITER = re.compile(r"iter_([0-9]+)")
_HINT = (
    "pass a Megatron-Core torch_dist checkpoint: its root (with latest_checkpointed_iteration.txt) or one "
    "iter_XXXXXXX folder"
)


def _children(root: Path) -> tuple[dict[int, list[Path]], bool]:
    """``iter_*`` folders of ``root`` holding ``metadata.json`` (by iteration), and whether any holds
    ``mp_rank_*`` shards (a legacy iteration)."""
    found: dict[int, list[Path]] = {}
    legacy = False
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return {}, False
    for name in names:
        m = _ITER.fullmatch(name)
        if m is None or not (root / name).is_dir():
            continue
        if os.path.lexists(root / name / METADATA_JSON):
            found.setdefault(int(m[1]), []).append(root / name)
        else:
            try:
                legacy = legacy or any(n.startswith("mp_rank_") for n in os.listdir(root / name))
            except OSError:
                continue
    return found, legacy


def locate(source: Path, iteration: int | None = None) -> tuple[Path, Path, int | None, ByteSource | None]:
    """``(iteration folder, root, iteration the folders say, tracker)`` of a torch_dist SOURCE; ReleaseError
    when the iteration cannot be chosen (several and no tracker, missing, two spellings)."""
    source = Path(source)
    here = Path(os.path.abspath(source))
    if os.path.lexists(source / METADATA_JSON):
        m = _ITER.fullmatch(here.name)
        said = int(m[1]) if m else None
        if iteration is not None and said is not None and iteration != said:
            raise ReleaseError(
                f"{source} is iteration {said}, not {iteration}", hint="pass ROOT with --iteration"
            )
        root = source.parent if m else source
        tracker = root / TRACKER
        return source, root, said, release_file(tracker, TRACKER) if m and os.path.lexists(tracker) else None
    children, _ = _children(source)
    tracker = release_file(source / TRACKER, TRACKER) if os.path.lexists(source / TRACKER) else None
    names = ", ".join(p.name for ps in children.values() for p in ps) or "none"
    if iteration is None:
        if tracker is not None:
            iteration = _parse_tracker(tracker)
        elif len(children) == 1:
            iteration = next(iter(children))
        else:
            raise ReleaseError(
                f"{source} holds several torch_dist iterations and no {TRACKER}: {names}",
                hint="pass --iteration N",
            )
    found = children.get(iteration, [])
    if not found:
        raise ReleaseError(
            f"{source}: iteration {iteration} has no torch_dist folder "
            f"(iter_{iteration:07d}/{METADATA_JSON}); found {names}",
            hint=f"fix {TRACKER} or pass --iteration N",
        )
    if found[0].is_symlink():
        raise ReleaseError(
            f"{source}: {found[0].name} is a symbolic link; links inside a checkpoint folder are not followed",
            hint=f"copy the real folder into {source} (cp -r --dereference), or pass the folder itself",
        )
    if len(found) > 1:
        raise ReleaseError(
            f"{source}: iteration {iteration} appears under two folder names, {found[0].name} and "
            f"{found[1].name}",
            hint="remove or rename one of the two folders (Megatron writes iter_{iteration:07d})",
        )
    return found[0], source, iteration, tracker


def looks_like_torch_dist(source: Path, iteration: int | None = None) -> bool:
    """Whether SOURCE is a distributed checkpoint (``metadata.json`` in it, or in the ``iter_*`` folder its
    tracker or ``iteration`` chooses, or in its ``iter_*`` folders when none holds legacy shards), whatever
    its backend says: :func:`open_torch_dist` then reads it or says why not."""
    source = Path(source)
    if not source.is_dir():
        return False
    if os.path.lexists(source / METADATA_JSON):
        return True
    children, legacy = _children(source)
    if not children:
        return False
    try:
        locate(source, iteration)
    except PersimmonToolsError:
        return not legacy
    return True


def is_torch_dist(path: Path, *, iteration: int | None = None) -> bool:
    """A folder with ``metadata.json`` saying ``sharded_backend: torch_dist``, or a ROOT whose tracker (or
    ``iteration``, or its only ``iter_*`` folder) chooses such an ``iter_*`` folder."""
    try:
        return (
            looks_like_torch_dist(path, iteration)
            and metadata_json(locate(Path(path), iteration)[0])[0].get("sharded_backend") == "torch_dist"
        )
    except PersimmonToolsError:
        return False


def metadata_json(folder: Path) -> tuple[dict[str, Any], ByteSource]:
    """``folder/metadata.json`` parsed (a small regular file, not a link; ReleaseError otherwise), and the
    file as a byte source."""
    path = folder / METADATA_JSON
    src = ByteSource.whole_file(path, what="metadata.json", max_bytes=_MAX_JSON, follow_symlinks=False)
    data = read_small(
        path, what="metadata.json", max_bytes=_MAX_JSON, follow_symlinks=False, error=ReleaseError
    )
    return parse_json(data, origin=str(path), error=ReleaseError, hint=_HINT), src


def check_backend(info: dict[str, Any], where: Path) -> None:
    """Refuse a ``metadata.json`` naming other backends than ``torch_dist`` 1 and ``torch`` 1 (``zarr``, a
    newer version, ...)."""
    backend = (info.get("sharded_backend"), info.get("sharded_backend_version"))
    common = (info.get("common_backend", "torch"), info.get("common_backend_version", 1))
    if backend != ("torch_dist", 1) or common != ("torch", 1):
        raise ReleaseError(
            f"{where / METADATA_JSON}: the checkpoint's backends are {small_repr(backend, 60)} (sharded) and "
            f"{small_repr(common, 60)} (common); this reader reads ('torch_dist', 1) and ('torch', 1)",
            hint="save the checkpoint with Megatron-LM's --ckpt-format torch_dist (or convert it to it)",
        )
