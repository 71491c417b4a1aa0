"""Unit tests of verify's pieces: metrics, tolerances, published-logits comparison, prompts, findings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from persimmon_tools.errors import UsageError
from persimmon_tools.verification.diagnose import locate
from persimmon_tools.verification.findings import config_findings
from persimmon_tools.verification.metrics import TOLERANCES, compare_logits, drift_by_position, tolerance_for
from persimmon_tools.verification.prompts import build_prompts, read_prompts_file
from persimmon_tools.verification.published import (
    EXPECTED_MEAN_FP16,
    EXPECTED_MEAN_INT8,
    EXPECTED_SLICE_INT8,
    INPUT_IDS,
    compare_published,
    is_8b_chat,
)
from persimmon_tools.verification.reference import Hyper

HP_8B = Hyper(
    vocab_size=262144,
    hidden_size=4096,
    num_layers=36,
    num_heads=64,
    head_dim=64,
    intermediate_size=16384,
    rotary_dim=32,
    rope_theta=25000.0,
    eps=1e-5,
    untied=True,
)


def _fake_logits(means, first30, vocab=4096) -> torch.Tensor:
    """(8, vocab) logits whose per-position means and position 0's first 30 values are the given ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(means), vocab, generator=g, dtype=torch.float64)
    x[0, :30] = torch.tensor(first30, dtype=torch.float64)
    for i, m in enumerate(means):  # shift the free entries so that the row mean is exactly m
        start = 30 if i == 0 else 0
        x[i, start:] += (m * vocab - x[i].sum()) / (vocab - start)
    return x


def test_published_comparison_accepts_the_published_numbers():
    res = compare_published(_fake_logits(EXPECTED_MEAN_INT8, EXPECTED_SLICE_INT8))
    assert res["passed"] and res["max_abs_diff_mean"] < 1e-3 and res["max_abs_diff_slice"] < 1e-3
    assert res["affects_verdict"] is False and res["input_ids"] == list(INPUT_IDS)


def test_published_comparison_tolerates_the_quantisation_spread():
    # the un-quantised fp16 numbers are 0.32 away from the int8 ones: a correct conversion may land there
    res = compare_published(_fake_logits(EXPECTED_MEAN_FP16, EXPECTED_SLICE_INT8))
    assert (
        res["passed"]
        and 0.3 < res["max_abs_diff_mean"] < 0.33
        and res["fp16_set"]["max_abs_diff_mean"] < 1e-3
    )


@pytest.mark.parametrize("shift_mean, shift_slice", [(0.6, 0.0), (0.0, 0.15)])
def test_published_comparison_rejects_a_different_model(shift_mean, shift_slice):
    means = [m + shift_mean for m in EXPECTED_MEAN_INT8]
    first = [v + shift_slice for v in EXPECTED_SLICE_INT8]
    assert not compare_published(_fake_logits(means, first))["passed"]


def test_is_8b_chat_detection():
    assert is_8b_chat(HP_8B, 1251, "unknown") and is_8b_chat(HP_8B, None, "chat")
    assert not is_8b_chat(HP_8B, 375000, "base")
    assert not is_8b_chat(replace(HP_8B, num_layers=35), 1251, "chat")
    assert not is_8b_chat(replace(HP_8B, vocab_size=1024, hidden_size=64), 1251, "chat")


def test_compare_logits_identical_and_broken():
    ref = torch.randn(7, 50) * 3
    ok = compare_logits(ref, ref.clone(), TOLERANCES["fp32"], prompt="p", name="n")
    assert (
        ok.passed
        and ok.max_abs_diff == 0
        and ok.kl_div == 0
        and ok.top1_agreement == 1
        and ok.top5_agreement == 1
    )
    noisy = compare_logits(ref, ref + 1e-6, TOLERANCES["fp32"], prompt="p", name="n")
    assert noisy.passed
    bad = compare_logits(ref, ref + 0.1 * torch.randn(7, 50), TOLERANCES["fp32"], prompt="p", name="n")
    assert not bad.passed and any("max |Δ|" in f for f in bad.failed)
    nan = ref.clone()
    nan[3, 4] = float("nan")
    assert not compare_logits(ref, nan, TOLERANCES["bf16"], prompt="p", name="n").passed


