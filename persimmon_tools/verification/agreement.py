"""Do the converter's and verify's interpretations of the source agree? Checked before any forward pass.

Both sides read the source through the one byte layer (:mod:`persimmon_tools.megatron`: tar listing, torch
zip records, restricted unpickler, lazy tensors; proved against ``torch.load`` and ``tarfile`` by
``tests/megatron/test_byte_layer_oracle.py``). What they make of those bytes is written twice: the
converter's merge (:mod:`persimmon_tools.megatron.checkpoint`: stage renumbering, TP merge by the mapping
table's parallel kinds) and verify's own (:mod:`persimmon_tools.verification.source_merge`). If the
converter's interpretation has a bug (pipeline stages in the wrong order, a key dropped, TP parts joined in
the wrong order or on the wrong dim, wrong byte ranges copied), the converted folder *and* a reference
built on it would hold the same wrong weights, and the logits would agree. Comparing the two closes that
hole: same iteration, same set of Megatron keys, and for every key the same shape, dtype and *read plan*.

A read plan is the list of ``(file, byte offset, length)`` ranges of the TP parts, in merge order, that an
interpretation reads, and how they are joined (``concatenated``, or rows joined on ``dim 1``). For the
converter it is :meth:`~persimmon_tools.megatron.checkpoint.MergedTensor.byte_ranges` (what its writer
copies) or, for a dim-1 join, its parts' ranges; for verify, :meth:`SourceTensor.read_plans` (a replicated
tensor may be read from any TP rank's copy: verify checked them byte-identical). Comparing plans reads no
weights, so the check costs milliseconds even for 8B. Only a tensor stored as a strided view (never seen in
Megatron files) has no plan; its bytes are compared instead, as two streams of row blocks of about
``block_bytes`` (each side cuts its own; the overlap of the current two blocks is compared), so at most one
block per side is held. Any difference is a failing :class:`~persimmon_tools.verification.findings.Finding`
of kind ``"reader"`` naming the key and what each side reads.

Both checkpoints are duck-typed: ``.iteration`` and ``.tensors: {key: X}`` where ``X`` has ``.shape``,
``.dtype`` and ``.iter_rows(max_bytes)`` (row blocks along dim 0, in order), and for plans
``.byte_ranges()`` / ``.concat_dim`` / ``.parts`` (the converter's) or ``.read_plans()`` (verify's).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.verification.findings import Finding

log = logging.getLogger(__name__)

CONVERTER = "the converter's interpretation (persimmon_tools.megatron.checkpoint)"
OWN = "verify's own interpretation (persimmon_tools.verification.source_merge)"
BLOCK_BYTES = 32 << 20
MAX_KEY_FINDINGS = 20  # per kind of difference; the rest are counted


@dataclass(frozen=True)
class Agreement:
    """The result of :func:`compare_readers`; ``findings`` are empty when ``agree``. ``tensors_compared``
    counts the keys both sides hold (shape, dtype and read plan compared); ``bytes_compared`` the bytes
    compared by value (tensors without a read plan only)."""

    agree: bool
    tensors_compared: int
    bytes_compared: int
    seconds: float
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "tensors_compared": self.tensors_compared,
            "bytes_compared": self.bytes_compared,
            "seconds": round(self.seconds, 3),
            "readers": [CONVERTER, OWN],
            "differences": [f.to_dict() for f in self.findings],
        }


def _describe(t: Any) -> str:
    return f"shape {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _byte_blocks(blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each row block as a flat uint8 view (no copy for contiguous blocks); empty blocks skipped."""
    for block in blocks:
        flat = block.contiguous().reshape(-1).view(torch.uint8)
        if flat.numel():
            yield flat


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bytewise equality of two flat uint8 tensors, 8 bytes at a time where alignment allows (2x faster)."""
    if x.numel() % 8 == 0 and x.storage_offset() % 8 == 0 and y.storage_offset() % 8 == 0:
        return torch.equal(x.view(torch.int64), y.view(torch.int64))
    return torch.equal(x, y)


def _index(flat: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(flat % n if n else 0)
        flat //= max(n, 1)
    return out[::-1]


def _value(chunk: torch.Tensor, k: int, dtype: torch.dtype) -> str:
    size = dtype.itemsize
    return repr(chunk[k * size : (k + 1) * size].clone().view(dtype).item())


def compare_bytes(
    key: str, theirs: Any, ours: Any, block_bytes: int = BLOCK_BYTES
) -> tuple[Finding | None, int]:
    """Stream both tensors (same shape and dtype) and compare their bytes; (finding or None, bytes read).

    The two readers may cut their row blocks differently: the overlapping part of the current block of
    each is compared (views, no copies), so at most one block per reader is held.
    """
    dtype, shape = ours.dtype, tuple(ours.shape)
    size = dtype.itemsize
    ia, ib = _byte_blocks(theirs.iter_rows(block_bytes)), _byte_blocks(ours.iter_rows(block_bytes))
    empty = torch.empty(0, dtype=torch.uint8)
    a = b = empty
    first, differing, pos = None, 0, 0
    while True:
        a = a if a.numel() else next(ia, empty)
        b = b if b.numel() else next(ib, empty)
        if not a.numel() or not b.numel():
            if a.numel() or b.numel():
                return Finding(
                    "reader",
                    key,
                    f"{CONVERTER} gives {'more' if a.numel() else 'fewer'} bytes than {OWN} (from byte "
                    f"{pos} on), though both say {_describe(ours)}",
                ), pos
            break
        n = min(a.numel(), b.numel())  # whole elements: every block holds whole rows
        x, y = a[:n], b[:n]
        if not _equal(x, y):  # details only for a differing stretch; equal ones go at memory speed
            ne = (x.view(-1, size) != y.view(-1, size)).any(dim=1)
            if first is None:
                k = int(ne.nonzero()[0])
                first = (pos // size + k, _value(x, k, dtype), _value(y, k, dtype))
            differing += int(ne.sum())
        a, b, pos = a[n:], b[n:], pos + n
    if first is None:
        return None, pos
    idx, mine, yours = first
    return Finding(
        "reader",
        key,
        f"{CONVERTER} gives {mine} at {_index(idx, shape)}, {OWN} gives {yours} ({differing} of "
        f"{math.prod(shape)} elements differ; both {_describe(ours)})",
    ), pos


Plan = tuple[str, tuple[tuple[str, int, int], ...]]
_realpath = functools.lru_cache(maxsize=256)(os.path.realpath)


def _normal(plan: Plan) -> Plan:
    """One spelling per plan: real paths, and adjacent ranges of one file merged when concatenated."""
    join, ranges = plan
    out: list[tuple[str, int, int]] = []
    for path, offset, length in ranges:
        path = _realpath(path)
        if join == "concatenated" and out and out[-1][0] == path and out[-1][1] + out[-1][2] == offset:
            out[-1] = (path, out[-1][1], out[-1][2] + length)
        else:
            out.append((path, offset, length))
    return join, tuple(out)


def converter_plan(t: Any) -> Plan | None:
    """What the converter reads for one merged tensor: its ``byte_ranges()`` (what its writer copies), else
    its parts' rows joined on dim 1; None for strided views or objects without ranges."""
    ranges = t.byte_ranges() if hasattr(t, "byte_ranges") else None
    if ranges is not None:
        return _normal(("concatenated", tuple((str(p), int(o), int(n)) for p, o, n in ranges)))
    parts = getattr(t, "parts", ())
    if getattr(t, "concat_dim", None) != 1 or not parts or not all(p.is_contiguous for p in parts):
        return None
    return _normal(("dim 1", tuple((str(p.storage.path), p.byte_offset, p.nbytes) for p in parts)))


