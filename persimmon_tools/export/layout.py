"""The target layout of an export: ``args`` and one ``model_optim_rng.pt`` object per (tensor rank, pipeline
stage) whose tensors stream from the source (what TP/PP and the vocab padding must be:
:mod:`persimmon_tools.export.checks`).

Splitting is the inverse of ``convert``'s merge, driven by the same table (:mod:`persimmon_tools.mapping`,
each rule's parallel kind) through :func:`persimmon_tools.ops.shard_rows` (bounds from
:func:`~persimmon_tools.ops.shard_bounds`):

- vocab (embedding, untied head ``[V, H]``) and column (``query_key_value`` ``[3·nh·hd, H]``, per-head
  ``[q|k|v]`` so that every rank holds whole heads; ``dense_h_to_4h`` ``[F, H]`` and their biases): rows
  ``[r·n/tp, (r+1)·n/tp)``;
- row (``dense`` ``[H, nh·hd]``, ``dense_4h_to_h`` ``[H, F]``): columns ``[r·m/tp, (r+1)·m/tp)``;
- replicated (layernorms, row-parallel biases, ``inv_freq``): copied to every rank.

Each shard tensor is a :class:`~persimmon_tools.megatron.ptwriter.TensorSpec` whose row blocks are read
from the source when the file is written (about 64 MiB at a time), so memory stays bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from persimmon_tools.conversion.values import count_overflow, narrows
from persimmon_tools.errors import ConversionError
from persimmon_tools.export.checks import ValueCounts
from persimmon_tools.export.source import ExportSource, RowTensor
from persimmon_tools.mapping import INV_FREQ, RULES, match_source, parallel_kind
from persimmon_tools.megatron.ptwriter import TensorSpec
from persimmon_tools.megatron.release_writer import EMBEDDING, HEAD, stage_layers, stage_model
from persimmon_tools.ops import Parallel, shard_rows, shard_shape

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 << 20


def inv_freq(base: float, rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """ADEPT's buffer: ``1 / base ** (arange(0, rotary_dim, 2) / rotary_dim)`` in float32, then cast with the
    module to the params dtype (``RotaryEmbedding.__init__``; ``Float16Module``). Shape ``[rotary_dim/2]``."""
    return (1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))).to(dtype)


@dataclass
class ShardTensor:
    """The rank-``rank`` piece of one logical tensor, produced in row blocks (cast to ``dtype``)."""

    key: str
    tensor: RowTensor | None  # None: computed (inv_freq)
    kind: Parallel
    full_shape: tuple[int, ...]  # after vocab padding
    tp: int
    rank: int
    dtype: torch.dtype
    computed: torch.Tensor | None = None
    counts: ValueCounts | None = None  # where NaN/Inf source values are counted (None: not counted)

    def spec(self) -> TensorSpec:
        if self.computed is not None:
            return TensorSpec.of(self.computed)  # in its own dtype (see _inv_freqs)
        shape = shard_shape(self.full_shape, self.kind, self.tp, self.rank)
        if shape[0] <= self._rows_per_block():  # one block: nothing to read ahead of
            return TensorSpec(shape, self.dtype, lambda: self._blocks(shape[0]))
        return TensorSpec(shape, self.dtype, lambda: read_ahead(self._blocks(shape[0])))

    def _rows_per_block(self) -> int:
        """Rows of the full tensor in one block of about BLOCK_BYTES (at least one)."""
        assert self.tensor is not None
        return max(1, BLOCK_BYTES // max(1, math.prod(self.full_shape[1:]) * self.tensor.dtype.itemsize))

    def _blocks(self, rows: int) -> Iterator[torch.Tensor]:
        """The piece's ``rows`` rows in blocks of about BLOCK_BYTES of full-tensor rows
        (:func:`persimmon_tools.ops.shard_rows`: column/vocab read the rank's rows, row the rank's columns)."""
        assert self.tensor is not None
        have, step = self.tensor.shape[0], self._rows_per_block()

        def read(lo: int, hi: int) -> torch.Tensor:
            return self._read(lo, hi, have)

        counts = self.counts if self.kind is not Parallel.REPLICATED or self.rank == 0 else None
        for a in range(0, rows, step):
            block = shard_rows(read, self.full_shape, self.kind, self.tp, self.rank, a, min(rows, a + step))
            if counts is not None:
                counts.add(self.key, block)
            yield self._cast(block)

    def _read(self, a: int, b: int, have: int) -> torch.Tensor:
        """Source rows ``[a, b)``; rows at or past the source's ``have`` are vocab padding (zeros)."""
        assert self.tensor is not None
        if b <= have:
            return self.tensor.read_rows(a, b)
        pad = torch.zeros((b - max(a, have), *self.full_shape[1:]), dtype=self.tensor.dtype)
        return pad if a >= have else torch.cat([self.tensor.read_rows(a, have), pad])

    def _cast(self, block: torch.Tensor) -> torch.Tensor:
        if block.dtype == self.dtype:
            return block.contiguous()
        out = block.to(self.dtype)
        if narrows(block.dtype, out.dtype):
            bad = count_overflow(block, out)  # convert's check: values the cast turned into ±inf
            if bad:
                raise ConversionError(
                    f"{self.key}: {bad} values overflow {str(self.dtype).removeprefix('torch.')} (become inf)",
                    hint="choose a wider --dtype (fp32 or bf16); nothing was written",
                )
        return out.contiguous()


