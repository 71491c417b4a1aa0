"""verify's own interpretation of a Megatron-Core ``torch_dist`` checkpoint: the same Megatron-keyed view as
:mod:`persimmon_tools.verification.source_merge` gives for a legacy release.

The bytes come from the toolkit's one byte layer (:func:`persimmon_tools.megatron.dist_checkpoint.open_torch_dist`
lists every stored chunk of every tensor as a lazy tensor read from its ``.distcp`` file). What the keys and
chunks *mean* is decided here, written from Megatron-Core's ``GPTModel`` (local layer spec) and apart from the
converter's mapping table, so a wrong row in the table shows up as a disagreement in
:mod:`persimmon_tools.verification.agreement`:

- a per-layer tensor is stored once for all layers, stacked on a leading layer axis (``[L, ...]``); layer
  ``i`` of it is the slice ``[i]`` of the chunk(s) that hold it (``DistChunk.select``, a view of the stored
  bytes, nothing copied);
- a tensor-parallel split shows as several chunks of one layer that differ in exactly one other dim; they
  are joined along that dim in offset order (the chunk grid itself says the dim, not a table);
- Megatron-Core names (``decoder.layers.self_attention.linear_qkv.weight``, the input layernorm fused into
  ``linear_qkv.layer_norm_weight``, ...) are read as the legacy names the reference's forward pass uses
  (``language_model.encoder.layers.{i}.self_attention.query_key_value.weight``, ...);
- ``_extra_state`` objects carry no weights (``None`` for the local layer spec) and are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.dist_checkpoint import DistCheckpoint, DistTensor, open_torch_dist
from persimmon_tools.megatron.lazy import LazyTensor, Reader
from persimmon_tools.megatron.release import Release
from persimmon_tools.verification.source_merge import SourceCheckpoint, SourceTensor

_LAYERS = "decoder.layers."
_LEGACY_LAYER = "language_model.encoder.layers.{i}."

#: Megatron-Core ``GPTModel`` names → the legacy GPT model's (what verify's forward pass reads).
_GLOBALS = {
    "embedding.word_embeddings.weight": "language_model.embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight": "language_model.encoder.final_layernorm.weight",
    "decoder.final_layernorm.bias": "language_model.encoder.final_layernorm.bias",
    "output_layer.weight": "word_embeddings_for_head.weight",
}
_PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.q_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attention.q_layernorm.bias": "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight": "self_attention.k_layernorm.weight",
    "self_attention.k_layernorm.bias": "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "self_attention.linear_proj.bias": "self_attention.dense.bias",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}


def _join(
    name: str, label: str, pieces: list[tuple[tuple[int, ...], LazyTensor]], shape: tuple[int, ...]
) -> SourceTensor:
    """Tensor ``name`` of ``shape`` from chunks at their offsets: one chunk, or chunks along a single dim.
    ``label`` names it in messages (the stored key, and the layer)."""
    if len(pieces) == 1:
        offsets, part = pieces[0]
        if any(offsets) or tuple(part.shape) != shape:
            raise CheckpointError(
                f"{label}: its one stored chunk (offsets {list(offsets)}, shape {list(part.shape)}) does not cover "
                f"the tensor {list(shape)}",
                hint="the checkpoint is incomplete or damaged",
            )
        return SourceTensor(name, (part,), None)
    varying = {d for d in range(len(shape)) if len({o[d] for o, _ in pieces}) > 1}
    if len(varying) != 1:
        raise CheckpointError(
            f"{label}: its {len(pieces)} stored chunks are split along dims {sorted(varying)}; verify reads a "
            "split along one dim (tensor parallelism)",
            hint="re-save the checkpoint with Megatron-Core, or convert it with a Megatron-Core tool first",
        )
    (dim,) = varying
    pieces = sorted(pieces, key=lambda p: p[0][dim])
    at = 0
    for offsets, part in pieces:
        if offsets[dim] != at or any(
            n != m for d, (n, m) in enumerate(zip(part.shape, shape, strict=True)) if d != dim
        ):
            raise CheckpointError(
                f"{label}: a stored chunk at offsets {list(offsets)} with shape {list(part.shape)} does not continue "
                f"the chunks before it along dim {dim} of {list(shape)}",
                hint="the checkpoint is incomplete or damaged",
            )
        at += part.shape[dim]
    if at != shape[dim]:
        raise CheckpointError(
            f"{label}: its stored chunks cover {at} of {shape[dim]} along dim {dim}",
            hint="the checkpoint is incomplete or damaged",
        )
    return SourceTensor(name, tuple(p for _, p in pieces), dim)


def _layers(key: str, tensor: DistTensor, legacy: str, reader: Reader | None) -> dict[str, SourceTensor]:
    out: dict[str, SourceTensor] = {}
    layers = tensor.shape[0] if tensor.shape else 0
    for i in range(layers):
        pieces = []
        for chunk in tensor.chunks:
            first, count = chunk.offsets[0], chunk.sizes[0]
            if first <= i < first + count:
                pieces.append((tuple(chunk.offsets[1:]), chunk.select(i).through(reader)))
        name = _LEGACY_LAYER.format(i=i) + legacy
        if not pieces:
            raise CheckpointError(
                f"{key}: no stored chunk holds layer {i}", hint="the checkpoint is incomplete"
            )
        out[name] = _join(name, f"{key} (layer {i})", pieces, tuple(tensor.shape[1:]))
    return out


def load_core_source(
    release: Release, dist: DistCheckpoint, *, reader: Reader | None = None
) -> SourceCheckpoint:
    """Interpret a torch_dist checkpoint with verify's own reading of Megatron-Core's names and chunk grid."""
    tensors: dict[str, SourceTensor] = {}
    where: dict[str, tuple[str, ...]] = {}
    for key, tensor in dist.tensors.items():
        if key in _GLOBALS:
            pieces = [(tuple(c.offsets), c.tensor.through(reader)) for c in tensor.chunks]
            tensors[_GLOBALS[key]] = _join(_GLOBALS[key], key, pieces, tuple(tensor.shape))
            where[_GLOBALS[key]] = (f"{dist.path.name}:{key}",)
        elif key.startswith(_LAYERS) and key[len(_LAYERS) :] in _PER_LAYER:
            found = _layers(key, tensor, _PER_LAYER[key[len(_LAYERS) :]], reader)
            tensors.update(found)
            where.update({name: (f"{dist.path.name}:{key}",) for name in found})
        else:
            raise CheckpointError(
                f"{dist.path}: tensor {key} is not part of a Persimmon-shaped Megatron-Core GPTModel",
                hint="verify reads GPTModel checkpoints with Persimmon's layers (local or Transformer Engine spec)",
            )
    version: Any = dist.checkpoint_version
    return SourceCheckpoint(
        release=release,
        tensors=tensors,
        args=dist.args,
        iteration=dist.iteration,
        globals_seen=set(),
        checkpoint_version=float(version) if isinstance(version, int | float) else None,
        shards=where,
    )


def load_dist_source(release: Release, *, reader: Reader | None = None) -> SourceCheckpoint:
    """:func:`load_core_source` on the torch_dist checkpoint ``release`` names (its ``kind`` is ``"torch_dist"``):
    the one the byte layer opened with the release (:attr:`Release.dist`), so its chunks' CRC-32 states are
    the ones :func:`~persimmon_tools.megatron.records.finish_records` completes, and no chunk is checked twice."""
    dist = release.dist
    if dist is None:  # a Release made by hand
        dist = open_torch_dist(Path(release.source), iteration=release.iteration)
    return load_core_source(release, dist, reader=reader)
