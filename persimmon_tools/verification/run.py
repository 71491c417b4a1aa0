"""Run the reference and the converted side over the prompts, layer by layer, in lockstep.

:class:`LayerwiseModel` runs any :class:`WeightSource` (the checkpoint by Megatron names, or a converted
folder by HF names) with the maths of :mod:`persimmon_tools.verification.reference`. Both sides keep only the
residual stream of every prompt between layers; after each layer's attention and MLP the relative
difference of the two streams is recorded for every prompt. Those per-stage errors are what diagnosis
uses to name the first layer where the two computations part ways, without holding hidden states back.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from persimmon_tools.errors import ConfigError
from persimmon_tools.verification.metrics import relative_error
from persimmon_tools.verification.reference import (
    Hyper,
    LayerWeights,
    decoder_layer,
    layer_norm,
    rotary_tables,
)
from persimmon_tools.verification.transformers_side import TransformersTrace

log = logging.getLogger(__name__)


class WeightSource(Protocol):
    """Where a layer-by-layer run gets its tensors (CPU tensors in their stored dtype)."""

    hyper: Hyper

    def layer(self, i: int) -> LayerWeights: ...
    def embedding_rows(self, ids: Sequence[int]) -> torch.Tensor: ...  # (len(ids), C)
    def final_norm(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def head_blocks(self) -> Iterator[torch.Tensor]: ...  # consecutive (rows, C) blocks, vocab order


class LayerwiseModel:
    """Runs a :class:`WeightSource` one layer at a time over several sequences at once.

    Each layer's weights are read once for all sequences, moved to ``device`` in ``dtype`` and freed after.
    """

    def __init__(
        self, weights: WeightSource, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        self.weights, self.hp, self.dtype, self.device = weights, weights.hyper, dtype, torch.device(device)

    def rotary(self, T: int, mode: str = "hf") -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(T, self.hp, mode, self.dtype, self.device)

    def embed(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Token embeddings (no scaling, no positions, §F.1): one (T, C) tensor per sequence."""
        flat = sorted({i for s in seqs for i in s})
        table = self.weights.embedding_rows(flat).to(self.device, self.dtype)  # (n_unique, C)
        where = {tok: j for j, tok in enumerate(flat)}
        return [table[torch.tensor([where[i] for i in s], device=self.device)] for s in seqs]

    def load_layer(self, i: int) -> LayerWeights:
        return self.weights.layer(i).to(self.device, self.dtype)

    def logits(self, hs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Final LayerNorm, then the head in row blocks: one (T, V) tensor per sequence."""
        w, b = (x.to(self.device, self.dtype) for x in self.weights.final_norm())
        normed = [layer_norm(h, w, b, self.hp.eps) for h in hs]  # (T, C) each
        out = [torch.empty(h.shape[0], self.hp.vocab_size, device=self.device, dtype=self.dtype) for h in hs]
        row = 0
        for block in self.weights.head_blocks():
            block = block.to(self.device, self.dtype)  # (rows, C)
            for o, n in zip(out, normed, strict=True):
                o[:, row : row + block.shape[0]] = F.linear(n, block)  # (T, rows)
            row += block.shape[0]
        if row != self.hp.vocab_size:
            raise ConfigError(f"the head has {row} rows, expected {self.hp.vocab_size}")
        return out

    @torch.no_grad()
    def forward(self, seqs: Sequence[Sequence[int]], rotary: str = "hf") -> list[torch.Tensor]:
        """Logits for each sequence (list of (T, V))."""
        hs = self.embed(seqs)
        tables = [self.rotary(h.shape[0], rotary) for h in hs]
        for i in range(self.hp.num_layers):
            lw = self.load_layer(i)
            hs = [decoder_layer(h, lw, self.hp, *cs)[1] for h, cs in zip(hs, tables, strict=True)]
            del lw
        return self.logits(hs)


@dataclass
class RunResult:
    """Logits of each side per prompt, and per-stage relative errors (``stage_errors[stage][prompt]``)."""

    reference: list[torch.Tensor]
    converted: list[torch.Tensor]
    adept: list[torch.Tensor] | None
    stage_errors: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def stages_for(self, prompt: int) -> list[tuple[str, float]]:
        return [(stage, errs[prompt]) for stage, errs in self.stage_errors.items()]


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn: Callable, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return out


def _record(
    errors: dict[str, list[float]], stage: str, ref: Sequence[torch.Tensor], conv: Sequence[torch.Tensor]
) -> None:
    errors[stage] = [relative_error(r, c) for r, c in zip(ref, conv, strict=True)]


def _ref_layer(
    model: LayerwiseModel, i: int, hs: list, tables: list, adept: list | None, adept_tables: list | None
):
    lw = model.load_layer(i)
    out = [decoder_layer(h, lw, model.hp, *t) for h, t in zip(hs, tables, strict=True)]
    adept_out = None
    if adept is not None:
        adept_out = [decoder_layer(h, lw, model.hp, *t)[1] for h, t in zip(adept, adept_tables, strict=True)]
    del lw
    return out, adept_out


@torch.no_grad()
def run_lockstep(
    ref: LayerwiseModel,
    conv: LayerwiseModel | TransformersTrace,
    seqs: Sequence[Sequence[int]],
    *,
    adept: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> RunResult:
    """Reference vs converted over ``seqs``; ``adept`` also runs the reference with ADEPT's bf16 rotary."""
    clock = _Clock()
    errors: dict[str, list[float]] = {}
    traced = None
    if isinstance(conv, TransformersTrace):
        traced = clock.time("converted", conv.run, seqs)

    def conv_state(stage: str, fallback: Callable[[], list]) -> list[torch.Tensor]:
        if traced is not None:
            return [s[stage] for s in traced[0]]
        return clock.time("converted", fallback)

    ref_h = clock.time("reference", ref.embed, seqs)
    adept_h = list(ref_h) if adept else None
    tables = [ref.rotary(len(s), "hf") for s in seqs]
    adept_tables = [ref.rotary(len(s), "adept") for s in seqs] if adept else None
    conv_h = conv_state("embedding", lambda: conv.embed(seqs))
    conv_tables = [conv.rotary(len(s), "hf") for s in seqs] if traced is None else None
    _record(errors, "embedding", ref_h, conv_h)
    for i in range(ref.hp.num_layers):
        progress(f"layer {i + 1}/{ref.hp.num_layers}")
        out, adept_h = clock.time("reference", _ref_layer, ref, i, ref_h, tables, adept_h, adept_tables)
        if traced is None:

            def step(i=i, hs=conv_h):
                lw = conv.load_layer(i)
                res = [decoder_layer(h, lw, conv.hp, *t) for h, t in zip(hs, conv_tables, strict=True)]
                del lw
                return res

            conv_out = clock.time("converted", step)
            conv_mid, conv_h = [m for m, _ in conv_out], [o for _, o in conv_out]
        else:
            conv_mid = [s[f"layer {i} attention"] for s in traced[0]]
            conv_h = [s[f"layer {i} mlp"] for s in traced[0]]
        _record(errors, f"layer {i} attention", [m for m, _ in out], conv_mid)
        ref_h = [o for _, o in out]
        _record(errors, f"layer {i} mlp", ref_h, conv_h)
    progress("head")
    both = clock.time("reference", ref.logits, ref_h + (adept_h or []))
    ref_logits, adept_logits = both[: len(seqs)], (both[len(seqs) :] if adept else None)
    conv_logits = traced[1] if traced is not None else clock.time("converted", conv.logits, conv_h)
    _record(errors, "logits", ref_logits, conv_logits)
    return RunResult(ref_logits, conv_logits, adept_logits, errors, clock.seconds)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation), in GiB."""
    out = {"host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out
