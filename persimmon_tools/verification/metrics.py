"""Logit metrics and the tolerances ``verify`` applies, defined here and nowhere else.

A prompt passes when, over all its positions and the whole vocabulary,

    max |Δ logit|  <= max_rel  x scale        scale = max |reference logit| of that prompt
    mean |Δ logit| <= mean_rel x scale
    mean KL(softmax(ref) || softmax(converted)) <= kl

Why these bounds (see also docs/verify.md):

- The two sides run the same arithmetic in the same dtype from weights that should be bit-identical; the
  only legitimate differences are rounding from a different order of operations (fused kernels, sdpa vs
  explicit softmax, chunked head). That error is a small multiple of the dtype's unit roundoff ``u``
  times the size of the numbers involved, so tolerances are relative to the logit scale.
  fp32: u = 6e-8; measured differences against transformers are <= 1e-6 of the scale; bound 1e-4.
  bf16: u = 3.9e-3 (8-bit mantissa); every matmul output, LayerNorm output and residual add is rounded,
  so two correct bf16 implementations drift apart with depth: measured against transformers on
  random-weight models of 6-12 layers, 0.9-1.7e-2 of the scale at the worst position and 1.2-2.6e-3 on
  average. Bounds 6e-2 / 1e-2 (not measured at 36 layers / 8B: see docs/verify.md).
  fp16: u = 4.9e-4 (11-bit mantissa): measured 1.1-2.2e-3 / 1.5-3.3e-4; bounds 1e-2 / 2e-3.
- Deliberately broken conversions move the tiny test model's logits by 5e-3 (q/k layernorms swapped in
  one layer; random layernorm weights are all near 1) to 1.7 (embedding and head swapped) of the scale:
  caught in fp32 by 50x or more. In bf16 the subtle ones (q/k swap 5e-3, rope_theta 2.7e-2) are inside
  rounding noise; they are caught by the exact checks that also decide the verdict: every config value
  against the checkpoint, and (below 500M parameters, or with --check-weights) every tensor by value.
- KL is bounded separately because it weighs the differences by probability (KL ≈ ½ Var_p(Δ)); its
  bounds sit two to three orders above the measured values (fp32 1e-13, fp16 4e-7, bf16 2.5e-5).
  Top-1/top-5 agreement are reported, not gated: with |Δ| below the max bound, a top-1 flip can only
  happen where the reference's top two logits are within 2x that bound of each other, i.e. a near-tie,
  which says nothing about the conversion.
- ``hidden_rel`` is the relative Frobenius difference of residual-stream states above which diagnosis
  calls a layer "diverged" (only used to locate a failure, never to pass one).

When the converted weights were stored in a lower precision than the checkpoint (fp32 → bf16, bf16 →
fp16), the weights themselves differ by that rounding, so the coarser row applies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

POSITION_RANGES = ((0, 7), (8, 63), (64, 255), (256, None))  # adept rotary drift is reported per range


@dataclass(frozen=True)
class Tolerance:
    name: str
    max_rel: float
    mean_rel: float
    kl: float
    hidden_rel: float
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = "max |reference logit| of the prompt; max/mean |Δ| bounds are *_rel x scale"
        return d


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(
        "fp32",
        max_rel=1e-4,
        mean_rel=1e-5,
        kl=1e-6,
        hidden_rel=1e-4,
        reason="fp32 unit roundoff 6e-8; the same maths in another order differs by ~1e-6 of "
        "the logit scale (measured <= 1e-6 against transformers); bounds leave 100x margin",
    ),
    "fp16": Tolerance(
        "fp16",
        max_rel=1e-2,
        mean_rel=2e-3,
        kl=1e-4,
        hidden_rel=1e-2,
        reason="fp16 unit roundoff 4.9e-4, every activation rounded; measured <= 2.2e-3 (max) / "
        "3.3e-4 (mean) of the scale against transformers; about 5x margin",
    ),
    "bf16": Tolerance(
        "bf16",
        max_rel=6e-2,
        mean_rel=1e-2,
        kl=5e-3,
        hidden_rel=8e-2,
        reason="bf16 unit roundoff 3.9e-3, every activation rounded; measured <= 1.7e-2 (max) / "
        "2.6e-3 (mean) of the scale against transformers, growing with depth; 3.5-4x margin",
    ),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_ORDER = ("fp32", "fp16", "bf16")  # finest to coarsest


def tolerance_for(
    compute: torch.dtype, source: torch.dtype | None = None, stored: torch.dtype | None = None
) -> Tolerance:
    """The row for ``compute``, or a coarser one when the converted weights were rounded on the way."""
    names = [DTYPE_NAMES.get(compute, "fp32")]
    if source is not None and stored is not None and source != stored:
        lossless = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}
        if (source, stored) not in lossless and stored in DTYPE_NAMES:
            names.append(DTYPE_NAMES[stored])
    return TOLERANCES[max(names, key=_ORDER.index)]


@dataclass(frozen=True)
class PromptMetrics:
    """Converted vs reference logits for one prompt (positions x full vocabulary)."""

    prompt: str
    name: str
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    kl_div: float  # mean over positions of KL(ref || converted), nats
    kl_div_max: float
    top1_agreement: float  # fraction of positions with the same argmax
    top5_agreement: float  # mean overlap of the top-5 sets, / 5
    logit_scale: float  # max |reference logit|
    max_abs_tolerance: float  # max_rel x logit_scale: the bound max_abs_diff was held to
    mean_abs_tolerance: float
    passed: bool
    failed: tuple[str, ...] = ()  # which bounds were exceeded

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = list(self.failed)
        return d


def compare_logits(
    ref: torch.Tensor,
    conv: torch.Tensor,
    tol: Tolerance,
    *,
    prompt: str,
    name: str,
    kl: torch.Tensor | None = None,
) -> PromptMetrics:
    """Metrics of converted logits ``conv`` against ``ref``, both (T, V).

    Differences in fp32; KL in fp64 (in fp32 the rounding of log-probabilities of a 262144-entry
    vocabulary alone reaches ~1e-6), a block of positions at a time to bound memory. ``kl``: the
    per-position KL (T,) when the caller has it already (:func:`persimmon_tools.verification.kl.full_stats`,
    the same formula), so it is not computed twice.
    """
    T = ref.shape[0]
    max_abs, sum_abs, scale = 0.0, 0.0, float(ref.abs().max())
    known = kl
    kl, top1, top5 = [], [], []
    k = min(5, ref.shape[-1])
    for a in range(0, T, 32):
        r, c = ref[a : a + 32].float(), conv[a : a + 32].float()  # (t, V)
        diff = (c - r).abs()
        max_abs, sum_abs = max(max_abs, float(diff.max())), sum_abs + float(diff.double().sum())
        if diff.isnan().any():
            max_abs = float("nan")
        if known is None:
            logp, logq = torch.log_softmax(r.double(), -1), torch.log_softmax(c.double(), -1)  # (t, V)
            kl.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0))  # (t,)
        top1.append(r.argmax(-1) == c.argmax(-1))
        t5r, t5c = r.topk(k, -1).indices, c.topk(k, -1).indices  # (t, k)
        top5.append((t5r[:, :, None] == t5c[:, None, :]).any(-1).double().sum(-1) / k)
    kl_t = torch.cat(kl) if known is None else known.to(torch.float64).cpu()
    mean_abs = sum_abs / ref.numel()
    failed = []
    if not max_abs <= tol.max_rel * scale:  # "not <=" also catches NaN
        failed.append(f"max |Δ| {max_abs:.3g} > {tol.max_rel:g} x scale {scale:.3g}")
    if not mean_abs <= tol.mean_rel * scale:
        failed.append(f"mean |Δ| {mean_abs:.3g} > {tol.mean_rel:g} x scale {scale:.3g}")
    if not float(kl_t.mean()) <= tol.kl:
        failed.append(f"KL {float(kl_t.mean()):.3g} > {tol.kl:g}")
    return PromptMetrics(
        prompt=prompt,
        name=name,
        tokens=T,
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        kl_div=float(kl_t.mean()),
        kl_div_max=float(kl_t.max()),
        top1_agreement=float(torch.cat(top1).float().mean()),
        top5_agreement=float(torch.cat(top5).mean()),
        logit_scale=scale,
        max_abs_tolerance=tol.max_rel * scale,
        mean_abs_tolerance=tol.mean_rel * scale,
        passed=not failed,
        failed=tuple(failed),
    )


def relative_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    """‖other − ref‖ / ‖ref‖ (Frobenius, fp32); inf when ref is zero and other is not."""
    ref, other = ref.float(), other.float()
    num, den = float((other - ref).norm()), float(ref.norm())
    if num != num:  # NaN
        return float("inf")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def drift_by_position(ref: list[torch.Tensor], conv: list[torch.Tensor]) -> list[dict]:
    """max/mean |Δ logit| and top-1 agreement per position range, pooled over prompts (adept mode)."""
    rows = []
    for lo, hi in POSITION_RANGES:
        diffs, agree, scale = [], [], 0.0
        for r, c in zip(ref, conv, strict=True):
            r, c = (
                r[lo : None if hi is None else hi + 1].float(),
                c[lo : None if hi is None else hi + 1].float(),
            )
            if not r.shape[0]:
                continue
            diffs.append((c - r).abs())
            agree.append(r.argmax(-1) == c.argmax(-1))
            scale = max(scale, float(r.abs().max()))
        if not diffs:
            continue
        d = torch.cat([x.reshape(-1) for x in diffs])
        rows.append(
            {
                "positions": f"{lo}-{hi}" if hi is not None else f"{lo}+",
                "count": sum(x.shape[0] for x in agree),
                "max_abs_diff": float(d.max()),
                "mean_abs_diff": float(d.mean()),
                "top1_agreement": float(torch.cat(agree).float().mean()),
                "logit_scale": scale,
            }
        )
    return rows
