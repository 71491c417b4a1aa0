"""Find the checkpoint shards and the vocabulary inside a release, without extracting anything.

SOURCE may be:
- a release tarball (``8b_chat_model_release.tar``), read in place: member data are byte ranges of the tar;
- an extracted release folder (holding ``latest_checkpointed_iteration.txt``, ``adept_vocab.model``,
  ``iter_XXXXXXX/``);
- one ``iter_XXXXXXX`` folder (shards ``mp_rank_XX`` or ``mp_rank_XX_YYY`` inside);
- one ``model_optim_rng.pt`` file, or the ``mp_rank_XX`` (``mp_rank_XX_YYY``) folder holding it: the same
  single shard (TP=1, PP=1); a folder that is one rank of a sharded release (other ``mp_rank_*`` beside it,
  a rank other than 0, or args saying TP or PP > 1) is refused, naming the ``iter_*`` folder to give instead;
- a Megatron-Core ``torch_dist`` checkpoint (since 2026-12-07, 0.1.0): its root (tracker and ``iter_*``
  folders), or one iteration's folder (``metadata.json``, ``.metadata``, ``*.distcp``, ``common.pt``). It is
  detected before the folder discovery below and opened by
  :func:`~persimmon_tools.megatron.dist_checkpoint.dist_release` as ``kind="torch_dist"``, TP=1, PP=1 (its
  tensors are stored whole, as chunks), no shards (:attr:`Release.dist` holds it; :meth:`Release.source_files`
  lists its files). An ``adept_vocab.model`` in the root or the iteration folder is used as the vocabulary;
  otherwise pass ``--vocab``.

The iteration comes from ``latest_checkpointed_iteration.txt`` when present, else from the only
``iter_*`` folder (spec §A). Shards form a complete TP×PP grid: ``mp_rank_{tp:02d}`` without pipeline
parallelism, ``mp_rank_{tp:02d}_{pp:03d}`` with it. Folder numbers are ASCII digits only; a path that
looks like a shard but is not spelled canonically, and one iteration under two spellings (``iter_0001251``
and ``iter_1251``), are refused. A tar is listed to its end-of-archive marker (:mod:`.tarlist`). Base/chat
comes from the release's own name (:mod:`.variant`).

A release tarball or folder holding ``integrity.json`` (written by ``export``; :mod:`.manifest`) is checked
against it here, before anything else is read: every listed file must exist with the listed size and sha256
(one sequential read of the listed files; a CheckpointError names the file that differs).
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.manifest import check_release_manifest
from persimmon_tools.megatron.tarlist import tar_tree
from persimmon_tools.megatron.variant import decide_variant
from persimmon_tools.safe_read import MAX_TRACKER_BYTES, MAX_VOCAB_BYTES, describe_irregular, scan_folder

if TYPE_CHECKING:
    from persimmon_tools.megatron.dist_checkpoint import DistCheckpoint

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
VOCAB = "adept_vocab.model"
SHARD_FILES = ("model_optim_rng.pt", "model_rng.pt")
# ASCII digits only: Python's \d and int() also accept other scripts' digits ("iter_١٢٥١").
SHARD_RE = re.compile(
    r"^(?P<root>(?:.*/)?)iter_(?P<it>[0-9]+)/mp_rank_(?P<tp>[0-9]{2})(?:_(?P<pp>[0-9]{3}))?/"
    r"(?P<file>model_optim_rng|model_rng)\.pt$"
)
#: Anything that looks like a shard path; one that is not also canonical (SHARD_RE) is refused.
SHARD_LIKE_RE = re.compile(r"(?:^|/)iter_[^/]*/mp_rank_[^/]*/(?:model_optim_rng|model_rng)\.pt$")
ITER_DIR_RE = re.compile(r"iter_[0-9]+")
RANK_DIR_RE = re.compile(r"mp_rank_(?P<tp>[0-9]{2})(?:_(?P<pp>[0-9]{3}))?")


@dataclass(frozen=True)
class Release:
    """What a SOURCE holds: the shard grid of one iteration and the vocabulary (if found)."""

    source: Path
    kind: str  # "tar" | "folder" | "iteration" | "pt" | "torch_dist"
    iteration: int | None
    shards: dict[tuple[int, int], ByteSource]  # (tp_rank, pp_rank) -> model_optim_rng.pt
    tp: int
    pp: int
    vocab: ByteSource | None
    pipeline_naming: bool = False
    other_files: list[str] = field(default_factory=list)
    #: ``base`` / ``chat`` from the release's own name (see :mod:`persimmon_tools.megatron.variant`), else
    #: ``unknown``; ``variant_from`` says which name decided, or why it is unknown.
    variant: str = "unknown"
    variant_from: str | None = None
    #: The folder name each shard was found under (``iter_0001251/mp_rank_00_001``), for messages.
    shard_dirs: dict[tuple[int, int], str] = field(default_factory=dict)
    #: The release folder inside SOURCE (``8b_chat_model_release/``; "" when SOURCE is that folder).
    root: str = ""
    #: A Megatron-Core torch_dist checkpoint (``kind == "torch_dist"``; ``shards`` is then empty).
    dist: DistCheckpoint | None = None

    @property
    def name(self) -> str:
        return self.source.name

    def shard_label(self, rank: tuple[int, int]) -> str:
        """How messages name a shard: its folder (``iter_0001251/mp_rank_00_001``) or its file."""
        return self.shard_dirs.get(rank) or _rank_dir(*rank, self.pipeline_naming)

    def shard_list(self) -> list[tuple[tuple[int, int], ByteSource]]:
        return sorted(self.shards.items())

    def source_files(self) -> list[ByteSource]:
        """The checkpoint's files, in a fixed order: the shards (rank order), or a torch_dist checkpoint's
        ``metadata.json``, ``.metadata``, ``common.pt`` and data files. The vocabulary is not among them."""
        if self.dist is not None:
            return list(self.dist.files)
        return [src for _, src in self.shard_list()]


def release_file(path: Path, name: str) -> ByteSource:
    """A shard, tracker or vocabulary found inside a release folder: a regular file, not a link, bounded."""
    what, limit = {
        TRACKER: ("the iteration tracker", MAX_TRACKER_BYTES),
        VOCAB: ("the vocabulary", MAX_VOCAB_BYTES),
    }.get(name, ("a checkpoint shard", None))
    return ByteSource.whole_file(path, what=what, max_bytes=limit, follow_symlinks=False)


def _relevant(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name in SHARD_FILES or name in (TRACKER, VOCAB) or name.startswith(("iter_", "mp_rank_"))


def _folder_tree(path: Path, max_depth: int = 4) -> dict[str, ByteSource]:
    """Shards, trackers and vocabularies below ``path``. Links, FIFOs, devices and sockets are never read:
    one named like a release file or folder is refused, any other is skipped (logged)."""
    scan = scan_folder(path, max_depth=max_depth)
    refused = {rel: kind for rel, kind in scan.irregular.items() if _relevant(rel)}
    if refused:
        raise ReleaseError(
            f"{path}: {describe_irregular(refused)} inside the release folder; only regular files and folders "
            "are read there (links are not followed)",
            hint="copy the real files into the release folder (cp --dereference), or pass the file itself",
        )
    if scan.irregular:
        log.info("%s: skipped %s (not regular files)", path, describe_irregular(scan.irregular))
    tree: dict[str, ByteSource] = {}
    for rel in scan.files:
        name = rel.rsplit("/", 1)[-1]
        if name in SHARD_FILES or name in (TRACKER, VOCAB):
            tree[rel] = release_file(path / rel, name)
    return tree


def _parse_tracker(src: ByteSource) -> int:
    if src.size > MAX_TRACKER_BYTES:  # a tar member: its size comes from the header
        raise ReleaseError(
            f"{src.name} is {src.size} bytes; an iteration tracker holds one number (at most "
            f"{MAX_TRACKER_BYTES} bytes), so it was not read",
            hint="pass --iteration N to choose the iter_XXXXXXX folder explicitly",
        )
    text = src.read_all().decode("utf-8", "replace").strip()
    try:
        value = int(text)
    except ValueError:
        raise ReleaseError(
            f"{src.name} should hold an iteration number, found {text[:40]!r}",
            hint="pass --iteration N to choose the iter_XXXXXXX folder explicitly",
        ) from None
    if value <= 0:
        raise ReleaseError(
            f"{src.name} holds {value}; Megatron requires a positive iteration", hint="pass --iteration N"
        )
    return value


def _discover(
    tree: dict[str, ByteSource],
    source: Path,
    kind: str,
    iteration: int | None,
    witnesses: Callable[[str], list[tuple[str, str]]],
) -> Release:
    """The shard grid of one iteration in ``tree`` (relative path -> bytes); ``witnesses(root)`` names the
    release for :func:`~persimmon_tools.megatron.variant.decide_variant` (root: the release folder's path)."""
    found: dict[tuple[str, int], dict[tuple[int, int], tuple[ByteSource, bool, str]]] = {}
    spelling: dict[tuple[str, int], str] = {}
    for rel, src in sorted(tree.items()):
        m = SHARD_RE.match(rel)
        if not m:
            if SHARD_LIKE_RE.search(rel):
                raise ReleaseError(
                    f"{source}: {rel} looks like a checkpoint shard but its folders are not spelled "
                    "iter_<digits>/mp_rank_<2 digits>[_<3 digits>] (ASCII digits)",
                    hint="rename the folders the way Megatron writes them (iter_0001251/mp_rank_00) or remove them",
                )
            continue
        key = (m["root"], int(m["it"]))
        it_dir = f"iter_{m['it']}"
        if spelling.setdefault(key, it_dir) != it_dir:
            raise ReleaseError(
                f"{source}: iteration {key[1]} appears under two folder names, {m['root']}{spelling[key]} and "
                f"{m['root']}{it_dir}; which one holds the checkpoint is ambiguous",
                hint="remove or rename one of the two folders (Megatron writes iter_{iteration:07d})",
            )
        grid = found.setdefault(key, {})
        rank = (int(m["tp"]), int(m["pp"]) if m["pp"] is not None else 0)
        if rank in grid:
            raise ReleaseError(
                f"{source}: two checkpoint files for rank {rank} in {rel}",
                hint="keep either model_optim_rng.pt or model_rng.pt",
            )
        rank_dir = rel[len(m["root"]) :].rsplit("/", 1)[0]
        grid[rank] = (src, m["pp"] is not None, rank_dir)
    if not found:
        raise ReleaseError(
            f"{source}: no checkpoint found (expected iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt)",
            hint="pass the release tarball, its extracted folder, an iter_* folder or a model_optim_rng.pt file",
        )
    roots = sorted({root for root, _ in found})
    if len(roots) > 1:
        raise ReleaseError(
            f"{source} holds several releases: {', '.join(r or '.' for r in roots)}",
            hint="pass one of those folders as SOURCE",
        )
    root = roots[0]
    iterations = sorted(it for _, it in found)
    names = ", ".join(spelling[(root, it)] for it in iterations)
    tracker = tree.get(root + TRACKER)
    if iteration is None and tracker is not None:
        iteration = _parse_tracker(tracker)
        log.debug("iteration %d from %s", iteration, tracker.name)
    elif tracker is not None:  # chosen by --iteration or by naming an iter_* folder: say so if they differ
        try:
            latest = _parse_tracker(tracker)
        except ReleaseError:
            latest = None
        if latest != iteration:
            log.info("reading iteration %d; %s names %s", iteration, tracker.name, latest)
    if iteration is None:
        if len(iterations) > 1:
            raise ReleaseError(
                f"{source} holds several iterations and no {TRACKER}: {names}", hint="pass --iteration N"
            )
        iteration = iterations[0]
    if (root, iteration) not in found:
        raise ReleaseError(
            f"{source}: iteration {iteration} has no shards; found {names}",
            hint=f"fix {TRACKER} or pass --iteration N",
        )
    grid = found[(root, iteration)]
    it_dir = spelling[(root, iteration)]
    naming = {pp_named for _, pp_named, _ in grid.values()}
    if len(naming) > 1:
        raise ReleaseError(
            f"{source}: {it_dir} mixes mp_rank_XX and mp_rank_XX_YYY folders",
            hint="remove the stray shard folders",
        )
    tp = max(t for t, _ in grid) + 1
    pp = max(p for _, p in grid) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in grid]
    if missing:
        names = ", ".join(_rank_dir(t, p, naming == {True}) for t, p in missing)
        raise ReleaseError(
            f"{source}: {it_dir} is missing shard(s) {names} of a TP={tp} x PP={pp} grid",
            hint="copy the missing mp_rank_* folders; every tensor/pipeline rank is needed",
        )
    vocab = tree.get(root + VOCAB)
    if vocab is not None and vocab.size > MAX_VOCAB_BYTES:  # a tar member (files were checked when found)
        raise ReleaseError(
            f"{vocab.name} is {vocab.size} bytes; a SentencePiece vocabulary is at most {MAX_VOCAB_BYTES} bytes "
            "(ADEPT's is 6.13 MB), so it was not read",
            hint="the release is damaged; pass --vocab with the right adept_vocab.model",
        )
    variant, variant_from = decide_variant(witnesses(root))
    return Release(
        source=source,
        kind=kind,
        iteration=iteration,
        shards={rank: src for rank, (src, _, _) in grid.items()},
        tp=tp,
        pp=pp,
        vocab=vocab,
        pipeline_naming=naming == {True},
        variant=variant,
        variant_from=variant_from,
        shard_dirs={rank: d for rank, (_, _, d) in grid.items()},
        root=root,
    )


