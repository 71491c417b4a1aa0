"""Megatron-Core ``torch_dist`` checkpoints, read lazily: the byte layer's view (keys as stored, chunks).

Layout, as Megatron-Core (0.16) and Megatron-LM write it (``--ckpt-format torch_dist``)::

    ROOT/latest_checkpointed_iteration.txt     the iteration number (as for ADEPT's releases)
    ROOT/iter_0000123/metadata.json            {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                "common_backend": "torch", "common_backend_version": 1}
    ROOT/iter_0000123/.metadata                a pickle of torch.distributed.checkpoint's Metadata
                                               (:mod:`persimmon_tools.megatron.dist_metadata`)
    ROOT/iter_0000123/__0_0.distcp, ...        data files (one per saving rank and writer thread)
    ROOT/iter_0000123/common.pt                torch.save of the non-sharded state: {"args": Namespace,
                                               "checkpoint_version": 3.0, "iteration": 123, ...};
                                               {} when empty

Every sharded tensor has a global shape and is stored as chunks (boxes of it); each chunk is a complete
``torch.save`` zip of that box (``PK\\x03\\x04`` ..., ``archive/data.pkl``, ``archive/data/0``) at
``[offset, offset + length)`` of a data file. Byte objects (``BytesStorageMetadata``: ``_extra_state``,
``rng_state``, sharded optimizer objects) are raw bytes at their range. Megatron-LM keeps ``args``,
``iteration`` and ``checkpoint_version`` in ``common.pt`` only (``generate_state_dict`` in
``megatron/training/checkpointing.py`` puts them in the state dict as plain values, and
``dist_checkpointing.save`` writes every non-sharded value there; no version stores them in the data files).

:func:`open_torch_dist` returns a :class:`DistCheckpoint`: the checked metadata, every chunk of every selected
tensor as a :class:`~persimmon_tools.megatron.lazy.LazyTensor` (the chunk's torch zip read through
:func:`~persimmon_tools.megatron.torchzip.load_checkpoint` on a :class:`ByteSource` sub-range of its data
file, so its records' CRC-32 is checked as everywhere else; no tensor bytes are read when opening), the byte
objects as byte ranges (never read), ``common.pt`` unpickled by the restricted unpickler. Checked: the
chunks tile each global shape (inside it, no overlaps, nothing missing), every storage range lies inside its
file and no two overlap, every chunk's stored tensor has the recorded dtype and sizes, and the iteration of
``common.pt`` agrees with the ``iter_*`` folder. What the keys mean (THE TABLE's Megatron-Core column) is
decided above this layer (:mod:`persimmon_tools.megatron.dist_legacy` for convert, inspect and export).

Source forms (:func:`locate`): the iteration folder (holding ``metadata.json``), or ROOT (its tracker, or
``--iteration``, or its only ``iter_*`` folder chooses the iteration).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.dist_layout import (
    COMMON_FILE,
    METADATA_FILE,
    check_backend,
    is_torch_dist,
    locate,
    looks_like_torch_dist,
    metadata_json,
)
from persimmon_tools.megatron.dist_metadata import MAX_METADATA_BYTES, DistMetadata, read_metadata
from persimmon_tools.megatron.dist_pickle import shown
from persimmon_tools.megatron.lazy import LazyTensor
from persimmon_tools.megatron.manifest import check_release_manifest
from persimmon_tools.megatron.records import RecordTable
from persimmon_tools.megatron.release import VOCAB, Release, release_file
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.megatron.variant import decide_variant
from persimmon_tools.safe_graph import small_repr

log = logging.getLogger(__name__)

__all__ = [
    "DistCheckpoint",
    "DistChunk",
    "DistTensor",
    "dist_release",
    "is_torch_dist",
    "looks_like_torch_dist",
    "model_key",
    "open_torch_dist",
]


def model_key(key: str) -> bool:
    """The default selection of :func:`open_torch_dist`: every tensor but the optimizer's state."""
    return not key.startswith("optimizer.")


@dataclass(frozen=True)
class DistChunk:
    """One stored box of a tensor: ``sizes`` elements from ``offsets`` of the global shape; ``tensor`` is the
    box itself (shape ``sizes``), read from ``source`` (the chunk's torch zip) on demand."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tensor: LazyTensor
    source: ByteSource

    def select(self, index: int) -> LazyTensor:
        """The box's slice at global ``index`` of dim 0 (which it must cover), dim 0 dropped; for stacked
        per-layer tensors, one layer's part (``[*sizes[1:]]``). Nothing is read."""
        local = index - self.offsets[0]
        if not 0 <= local < self.sizes[0]:
            raise IndexError(
                f"{self.source.name}: index {index} is outside the chunk at {list(self.offsets)}"
            )
        t = self.tensor
        return LazyTensor(t.storage, t.offset + local * t.stride[0], t.shape[1:], t.stride[1:])


