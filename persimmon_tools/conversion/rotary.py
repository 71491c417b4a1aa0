"""The stored ``rotary_emb.inv_freq`` buffers against the rotary base the config is written with.

ADEPT's rotary module keeps ``inv_freq = 1 / base ** (arange(0, rotary_dim, 2) / rotary_dim)`` as a
*persistent* buffer (spec §B.2), so its inference code computes every layer with the buffer loaded from that
layer's shard, not with a value recomputed from ``args``. HF Persimmon recomputes one ``inv_freq`` from
``rope_theta`` for all layers. The conversion is therefore faithful only if every layer's buffer, on every
tensor-parallel rank and pipeline stage, is the one ``rope_theta`` gives, up to the rounding of the buffer's
dtype. The buffers are tiny (``rotary_dim / 2`` values each), so all of them are read. A release without
them is accepted (the spec asks converters to tolerate their absence).
"""

from __future__ import annotations

import torch

from persimmon_tools.megatron.checkpoint import Checkpoint
from persimmon_tools.ops import layer_index

INV_FREQ_SUFFIX = ".self_attention.rotary_emb.inv_freq"
_MAX_LISTED = 3


def estimate_theta(inv_freq: torch.Tensor, rotary_dim: int) -> float:
    """Least-squares base from ``inv_freq[j] = base ** (-2j / rotary_dim)`` (j ≥ 1)."""
    f = inv_freq.float()
    j = torch.arange(1, f.numel(), dtype=torch.float64)
    if not len(j):
        return float("nan")
    logs = -torch.log(f[1:].double()) * rotary_dim / (2 * j)
    return float(torch.exp(logs.mean()))


def check_inv_freq(inv_freq: torch.Tensor, base: float, rotary_dim: int) -> bool:
    """Whether a stored ``inv_freq`` equals ``1/base**(arange(0, rd, 2)/rd)`` up to its dtype's rounding."""
    expected = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if tuple(inv_freq.shape) != tuple(expected.shape):
        return False
    rel = ((inv_freq.double() - expected).abs() / expected).max().item()
    tol = {torch.float32: 1e-5, torch.float64: 1e-9}.get(inv_freq.dtype, 2.0**-7)
    return rel <= tol


def inv_freq_problems(ckpt: Checkpoint, base: float, rotary_dim: int, base_from: str) -> list[str]:
    """One line per stored ``inv_freq`` copy (every layer, every TP rank of its pipeline stage) that
    ``base`` (taken from ``base_from``) does not give, naming the layer, the shard and the base the copy
    implies; then copies of one layer that differ between TP ranks although each is within rounding.

    A copy of another length or a non-float dtype is left to the mapping plan's shape and dtype checks."""
    wrong: list[str] = []
    differ: list[str] = []
    for key, merged in ckpt.tensors.items():
        if not key.endswith(INV_FREQ_SUFFIX):
            continue
        copies = [part.materialize() for part in merged.parts]
        checked = [c.is_floating_point() and c.numel() == rotary_dim // 2 for c in copies]
        before = len(wrong)
        for tp, copy in enumerate(copies):
            if checked[tp] and not check_inv_freq(copy.reshape(-1), base, rotary_dim):
                wrong.append(
                    f"rotary base {base} ({base_from}) disagrees with the stored inv_freq of layer "
                    f"{layer_index(key)} in {ckpt.shard_of(key, tp)}, which implies about "
                    f"{estimate_theta(copy.reshape(-1), rotary_dim):.6g}"
                )
        if len(wrong) > before or not all(checked):
            continue
        for tp, copy in enumerate(copies[1:], start=1):
            if copy.shape != copies[0].shape or not torch.equal(
                copy.reshape(-1).view(torch.uint8), copies[0].reshape(-1).view(torch.uint8)
            ):
                differ.append(
                    f"the inv_freq of layer {layer_index(key)} differs between {ckpt.shard_of(key, 0)} and "
                    f"{ckpt.shard_of(key, tp)} (each within rounding of rotary base {base}); replicated "
                    "buffers are identical on every tensor-parallel rank"
                )
    if len(wrong) > _MAX_LISTED:
        wrong = [*wrong[:_MAX_LISTED], f"... and {len(wrong) - _MAX_LISTED} more stored inv_freq copies"]
    return wrong + differ[:_MAX_LISTED]
