"""Synthetic tensor values and shapes for ``make-release`` (see :mod:`persimmon_tools.synth.build`).

Values are a deterministic function of (seed, tensor name, element index): a fixed pool of normal samples
read from a per-tensor offset. Any block of any tensor can be produced on its own, so an 8B release is
written in bounded memory and TP/PP releases from the same seed hold exactly the same logical tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from persimmon_tools.mapping import RULES
from persimmon_tools.megatron.ptwriter import TensorSpec
from persimmon_tools.ops import Parallel, shard_bounds

_POOL_SIZE = 4_194_301  # prime, so rows of power-of-two widths do not repeat with the pool
_BLOCK_ELEMENTS = 8 << 20


@dataclass(frozen=True)
class Preset:
    hidden: int
    heads: int
    layers: int
    ffn: int
    vocab: int | None  # None: the tokenizer's size padded to a multiple of 1024 (= 128 x TP for TP <= 8)
    rotary_pct: float = 0.5
    rope_base: float = 25000.0
    eps: float = 1e-5
    seq_length: int = 16384
    iteration: int = 1251


PRESETS = {
    "tiny": Preset(hidden=64, heads=4, layers=6, ffn=256, vocab=None, seq_length=2048),
    "mid": Preset(hidden=2048, heads=32, layers=8, ffn=8192, vocab=32768, seq_length=4096),
    "8b": Preset(hidden=4096, heads=64, layers=36, ffn=16384, vocab=262144, iteration=375000),
}


class Values:
    """Deterministic pseudo-random values: element ``k`` of tensor ``name`` = ``pool[(start + k) % P]``."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(_POOL_SIZE, generator=gen)
        self.seed = seed

    def start(self, name: str) -> int:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % _POOL_SIZE

    def flat(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the flattened tensor ``name`` (fp32)."""
        first = (self.start(name) + lo) % _POOL_SIZE
        pieces, need = [], hi - lo
        while need > 0:
            take = min(need, _POOL_SIZE - first)
            pieces.append(self.pool[first : first + take])
            need, first = need - take, 0
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0].clone()


def value_transform(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if "layernorm" in key and key.endswith(".weight"):
        return lambda x: 1.0 + 0.1 * x
    if key.endswith(".bias"):
        return lambda x: 0.02 * x
    return lambda x: 0.02 * x


def logical_keys(p: Preset, vocab: int) -> dict[str, tuple[tuple[int, ...], Parallel]]:
    """Megatron key -> (full shape, parallel kind) for every tensor of the model, in Megatron order."""
    head_dim = p.hidden // p.heads
    sym = {
        "V": vocab,
        "H": p.hidden,
        "F": p.ffn,
        "A": p.hidden,
        "QKV": 3 * p.hidden,
        "D": head_dim,
        "R": int(p.rotary_pct * head_dim) // 2,
    }
    out: dict[str, tuple[tuple[int, ...], Parallel]] = {}
    for rule in RULES:
        shape = tuple(sym[s] for s in rule.shape)
        if "{i}" in rule.source:
            for i in range(p.layers):
                out[rule.source.replace("{i}", str(i))] = (shape, rule.parallel)
        else:
            out[rule.source] = (shape, rule.parallel)
    return out


def inv_freq(p: Preset, dtype: torch.dtype) -> torch.Tensor:
    rd = int(p.rotary_pct * (p.hidden // p.heads))
    return (1.0 / (p.rope_base ** (torch.arange(0, rd, 2).float() / rd))).to(dtype)


def shard_spec(
    values: Values,
    key: str,
    shape: tuple[int, ...],
    kind: Parallel,
    tp: int,
    rank: int,
    dtype: torch.dtype,
    p: Preset,
) -> TensorSpec:
    """The ``rank``-th tensor-parallel piece of logical tensor ``key`` (see :func:`persimmon_tools.ops.split`)."""
    if key.endswith("rotary_emb.inv_freq"):
        return TensorSpec.of(inv_freq(p, dtype))
    transform = value_transform(key)
    dim, lo, hi = shard_bounds(shape, kind, tp, rank)
    rows, cols = shape[0], (shape[1] if len(shape) > 1 else 1)
    r0, r1, c0, c1 = 0, rows, 0, cols
    if dim == 0:
        r0, r1 = lo, hi
    elif dim == 1:
        c0, c1 = lo, hi
    piece_shape = (r1 - r0, c1 - c0) if len(shape) > 1 else (r1 - r0,)

    def blocks() -> Iterator[torch.Tensor]:
        step = max(1, _BLOCK_ELEMENTS // (c1 - c0))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            if c0 == 0 and c1 == cols:
                block = values.flat(key, a * cols, b * cols)
            else:
                block = torch.cat([values.flat(key, r * cols + c0, r * cols + c1) for r in range(a, b)])
            yield transform(block).to(dtype)

    return TensorSpec(piece_shape, dtype, blocks)
