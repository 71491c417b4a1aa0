"""inv_freq and the small files: the release's own buffers and vocabulary text, byte for byte."""

from __future__ import annotations

from pathlib import Path

import torch
from export_helpers import read_release, same_bits

from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.export.layout import inv_freq
from persimmon_tools.megatron.ptwriter import TensorSpec
from persimmon_tools.synth.build import build_release, write_release_folder
from persimmon_tools.synth.values import PRESETS

INV = "self_attention.rotary_emb.inv_freq"


def _inv_freqs(obj: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj["model"]["language_model"]["encoder"].items() if k.endswith(INV)}


def _release_with_fp32_buffers(tmp_path: Path) -> Path:
    """A bf16 release whose inv_freq buffers are float32 (a run that kept buffers out of the module cast)."""
    rel = build_release(preset="tiny", dtype=torch.bfloat16)
    p = PRESETS["tiny"]
    rd = int(p.rotary_pct * (p.hidden // p.heads))
    for obj in rel.objects.values():
        encoder = obj["model"]["language_model"]["encoder"]
        for key in [k for k in encoder if k.endswith(INV)]:
            encoder[key] = TensorSpec.of(inv_freq(p.rope_base, rd, torch.float32))
    return write_release_folder(rel, tmp_path / "fp32_buffers_release")


def test_a_stored_buffer_keeps_its_own_dtype_and_bytes(tmp_path):
    source = _release_with_fp32_buffers(tmp_path)
    export_release(source, tmp_path / "out", ExportOptions())
    _, out, _ = read_release(tmp_path / "out")
    (obj,) = out.values()
    buffers = _inv_freqs(obj)
    assert len(buffers) == PRESETS["tiny"].layers
    p = PRESETS["tiny"]
    rd = int(p.rotary_pct * (p.hidden // p.heads))
    for value in buffers.values():
        assert same_bits(value, inv_freq(p.rope_base, rd, torch.float32))


def test_a_dtype_change_recomputes_buffers_that_followed_the_weights(tmp_path):
    source = tmp_path / "bf16_release"
    write_release_folder(build_release(preset="tiny", dtype=torch.bfloat16), source)
    export_release(source, tmp_path / "out", ExportOptions(dtype="fp32"))
    _, out, _ = read_release(tmp_path / "out")
    (obj,) = out.values()
    p = PRESETS["tiny"]
    rd = int(p.rotary_pct * (p.hidden // p.heads))
    expected = inv_freq(p.rope_base, rd, torch.float32)  # not the bf16 buffer widened
    assert not same_bits(expected, inv_freq(p.rope_base, rd, torch.bfloat16).float())
    for value in _inv_freqs(obj).values():
        assert same_bits(value, expected)


def test_the_vocabulary_files_are_the_sources(tmp_path):
    source = tmp_path / "bf16_release"
    write_release_folder(build_release(preset="tiny"), source)
    export_release(source, tmp_path / "out", ExportOptions(tp=2))
    for name in ("adept_vocab.model", "adept_vocab.vocab"):
        assert (tmp_path / "out" / "bf16_release" / name).read_bytes() == (source / name).read_bytes()
