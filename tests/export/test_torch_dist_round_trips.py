"""Exact round trips through Megatron-Core's ``torch_dist`` format (issue 25, part 3).

- legacy → torch_dist → HF equals legacy → HF, bit for bit (tensors, config.json);
- HF → torch_dist → HF equals the HF folder, bit for bit;
- torch_dist → legacy → torch_dist keeps every tensor (read back by torch's own
  ``torch.distributed.checkpoint.load``, not by the toolkit) and the model's args.

The vocabulary travels inside the torch_dist checkpoint (``iter_*/tokenizer/tokenizer.model``, where
Megatron-LM keeps it), so no ``--vocab`` is needed on the way back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export_torch_dist import dcp_load, load_common

from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.export.export import ExportOptions, export_release

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "tiny_release.tar"
ITER = "iter_0001251"
# args that only say how a run was launched or what it has done, not what the model is
_RUN_FIELDS = {
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "load",
    "save",
    "tokenizer_model",
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in shape, dtype or any bit (missing on one side included)."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if (
            x.shape != y.shape
            or x.dtype != y.dtype
            or x.reshape(-1).view(torch.uint8).ne(y.reshape(-1).view(torch.uint8)).any()
        ):
            bad.append(k)
    return bad


@pytest.fixture(scope="module")
def trips(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("torch-dist-trips")
    p = {
        name: base / name
        for name in ("hf", "dist", "hf_via_dist", "dist_from_hf", "hf_again", "legacy", "dist2")
    }
    convert(FIXTURE, p["hf"], ConvertOptions())
    export_release(FIXTURE, p["dist"], ExportOptions(format="torch_dist"))
    convert(p["dist"], p["hf_via_dist"], ConvertOptions())
    export_release(p["hf"], p["dist_from_hf"], ExportOptions(format="torch_dist"))
    convert(p["dist_from_hf"], p["hf_again"], ConvertOptions())
    export_release(p["dist"], p["legacy"], ExportOptions())
    export_release(
        p["legacy"] / next(iter(d.name for d in p["legacy"].iterdir() if d.is_dir())),
        p["dist2"],
        ExportOptions(format="torch_dist"),
    )
    return p


def test_legacy_to_torch_dist_to_hf_equals_legacy_to_hf(trips):
    assert _same_bits(_tensors(trips["hf"]), _tensors(trips["hf_via_dist"])) == []
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model"):
        assert (trips["hf"] / name).read_bytes() == (trips["hf_via_dist"] / name).read_bytes(), name


def test_hf_to_torch_dist_to_hf_equals_the_hf_folder(trips):
    assert _same_bits(_tensors(trips["hf"]), _tensors(trips["hf_again"])) == []
    assert json.loads((trips["hf"] / "config.json").read_text()) == json.loads(
        (trips["hf_again"] / "config.json").read_text()
    )


def test_torch_dist_to_legacy_to_torch_dist_keeps_every_tensor(trips):
    first, _ = dcp_load(trips["dist"] / ITER)
    again, _ = dcp_load(trips["dist2"] / ITER)
    tensors = {k: v for k, v in first.items() if isinstance(v, torch.Tensor)}
    assert len(tensors) == 20  # 16 stacked per-layer tensors, the embedding, the final layernorm, the head
    assert _same_bits(tensors, {k: v for k, v in again.items() if isinstance(v, torch.Tensor)}) == []
    assert set(first) == set(again)  # the byte objects (_extra_state) too
    args = vars(load_common(trips["dist"] / ITER)["args"])
    args2 = vars(load_common(trips["dist2"] / ITER)["args"])
    model = {k: v for k, v in args.items() if k not in _RUN_FIELDS}
    assert model == {k: v for k, v in args2.items() if k not in _RUN_FIELDS}
