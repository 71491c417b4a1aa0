"""The generation check (issue 24) catches a converted model whose logits are within tolerance at every prompt
position but whose greedy decoding parts from the reference's at a later token; and its bf16/fp16 rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from persimmon_tools.errors import VerificationError
from persimmon_tools.verification.generation import Choices, judge
from persimmon_tools.verification.hf_side import HFWeights
from persimmon_tools.verification.reference import decoder_layer, layer_norm
from persimmon_tools.verification.run import LayerwiseModel
from persimmon_tools.verification.verify import VerifyOptions, check_passed, verify

pytest.importorskip("transformers")

PROMPT = [5, 17, 250, 3, 99, 7]
STEP = 3  # the new token whose greedy choice is flipped (0 = the first)


def final_states(model: LayerwiseModel, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final LayerNorm's output (T, C) and the logits (T, V) of ``seq`` (full recomputation, fp32)."""
    hs = model.embed([seq])
    cos, sin = model.rotary(len(seq))
    for i in range(model.hp.num_layers):
        hs = [decoder_layer(hs[0], model.load_layer(i), model.hp, cos, sin)[1]]
    w, b = model.weights.final_norm()
    return layer_norm(hs[0], w.float(), b.float(), model.hp.eps), model.logits(hs)[0]


@pytest.fixture(scope="module")
def flipped(converted_tiny: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the converted folder whose lm_head row of the runner-up token at new token STEP is moved along
    the part of that position's final hidden state orthogonal to every earlier position's: the logits of all
    earlier positions (the prompt's included) do not change, and at STEP the runner-up overtakes the top
    token by a margin. The row is stored in fp32 so that no rounding leaks into the earlier positions."""
    folder = tmp_path_factory.mktemp("flipped") / "hf"
    shutil.copytree(converted_tiny, folder)
    model = LayerwiseModel(HFWeights(folder))
    seq = list(PROMPT)
    for _ in range(STEP):  # the greedy prefix, recomputed in full each time
        seq.append(int(model.forward([seq])[0][-1].argmax()))
    normed, logits = final_states(model, seq)
    at = len(seq) - 1  # the position that predicts new token STEP
    top = logits[at].topk(2)
    (a, b), gap = top.indices.tolist(), float(top.values[0] - top.values[1])
    earlier = torch.linalg.qr(normed[:at].double().T).Q  # (C, at): orthonormal basis of the earlier states
    n = normed[at].double()
    u = n - earlier @ (earlier.T @ n)  # (C,)
    tensors = load_file(folder / "model.safetensors")
    head = tensors["lm_head.weight"].double()
    head[b] += (gap + max(0.05, gap)) / float(u @ n) * u
    tensors["lm_head.weight"] = head.float()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, {"prefix": seq[len(PROMPT) :], "reference": a, "converted": b, "gap": gap}


@pytest.mark.parametrize("loader", ["transformers", "persimmon-tools"])
def test_a_later_greedy_token_flipped_within_logit_tolerance_fails(flipped, releases, loader) -> None:
    folder, expect = flipped
    options = VerifyOptions(
        device="cpu",
        default_prompts=False,
        ids=(tuple(PROMPT),),
        check_weights=False,
        loader=loader,
        write=False,
    )
    report = verify(folder, releases["tar"], options)
    [m] = report.metrics
    assert m.passed and m.max_abs_diff <= m.max_abs_tolerance  # every prompt position within tolerance
    status = {c["name"]: c["status"] for c in report.checks}
    assert status["logits"] == "pass" and status["kl"] == "pass" and status["generation"] == "fail"
    [p] = report.generation["prompts"]
    assert not p["same"] and not p["passed"]
    assert p["converted"][:STEP] == expect["prefix"] and p["converted"][STEP] == expect["converted"]
    assert p["reference"] == expect["prefix"] + [expect["reference"]]  # up to and including the difference
    d = p["first_difference"]
    assert (d["position"], d["reference_token"], d["converted_token"]) == (
        STEP,
        expect["reference"],
        expect["converted"],
    )
    assert (
        d["logit_gap"] == pytest.approx(expect["gap"], rel=1e-4) and d["logit_tolerance"] is None
    )  # fp32: exact
    assert not report.passed
    with pytest.raises(VerificationError, match=f"greedy generation differs: prompt 'ids1' new token {STEP}"):
        check_passed(report)


def test_the_low_precision_rule_tolerates_near_ties_only() -> None:
    choices = Choices(top=[7, 8, 9], gap=lambda j, b: 0.5, tolerance=1.0)
    tied = judge("p", [7, 8, 4], choices, exact=False)
    assert tied["passed"] and not tied["same"] and tied["reference"] == [7, 8, 9]
    assert tied["first_difference"] == {
        "position": 2, "reference_token": 9, "converted_token": 4, "logit_gap": 0.5, "logit_tolerance": 1.0,
    }  # fmt: skip
    assert not judge("p", [7, 8, 4], Choices([7, 8, 9], lambda j, b: 1.5, 1.0), exact=False)["passed"]
    assert not judge("p", [7, 8, 4], choices, exact=True)["passed"]  # fp32: any difference fails
    same = judge("p", [7, 8, 9], choices, exact=True)
    assert same["same"] and same["passed"] and same["first_difference"] is None
