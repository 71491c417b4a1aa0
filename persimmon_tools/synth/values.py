"""Synthetic tensor values and shapes for ``make-release`` (see :mod:`persimmon_tools.synth.build`).

Values are a deterministic function of (seed, tensor name, element index): a fixed pool of normal samples
read from a per-tensor offset. Any block of any tensor can be produced on its own, so an 8B release is
written in bounded memory and TP/PP releases from the same seed hold exactly the same logical tensors.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from persimmon_tools.mapping import INV_FREQ, RULES, match_source
from persimmon_tools.megatron.ptwriter import TensorSpec
from persimmon_tools.ops import Parallel, shard_rows, shard_shape

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
        self.pool = _pool(seed)  # shared and read-only: ``flat`` returns copies
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


@functools.lru_cache(maxsize=2)
def _pool(seed: int) -> torch.Tensor:
    """The ``_POOL_SIZE`` normal samples of ``seed`` (fp32, 16 MiB; drawn once per seed and process)."""
    return torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(seed))


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
    # Megatron's state-dict order, which is also the order of the records in its files: the embedding, then
    # layer by layer (each layer's tensors in THE TABLE's order), then the final layernorm and the head.
    layer_rules = [r for r in RULES if r.per_layer]
    before = [r for r in RULES if not r.per_layer and RULES.index(r) < RULES.index(layer_rules[0])]
    after = [r for r in RULES if not r.per_layer and r not in before]
    out: dict[str, tuple[tuple[int, ...], Parallel]] = {}
    for rule in before:
        out[rule.source] = (rule.shape_for(sym), rule.parallel)
    for i in range(p.layers):
        for rule in layer_rules:
            out[rule.source_key(i)] = (rule.shape_for(sym), rule.parallel)
    for rule in after:
        out[rule.source] = (rule.shape_for(sym), rule.parallel)
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
    """The ``rank``-th tensor-parallel piece of logical tensor ``key`` (``shape``: 1-D or ``[rows, cols]``),
    cut by :func:`persimmon_tools.ops.shard_rows` (the inverse of convert's merge) from rows of the full
    tensor generated on demand: blocks of about ``_BLOCK_ELEMENTS`` full-tensor elements."""
    match = match_source(key)
    if match is not None and match.rule is INV_FREQ:
        return TensorSpec.of(inv_freq(p, dtype))
    transform = value_transform(key)
    cols = shape[1] if len(shape) > 1 else 1
    piece_shape = shard_shape(shape, kind, tp, rank)

    def full_rows(a: int, b: int) -> torch.Tensor:
        return values.flat(key, a * cols, b * cols).view(b - a, *shape[1:])

    def blocks() -> Iterator[torch.Tensor]:
        step = max(1, _BLOCK_ELEMENTS // cols)
        for a in range(0, piece_shape[0], step):
            block = shard_rows(full_rows, shape, kind, tp, rank, a, min(piece_shape[0], a + step))
            yield transform(block.reshape(-1)).to(dtype)

    return TensorSpec(piece_shape, dtype, blocks)
