"""Why a converted folder does not compute what the checkpoint computes: locate, then explain.

1. Config and presence findings (:mod:`persimmon_tools.verification.findings`) come from the caller.
2. Locate: the first stage (embedding, layer i attention, layer i MLP, logits) where the residual streams
   of the two sides part ways by more than the dtype's ``hidden_rel`` (:mod:`persimmon_tools.verification.metrics`).
3. Explain: the converted tensors of that stage are compared with the checkpoint's by content
   (:mod:`persimmon_tools.verification.content`), unless a full weight check already ran.
4. Pick the most likely culprit: a disagreement between the two readers of the source, else a differing
   tensor of the diverging stage, else a structural problem, else a config value acting on that stage,
   else any finding; and say so honestly when nothing is found.
"""

from __future__ import annotations

from persimmon_tools.verification.content import ContentChecker, weight_findings
from persimmon_tools.verification.findings import (
    FULL_SCAN_PARAMS,
    Finding,
    all_fields,
    stage_fields,
    stage_part,
)


def locate(stages: list[tuple[str, float]], threshold: float) -> dict | None:
    """The first stage whose relative error exceeds ``threshold`` (NaN counts as exceeding)."""
    prev = None
    for stage, err in stages:
        if not err <= threshold:
            return {
                "stage": stage,
                "relative_error": err,
                "threshold": threshold,
                "before": {"stage": prev[0], "relative_error": prev[1]} if prev else None,
            }
        prev = (stage, err)
    return None


def _pick(first: dict | None, findings: list[Finding]) -> Finding | None:
    part, layer = stage_part(first["stage"]) if first else (None, None)
    ranked = [
        lambda f: f.kind == "reader",
        lambda f: f.kind == "tensor" and f.part == part and f.layer == layer,
        lambda f: f.kind in ("structure", "load"),
        lambda f: f.kind == "config" and f.part in (part, None),
        lambda f: f.kind == "config",
        lambda f: f.kind == "tensor",
    ]
    for test in ranked:
        for f in findings:
            if test(f):
                return f
    return None


def diagnose(
    *,
    config: list[Finding],
    stages: list[tuple[str, float]] | None,
    prompt: str | None,
    hidden_rel: float,
    checker: ContentChecker | None,
    tensors: list[Finding] | None = None,
    skipped: str | None = None,
) -> dict:
    """Locate the failure (first diverging stage of the first failing prompt) and explain it.

    ``tensors``: findings of a full weight check already made; when None, the tensors of the diverging
    stage are checked now (and every tensor, for models below :data:`FULL_SCAN_PARAMS`). ``skipped``: why
    no forward pass ran (None: it ran), said instead of anything about the logits.
    """
    first = locate(stages, hidden_rel) if stages else None
    if first is not None:
        first["prompt"] = prompt
    if tensors is None:
        tensors = []
        if checker is not None:
            scope = stage_fields(first["stage"], checker.hp) if first else []
            if checker.hp.num_parameters() <= FULL_SCAN_PARAMS:
                scope += [x for x in all_fields(checker.hp) if x not in scope]
            tensors = weight_findings(checker, scope) if scope else []
    findings = [*config, *tensors]
    likely = _pick(first, findings)
    bits = []
    if first is not None:
        before = first["before"]
        bits.append(
            f"first divergence at {first['stage']} (prompt {prompt!r}: ‖Δh‖/‖h‖ = "
            f"{first['relative_error']:.3g}"
            + (f", {before['relative_error']:.2g} at {before['stage']}" if before else "")
            + ")"
        )
    elif any(f.kind == "reader" for f in findings):
        bits.append(
            "the converter's and verify's own reader of the source disagree (keys, shapes, dtypes or the byte "
            "ranges they read), so no forward pass was run (a bug in interpreting the release would make both "
            "the conversion and a reference built on the same interpretation wrong)"
        )
    elif skipped is not None:
        bits.append(skipped)
    elif stages:
        bits.append(
            f"no stage differs by more than {hidden_rel:g} (relative); the logits differ slightly "
            "everywhere, which looks like precision rather than a mapping mistake"
        )
    elif prompt is None and findings:  # every prompt compared passed: the exact checks failed
        bits.append("the logits agree within tolerance, but the conversion is not faithful")
    if likely is not None:
        bits.append("most likely: " + likely.line())
    else:
        bits.append(
            "every compared tensor equals the checkpoint's and config.json agrees with it; the "
            "difference comes from the computation itself (transformers version, dtype or device)"
        )
    return {
        "summary": "; ".join(bits),
        "first_divergence": first,
        "most_likely": likely.to_dict() if likely else None,
        "findings": [f.to_dict() for f in findings],
        "stage_errors": [{"stage": s, "relative_error": e} for s, e in (stages or [])],
    }
