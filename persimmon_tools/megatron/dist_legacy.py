"""A Megatron-Core ``torch_dist`` checkpoint as the converter's merged view, keyed by ADEPT's Megatron keys.

:func:`load_dist_checkpoint` builds the same :class:`~persimmon_tools.megatron.checkpoint.Checkpoint` that
:func:`~persimmon_tools.megatron.checkpoint.load_release_checkpoint` builds from ``model_optim_rng.pt``
shards, so ``convert``, ``inspect`` and ``export`` read both alike. Each stored key goes through THE TABLE's
Megatron-Core column (:func:`persimmon_tools.mapping.match_core`): core key → rule →
``rule.source_key(i)``.

- Per-layer tensors are stored stacked, ``[num_layers, *shape]`` (e.g. ``decoder.layers.self_attention.
  linear_qkv.weight`` ``[L, n_heads*3*head_dim, hidden]``, per-head ``[q|k|v]`` rows as in ADEPT's
  ``query_key_value``). Layer ``i`` is the chunks covering index ``i`` of the layer axis, each viewed with
  that axis dropped (:meth:`~persimmon_tools.megatron.dist_checkpoint.DistChunk.select`; nothing is read).
- A tensor (or one layer of it) stored in one chunk is one part; stored in several (tensor-parallel ranks),
  it must be split along one dimension only, the one the rule's parallel kind joins (column and vocab: dim
  0, row: dim 1), and its parts are that split in order: a :class:`~persimmon_tools.megatron.checkpoint.
  MergedTensor` joins them as it joins ``mp_rank_*`` parts. Any other chunk grid is refused, naming it.
- Keys no rule names stay under their Megatron-Core key (one chunk, or a 1-D split along dim 0 or 1), so the
  mapping plan reports them and ``--drop-key`` can leave them out. Byte objects (``_extra_state/shard_i_L``
  of the linear layers, RNG state) and the optimizer's tensors are never read.
- What the stored shapes say about the architecture is checked first (:func:`architecture_problems`): a
  gated MLP (``linear_fc1`` of 2 x F rows), grouped-query attention (``linear_qkv`` rows other than
  3 x the attention width), no QK-layernorm, norms without bias (RMSNorm), linear layers without bias,
  experts: a ConfigError naming what differs.
- ``args``, ``iteration`` and ``checkpoint_version`` come from ``common.pt``; the version is checked by
  :func:`~persimmon_tools.megatron.consistency.check_checkpoint_version` as for shards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from persimmon_tools.errors import CheckpointError, ConfigError
from persimmon_tools.mapping import match_core
from persimmon_tools.megatron.checkpoint import Checkpoint, MergedTensor
from persimmon_tools.megatron.consistency import check_checkpoint_version
from persimmon_tools.megatron.dist_checkpoint import DistCheckpoint, DistTensor
from persimmon_tools.megatron.dist_layout import COMMON_FILE
from persimmon_tools.megatron.lazy import LazyTensor
from persimmon_tools.megatron.release import Release
from persimmon_tools.ops import Parallel, merge_dim

log = logging.getLogger(__name__)

_A = "decoder.layers.self_attention."
_M = "decoder.layers.mlp."
#: (offsets, sizes, view) of one stored box of a tensor or of one layer of it
Piece = tuple[tuple[int, ...], tuple[int, ...], LazyTensor]


def _shape(dist: DistCheckpoint, key: str) -> tuple[int, ...] | None:
    t = dist.tensors.get(key)
    return t.shape if t is not None else None


def architecture_problems(dist: DistCheckpoint) -> list[str]:
    """What the stored keys and global shapes say differs from Persimmon's architecture (module docstring)."""
    keys = set(dist.tensors)
    problems = []
    fc1, fc2 = _shape(dist, _M + "linear_fc1.weight"), _shape(dist, _M + "linear_fc2.weight")
    if fc1 and fc2 and len(fc1) == len(fc2) == 3 and fc1[1] != fc2[2]:
        gated = " (a gated MLP: SwiGLU/GeGLU, args.swiglu)" if fc1[1] == 2 * fc2[2] else ""
        problems.append(
            f"{_M}linear_fc1.weight has {fc1[1]} rows per layer but linear_fc2.weight {fc2[2]} "
            f"columns{gated}; Persimmon's MLP is not gated (squared ReLU of one projection)"
        )
    qkv, proj = _shape(dist, _A + "linear_qkv.weight"), _shape(dist, _A + "linear_proj.weight")
    if qkv and proj and len(qkv) == len(proj) == 3 and qkv[1] != 3 * proj[2]:
        problems.append(
            f"{_A}linear_qkv.weight has {qkv[1]} rows per layer, not 3 x {proj[2]} (the attention width of "
            "linear_proj): grouped-query or multi-query attention (args.num_query_groups); Persimmon's "
            "attention has as many key/value heads as query heads"
        )
    if qkv and not {_A + "q_layernorm.weight", _A + "k_layernorm.weight"} <= keys:
        problems.append("no q_layernorm / k_layernorm: Persimmon normalises queries and keys (QK-layernorm)")
    for fused in (_A + "linear_qkv.layer_norm_", _M + "linear_fc1.layer_norm_"):
        if fused + "weight" in keys and fused + "bias" not in keys:
            problems.append(
                f"{fused}weight has no {fused}bias: RMSNorm (args.normalization); Persimmon uses LayerNorm"
            )
    unbiased = [
        k
        for k in ("linear_qkv", "linear_proj")
        if _A + k + ".weight" in keys and _A + k + ".bias" not in keys
    ]
    unbiased += [
        k for k in ("linear_fc1", "linear_fc2") if _M + k + ".weight" in keys and _M + k + ".bias" not in keys
    ]
    if unbiased:
        problems.append(f"{', '.join(unbiased)} have no bias (args.add_bias_linear False); Persimmon's have")
    experts = sorted(k for k in keys if ".experts." in k or ".router." in k)
    if experts:
        problems.append(f"{experts[0]}: a mixture of experts; Persimmon's MLP is dense")
    return problems


