"""Streaming safetensors writer (the all-or-nothing output folder is :mod:`persimmon_tools.conversion.output_dir`).

``safetensors.torch.save_file`` needs a whole shard in memory (5 GB by default); we write the same format
(8-byte little-endian header length, JSON header with ``data_offsets``, ``{"format": "pt"}`` metadata, raw
little-endian data) tensor by tensor, in bounded chunks. Bytes that need no change (same dtype, no
interleaving) are read in user space in chunks, CRC-checked against their zip records by the byte layer
(:mod:`persimmon_tools.megatron.records`), screened for NaN/Inf and written. The shard plan
itself comes from ``huggingface_hub.split_torch_state_dict_into_shards`` (given meta tensors), so file
names and the index match what ``save_pretrained`` would write. Every written shard is reopened with
``safetensors.safe_open`` and its header compared with the plan.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from persimmon_tools.conversion.plan import PlannedTensor
from persimmon_tools.conversion.sizes import SIZE_HINT, parse_size
from persimmon_tools.conversion.values import WriteStats, count_nonfinite, count_overflow, narrows
from persimmon_tools.errors import ConversionError, UsageError
from persimmon_tools.megatron.lazy import preadv_exact

log = logging.getLogger(__name__)

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CHUNK_BYTES = 64 << 20  # row blocks for the cast / interleave path
#: Copy chunk of the same-dtype path. Measured on the 8B preset here (17.5 GiB, 2 cores, 1 torch thread):
#: 8 MiB 13.2 s, 16 MiB 18.0 s, 32 MiB 20.6 s; small chunks stay in the CPU cache between read and check.
COPY_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardPlan:
    files: dict[str, list[PlannedTensor]]
    is_sharded: bool
    total_size: int


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int | str) -> ShardPlan:
    """Group tensors into ``model-0000k-of-0000n.safetensors`` files with huggingface_hub's sharding helper.

    The generic ``split_state_dict_into_shards_factory`` is used with the planned sizes: its torch variant
    imports ``torch.distributed.tensor`` (a noticeable start-up cost, see docs/performance.md) to size
    tensors we never materialise. File names and grouping are the same as ``save_pretrained``'s.
    """
    from huggingface_hub import constants, split_state_dict_into_shards_factory

    try:
        max_shard_size = parse_size(max_shard_size)
    except ValueError as err:
        raise UsageError(f"max shard size {max_shard_size!r}: {err}", hint=SIZE_HINT) from None

    split = split_state_dict_into_shards_factory(
        {p.target: p for p in tensors},
        get_storage_size=lambda p: p.nbytes,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=max_shard_size,
    )
    by_name = {p.target: p for p in tensors}
    files = {fname: [by_name[n] for n in names] for fname, names in split.filename_to_tensors.items()}
    return ShardPlan(files=files, is_sharded=split.is_sharded, total_size=sum(p.nbytes for p in tensors))


def _header(tensors: list[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in tensors:
        header[p.target] = {
            "dtype": ST_DTYPES[p.out_dtype],
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class _CheckedCopier:
    """Copies byte ranges to an output fd, screening every chunk for NaN/Inf, in bounded memory.

    A reader thread reads chunk ``i + 1`` into one of a few reusable buffers (``preadv``) and screens it
    (``aminmax``, run with one torch thread: OpenMP workers spinning against the writer thread cost more
    than they gain), while this thread writes chunk ``i``: reading + checking and writing run on both cores
    at once. Memory stays at ``_BUFFERS`` chunks whatever the tensor size. (Kernel-side ``copy_file_range``
    with a separate check pass over an ``mmap`` is slower: benchmarks/results/HISTORY.md has the figures.)
    """

    _BUFFERS = 3

    def __init__(self, out_fd: int, stats: WriteStats, progress: Callable[[int], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out_fd, self.stats, self.progress = out_fd, stats, progress
        self.buffers = [bytearray() for _ in range(self._BUFFERS)]
        self.fds: dict[Path, int] = {}
        self.pool = ThreadPoolExecutor(max_workers=1)

    def __enter__(self) -> _CheckedCopier:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)
        self.close()

    def close(self) -> None:
        self.pool.shutdown()
        for fd in self.fds.values():
            os.close(fd)

    def _read_and_check(self, job: tuple[Path, int, int, torch.dtype], slot: int) -> int:
        """Fill buffer ``slot`` with the job's bytes; return its NaN/Inf count."""
        src, off, n, dtype = job
        fd = self.fds.get(src)
        if fd is None:
            fd = self.fds[src] = os.open(src, os.O_RDONLY)
        if len(self.buffers[slot]) < n:
            self.buffers[slot] = bytearray(n)
        view = memoryview(self.buffers[slot])[:n]
        preadv_exact(fd, view, off, str(src))
        return count_nonfinite(torch.frombuffer(view, dtype=dtype)) if n else 0

    def copy(self, tensors: list[tuple[list, torch.dtype, str]]) -> list[int]:
        """Copy each ``(byte ranges, dtype, name)`` in order, as one pipeline (no stall between tensors);
        return the bytes written per tensor."""
        jobs, owner = [], []
        for index, (ranges, dtype, _) in enumerate(tensors):
            step = COPY_CHUNK_BYTES - COPY_CHUNK_BYTES % dtype.itemsize
            for src, off, size in ranges:
                for a in range(0, size, step):
                    jobs.append((src, off + a, min(step, size - a), dtype))
                    owner.append(index)
        ahead = self._BUFFERS - 1
        pending = [
            self.pool.submit(self._read_and_check, jobs[i], i % self._BUFFERS)
            for i in range(min(ahead, len(jobs)))
        ]
        written = [0] * len(tensors)
        for i, job in enumerate(jobs):
            bad = pending.pop(0).result()
            if i + ahead < len(jobs):
                nxt = i + ahead
                pending.append(self.pool.submit(self._read_and_check, jobs[nxt], nxt % self._BUFFERS))
            name = tensors[owner[i]][2]
            if bad:
                self.stats.nonfinite[name] = self.stats.nonfinite.get(name, 0) + bad
            _write_all(self.out_fd, memoryview(self.buffers[i % self._BUFFERS])[: job[2]])
            written[owner[i]] += job[2]
            self.progress(job[2])
        return written


