"""The ``.metadata`` file of a Megatron-Core ``torch_dist`` checkpoint, read without torch.distributed and
without executing it.

``.metadata`` is what torch's Distributed Checkpoint (``torch.distributed.checkpoint``, DCP) writes beside
its ``.distcp`` data files: a pickle (protocol 4, ``STACK_GLOBAL`` only) of
``torch.distributed.checkpoint.metadata.Metadata``. The fields read here:

- ``state_dict_metadata``: ``{key: TensorStorageMetadata | BytesStorageMetadata}``;
  ``TensorStorageMetadata(properties=TensorProperties(dtype, layout, ...), size: torch.Size,
  chunks=[ChunkStorageMetadata(offsets: torch.Size, sizes: torch.Size), ...])`` (the tensor's global shape
  and the boxes that cover it); ``BytesStorageMetadata()`` marks a byte object (``_extra_state/shard_i_L``,
  ``rng_state``, ...);
- ``storage_data``: ``{MetadataIndex(fqn, offset: torch.Size | None, index): _StorageInfo(relative_path,
  offset, length, transform_descriptors)}``: where each chunk (``offset`` = the chunk's offsets) or byte
  object (``offset`` None) lies: ``[offset, offset + length)`` of the data file ``relative_path``.

``planner_data``, ``storage_meta``, ``all_local_plans`` (the savers' plans) and Megatron-Core's ``mcore_data``
are unpickled into inert stand-ins and not used; ``version`` is kept for messages.

The pickle is unpickled by the restricted unpickler with its own allow-list
(:mod:`persimmon_tools.megatron.dist_pickle`: inert stand-ins, nothing executed); the stand-ins are then
checked field by field into the frozen dataclasses below. Bounds: the file (:data:`MAX_METADATA_BYTES`), the
keys and storage entries (:data:`MAX_ENTRIES`), the chunks (:data:`MAX_CHUNKS`) and the work of the overlap
check (:data:`MAX_COMPARISONS`).

:func:`read_metadata` also checks what the metadata says by itself: every chunk lies inside its tensor's
global shape, no two chunks overlap, together they cover the tensor, every chunk and byte object has one
storage entry and every storage entry belongs to one, and data file names are plain file names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.dist_pickle import TAMPERED, DcpRecord, load_metadata_pickle, shown
from persimmon_tools.safe_graph import small_repr

#: Largest ``.metadata`` unpickled (a real 8B checkpoint with optimizer state is a few MB).
MAX_METADATA_BYTES = 256 << 20
#: Keys of ``state_dict_metadata`` and entries of ``storage_data``, each.
MAX_ENTRIES = 1_000_000
#: Chunks over all tensors (a shared chunk list counts once per tensor naming it).
MAX_CHUNKS = 4_000_000
#: Chunk pairs the overlap check may compare, over all tensors.
MAX_COMPARISONS = 20_000_000
_MAX_DIMS = 64
_MAX_DIM = 1 << 62
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")
_NOT_DATA = (".metadata", "common.pt", "metadata.json")
_TOP = ("Metadata", "MCoreMetadata")


# ---- the checked result -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkMeta:
    """One box of a tensor: ``sizes`` elements per dimension starting at ``offsets`` of the global shape."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorMeta:
    """A sharded tensor: its key, dtype, global shape and the chunks (sorted by offsets) that cover it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[ChunkMeta, ...]


@dataclass(frozen=True)
class StorageEntry:
    """Where a chunk (``offset``: its offsets) or byte object (``offset`` None) lies: ``length`` bytes at
    ``start`` of the data file ``file`` (a name in the checkpoint's folder)."""

    key: str
    offset: tuple[int, ...] | None
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class DistMetadata:
    """What a ``.metadata`` file says, checked (module docstring)."""

    origin: str
    version: str | None
    tensors: dict[str, TensorMeta]
    objects: tuple[str, ...]
    storage: dict[tuple[str, tuple[int, ...] | None], StorageEntry]
    globals_seen: dict[str, str]

    @property
    def files(self) -> list[str]:
        """The data files the storage entries name, sorted."""
        return sorted({e.file for e in self.storage.values()})


def _bad(origin: str, what: str) -> CheckpointError:
    return CheckpointError(f"{origin}: {what}", hint=TAMPERED)


def _ints(value: Any, origin: str, what: str, dims: int | None = None) -> tuple[int, ...]:
    ok = isinstance(value, tuple | list) and len(value) <= _MAX_DIMS
    ok = ok and all(type(n) is int and 0 <= n <= _MAX_DIM for n in value)
    if not ok or (dims is not None and len(value) != dims):
        need = f"{dims} " if dims is not None else ""
        raise _bad(origin, f"{what} is {small_repr(value, 60)}, expected {need}non-negative integers")
    return tuple(value)


def _record(value: Any, names: tuple[str, ...], origin: str, what: str) -> dict[str, Any]:
    if not isinstance(value, DcpRecord) or value.qualname.rsplit(".", 1)[-1] not in names:
        raise _bad(origin, f"{what} is {small_repr(value, 60)}, expected a {' or '.join(names)}")
    fields = value.fields()
    props = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
    if fields is None and value.qualname.endswith("TensorProperties") and isinstance(value.state, tuple):
        # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory format encoding, pin_memory)
        fields = dict(zip(props, value.state, strict=True)) if len(value.state) == len(props) else None
    if fields is None:
        fields = {} if value.state is None and value.qualname.endswith("BytesStorageMetadata") else None
    if fields is None:
        raise _bad(origin, f"{what}: the {value.qualname} has the state {small_repr(value.state, 60)}")
    return fields


def _tensor(key: str, value: Any, origin: str, budget: list[int]) -> TensorMeta:
    what = f"tensor {shown(key, 120)}"
    fields = _record(value, ("TensorStorageMetadata",), origin, what)
    props = _record(fields.get("properties"), ("TensorProperties",), origin, f"{what}: properties")
    dtype, layout = props.get("dtype"), props.get("layout", "torch.strided")
    if not isinstance(dtype, torch.dtype) or layout not in ("torch.strided", None):
        odd = small_repr(dtype if not isinstance(dtype, torch.dtype) else layout, 40)
        raise _bad(origin, f"{what} is stored as {odd}; expected a dense (strided) tensor of a torch dtype")
    shape = _ints(fields.get("size"), origin, f"{what}: size")
    chunks = fields.get("chunks")
    if not isinstance(chunks, list | tuple):
        raise _bad(origin, f"{what}: chunks is {small_repr(chunks, 40)}, expected a list")
    budget[0] -= len(chunks)
    if budget[0] < 0:
        raise _bad(origin, f"more than {MAX_CHUNKS} chunks; refusing to read further")
    boxes = []
    for chunk in chunks:
        c = _record(chunk, ("ChunkStorageMetadata",), origin, f"{what}: a chunk")
        offsets = _ints(c.get("offsets"), origin, f"{what}: chunk offsets", len(shape))
        sizes = _ints(c.get("sizes"), origin, f"{what}: chunk sizes", len(shape))
        boxes.append(ChunkMeta(offsets, sizes))
    boxes.sort(key=lambda c: c.offsets)
    meta = TensorMeta(key, dtype, shape, tuple(boxes))
    problem = coverage_problem(meta, budget)
    if problem:
        raise _bad(origin, f"{what} {list(shape)}: {problem}")
    return meta


def coverage_problem(meta: TensorMeta, budget: list[int] | None = None) -> str | None:
    """Why ``meta``'s chunks do not tile its global shape exactly (None: they do): a chunk outside the shape,
    two chunks that overlap, or elements no chunk covers. ``budget[1]`` counts the pairs compared."""
    budget = [0, MAX_COMPARISONS] if budget is None else budget
    shape, total = meta.shape, 0
    for c in meta.chunks:
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, shape, strict=True)):
            return f"the chunk at {list(c.offsets)} of size {list(c.sizes)} lies outside the global shape"
        total += math.prod(c.sizes)
    active: list[ChunkMeta] = []  # chunks (by first offset) that still reach the current one along dim 0
    for c in (c for c in meta.chunks if math.prod(c.sizes)):
        if shape:
            active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
        budget[1] -= len(active)
        if budget[1] < 0:
            return f"the chunks are too fragmented to check (over {MAX_COMPARISONS} overlap comparisons)"
        for a in active:
            if all(
                ao < co + cs and co < ao + as_
                for ao, as_, co, cs in zip(a.offsets, a.sizes, c.offsets, c.sizes, strict=True)
            ):
                return f"the chunks at {list(a.offsets)} and {list(c.offsets)} overlap"
        active.append(c)
    if total != math.prod(shape):
        return f"the chunks cover {total} of its {math.prod(shape)} elements (some are missing)"
    return None


