"""Find the checkpoint shards and the vocabulary inside a release, without extracting anything.

SOURCE may be:
- a release tarball (``8b_chat_model_release.tar``), read in place: member data are byte ranges of the tar;
- an extracted release folder (holding ``latest_checkpointed_iteration.txt``, ``adept_vocab.model``,
  ``iter_XXXXXXX/``);
- one ``iter_XXXXXXX`` folder (shards ``mp_rank_XX`` or ``mp_rank_XX_YYY`` inside);
- one ``model_optim_rng.pt`` file.

The iteration comes from ``latest_checkpointed_iteration.txt`` when present, else from the only
``iter_*`` folder (spec §A). Shards form a complete TP×PP grid: ``mp_rank_{tp:02d}`` without pipeline
parallelism, ``mp_rank_{tp:02d}_{pp:03d}`` with it.
"""

from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.bytesource import ByteSource

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
VOCAB = "adept_vocab.model"
SHARD_FILES = ("model_optim_rng.pt", "model_rng.pt")
_SHARD_RE = re.compile(
    r"^(?P<root>(?:.*/)?)iter_(?P<it>\d+)/mp_rank_(?P<tp>\d{2})(?:_(?P<pp>\d{3}))?/(?P<file>model_optim_rng|model_rng)\.pt$"
)


@dataclass(frozen=True)
class Release:
    """What a SOURCE holds: the shard grid of one iteration and the vocabulary (if found)."""

    source: Path
    kind: str  # "tar" | "folder" | "iteration" | "pt"
    iteration: int | None
    shards: dict[tuple[int, int], ByteSource]  # (tp_rank, pp_rank) -> model_optim_rng.pt
    tp: int
    pp: int
    vocab: ByteSource | None
    pipeline_naming: bool = False
    other_files: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def variant(self) -> str:
        """``base`` / ``chat`` when the source's name says so (e.g. ``8b_chat_model_release``), else ``unknown``."""
        text = str(self.source).lower()
        for variant in ("chat", "base"):
            if re.search(rf"(^|[^a-z]){variant}([^a-z]|$)", text):
                return variant
        return "unknown"

    def shard_list(self) -> list[tuple[tuple[int, int], ByteSource]]:
        return sorted(self.shards.items())


def _tar_tree(path: Path) -> dict[str, ByteSource]:
    """Regular-file members of an uncompressed tar as byte ranges of the tar file itself."""
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the `with tf` below
    except tarfile.ReadError as err:
        raise ReleaseError(
            f"{path} is not an uncompressed tar archive ({err})",
            hint="ADEPT's releases are plain .tar files; decompress first, or run `persimmon-tools unpack`",
        ) from err
    tree: dict[str, ByteSource] = {}
    tar_size = path.stat().st_size
    try:
        with tf:
            for member in tf:
                name = _member_name(path, member)
                if not member.isreg() or member.issparse():
                    if member.isdir():
                        continue
                    if _is_release_file(name):
                        raise ReleaseError(
                            f"{path}: member {member.name!r} is a {_member_kind(member)}, not a regular file; "
                            "refusing to read it",
                            hint="a genuine release holds regular files only; download it again",
                        )
                    log.debug("ignoring %s member %s", _member_kind(member), member.name)
                    continue
                if member.offset_data + member.size > tar_size:
                    raise ReleaseError(
                        f"{path}: member {member.name} runs past the end of the file "
                        f"({member.offset_data + member.size} > {tar_size} bytes)",
                        hint="the tarball is truncated; download it again (and check its md5)",
                    )
                if name in tree and _is_release_file(name):
                    raise ReleaseError(
                        f"{path}: member {name} appears twice", hint="the archive is not a genuine release"
                    )
                tree[name] = ByteSource(path, member.offset_data, member.size, f"{path}:{name}")
    except tarfile.TarError as err:
        raise ReleaseError(
            f"{path} is not a readable tar archive ({err})",
            hint="the tarball is truncated or corrupt; download it again (and check its md5)",
        ) from err
    return tree


