"""Compare converted tensors with the checkpoint's by value, and say what a differing one is instead.

A tensor that differs is checked against every other checkpoint tensor of the same shape (another layer,
the other layernorm, the head instead of the embedding), against known layout mistakes (fused QKV rows in
blocked [Q;K;V] order, rows permuted, transposed) and for being all zeros. Tensors are streamed in row
blocks, and candidates are found by a first-row signature, so this works at 8B scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from persimmon_tools.verification.findings import Finding, all_fields, part_of
from persimmon_tools.verification.hf_side import HFWeights
from persimmon_tools.verification.reference import MegatronWeights


def _blocked_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head interleaved [q0 k0 v0 | q1 ...] rows → blocked [Q; K; V] rows (the classic mistake)."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, with NaN equal to NaN (a NaN copied from the checkpoint is a faithful copy)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


class ContentChecker:
    """Compares converted tensors with the checkpoint's by value (streamed in row blocks)."""

    def __init__(self, src: MegatronWeights, conv: HFWeights) -> None:
        self.src, self.conv = src, conv
        self.hp = src.hyper
        self._sigs: dict[torch.dtype, dict[tuple, list[tuple[str, int | None]]]] = {}

    # -- reading
    def _src_mt(self, field: str, layer: int | None):
        return self.src.ckpt.tensors.get(self.src.key(field, layer))

    def _blocks(
        self, src_field: str, src_layer: int | None, name: str
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(checkpoint block, converted block) pairs of the same rows."""
        row = 0
        for block in self._src_mt(src_field, src_layer).iter_rows(32 << 20):
            n = block.shape[0] if block.dim() else 1
            yield block, self.conv.st.read_rows(name, row, row + n).reshape(block.shape)
            row += n

    @staticmethod
    def _signature(t: torch.Tensor, dtype: torch.dtype) -> bytes:
        """Bytes of (up to 4096 values of) the first row, as stored in ``dtype``: a cheap identity."""
        first = t[:1] if t.dim() > 1 else t
        return first.to(dtype).float().reshape(-1)[:4096].numpy().tobytes()

    def _src_head(self, field: str, layer: int | None) -> torch.Tensor | None:
        mt = self._src_mt(field, layer)
        if mt is None:
            return None
        if len(mt.shape) < 2:
            return mt.materialize()
        return mt.read_rows(0, 1)

    def _index(self, dtype: torch.dtype) -> dict[tuple, list[tuple[str, int | None]]]:
        if dtype not in self._sigs:
            sigs = self._sigs[dtype] = {}
            for field, layer in all_fields(self.hp):
                head = self._src_head(field, layer)
                if head is not None:
                    shape = self._src_mt(field, layer).shape
                    sigs.setdefault((tuple(shape), self._signature(head, dtype)), []).append((field, layer))
        return self._sigs[dtype]

    def equal(self, src_field: str, src_layer: int | None, conv_field: str, conv_layer: int | None) -> bool:
        name, mt = self.conv.name(conv_field, conv_layer), self._src_mt(src_field, src_layer)
        entry = self.conv.st.entry(name)
        if mt is None or tuple(mt.shape) != entry.shape:
            return False
        return all(_same(s.to(entry.dtype), c) for s, c in self._blocks(src_field, src_layer, name))

    # -- explaining
    def _equals_other(self, cand: tuple[str, int | None], field: str, layer: int | None) -> str:
        other, key = self.src.key(*cand), self.src.key(field, layer)
        if cand[0] == field and cand[1] is not None and layer is not None:
            return f"equals the checkpoint's {other}: taken from layer {cand[1]} instead of layer {layer}"
        if cand[1] is not None and cand[1] == layer:
            return f"equals the checkpoint's {other} (another tensor of the same layer) instead of {key}"
        return f"equals the checkpoint's {other} instead of {key}"

    def check(self, field: str, layer: int | None) -> Finding | None:
        """None when the converted tensor equals the checkpoint's; else a finding saying what it is."""
        name = self.conv.name(field, layer)
        where, part = name, part_of(field)
        if name not in self.conv.st:
            return Finding("tensor", where, "is missing from the converted folder", part, layer)
        mt, entry = self._src_mt(field, layer), self.conv.st.entry(name)
        key = self.src.key(field, layer)
        if mt is None:
            return None
        if tuple(mt.shape) != entry.shape:
            return Finding(
                "tensor",
                where,
                f"has shape {list(entry.shape)}, the checkpoint's {key} has {list(mt.shape)}",
                part,
                layer,
            )
        diff2 = ref2 = 0.0
        max_abs, conv_zero, equal, nonfinite = 0.0, True, True, 0
        for s, c in self._blocks(field, layer, name):
            s, c = s.to(entry.dtype).float(), c.float()
            nonfinite += int((~torch.isfinite(s)).sum())
            if not _same(s, c):
                equal = False
                max_abs = max(max_abs, float((s - c).abs().max()))
                diff2 += float(((s - c) ** 2).sum())
            ref2 += float((s**2).sum())
            conv_zero = conv_zero and not bool(c.any())
        if equal and nonfinite:
            return Finding(
                "tensor",
                where,
                f"holds {nonfinite} NaN/Inf values, copied from the checkpoint's {key} "
                "(converted with --allow-nonfinite): the model's outputs cannot be trusted",
                part,
                layer,
            )
        if equal:
            return None

        def finding(msg: str) -> Finding:
            return Finding("tensor", where, msg, part, layer)

        if conv_zero:
            return finding(f"is all zeros; the checkpoint's {key} is not (‖·‖ = {math.sqrt(ref2):.3g})")
        sig = self._signature(
            self.conv.st.read_rows(name, 0, 1) if len(entry.shape) > 1 else self.conv.st.read(name),
            entry.dtype,
        )
        for cand in self._index(entry.dtype).get((entry.shape, sig), []):
            if cand != (field, layer) and self.equal(cand[0], cand[1], field, layer):
                return finding(self._equals_other(cand, field, layer))
        rel = math.sqrt(diff2 / ref2) if ref2 else float("inf")
        if entry.shape[0] * max(1, math.prod(entry.shape[1:])) <= 64 << 20:  # small enough to rearrange
            s, c = mt.materialize().to(entry.dtype), self.conv.st.read(name).reshape(entry.shape)
            if field in ("qkv_w", "qkv_b") and torch.equal(_blocked_qkv(s, self.hp.num_heads), c):
                return finding(
                    "holds the fused QKV rows in blocked [Q; K; V] order; the checkpoint and "
                    "transformers use per-head interleaved [q0 k0 v0 | q1 k1 v1 | ...] (spec §C)"
                )
            if c.dim() == 2 and c.shape[0] == c.shape[1] and torch.equal(s.T, c):
                return finding(f"is the transpose of the checkpoint's {key}")
            rows_s = sorted(r.numpy().tobytes() for r in s.reshape(s.shape[0], -1).float())
            rows_c = sorted(r.numpy().tobytes() for r in c.reshape(c.shape[0], -1).float())
            if rows_s == rows_c:
                return finding(f"holds the checkpoint's {key} rows in a different order")
        if rel < 1e-2:
            return finding(
                f"differs from the checkpoint's {key} by rounding only (max |Δ| {max_abs:.3g}, "
                f"‖Δ‖/‖·‖ {rel:.2g}): cast through another dtype?"
            )
        return finding(
            f"differs from the checkpoint's {key} (‖Δ‖/‖·‖ = {rel:.3g}) and equals no other checkpoint tensor"
        )


def weight_findings(
    checker: ContentChecker, scope: list[tuple[str, int | None]] | None = None
) -> list[Finding]:
    """Content check of ``scope`` (default: every tensor) against the checkpoint."""
    return [f for f in (checker.check(*x) for x in (scope or all_fields(checker.hp))) if f is not None]