def own_plans(t: Any) -> list[Plan] | None:
    """verify's read plans for one tensor (several for a replicated one: any verified copy will do)."""
    plans = t.read_plans() if hasattr(t, "read_plans") else None
    return None if plans is None else [_normal(p) for p in plans]


def _show(plan: Plan, limit: int = 3) -> str:
    join, ranges = plan
    shown = [f"bytes {o}..{o + n} of {'/'.join(Path(p).parts[-3:])}" for p, o, n in ranges[:limit]]
    more = f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else ""
    text = ", ".join(shown) + more
    return f"the rows of [{text}] joined on dim 1" if join == "dim 1" else text


def compare_plans(key: str, theirs: Any, ours: Any) -> tuple[bool, Finding | None]:
    """Compare the read plans of one tensor: (whether both sides have one, a finding when they differ)."""
    mine, yours = converter_plan(theirs), own_plans(ours)
    if mine is None or yours is None:
        return False, None
    if mine in yours:
        return True, None
    return True, Finding(
        "reader",
        key,
        f"{CONVERTER} reads {_show(mine)}; {OWN} reads {_show(yours[0])} (both {_describe(ours)})",
    )


def compare_readers(theirs: Any, ours: Any, *, block_bytes: int = BLOCK_BYTES) -> Agreement:
    """Compare the converter's view ``theirs`` with verify's own ``ours``: iteration, keys, shapes, dtypes and
    read plans (bytes where a side has no plan)."""
    start = time.perf_counter()
    findings: list[Finding] = []
    if theirs.iteration != ours.iteration:
        findings.append(
            Finding(
                "reader", "iteration", f"{CONVERTER} gives {theirs.iteration}, {OWN} gives {ours.iteration}"
            )
        )
    a, b = set(theirs.tensors), set(ours.tensors)
    for keys, msg in (
        (
            sorted(b - a),
            lambda k: f"{CONVERTER} has no such tensor, {OWN} gives {_describe(ours.tensors[k])}",
        ),
        (
            sorted(a - b),
            lambda k: f"{CONVERTER} gives {_describe(theirs.tensors[k])}, {OWN} has no such tensor",
        ),
    ):
        findings += [Finding("reader", k, msg(k)) for k in keys[:MAX_KEY_FINDINGS]]
        if len(keys) > MAX_KEY_FINDINGS:
            findings.append(
                Finding("reader", "keys", f"... and {len(keys) - MAX_KEY_FINDINGS} more such keys")
            )
    compared = read = 0
    odd = 0
    for key in sorted(a & b):
        x, y = theirs.tensors[key], ours.tensors[key]
        compared += 1
        if tuple(x.shape) != tuple(y.shape) or x.dtype != y.dtype:
            found: Finding | None = Finding(
                "reader", key, f"{CONVERTER} gives {_describe(x)}, {OWN} gives {_describe(y)}"
            )
        else:
            planned, found = compare_plans(key, x, y)
            if not planned:  # a strided view on a side: no byte ranges, so compare the bytes themselves
                found, n = compare_bytes(key, x, y, block_bytes)
                read += n
        if found is not None:
            odd += 1
            if odd <= MAX_KEY_FINDINGS:
                findings.append(found)
    if odd > MAX_KEY_FINDINGS:
        findings.append(Finding("reader", "tensors", f"... and {odd - MAX_KEY_FINDINGS} more tensors differ"))
    seconds = time.perf_counter() - start
    log.debug(  # the report says it (verify's table on stdout, verification.json's "readers")
        "readers: %d tensors compared by shape, dtype and byte ranges (%d bytes by value) in %.2f s; "
        "%d differences",
        compared,
        read,
        seconds,
        len(findings),
    )
    return Agreement(not findings, compared, read, seconds, tuple(findings))