@dataclass(frozen=True)
class DistTensor:
    """A sharded tensor: key as stored, global shape, dtype, and its chunks sorted by offsets."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[DistChunk, ...]


@dataclass(frozen=True)
class DistCheckpoint:
    """One iteration of a torch_dist checkpoint, opened and checked (module docstring)."""

    path: Path  # the iteration folder (holds metadata.json)
    root: Path  # the folder above iter_* (the iteration folder itself when it is not named iter_*)
    iteration: int | None  # common.pt's, else the folder's or the tracker's
    tensors: dict[str, DistTensor]  # the selected tensors (default: all but optimizer.*)
    objects: dict[str, ByteSource]  # byte objects (never read)
    common: dict[str, Any]  # common.pt, unpickled by the restricted unpickler
    args: Any  # common["args"] (argparse.Namespace) or None
    checkpoint_version: Any  # common["checkpoint_version"] as saved, or None
    metadata_json: dict[str, Any]
    files: list[ByteSource]  # metadata.json, .metadata, common.pt, the data files
    metadata: DistMetadata
    skipped: tuple[str, ...] = ()  # tensors not selected (never opened)
    globals_seen: dict[str, str] = field(default_factory=dict)
    record_tables: tuple[RecordTable, ...] = ()
    tracker: ByteSource | None = None

    def finish_records(self) -> int:
        """Complete the CRC-32 check of the records a pass started (see :mod:`.records`); bytes read."""
        return sum(table.finish() for table in self.record_tables)


def _data_files(folder: Path, meta: DistMetadata) -> dict[str, ByteSource]:
    """The data files the metadata names, each a regular file (not a link) holding every range in it."""
    files: dict[str, ByteSource] = {}
    for name in meta.files:
        if not os.path.lexists(folder / name):
            raise CheckpointError(
                f"{folder}: {name} is missing; {METADATA_FILE} stores tensors in it",
                hint="copy the whole iteration folder again",
            )
        files[name] = ByteSource.whole_file(
            folder / name, what="a torch_dist data file", follow_symlinks=False
        )
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for entry in meta.storage.values():
        by_file.setdefault(entry.file, []).append((entry.start, entry.length, entry.key))
    for name, ranges in by_file.items():
        ranges.sort()
        size = files[name].size
        for start, length, key in ranges:
            if start + length > size:
                raise CheckpointError(
                    f"{files[name].name}: {shown(key, 120)} is stored at bytes [{start}, {start + length}) "
                    f"but the file has {size} bytes",
                    hint="the file is truncated; copy the checkpoint again",
                )
        for (a, na, ka), (b, _, kb) in zip(ranges, ranges[1:], strict=False):
            if a + na > b:
                raise CheckpointError(
                    f"{files[name].name}: the stored ranges of {shown(ka, 100)} and {shown(kb, 100)} overlap",
                    hint="the checkpoint is damaged or was tampered with",
                )
    return files


def _iteration(common: dict[str, Any], said: int | None, where: str) -> int | None:
    value = common.get("iteration")
    if value is None:
        return said
    if type(value) is not int or value < 0:
        raise CheckpointError(
            f"{where}: 'iteration' is {small_repr(value, 40)}; Megatron saves a non-negative integer",
            hint="the file is damaged or was tampered with",
        )
    if said is not None and value != said:
        raise CheckpointError(
            f"{where}: the checkpoint says iteration {value} but its folder says {said}",
            hint="the folder was renamed or copied from another iteration; use the iter_* folder it was "
            "saved in",
        )
    return value


def open_torch_dist(
    source: Path, *, iteration: int | None = None, select: Callable[[str], bool] = model_key
) -> DistCheckpoint:
    """Open one iteration of the torch_dist checkpoint SOURCE (module docstring); tensors whose key
    ``select`` refuses are listed in ``skipped`` and never opened. Raises ReleaseError / CheckpointError."""
    folder, root, said, tracker = locate(Path(source), iteration)
    info, info_src = metadata_json(folder)
    check_backend(info, folder)
    meta_src = ByteSource.whole_file(
        folder / METADATA_FILE,
        what="the torch_dist metadata",
        max_bytes=MAX_METADATA_BYTES,
        follow_symlinks=False,
    )
    meta = read_metadata(meta_src)
    data = _data_files(folder, meta)
    common_src = ByteSource.whole_file(folder / COMMON_FILE, what="common.pt", follow_symlinks=False)
    loaded = load_checkpoint(common_src)
    common = loaded.obj
    if not isinstance(common, dict) or not all(isinstance(k, str) for k in common):
        raise CheckpointError(
            f"{common_src.name} holds {small_repr(common, 60)}; Megatron-Core saves a dict (the common "
            "state)",
            hint="the file is damaged or not a torch_dist checkpoint's common.pt",
        )
    globals_seen = {**meta.globals_seen, **loaded.globals_seen}
    tables = [loaded.table] if loaded.table is not None else []
    tensors: dict[str, DistTensor] = {}
    skipped = []
    for key, t in meta.tensors.items():
        if not select(key):
            skipped.append(key)
            continue
        chunks = []
        for c in t.chunks:
            entry = meta.storage[(key, c.offsets)]
            src = ByteSource(
                data[entry.file].path,
                entry.start,
                entry.length,
                f"{data[entry.file].name}[{entry.start}:+{entry.length}] ({shown(key)} chunk at "
                f"{list(c.offsets)})",
            )
            chunk = load_checkpoint(src)
            stored = chunk.obj
            if not isinstance(stored, LazyTensor) or stored.dtype != t.dtype or stored.shape != c.sizes:
                found = (
                    f"{stored.dtype} {list(stored.shape)}" if isinstance(stored, LazyTensor) else "no tensor"
                )
                raise CheckpointError(
                    f"{src.name}: the chunk holds {found}; {METADATA_FILE} records {t.dtype} {list(c.sizes)}",
                    hint="the checkpoint is damaged or was tampered with",
                )
            globals_seen.update(chunk.globals_seen)
            tables += [chunk.table] if chunk.table is not None else []
            chunks.append(DistChunk(c.offsets, c.sizes, stored, src))
        tensors[key] = DistTensor(key, t.shape, t.dtype, tuple(chunks))
    if skipped:
        log.debug("%s: %d tensors not opened (e.g. %s)", folder, len(skipped), skipped[0])
    objects = {
        key: ByteSource(
            data[e.file].path, e.start, e.length, f"{data[e.file].name}[{e.start}:+{e.length}] ({shown(key)})"
        )
        for key in meta.objects
        for e in [meta.storage[(key, None)]]
    }
    return DistCheckpoint(
        path=folder,
        root=root,
        iteration=_iteration(common, said, common_src.name),
        tensors=tensors,
        objects=objects,
        common=common,
        args=common.get("args"),
        checkpoint_version=common.get("checkpoint_version"),
        metadata_json=info,
        files=[info_src, meta_src, common_src, *data.values()],
        metadata=meta,
        skipped=tuple(skipped),
        globals_seen=globals_seen,
        record_tables=tuple(tables),
        tracker=tracker,
    )


#: Where Megatron-LM (``save_tokenizer_assets``) keeps a SentencePiece tokenizer, relative to the iteration.
MEGATRON_LM_TOKENIZER = Path("tokenizer") / "tokenizer.model"


def _through_a_link(folder: Path, relative: Path) -> bool:
    """Whether a folder on the way from ``folder`` to ``folder / relative`` is a symbolic link (the file
    itself is checked where it is opened: :func:`release_file` refuses a link)."""
    return any((folder / parent).is_symlink() for parent in relative.parents if parent != Path("."))


def dist_release(source: Path, iteration: int | None = None) -> Release:
    """SOURCE as a :class:`~persimmon_tools.megatron.release.Release` of ``kind="torch_dist"``: TP=1, PP=1,
    no shards, :attr:`Release.dist` the opened checkpoint; the vocabulary an ``adept_vocab.model`` in the root
    or the iteration folder, or the ``tokenizer/tokenizer.model`` that Megatron-LM saves in the iteration
    folder; base/chat from the root's name when it holds the tracker. An ``integrity.json``
    in the root is checked as for a release folder (:mod:`.manifest`)."""
    dist = open_torch_dist(source, iteration=iteration)
    check_release_manifest(dist.root, "", None)  # an integrity.json beside the tracker, when there is one
    places = [(dist.root, Path(VOCAB)), (dist.path, Path(VOCAB)), (dist.path, MEGATRON_LM_TOKENIZER)]
    vocab = next(
        (
            release_file(folder / rel, VOCAB)
            for folder, rel in places
            if os.path.lexists(folder / rel) and not _through_a_link(folder, rel)
        ),
        None,
    )
    root_name = Path(os.path.abspath(dist.root)).name
    witnesses = [(f"checkpoint folder {root_name}", root_name)] if dist.tracker is not None else []
    variant, variant_from = decide_variant(witnesses)
    return Release(
        source=Path(source),
        kind="torch_dist",
        iteration=dist.iteration,
        shards={},
        tp=1,
        pp=1,
        vocab=vocab,
        variant=variant,
        variant_from=variant_from,
        shard_dirs={(0, 0): Path(os.path.abspath(dist.path)).name},
        dist=dist,
    )
