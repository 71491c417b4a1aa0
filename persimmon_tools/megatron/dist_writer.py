"""Write a Megatron-Core ``torch_dist`` checkpoint folder, as ``megatron.core.dist_checkpointing.save`` does
with one saving rank, streaming: no stacked tensor is ever built.

One checkpoint folder (Megatron-LM's ``iter_XXXXXXX``)::

    __0_0.distcp    the data: every byte object, then every tensor chunk, one after another
    .metadata       pickle (protocol :data:`pickle.DEFAULT_PROTOCOL`, 4) of torch's
                    ``torch.distributed.checkpoint.metadata.Metadata``, written as DCP's
                    ``FileSystemWriter.finish`` writes it
    common.pt       ``torch.save`` of the common (non-sharded) state: ``args``, ``checkpoint_version``, ...
    metadata.json   ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend":
                    "torch", "common_backend_version": 1}``

Tensors (:class:`GlobalTensor`): a per-layer tensor is stored once, stacked on a leading layer axis,
``[num_layers, *layer shape]`` (``decoder.layers.self_attention.linear_qkv.weight`` ``[L, 3·nh·hd, H]``), and
each layer is one chunk with offsets ``(i, 0, ...)`` and sizes ``(1, *layer shape)``; any other tensor is one
chunk covering it. Every chunk is a complete ``torch.save`` zip (``archive/data.pkl``, ``archive/data/0``, ...)
at ``[offset, offset + length)`` of ``__0_0.distcp``, written by the toolkit's one torch-zip writer
(:func:`~persimmon_tools.megatron.ptwriter.write_pt`) from row blocks, so memory stays near one block. Byte
objects (``BytesStorageMetadata``) are raw bytes at their range: the linear layers'
``_extra_state/shard_{i}_{L}`` that GPTModel's local layer spec saves, each ``torch.save([None])`` (a
ShardedObject's data is saved in a one-item list).

Only torch's DCP metadata classes are imported here (``torch.distributed.checkpoint.metadata`` and
``_StorageInfo``, plain dataclasses; no process group), when the metadata is written.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.errors import ConversionError, MappingError
from persimmon_tools.megatron.manifest import HashingSink
from persimmon_tools.megatron.ptwriter import TensorSpec, write_pt
from persimmon_tools.safe_write import open_new_file, write_new_file

DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
METADATA_JSON = "metadata.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # beside the iteration folders (Megatron-LM)
BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
LAYERS = "decoder.layers."
#: The modules of a GPT layer (local spec) whose ``_extra_state`` is saved, in the order they are saved.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)

Chunk = tuple[str, int | None, "TensorSpec | torch.Tensor"]  # (key, layer index or None, tensor)


def iteration_dir(iteration: int) -> str:
    """Megatron-LM's folder name of one iteration's checkpoint (``get_checkpoint_name``)."""
    return f"iter_{iteration:07d}"


def extra_state_keys(num_layers: int) -> list[str]:
    """The byte objects GPTModel (local spec) saves: ``decoder.layers.<module>._extra_state/shard_{i}_{L}``."""
    return [
        f"{LAYERS}{module}._extra_state/shard_{i}_{num_layers}"
        for i in range(num_layers)
        for module in EXTRA_STATE_MODULES
    ]


@dataclass(frozen=True)
class GlobalTensor:
    """One tensor of the checkpoint: its key, global shape and dtype, known before any byte is written."""

    key: str
    shape: tuple[int, ...]  # global; stacked tensors: (num_layers, *layer shape)
    dtype: torch.dtype
    stacked: bool  # one chunk per layer (True) or one chunk for the whole tensor

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (1, *self.shape[1:]) if self.stacked else self.shape

    def offsets(self, layer: int | None) -> tuple[int, ...]:
        return (layer or 0, *(0 for _ in self.shape[1:])) if self.stacked else tuple(0 for _ in self.shape)


@dataclass(frozen=True)
class _Stored:
    key: str
    offsets: tuple[int, ...] | None  # None: a byte object
    offset: int
    length: int


def write_checkpoint(
    folder: Path,
    tensors: Sequence[GlobalTensor],
    chunks: Iterable[Chunk],
    *,
    num_layers: int,
    common: Mapping[str, Any],
    checkpoint_id: str | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Write one ``torch_dist`` checkpoint into the new folder ``folder`` (the caller's staging area).

    ``chunks`` yields ``(key, layer, tensor)`` in any order: ``layer`` is the layer index of a stacked
    tensor (None otherwise), ``tensor`` its layer's (or its whole) value as a tensor or a
    :class:`~persimmon_tools.megatron.ptwriter.TensorSpec` of shape :attr:`GlobalTensor.chunk_shape` (a
    stacked chunk's leading 1 may be left out) and the tensor's dtype. Each is written as it arrives; every
    (key, layer) must arrive exactly once. ``common`` is saved as ``common.pt``; ``checkpoint_id`` (the
    folder's final path) goes into the metadata's ``storage_meta`` as DCP records it. ``progress`` gets the
    tensor bytes written. Returns the files written, relative to ``folder``.
    """
    plan = {t.key: t for t in tensors}
    if len(plan) != len(tensors):
        raise MappingError("a key is planned twice in the torch_dist checkpoint", hint=_BUG)
    objects = extra_state_keys(num_layers)
    folder.mkdir()
    stored: list[_Stored] = []
    with open_new_file(folder / DATA_FILE) as fh:
        position = 0
        for key in objects:
            sink = HashingSink(fh, hash=False)
            write_pt(sink, [None])
            stored.append(_Stored(key, None, position, sink.size))
            position += sink.size
        seen: set[tuple[str, int | None]] = set()
        for key, layer, value in chunks:
            target = _check_chunk(plan, key, layer, num_layers, seen)
            spec = _spec(target, value)
            sink = HashingSink(fh, hash=False)
            write_pt(sink, spec, on_bytes=progress)
            stored.append(_Stored(key, target.offsets(layer), position, sink.size))
            position += sink.size
        fh.flush()
        os.fsync(fh.fileno())
    _check_complete(plan, seen, num_layers)
    _write_metadata(folder / METADATA_FILE, tensors, objects, stored, num_layers, checkpoint_id)
    with open_new_file(folder / COMMON_FILE) as fh:
        write_pt(fh, dict(common))
        fh.flush()
        os.fsync(fh.fileno())
    write_new_file(folder / METADATA_JSON, json.dumps(BACKEND).encode())
    return [DATA_FILE, METADATA_FILE, COMMON_FILE, METADATA_JSON]


