"""All shards of one iteration → one flat ``{megatron_key: MergedTensor}`` view, still lazy.

Each shard's ``ckpt["model"]`` is flattened with dots (spec §B.2). Pipeline stages number their layers
from 0; stage ``s`` is shifted by the number of layers in stages ``< s``. Tensor-parallel ranks are merged
per the mapping table's parallel kind (:mod:`persimmon_tools.ops`); replicated tensors are checked equal.
Only ``ckpt["model"]``, ``ckpt["iteration"]`` and ``ckpt["args"]`` are used; optimizer state and RNG state
are never read. Before merging, :mod:`persimmon_tools.megatron.consistency` checks that the shards belong
together (same iteration and args, stage roles, canonical layer numbers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.mapping import RULES
from persimmon_tools.megatron.consistency import (
    check_args,
    check_iterations,
    check_layer_keys,
    check_rank_positions,
    check_stage_roles,
)
from persimmon_tools.megatron.lazy import LazyTensor
from persimmon_tools.megatron.release import Release
from persimmon_tools.megatron.torchzip import LoadedCheckpoint, load_checkpoint
from persimmon_tools.ops import Parallel, check_replicated, layer_index, renumber_layer

log = logging.getLogger(__name__)

_RULE_PATTERNS = [
    (re.compile("^" + re.escape(r.source).replace(r"\{i\}", r"(?:0|[1-9][0-9]*)") + "$"), r) for r in RULES
]


def parallel_kind(key: str) -> Parallel | None:
    """The tensor-parallel kind of a Megatron key per the mapping table (None for unknown keys)."""
    for pattern, rule in _RULE_PATTERNS:
        if pattern.match(key):
            return rule.parallel
    return None


@dataclass(frozen=True)
class MergedTensor:
    """One logical tensor assembled from its tensor-parallel parts (rank order); read on demand."""

    key: str
    parts: tuple[LazyTensor, ...]
    kind: Parallel | None  # None: unknown key (only valid with one part)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        dim = self.kind.concat_dim if self.kind is not None else None
        if dim is None or len(self.parts) == 1:
            return first
        dim = min(dim, len(first) - 1)
        return tuple(sum(p.shape[dim] for p in self.parts) if d == dim else n for d, n in enumerate(first))

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts) if self._concatenated else self.parts[0].numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.parts[0].storage.dtype.itemsize

    @property
    def _concatenated(self) -> bool:
        return self.kind is not None and self.kind.concat_dim is not None and len(self.parts) > 1

    @property
    def concat_dim(self) -> int | None:
        if not self._concatenated:
            return None
        return min(self.kind.concat_dim, len(self.shape) - 1)  # 1-D row-parallel: never happens (bias is P)

    def byte_ranges(self) -> list[tuple[Any, int, int]] | None:
        """``[(path, offset, nbytes)]`` whose concatenation is this tensor's bytes, when that is possible
        (one part or dim-0 concat of contiguous parts); None otherwise (dim-1 concat needs interleaving)."""
        parts = self.parts if self.concat_dim == 0 else self.parts[:1]
        if self.concat_dim == 1 or not all(p.is_contiguous for p in parts):
            return None
        return [(p.storage.path, p.byte_offset, p.nbytes) for p in parts]

    def iter_rows(self, max_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """Consecutive row blocks (dim 0) of the merged tensor, each at most ~``max_bytes``."""
        shape = self.shape
        if not shape:
            yield self.materialize()
            return
        if not all(p.is_contiguous for p in self.parts):
            # A strided view (never seen in Megatron checkpoints) cannot be read by row ranges: read it once
            # (memory: this one tensor) instead of once per block.
            whole = self.materialize()
            step = max(1, max_bytes // max(1, whole[:1].numel() * whole.element_size()))
            for start in range(0, shape[0], step):
                yield whole[start : start + step]
            return
        if self.concat_dim == 0:
            for part in self.parts:
                yield from _part_rows(part, max_bytes)
            return
        if self.concat_dim == 1:
            row_bytes = max(1, self.nbytes // max(1, shape[0]))
            step = max(1, max_bytes // row_bytes)
            for start in range(0, shape[0], step):
                stop = min(shape[0], start + step)
                yield torch.cat([p.read_rows(start, stop) for p in self.parts], dim=1)
            return
        yield from _part_rows(self.parts[0], max_bytes)

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (dim 0) of the merged tensor, reading only those rows of each part."""
        if not self.shape:
            return self.materialize()
        if self.concat_dim == 1:
            return torch.cat([p.read_rows(start, stop) for p in self.parts], dim=1)
        if self.concat_dim is None:
            return self.parts[0].read_rows(start, stop)
        pieces, base = [], 0
        for part in self.parts:
            lo, hi = max(start, base), min(stop, base + part.shape[0])
            if lo < hi:
                pieces.append(part.read_rows(lo - base, hi - base))
            base += part.shape[0]
        if not pieces:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def materialize(self) -> torch.Tensor:
        if self.concat_dim is None:
            return self.parts[0].materialize()
        return torch.cat([p.materialize() for p in self.parts], dim=self.concat_dim)


def _part_rows(part: LazyTensor, max_bytes: int) -> Iterator[torch.Tensor]:
    if not part.shape:
        yield part.materialize()
        return
    step = max(1, max_bytes // max(1, part.row_nbytes))
    for start in range(0, part.shape[0], step):
        yield part.read_rows(start, min(part.shape[0], start + step))


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
    checkpoint_version: Any = None  # ckpt["checkpoint_version"] of the first shard, when present

    def tensor(self, key: str) -> torch.Tensor:
        """Materialise one merged tensor by its Megatron key."""
        return self.tensors[key].materialize()


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
    """Load every shard of ``release`` lazily and merge them into one Megatron-keyed view."""
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
    # roles first: "stages out of order" explains a swap better than the saving rank does
    check_stage_roles(release, {pp: list(flats[(0, pp)][0]) for pp in range(release.pp)})
    check_rank_positions(release, objects)

    # Pipeline stages: shift stage-local layer numbers by the layer count of the earlier stages.
    stage_keys: dict[int, dict[int, dict[str, LazyTensor]]] = {}
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
        offset += len(layers)

    tensors: dict[str, MergedTensor] = {}
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
    return Checkpoint(
        release=release,
        tensors=tensors,
        args=args,
        iteration=iteration if iteration is not None else release.iteration,
        globals_seen=globals_seen,
        top_level_keys=sorted(map(str, first)) if isinstance(first, dict) else [],
        non_tensor_leaves=odd,
        checkpoint_version=first.get("checkpoint_version") if isinstance(first, dict) else None,
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
        dim = kind.concat_dim
        for rank, p in enumerate(parts):
            same = [n for d, n in enumerate(p.shape) if d != dim] == [
                n for d, n in enumerate(parts[0].shape) if d != dim
            ]
            if len(p.shape) != len(parts[0].shape) or not same:
                raise CheckpointError(
                    f"{key}: shard shapes do not fit together (rank 0 {list(parts[0].shape)}, rank {rank} "
                    f"{list(p.shape)})",
                    hint="the shards come from different checkpoints",
                )
        if dim is None:
            check_replicated([p.materialize() for p in parts], key)
    return MergedTensor(key, parts, kind)
