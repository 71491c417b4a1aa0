"""The converted side through ``transformers.PersimmonForCausalLM``, when it is installed and the model fits.

The model runs its own ``forward`` (its rotary, mask, attention kernel); hooks only record the residual
stream after each layer's attention (the input of ``post_attention_layernorm``) and after its MLP, so that
a failure can be located layer by layer just like with the toolkit's own loader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from persimmon_tools.verification.reference import Hyper

log = logging.getLogger(__name__)

CPU_LIMIT_BYTES = 6 << 30  # keep CPU verification of big models on the layer-by-layer path (<= 8 GiB RSS)


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def fits(hp: Hyper, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether a whole ``PersimmonForCausalLM`` of ``hp`` can be loaded; with the reason."""
    need = hp.num_parameters() * dtype.itemsize
    host = _mem_available()
    if device.type == "cpu":
        limit = min(CPU_LIMIT_BYTES, host // 2)
        return need <= limit, f"model needs {need / 2**30:.1f} GiB, CPU limit {limit / 2**30:.1f} GiB"
    free, _ = torch.cuda.mem_get_info(device)
    ok = need <= 0.8 * free and need <= host // 2  # loaded on the host first (no accelerate needed)
    return (
        ok,
        f"model needs {need / 2**30:.1f} GiB, GPU free {free / 2**30:.1f} GiB, host {host / 2**30:.1f} GiB",
    )


class TransformersTrace:
    """Runs the converted folder with transformers and records per-stage residual states for each sequence.

    ``states[s]`` is a dict ``stage -> (T, C) tensor`` for sequence ``s``; ``logits[s]`` is (T, V).
    Stages: ``embedding``, ``layer {i} attention``, ``layer {i} mlp``.
    """

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import PersimmonForCausalLM
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = PersimmonForCausalLM.from_pretrained(str(folder), dtype=dtype)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model = model.to(device).eval()
        self.device = device
        self.config = model.config

    @torch.no_grad()
    def run(self, seqs: Sequence[Sequence[int]]) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        inner = self.model.model
        current: dict[str, torch.Tensor] = {}
        handles = [
            inner.embed_tokens.register_forward_hook(
                lambda m, a, out: current.__setitem__("embedding", out[0])
            )
        ]
        for i, layer in enumerate(inner.layers):
            handles.append(
                layer.post_attention_layernorm.register_forward_pre_hook(
                    lambda m, a, i=i: current.__setitem__(f"layer {i} attention", a[0][0])
                )
            )
            handles.append(
                layer.register_forward_hook(
                    lambda m, a, out, i=i: current.__setitem__(
                        f"layer {i} mlp", (out[0] if isinstance(out, tuple) else out)[0]
                    )
                )
            )
        states, logits = [], []
        try:
            for seq in seqs:
                current = {}
                ids = torch.tensor([list(seq)], device=self.device)  # (1, T)
                out = self.model(input_ids=ids, use_cache=False)
                logits.append(out.logits[0])  # (T, V)
                states.append(current)
        finally:
            for h in handles:
                h.remove()
        return states, logits