def _storage(index: Any, info: Any, origin: str) -> StorageEntry:
    idx = _record(index, ("MetadataIndex",), origin, "a storage_data key")
    key = idx.get("fqn")
    if type(key) is not str:
        raise _bad(origin, f"a storage_data key names {small_repr(key, 40)}, not a tensor or object name")
    offset = idx.get("offset")
    offset = None if offset is None else _ints(offset, origin, f"the storage entry of {key}: offset")
    what = f"the storage entry of {shown(key, 120)}" + (f" at {list(offset)}" if offset else "")
    found = _record(info, ("_StorageInfo",), origin, what)
    name, start, length = found.get("relative_path"), found.get("offset"), found.get("length")
    if found.get("transform_descriptors"):
        raise CheckpointError(
            f"{origin}: {what} is stored with the transforms "
            f"{small_repr(found['transform_descriptors'], 80)}; "
            "this reader reads untransformed torch.save chunks only",
            hint="save the checkpoint again without compression or other storage transforms",
        )
    if type(name) is not str or not _FILE_NAME.fullmatch(name) or name in _NOT_DATA or ".." in name:
        raise _bad(origin, f"{what} names the data file {small_repr(name, 80)}, not a plain file name")
    start, length = _ints((start, length), origin, f"{what}: offset and length")
    return StorageEntry(key, offset, name, start, length)