def _split(
    label: str, kind: Parallel | None, shape: tuple[int, ...], pieces: Sequence[Piece]
) -> tuple[LazyTensor, ...]:
    """The pieces of one tensor (or one layer) as MergedTensor parts: one piece, or a 1-D split along the dim
    ``kind`` joins, in order; CheckpointError naming ``label`` otherwise."""
    if len(pieces) == 1:
        return (pieces[0][2],)
    split = [d for d in range(len(shape)) if any(sizes[d] != shape[d] for _, sizes, _ in pieces)]
    dim = merge_dim(kind, len(shape)) if kind is not None else None
    if split != [dim] or dim is None:
        how = f"split along dim {dim}" if dim is not None else "stored in one chunk"
        raise CheckpointError(
            f"{label} {list(shape)} is stored in {len(pieces)} chunks split along dim(s) {split}; a "
            f"{kind.value if kind else 'tensor no rule names'} tensor is read only when {how}",
            hint="save the checkpoint again with Megatron-LM (tensor parallelism splits each tensor along "
            "one dimension)",
        )
    return tuple(view for _, _, view in sorted(pieces, key=lambda p: p[0][dim]))


def _layer_pieces(t: DistTensor) -> list[list[Piece]]:
    """For each layer of a stacked tensor, the chunks covering it, each viewed at that layer (one pass: the
    layers of all chunks add up to at most the elements stored)."""
    layers: list[list[Piece]] = [[] for _ in range(t.shape[0])]
    for c in t.chunks:
        for i in range(c.offsets[0], c.offsets[0] + c.sizes[0]):
            layers[i].append((c.offsets[1:], c.sizes[1:], c.select(i)))
    return layers


def _kind_of_split(t: DistTensor) -> Parallel | None:
    """How to join the chunks of a tensor no rule names (for reading it: it is reported as unknown)."""
    split = [d for d in range(len(t.shape)) if any(c.sizes[d] != t.shape[d] for c in t.chunks)]
    return {0: Parallel.COLUMN, 1: Parallel.ROW}.get(split[0]) if len(split) == 1 else None


def load_dist_checkpoint(release: Release) -> Checkpoint:
    """The merged, lazy, legacy-keyed view of ``release``'s torch_dist checkpoint (module docstring)."""
    dist = release.dist
    if dist is None:
        raise ValueError(f"{release.source} is not a torch_dist checkpoint")
    problems = architecture_problems(dist)
    if problems:
        raise ConfigError(
            f"not a Persimmon checkpoint: {dist.path} stores another architecture:\n  - "
            + "\n  - ".join(problems),
            hint="persimmon-tools converts Persimmon checkpoints (LayerNorm with bias, QK-layernorm, full "
            "multi-head attention, an ungated squared-ReLU MLP, linear biases)",
        )
    version = check_checkpoint_version(dist.checkpoint_version, str(dist.path / COMMON_FILE))
    tensors: dict[str, MergedTensor] = {}
    layers: tuple[str, int] | None = None
    for key, t in dist.tensors.items():
        rule = match_core(key)
        if rule is None:
            kind = _kind_of_split(t)
            parts = _split(key, kind, t.shape, [(c.offsets, c.sizes, c.tensor) for c in t.chunks])
            tensors[key] = MergedTensor(key, parts, kind)
            continue
        if len(t.shape) != len(rule.shape) + rule.per_layer or 0 in t.shape:
            stacked = "[layers, " if rule.per_layer else "["
            raise CheckpointError(
                f"{dist.path}: {key} has shape {list(t.shape)}, expected {stacked}{', '.join(rule.shape)}]",
                hint="the checkpoint is not a Megatron-Core GPT model of Persimmon's layout, or is damaged",
            )
        if not rule.per_layer:
            pieces = [(c.offsets, c.sizes, c.tensor) for c in t.chunks]
            tensors[rule.source_key()] = MergedTensor(
                rule.source_key(), _split(key, rule.parallel, t.shape, pieces), rule.parallel
            )
            continue
        if layers is not None and layers[1] != t.shape[0]:
            raise CheckpointError(
                f"{dist.path}: {key} stacks {t.shape[0]} layers but {layers[0]} stacks {layers[1]}",
                hint="the checkpoint is damaged or mixes models",
            )
        layers = (key, t.shape[0])
        for i, pieces in enumerate(_layer_pieces(t)):
            name = rule.source_key(i)
            parts = _split(f"{key} (layer {i})", rule.parallel, t.shape[1:], pieces)
            tensors[name] = MergedTensor(name, parts, rule.parallel)
    if dist.objects:
        log.debug(
            "%s: %d byte objects (_extra_state, RNG state, ...) are not read", dist.path, len(dist.objects)
        )
    return Checkpoint(
        release=release,
        tensors=tensors,
        args=dist.args,
        iteration=dist.iteration,
        globals_seen=dict(dist.globals_seen),
        top_level_keys=sorted(dist.common),
        checkpoint_version=version,
        record_tables=dist.record_tables,
    )