def _rank_dir(tp: int, pp: int, pipeline_naming: bool) -> str:
    return f"mp_rank_{tp:02d}_{pp:03d}" if pipeline_naming else f"mp_rank_{tp:02d}"


def open_release(source: Path, *, iteration: int | None = None, vocab: Path | None = None) -> Release:
    """Locate shards and vocabulary in SOURCE (tar, release folder, iter_* folder, one .pt file or its
    mp_rank folder)."""
    from persimmon_tools.megatron.single_shard import rank_folder, single_pt  # it builds on this module

    source = Path(source)
    if not source.exists():
        raise ReleaseError(f"{source} does not exist", hint="check the path")
    if not source.is_dir() and not source.is_file():
        raise ReleaseError(
            f"{source} is not a regular file or folder (a device, FIFO or socket)",
            hint="pass the release tarball, its extracted folder, an iter_* folder or a model_optim_rng.pt",
        )
    own_name = Path(os.path.abspath(source)).name  # "." and ".." resolved, symlinks kept as named
    from persimmon_tools.megatron.dist_checkpoint import dist_release, looks_like_torch_dist  # builds on this

    if looks_like_torch_dist(source, iteration):
        release = dist_release(source, iteration)
    elif (
        source.is_dir()
        and RANK_DIR_RE.fullmatch(own_name)
        and any(os.path.lexists(source / n) for n in SHARD_FILES)
    ):
        release = rank_folder(source)
    elif source.is_dir():
        kind = "iteration" if ITER_DIR_RE.fullmatch(source.name) else "folder"
        tree = _folder_tree(source)
        if kind == "iteration":
            tree = {f"{source.name}/{k}": v for k, v in tree.items()}
            for extra in (TRACKER, VOCAB):  # the release root is the parent of iter_*
                parent_file = source.parent / extra
                if os.path.lexists(parent_file):
                    tree[extra] = release_file(parent_file, extra)
            if iteration is None:
                iteration = int(source.name[5:])
        release = _discover(tree, source, kind, iteration, lambda root: _folder_witnesses(source, kind, root))
        if kind == "folder":
            check_release_manifest(source, release.root, None)
    elif source.suffix == ".pt":
        release = single_pt(source)
    elif tarfile.is_tarfile(source) or source.suffix == ".tar":
        members = tar_tree(source)
        release = _discover(members, source, "tar", iteration, lambda root: _tar_witnesses(own_name, root))
        check_release_manifest(source, release.root, members)
    else:
        raise ReleaseError(
            f"{source} is neither a folder, a .tar release nor a .pt checkpoint",
            hint="pass the release tarball, its extracted folder, an iter_* folder or a model_optim_rng.pt",
        )
    if vocab is not None:
        given = ByteSource.whole_file(Path(vocab), what="the vocabulary (--vocab)", max_bytes=MAX_VOCAB_BYTES)
        release = _replace_vocab(release, given)
    log.debug("variant %s (%s)", release.variant, release.variant_from)
    return release


def holds_release_files(folder: Path) -> bool:
    return (folder / TRACKER).is_file() or (folder / VOCAB).is_file()


def _tar_witnesses(tar_name: str, root: str) -> list[tuple[str, str]]:
    """The tar's top folder (``root``, when there is one) and the tarball's own name."""
    folder = [(f"release folder {PurePosixPath(root).name} inside {tar_name}", PurePosixPath(root).name)]
    return (folder if root else []) + [(f"tarball name {tar_name}", tar_name)]


def _folder_witnesses(source: Path, kind: str, root: str) -> list[tuple[str, str]]:
    """The release folder's name for a folder or iter_* SOURCE (``root``: the release folder inside it)."""
    here = Path(os.path.abspath(source))
    if kind == "iteration":
        parent = here.parent
        if holds_release_files(parent):
            return [(f"release folder {parent.name} (parent of {here.name})", parent.name)]
        return []
    if root:
        name = PurePosixPath(root).name
        return [(f"release folder {name} inside {here.name}", name)]
    return [(f"release folder name {here.name}", here.name)]


def _replace_vocab(release: Release, vocab: ByteSource) -> Release:
    from dataclasses import replace

    return replace(release, vocab=vocab)