def _metadata(obj: Any, origin: str, globals_seen: dict[str, str]) -> DistMetadata:
    if not isinstance(obj, DcpRecord) or obj.qualname.rsplit(".", 1)[-1] not in _TOP:
        raise _bad(
            origin, f"the pickle holds {small_repr(obj, 60)}, not a torch.distributed.checkpoint Metadata"
        )
    fields = _record(obj, ("Metadata", "MCoreMetadata"), origin, "the metadata")
    sdm, data, version = fields.get("state_dict_metadata"), fields.get("storage_data"), fields.get("version")
    if not isinstance(sdm, dict) or not isinstance(data, dict):
        raise _bad(origin, "state_dict_metadata or storage_data is not a dict")
    if len(sdm) > MAX_ENTRIES or len(data) > MAX_ENTRIES:
        raise _bad(origin, f"more than {MAX_ENTRIES} keys or storage entries; refusing to read further")
    budget = [MAX_CHUNKS, MAX_COMPARISONS]
    tensors: dict[str, TensorMeta] = {}
    objects: list[str] = []
    for key, value in sdm.items():
        if type(key) is not str:
            raise _bad(origin, f"state_dict_metadata has the key {small_repr(key, 60)}, not a string")
        if isinstance(value, DcpRecord) and value.qualname.endswith(".BytesStorageMetadata"):
            objects.append(key)
        else:
            tensors[key] = _tensor(key, value, origin, budget)
    storage: dict[tuple[str, tuple[int, ...] | None], StorageEntry] = {}
    for index, info in data.items():
        entry = _storage(index, info, origin)
        where = (entry.key, entry.offset)
        if where in storage:
            raise _bad(origin, f"two storage entries for {shown(entry.key, 120)} at {entry.offset}")
        storage[where] = entry
    wanted = {(k, c.offsets) for k, t in tensors.items() for c in t.chunks} | {(k, None) for k in objects}
    for key, offset in sorted(wanted - set(storage), key=repr)[:1]:
        at = f"its chunk at {list(offset)}" if offset is not None else "the byte object"
        raise _bad(origin, f"{shown(key, 120)}: {at} has no storage entry (no data file names it)")
    for key, offset in sorted(set(storage) - wanted, key=repr)[:1]:
        raise _bad(origin, f"a storage entry for {shown(key, 120)} at {offset} belongs to no chunk or object")
    if version is not None and type(version) is not str:
        raise _bad(origin, f"version is {small_repr(version, 40)}, not a string")
    return DistMetadata(origin, version, tensors, tuple(objects), storage, globals_seen)


def read_metadata(src: ByteSource) -> DistMetadata:
    """Unpickle and check the ``.metadata`` file ``src`` (module docstring); CheckpointError naming it."""
    if src.size > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"{src.name} is {src.size} bytes; a torch_dist .metadata is at most {MAX_METADATA_BYTES} bytes "
            "here, so it was not read",
            hint=TAMPERED,
        )
    obj, globals_seen = load_metadata_pickle(src.read_all(), src.name)
    return _metadata(obj, src.name, globals_seen)