_BUG = "this is a bug in persimmon-tools; please report it; nothing was written"


def _check_chunk(
    plan: Mapping[str, GlobalTensor],
    key: str,
    layer: int | None,
    num_layers: int,
    seen: set[tuple[str, int | None]],
) -> GlobalTensor:
    target = plan.get(key)
    if target is None:
        raise MappingError(f"torch_dist chunk {key!r} was not planned", hint=_BUG)
    if target.stacked != (layer is not None) or (layer is not None and not 0 <= layer < num_layers):
        raise MappingError(
            f"torch_dist chunk {key!r}: layer {layer!r} for a tensor "
            + (f"stacked over {num_layers} layers" if target.stacked else "without layers"),
            hint=_BUG,
        )
    if (key, layer) in seen:
        raise MappingError(f"torch_dist chunk {key!r} (layer {layer}) arrived twice", hint=_BUG)
    seen.add((key, layer))
    return target


def _spec(target: GlobalTensor, value: TensorSpec | torch.Tensor) -> TensorSpec:
    """``value`` as a spec of exactly the chunk's shape (a stacked chunk's leading 1 added) and dtype."""
    spec = value if isinstance(value, TensorSpec) else TensorSpec.of(value)
    shape = tuple(spec.shape)
    if target.stacked and shape == target.chunk_shape[1:]:
        shape = target.chunk_shape  # same bytes, the layer axis made explicit
    if shape != target.chunk_shape or spec.dtype != target.dtype:
        raise ConversionError(
            f"torch_dist chunk {target.key}: {list(spec.shape)} {spec.dtype}, expected "
            f"{list(target.chunk_shape)} {target.dtype}",
            hint=_BUG,
        )
    return TensorSpec(shape, spec.dtype, spec.blocks)


def _check_complete(plan: Mapping[str, GlobalTensor], seen: set, num_layers: int) -> None:
    missing = [
        f"{t.key} (layer {i})" if t.stacked else t.key
        for t in plan.values()
        for i in (range(num_layers) if t.stacked else [None])
        if (t.key, i) not in seen
    ]
    if missing:
        raise MappingError(
            f"the torch_dist checkpoint lacks {len(missing)} chunk(s): " + ", ".join(missing[:10]),
            hint=_BUG,
        )


def _write_metadata(
    path: Path,
    tensors: Sequence[GlobalTensor],
    objects: Sequence[str],
    stored: Sequence[_Stored],
    num_layers: int,
    checkpoint_id: str | None,
) -> None:
    """``.metadata``: torch's own classes, pickled as ``FileSystemWriter.finish`` pickles them."""
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict[str, Any] = {}
    for t in tensors:
        boxes = [t.offsets(i) for i in range(num_layers)] if t.stacked else [t.offsets(None)]
        chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(t.chunk_shape)) for o in boxes]
        state[t.key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), torch.Size(t.shape), chunks)
    for key in objects:
        state[key] = BytesStorageMetadata()
    storage = {
        MetadataIndex(s.key, None if s.offsets is None else torch.Size(s.offsets)): _StorageInfo(
            DATA_FILE, s.offset, s.length
        )
        for s in stored
    }
    metadata = Metadata(
        state_dict_metadata=state,
        planner_data=None,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=str(uuid.uuid4())),
        version=CURRENT_DCP_VERSION,
    )
    with open_new_file(path) as fh:
        pickle.dump(metadata, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_tracker(root: Path, iteration: int) -> str:
    """``latest_checkpointed_iteration.txt`` in Megatron-LM's checkpoint root (``--load``): the iteration
    as text, no newline. Returns its name."""
    write_new_file(root / TRACKER_FILE, str(iteration).encode())
    return TRACKER_FILE
