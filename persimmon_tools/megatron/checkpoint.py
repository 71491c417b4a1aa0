"""All shards of one iteration → one flat ``{megatron_key: MergedTensor}`` view, still lazy.

Each shard's ``ckpt["model"]`` is flattened with dots (spec §B.2). Pipeline stages number their layers
from 0; stage ``s`` is shifted by the number of layers in stages ``< s``. Tensor-parallel ranks are merged
per the mapping table's parallel kind (:mod:`persimmon_tools.ops`); replicated tensors are checked equal,
except ``rotary_emb.inv_freq``: every rank's copy of it is kept (:attr:`MergedTensor.parts`) and checked
against the rotary base by :func:`persimmon_tools.conversion.config.derive_dims`, which can say what base a
wrong copy implies. Only ``ckpt["model"]``, ``ckpt["iteration"]``, ``ckpt["args"]`` and
``ckpt["checkpoint_version"]`` are used; optimizer state and RNG state are never read. Before merging,
:mod:`persimmon_tools.megatron.consistency` checks that the shards belong together (same iteration, args
and checkpoint_version, stage roles, canonical layer numbers) and refuses a ``checkpoint_version`` below 2.0
(:func:`~persimmon_tools.megatron.consistency.check_checkpoint_version`). A Megatron-Core torch_dist
checkpoint gives the same view through THE TABLE's Megatron-Core column (:mod:`.dist_legacy`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.mapping import INV_FREQ, match_source, parallel_kind
from persimmon_tools.megatron.consistency import (
    check_args,
    check_checkpoint_versions,
    check_iterations,
    check_layer_keys,
    check_rank_positions,
    check_stage_roles,
)
from persimmon_tools.megatron.lazy import LazyTensor
from persimmon_tools.megatron.records import RecordTable
from persimmon_tools.megatron.release import Release
from persimmon_tools.megatron.torchzip import LoadedCheckpoint, load_checkpoint
from persimmon_tools.ops import (
    Parallel,
    check_replicated,
    layer_index,
    merge_dim,
    merge_rows,
    merged_shape,
    renumber_layer,
    row_blocks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergedTensor:
    """One logical tensor assembled from its tensor-parallel parts (rank order); read on demand.

    Layout: the parts joined along :func:`persimmon_tools.ops.merge_dim` of ``kind`` (column/vocab: dim 0,
    e.g. ``query_key_value.weight`` ``[n_heads*3*head_dim, hidden]`` as whole heads per rank; row: dim 1,
    e.g. ``dense.weight`` ``[hidden, n_heads*head_dim]``; replicated: rank 0's copy). Every read goes
    through :func:`persimmon_tools.ops.merge_rows`, so only the rows asked for are read from each part.
    """

    key: str
    parts: tuple[LazyTensor, ...]
    kind: Parallel | None  # None: unknown key (only valid with one part)

    @property
    def _shapes(self) -> list[tuple[int, ...]]:
        return [p.shape for p in self.parts]

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return merged_shape(self._shapes, self.kind, self.key)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.parts[0].storage.dtype.itemsize

    @property
    def concat_dim(self) -> int | None:
        """The dimension the parts are joined along (None: one part or replicated: rank 0's copy is read)."""
        return merge_dim(self.kind, len(self.parts[0].shape)) if len(self.parts) > 1 else None

    def byte_ranges(self) -> list[tuple[Any, int, int]] | None:
        """``[(path, offset, nbytes)]`` whose concatenation is this tensor's bytes, when that is possible
        (one part or dim-0 concat of contiguous parts); None otherwise (dim-1 concat needs interleaving)."""
        parts = self.parts if self.concat_dim == 0 else self.parts[:1]
        if self.concat_dim == 1 or not all(p.is_contiguous for p in parts):
            return None
        return [(p.storage.path, p.byte_offset, p.nbytes) for p in parts]

    def iter_rows(self, max_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """Consecutive row blocks (dim 0) of the merged tensor, each at most ~``max_bytes`` (and never across
        two dim-0 parts, so each block is one read)."""
        shape = self.shape
        if not shape:
            yield self.materialize()
            return
        row_bytes = max(1, self.nbytes // max(1, shape[0]))
        step = max(1, max_bytes // row_bytes)
        if not all(p.is_contiguous for p in self.parts):
            # A strided view (never seen in Megatron checkpoints) cannot be read by row ranges: read it once
            # (memory: this one tensor) instead of once per block.
            whole = self.materialize()
            for start in range(0, shape[0], step):
                yield whole[start : start + step]
            return
        for start, stop in row_blocks(self._shapes, self.kind, step):
            yield self.read_rows(start, stop)

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (dim 0) of the merged tensor, reading only those rows of each part."""
        if not self.shape:
            return self.materialize()
        return merge_rows(self._read_part, self._shapes, self.kind, start, stop)

    def _read_part(self, part: int, start: int, stop: int) -> torch.Tensor:
        return self.parts[part].read_rows(start, stop)

    def materialize(self) -> torch.Tensor:
        shape = self.shape
        if not shape or self.concat_dim is None:
            return self.parts[0].materialize()
        return merge_rows(self._read_part, self._shapes, self.kind, 0, shape[0])


@dataclass
class Checkpoint:
    """The merged, lazy view of one iteration of a release."""

    release: Release
    tensors: dict[str, MergedTensor]
    args: Any  # argparse.Namespace (or None when the checkpoint carries no args)
    iteration: int | None
    globals_seen: dict[str, str]
    top_level_keys: list[str]
    non_tensor_leaves: list[str] = field(default_factory=list)
    #: ``ckpt["checkpoint_version"]`` as saved, the same in every shard and >= 2.0; None when absent (ADEPT's
    #: loader never reads it: :func:`~persimmon_tools.megatron.consistency.check_checkpoint_version`)
    checkpoint_version: float | int | None = None
    #: merged key -> (pipeline stage, the key as that stage's shards spell it: stage-local layer numbers)
    origin: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: the CRC-32 state of every shard's records (:meth:`finish_records`)
    record_tables: tuple[RecordTable, ...] = ()

    def finish_records(self) -> int:
        """Complete the CRC-32 check of every record a pass started and did not complete (see
        :mod:`persimmon_tools.megatron.records`); returns the bytes read to do so."""
        return sum(table.finish() for table in self.record_tables)

    def tensor(self, key: str) -> torch.Tensor:
        """Materialise one merged tensor by its Megatron key."""
        return self.tensors[key].materialize()

    def shard_of(self, key: str, tp_rank: int = 0) -> str:
        """Where tensor-parallel rank ``tp_rank``'s part of merged ``key`` is stored, for messages: the shard
        (``iter_0001251/mp_rank_01_001``), and the key as that shard spells it when it differs."""
        stage, local = self.origin.get(key, (0, key))
        label = self.release.shard_label((tp_rank, stage))
        return label if local == key else f"{label} (as {local})"


_MAX_DEPTH = 16  # ckpt["model"] nests 4 deep (spec §B.2)


def _flatten(
    obj: Any,
    prefix: str,
    out: dict[str, LazyTensor],
    odd: list[str],
    origin: str,
    seen: set[int],
    depth: int = 0,
) -> None:
    """Flatten nested dicts with dotted keys. A pickle can build self-referencing or shared dicts (which
    would recurse forever or blow up exponentially) and keys that collide once dotted: all refused."""
    if isinstance(obj, dict):
        if id(obj) in seen or depth > _MAX_DEPTH:
            raise CheckpointError(
                f"{origin}: the model dict is not a tree (at {prefix or 'model'}: a dict that contains "
                f"itself, appears twice, or nests deeper than {_MAX_DEPTH} levels)",
                hint="the file is corrupt or was tampered with",
            )
        seen.add(id(obj))
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, odd, origin, seen, depth + 1)
    elif isinstance(obj, LazyTensor):
        if prefix in out:
            raise CheckpointError(
                f"{origin}: the tensor name {prefix} occurs twice in the model dict",
                hint="the file is corrupt or was tampered with",
            )
        out[prefix] = obj
    elif obj is not None:
        odd.append(f"{prefix} ({type(obj).__name__})")


def _model_dict(loaded: LoadedCheckpoint) -> tuple[dict[str, LazyTensor], list[str]]:
    obj = loaded.obj
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = sorted(map(str, obj))[:12] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{loaded.source.name} is not a Megatron checkpoint: no 'model' dict (found {found})",
            hint="pass ADEPT's model_optim_rng.pt (a dict with 'model', 'args', 'iteration')",
        )
    flat: dict[str, LazyTensor] = {}
    odd: list[str] = []
    _flatten(obj["model"], "", flat, odd, loaded.source.name, set())
    return flat, odd


def load_release_checkpoint(release: Release) -> Checkpoint:
    """Load every shard of ``release`` lazily and merge them into one Megatron-keyed view (a torch_dist
    checkpoint: :func:`persimmon_tools.megatron.dist_legacy.load_dist_checkpoint`, the same view)."""
    if release.dist is not None:
        from persimmon_tools.megatron.dist_legacy import load_dist_checkpoint  # it builds on this module

        return load_dist_checkpoint(release)
    loaded = {rank: load_checkpoint(src) for rank, src in release.shard_list()}
    first = loaded[(0, 0)].obj
    args = first.get("args") if isinstance(first, dict) else None
    globals_seen: dict[str, str] = {}
    for item in loaded.values():
        globals_seen.update(item.globals_seen)
    flats = {rank: _model_dict(item) for rank, item in loaded.items()}
    odd = sorted({o for _, o_list in flats.values() for o in o_list})

    # Do the shards belong together, each in its place? (iteration, args, stage roles, layer spelling)
    objects = {rank: item.obj for rank, item in loaded.items()}
    for rank, (flat, _) in flats.items():
        check_layer_keys(list(flat), release.shard_label(rank))
    iteration = check_iterations(release, objects)
    check_args(release, objects)
    version = check_checkpoint_versions(release, objects)
    # roles first: "stages out of order" explains a swap better than the saving rank does
    check_stage_roles(release, {pp: list(flats[(0, pp)][0]) for pp in range(release.pp)})
    check_rank_positions(release, objects)

    # Pipeline stages: shift stage-local layer numbers by the layer count of the earlier stages.
    stage_keys: dict[int, dict[int, dict[str, LazyTensor]]] = {}
    local_names: dict[int, dict[str, str]] = {pp: {} for pp in range(release.pp)}  # renamed keys only
    offset = 0
    for pp in range(release.pp):
        layers = {layer_index(k) for k in flats[(0, pp)][0] if layer_index(k) is not None}
        if layers and layers != set(range(len(layers))):
            raise CheckpointError(
                f"pipeline stage {pp} ({release.shard_label((0, pp))}): layer numbers {sorted(layers)} are not "
                f"0..{len(layers) - 1}",
                hint="stage-local numbering is expected in mp_rank_XX_YYY shards",
            )
        for tp in range(release.tp):
            flat = flats[(tp, pp)][0]
            stage_keys.setdefault(pp, {})[tp] = {
                renumber_layer(k, offset) if offset else k: v for k, v in flat.items()
            }
        if offset:
            local_names[pp] = {renumber_layer(k, offset): k for k in flats[(0, pp)][0]}
        offset += len(layers)

    tensors: dict[str, MergedTensor] = {}
    origin: dict[str, tuple[int, str]] = {}
    for pp, by_tp in stage_keys.items():
        keysets = {tp: set(d) for tp, d in by_tp.items()}
        for tp, ks in keysets.items():
            if ks != keysets[0]:
                diff = sorted(ks ^ keysets[0])[:5]
                raise CheckpointError(
                    f"tensor-parallel ranks 0 and {tp} of pipeline stage {pp} hold different keys, e.g. {diff}",
                    hint="the shards come from different checkpoints or a shard is damaged",
                )
        for key in by_tp[0]:
            if key in tensors:
                raise CheckpointError(
                    f"{key} appears in more than one pipeline stage",
                    hint="the pipeline shards overlap; check the mp_rank_XX_YYY folders",
                )
            parts = tuple(by_tp[tp][key] for tp in range(release.tp))
            tensors[key] = _merge(key, parts)
            origin[key] = (pp, local_names[pp].get(key, key))
    return Checkpoint(
        release=release,
        tensors=tensors,
        args=args,
        iteration=iteration if iteration is not None else release.iteration,
        globals_seen=globals_seen,
        top_level_keys=sorted(map(str, first)) if isinstance(first, dict) else [],
        non_tensor_leaves=odd,
        checkpoint_version=version,
        origin=origin,
        record_tables=tuple(item.table for item in loaded.values() if item.table is not None),
    )


def _merge(key: str, parts: tuple[LazyTensor, ...]) -> MergedTensor:
    kind = parallel_kind(key)
    if len(parts) > 1:
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            raise CheckpointError(
                f"{key}: tensor-parallel shards have different dtypes {sorted(map(str, dtypes))}",
                hint="the shards come from different checkpoints",
            )
        if kind is None:
            kind = Parallel.REPLICATED  # unknown keys are reported by the mapping step; compare them anyway
        merged_shape([p.shape for p in parts], kind, key)  # raises when the shard shapes do not fit
        if kind.concat_dim is None and not _is_inv_freq(key):  # inv_freq: derive_dims checks every copy
            check_replicated([p.materialize() for p in parts], key)
    return MergedTensor(key, parts, kind)


def _is_inv_freq(key: str) -> bool:
    match = match_source(key)
    return match is not None and match.rule is INV_FREQ