def _write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until every byte of ``view`` is written (writes may be short)."""
    while view.nbytes:
        view = view[os.write(fd, view) :]


def _chunks(p: PlannedTensor, stats: WriteStats, check_finite: bool) -> Iterator[torch.Tensor]:
    """Row blocks of ``p`` in the output dtype, counting non-finite source values and, for a narrowing cast
    (:func:`~persimmon_tools.conversion.values.narrows`), finite values that became ±inf."""
    for block in p.source.iter_rows(CHUNK_BYTES):
        if check_finite:
            bad = count_nonfinite(block)
            if bad:
                stats.nonfinite[p.target] = stats.nonfinite.get(p.target, 0) + bad
        cast = block if block.dtype == p.out_dtype else block.to(p.out_dtype)
        if narrows(block.dtype, p.out_dtype):
            over = count_overflow(block, cast)
            if over:
                stats.overflow[p.target] = stats.overflow.get(p.target, 0) + over
                stats.overflow_dtype[p.target] = p.out_dtype
        yield cast


def write_shard(
    path: Path,
    tensors: list[PlannedTensor],
    stats: WriteStats,
    *,
    check_finite: bool = True,
    progress: Callable[[int], None] = lambda n: None,
    sync: bool = True,
) -> None:
    """Write one safetensors file, streaming each tensor's bytes (see module docstring).

    With ``sync=False`` the caller must call :func:`finish_shard` before relying on the file: convert
    does it in another thread, so the fsync of one shard overlaps the writing of the next.
    """
    header = _header(tensors)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with _CheckedCopier(fd, stats, progress) as copier:
            _write_all(fd, memoryview(header))
            for how, group in itertools.groupby(tensors, key=lambda p: _how_to_write(p)):
                group = list(group)
                if how == "checked":
                    written = copier.copy([(p.source.byte_ranges(), p.out_dtype, p.target) for p in group])
                else:
                    written = [_write_one(p, how, fd, stats, check_finite, progress) for p in group]
                for p, n in zip(group, written, strict=True):
                    if n != p.nbytes:
                        raise ConversionError(
                            f"{p.target}: wrote {n} bytes, expected {p.nbytes}",
                            hint="the source checkpoint is inconsistent; re-download it",
                        )
                    stats.tensors += 1
                    stats.bytes_written += n
    finally:
        os.close(fd)
    if sync:
        finish_shard(path, tensors)


def finish_shard(path: Path, tensors: list[PlannedTensor]) -> None:
    """fsync a shard written with ``sync=False`` and check its header against the plan."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # Linux flushes the file's dirty pages through any descriptor of it
    finally:
        os.close(fd)
    _check_written(path, tensors)


def _how_to_write(p: PlannedTensor) -> str:
    """``checked`` (same dtype: read in user space, so every record's CRC-32 is checked on the way, and
    screened for NaN/Inf) or ``cast`` (dtype change or interleaving: row blocks through torch). Since
    2026-12-07 no byte is copied by the kernel (``copy_file_range``), where the CRC check cannot see it."""
    if p.out_dtype != p.source.dtype or p.source.byte_ranges() is None:
        return "cast"
    return "checked"


def _write_one(
    p: PlannedTensor,
    how: str,
    fd: int,
    stats: WriteStats,
    check_finite: bool,
    progress: Callable[[int], None],
) -> int:
    """Write one tensor by the ``cast`` path; return the bytes written."""
    written = 0
    for block in _chunks(p, stats, check_finite):
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
        _write_all(fd, memoryview(data))
        written += data.nbytes
        progress(data.nbytes)
    return written


def _check_written(path: Path, tensors: list[PlannedTensor]) -> None:
    """Reopen a written shard with safetensors and compare names, shapes and dtypes with the plan."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != {p.target for p in tensors}:
            raise ConversionError(f"{path.name}: safetensors reports different tensor names than written")
        for p in tensors:
            sl = f.get_slice(p.target)
            if tuple(sl.get_shape()) != p.shape or sl.get_dtype() != ST_DTYPES[p.out_dtype]:
                raise ConversionError(
                    f"{path.name}: {p.target} reads back as {sl.get_dtype()} "
                    f"{sl.get_shape()}, wrote {ST_DTYPES[p.out_dtype]} {list(p.shape)}"
                )


def write_index(folder: Path, plan: ShardPlan) -> None:
    weight_map = {p.target: fname for fname, ts in plan.files.items() for p in ts}
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