def test_tolerance_selection():
    assert tolerance_for(torch.float32).name == "fp32"
    assert tolerance_for(torch.bfloat16).name == "bf16"
    assert tolerance_for(torch.float32, torch.bfloat16, torch.float32).name == "fp32"  # widening is exact
    assert tolerance_for(torch.float32, torch.bfloat16, torch.bfloat16).name == "fp32"
    assert tolerance_for(torch.float32, torch.float32, torch.bfloat16).name == "bf16"  # rounded weights
    assert tolerance_for(torch.float32, torch.bfloat16, torch.float16).name == "fp16"
    assert TOLERANCES["fp32"].max_rel < TOLERANCES["fp16"].max_rel < TOLERANCES["bf16"].max_rel


def test_drift_by_position_ranges():
    ref = [torch.zeros(300, 10)]
    conv = [torch.zeros(300, 10)]
    conv[0][260, 3] = 2.0
    rows = drift_by_position(ref, conv)
    assert [r["positions"] for r in rows] == ["0-7", "8-63", "64-255", "256+"]
    assert [r["max_abs_diff"] for r in rows] == [0.0, 0.0, 0.0, 2.0]
    assert [r["count"] for r in rows] == [8, 56, 192, 44]


def test_locate_first_divergence():
    stages = [("embedding", 0.0), ("layer 0 attention", 1e-7), ("layer 0 mlp", 0.3), ("logits", 0.9)]
    first = locate(stages, 1e-4)
    assert first["stage"] == "layer 0 mlp" and first["before"]["stage"] == "layer 0 attention"
    assert locate(stages[:2], 1e-4) is None
    assert locate([("embedding", float("nan"))], 1e-4)["stage"] == "embedding"


def test_config_findings_name_both_values():
    conv = replace(HP_8B, rope_theta=10000.0, rotary_dim=64, origin=(("rope_theta", "config.json"),))
    ref = replace(
        HP_8B,
        stored_inv_freq=tuple((1.0 / 25000 ** (torch.arange(0, 32, 2) / 32)).tolist()),
        origin=(("rope_theta", "args.rotary_emb_base"),),
    )
    found = {f.where: f.message for f in config_findings(ref, conv)}
    assert "is 10000 (config.json)" in found["config.json rope_theta"]
    assert "25000 (args.rotary_emb_base" in found["config.json rope_theta"]
    assert "implies about 25000" in found["config.json rope_theta"]
    assert "rotates 64 of 64" in found["config.json partial_rotary_factor"]
    assert config_findings(ref, ref) == []


def test_prompt_helpers(tmp_path):  # --ids: the CLI's TOKEN_IDS (tests/cli/test_cli_validation.py)
    f = tmp_path / "p.json"
    f.write_text('["a\\nb", "c"]')
    assert read_prompts_file(f) == ["a\nb", "c"]


def test_prompts_without_tokenizer_use_fixed_ids(tmp_path):
    prompts, desc = build_prompts(tmp_path, vocab=100, max_tokens=2048)
    assert "fixed pseudo-random ids" in desc
    assert [p.name for p in prompts] == ["plain", "chat", "code", "long"]
    assert len(prompts[-1].ids) > 256 and all(0 <= i < 100 for p in prompts for i in p.ids)
    with pytest.raises(UsageError, match="needs a tokenizer"):
        build_prompts(tmp_path, texts=["hi"], vocab=100, max_tokens=2048)
    with pytest.raises(UsageError, match="outside the model's 100 rows"):
        build_prompts(tmp_path, ids=[(1, 100)], defaults=False, vocab=100, max_tokens=2048)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden_size", "64"),
        ("hidden_size", 0),
        ("num_attention_heads", 0),
        ("vocab_size", 1.5),
        ("num_hidden_layers", None),
        ("intermediate_size", True),
        ("rope_theta", float("inf")),
        ("partial_rotary_factor", "half"),
        ("layer_norm_eps", -1),
        ("rope_parameters", [1, 2]),
        ("hidden_act", ["relu2"]),
        ("max_position_embeddings", "2048"),
    ],
)
def test_malformed_config_values_are_typed_errors(converted_tiny, key, value):
    """A config.json value of the wrong type or range (found by CLI fuzzing: a raw ValueError before)."""
    import json

    from persimmon_tools.errors import VerificationError
    from persimmon_tools.verification.hf_side import hf_hyper

    config = json.loads((converted_tiny / "config.json").read_text())
    config[key] = value
    with pytest.raises(VerificationError, match=key):
        hf_hyper(config)