def read_ahead(blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Produce the next block in a thread while the caller checksums and writes the current one.

    Reading (``pread``), slicing and casting release the GIL, so on a cold page cache the disk read overlaps
    the zip CRC32 and the write (one block ahead: memory grows by one block). An error in the reader is
    raised here; closing the generator early stops the reader at its next block.
    """
    slot: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def run() -> None:
        try:
            for block in blocks:
                while not stop.is_set():
                    try:
                        slot.put(("block", block), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slot.put(("end", None))
        except BaseException as err:  # handed to the consumer, which raises it
            slot.put(("error", err))

    reader = threading.Thread(target=run, name="export-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            kind, item = slot.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                slot.get_nowait()
        reader.join()


def shard_args(
    base: dict[str, Any], *, tp: int, pp: int, tp_rank: int, pp_rank: int, vocab_rows: int, iteration: int
) -> argparse.Namespace:
    """``ckpt["args"]`` of one shard: ``base`` with the new layout's sizes (and, where ``base`` has them,
    the saving process's ranks: ``rank = tp_rank + tp · pp_rank``, Megatron's order with one data-parallel
    replica, ``local_rank = rank % 8`` as on 8-GPU nodes)."""
    fields = dict(base)
    fields["tensor_model_parallel_size"] = tp
    fields["pipeline_model_parallel_size"] = pp
    fields["padded_vocab_size"] = vocab_rows
    rank = tp_rank + tp * pp_rank
    updates = {
        "rank": rank,
        "local_rank": rank % 8,
        "world_size": tp * pp,
        "tensor_model_parallel_rank": tp_rank,
        "pipeline_model_parallel_rank": pp_rank,
        "data_parallel_size": 1,
        "data_parallel_rank": 0,
        "iteration": iteration,
    }
    for name, value in updates.items():
        if name in fields:
            fields[name] = value
    return argparse.Namespace(**fields)


def shard_objects(
    source: ExportSource,
    *,
    tp: int,
    pp: int,
    dtype: torch.dtype,
    vocab_rows: int,
    iteration: int,
    base_args: dict[str, Any],
    checkpoint_version: Any,
    rope_base: float,
    counts: ValueCounts | None = None,
) -> dict[tuple[int, int], dict]:
    """One checkpoint object per (tp_rank, pp_rank): ``args``, ``checkpoint_version``, ``iteration`` and
    ``model`` (no optimizer or RNG state: ADEPT loads with ``--no-load-optim --no-load-rng``). ``counts``
    collects NaN/Inf source values while the shards are written."""
    d = source.dims
    computed = _inv_freqs(source, dtype, rope_base)
    objects = {}
    stages = stage_layers(d.num_layers, pp)
    for s in range(pp):
        for t in range(tp):
            specs: dict[str, TensorSpec] = {}
            for key in megatron_keys(source):
                kind = parallel_kind(key) or Parallel.REPLICATED
                tensor = source.tensors.get(key)
                shape = tuple(tensor.shape) if tensor is not None else tuple(computed[key].shape)
                if key in (EMBEDDING, HEAD):
                    shape = (vocab_rows, *shape[1:])
                piece = ShardTensor(
                    key, tensor, kind, shape, tp, t, dtype, computed=computed.get(key), counts=counts
                )
                specs[key] = piece.spec()
            args = shard_args(
                base_args, tp=tp, pp=pp, tp_rank=t, pp_rank=s, vocab_rows=vocab_rows, iteration=iteration
            )
            objects[(t, s)] = {
                "args": args,
                "checkpoint_version": checkpoint_version,
                "iteration": iteration,
                "model": stage_model(specs, stages[s], first=s == 0, last=s == pp - 1),
            }
    return objects


def megatron_keys(source: ExportSource) -> list[str]:
    """Every Megatron key to write: the source's own order when it is a Megatron checkpoint with its
    ``inv_freq`` buffers, else module order (embedding; per layer, the table's order; final norm; head)."""
    inv = [INV_FREQ.source_key(i) for i in range(source.dims.num_layers)]
    if all(k in source.tensors for k in inv):
        return list(source.tensors)
    keys = set(source.tensors) | set(inv)
    ordered = [EMBEDDING] if EMBEDDING in keys else []
    layered = [r for r in RULES if r.per_layer]
    for i in range(source.dims.num_layers):
        ordered += [k for r in layered if (k := r.source_key(i)) in keys]
    ordered += [r.source for r in RULES if not r.per_layer and r.source != EMBEDDING and r.source in keys]
    return ordered


def _inv_freqs(source: ExportSource, dtype: torch.dtype, base: float) -> dict[str, torch.Tensor]:
    """``inv_freq`` of every layer, as the release would store it.

    A stored buffer is copied as it is (its bytes and dtype) unless the export changes the weights' dtype and
    the buffer had followed it (a buffer is cast with the module: ``Float16Module``); then, and when the
    source has none (HF folders), it is recomputed in the new dtype (:func:`inv_freq`). A stored buffer that
    differs from the recomputed one is kept, with a warning.
    """
    d = source.dims
    weights = next((t.dtype for k, t in source.tensors.items() if not _is_inv_freq(k)), dtype)
    fresh = inv_freq(base, d.rotary_dim, dtype)
    out = {}
    differs = 0
    for i in range(d.num_layers):
        key = INV_FREQ.source_key(i)
        stored = source.tensors.get(key)
        if stored is not None and (dtype == weights or stored.dtype != weights):
            value = stored.read_rows(0, stored.shape[0])
            differs += not torch.equal(value, inv_freq(base, d.rotary_dim, value.dtype))
            out[key] = value
        else:
            out[key] = fresh
    if differs:
        log.warning(
            "%d layer(s) store an inv_freq that differs from 1/base**(arange(0, %d, 2)/%d) with base %s; "
            "the stored buffers are kept",
            differs,
            d.rotary_dim,
            d.rotary_dim,
            base,
        )
    return out


def _is_inv_freq(key: str) -> bool:
    match = match_source(key)
    return match is not None and match.rule is INV_FREQ