def _member_name(path: Path, member: tarfile.TarInfo) -> str:
    """The member's name relative to the archive root; absolute names and ``..`` are refused (a genuine
    release has neither, and ``unpack`` would refuse to extract them)."""
    raw = member.name
    parts = PurePosixPath(raw).parts
    if raw.startswith(("/", "\\")) or ".." in parts or "\\" in raw or "\0" in raw:
        raise ReleaseError(
            f"{path}: member {raw!r} points outside the archive (absolute path or '..')",
            hint="the archive is not a genuine release; nothing was read from it",
        )
    return "/".join(p for p in parts if p not in ("", "."))


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symlink (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.issparse():
        return "sparse file"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return f"tar member of type {member.type!r}"


def _is_release_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in (*SHARD_FILES, TRACKER, VOCAB)


def _folder_tree(path: Path, max_depth: int = 4) -> dict[str, ByteSource]:
    tree: dict[str, ByteSource] = {}
    base_depth = len(path.parts)
    for p in sorted(path.rglob("*")):
        if len(p.parts) - base_depth > max_depth or not p.is_file():
            continue
        rel = p.relative_to(path).as_posix()
        if p.name in SHARD_FILES or p.name in (TRACKER, VOCAB):
            tree[rel] = ByteSource.whole_file(p)
    return tree


def _parse_tracker(src: ByteSource) -> int:
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


def _discover(tree: dict[str, ByteSource], source: Path, kind: str, iteration: int | None) -> Release:
    found: dict[tuple[str, int], dict[tuple[int, int], tuple[ByteSource, bool]]] = {}
    for rel, src in tree.items():
        m = _SHARD_RE.match(rel)
        if not m:
            continue
        key = (m["root"], int(m["it"]))
        grid = found.setdefault(key, {})
        rank = (int(m["tp"]), int(m["pp"]) if m["pp"] is not None else 0)
        if rank in grid:
            raise ReleaseError(
                f"{source}: two checkpoint files for rank {rank} in {rel}",
                hint="keep either model_optim_rng.pt or model_rng.pt",
            )
        grid[rank] = (src, m["pp"] is not None)
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
    tracker = tree.get(root + TRACKER)
    if iteration is None and tracker is not None:
        iteration = _parse_tracker(tracker)
        log.debug("iteration %d from %s", iteration, tracker.name)
    if iteration is None:
        if len(iterations) > 1:
            raise ReleaseError(
                f"{source} holds several iterations and no {TRACKER}: "
                + ", ".join(f"iter_{it:07d}" for it in iterations),
                hint="pass --iteration N",
            )
        iteration = iterations[0]
    if (root, iteration) not in found:
        raise ReleaseError(
            f"{source}: iteration {iteration} has no shards; found "
            + ", ".join(f"iter_{it:07d}" for it in iterations),
            hint=f"fix {TRACKER} or pass --iteration N",
        )
    grid = found[(root, iteration)]
    naming = {pp_named for _, pp_named in grid.values()}
    if len(naming) > 1:
        raise ReleaseError(
            f"{source}: iter_{iteration:07d} mixes mp_rank_XX and mp_rank_XX_YYY folders",
            hint="remove the stray shard folders",
        )
    tp = max(t for t, _ in grid) + 1
    pp = max(p for _, p in grid) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in grid]
    if missing:
        names = ", ".join(_rank_dir(t, p, naming == {True}) for t, p in missing)
        raise ReleaseError(
            f"{source}: iter_{iteration:07d} is missing shard(s) {names} of a TP={tp} x PP={pp} grid",
            hint="copy the missing mp_rank_* folders; every tensor/pipeline rank is needed",
        )
    vocab = tree.get(root + VOCAB)
    return Release(
        source=source,
        kind=kind,
        iteration=iteration,
        shards={rank: src for rank, (src, _) in grid.items()},
        tp=tp,
        pp=pp,
        vocab=vocab,
        pipeline_naming=naming == {True},
    )


def _rank_dir(tp: int, pp: int, pipeline_naming: bool) -> str:
    return f"mp_rank_{tp:02d}_{pp:03d}" if pipeline_naming else f"mp_rank_{tp:02d}"


def open_release(source: Path, *, iteration: int | None = None, vocab: Path | None = None) -> Release:
    """Locate shards and vocabulary in SOURCE (tar, release folder, iter_* folder or one .pt file)."""
    source = Path(source)
    if not source.exists():
        raise ReleaseError(f"{source} does not exist", hint="check the path")
    if not source.is_dir() and not source.is_file():
        raise ReleaseError(
            f"{source} is not a regular file or folder (a device, FIFO or socket)",
            hint="pass the release tarball, its extracted folder, an iter_* folder or a model_optim_rng.pt",
        )
    if source.is_dir():
        kind = "iteration" if re.fullmatch(r"iter_\d+", source.name) else "folder"
        tree = _folder_tree(source)
        if kind == "iteration":
            tree = {f"{source.name}/{k}": v for k, v in tree.items()}
            for extra in (TRACKER, VOCAB):  # the release root is the parent of iter_*
                parent_file = source.parent / extra
                if parent_file.is_file():
                    tree[extra] = ByteSource.whole_file(parent_file)
            if iteration is None:
                iteration = int(source.name[5:])
        release = _discover(tree, source, kind, iteration)
    elif source.suffix == ".pt":
        src = ByteSource.whole_file(source)
        found_vocab = None
        for up in (source.parent.parent.parent, source.parent.parent, source.parent):
            if (up / VOCAB).is_file():
                found_vocab = ByteSource.whole_file(up / VOCAB)
                break
        m = re.fullmatch(r"iter_(\d+)", source.parent.parent.name)
        release = Release(
            source=source,
            kind="pt",
            iteration=int(m[1]) if m else None,
            shards={(0, 0): src},
            tp=1,
            pp=1,
            vocab=found_vocab,
        )
    elif tarfile.is_tarfile(source) or source.suffix == ".tar":
        release = _discover(_tar_tree(source), source, "tar", iteration)
    else:
        raise ReleaseError(
            f"{source} is neither a folder, a .tar release nor a .pt checkpoint",
            hint="pass the release tarball, its extracted folder, an iter_* folder or a model_optim_rng.pt",
        )
    if vocab is not None:
        release = _replace_vocab(release, ByteSource.whole_file(Path(vocab)))
    return release


def _replace_vocab(release: Release, vocab: ByteSource) -> Release:
    from dataclasses import replace

    return replace(release, vocab=vocab)
