"""verify's forward passes against a source: greedy generation by the converted model, then ONE lockstep pass
of both sides over prompt + generated tokens; the logit metrics, the generation check and the KL
distribution from it; and the stored reference record written from the same reference logits.

The lockstep run (:func:`~persimmon_tools.verification.run.run_lockstep`) sees ``prompt + generated`` per
prompt; the logit metrics and the KL distribution use the rows of the prompt's own positions (``[:T]``: a
causal model's logits there do not depend on what follows), the generation check the rows ``T - 1 ..
T + n - 2`` (:mod:`persimmon_tools.verification.generation`), and the record every row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import REFERENCE_RECORD_FILE
from persimmon_tools.verification.findings import Finding
from persimmon_tools.verification.generation import (
    budget,
    choices_from_logits,
    describe_failure,
    generation_record,
    greedy,
    judge,
)
from persimmon_tools.verification.kl import full_stats, kl_record
from persimmon_tools.verification.metrics import DTYPE_NAMES, PromptMetrics, Tolerance, compare_logits
from persimmon_tools.verification.prompts import Prompt
from persimmon_tools.verification.record import TOP_K, build_record, describe, verified_files, write_record
from persimmon_tools.verification.run import LayerwiseModel, RunResult, run_lockstep
from persimmon_tools.verification.transformers_side import TransformersTrace

if TYPE_CHECKING:
    from persimmon_tools.verification.verify import VerifyOptions


@dataclass
class Passes:
    """What the passes give. ``reference``/``converted``/``adept``: (T, V) logits of each prompt's own
    positions; ``run.reference``: (T + n, V) over prompt + generated."""

    prompts: list[Prompt]
    run: RunResult
    generated: list[list[int]]
    reference: list[torch.Tensor]
    converted: list[torch.Tensor]
    adept: list[torch.Tensor] | None
    metrics: list[PromptMetrics]
    generation: dict
    kl: dict
    generation_seconds: float


def run_with_generation(
    ref: LayerwiseModel,
    conv: LayerwiseModel | TransformersTrace,
    prompts: list[Prompt],
    tol: Tolerance,
    new_tokens: int,
    max_tokens: int,
    rotary: str,
    progress: Callable[[str], None],
) -> Passes:
    """Generate, then compare both sides over prompt + generated (module docstring)."""
    lengths = [len(p.ids) for p in prompts]
    counts = budget(lengths, new_tokens, max_tokens)
    t = time.perf_counter()
    generated: list[list[int]] = [[] for _ in prompts]
    if any(counts):
        progress(f"greedy generation ({new_tokens} new tokens per prompt)")
        generated = greedy(conv, [p.ids for p in prompts], counts)
    gen_seconds = time.perf_counter() - t
    seqs = [list(p.ids) + g for p, g in zip(prompts, generated, strict=True)]
    run = run_lockstep(ref, conv, seqs, adept=rotary == "adept", progress=progress)
    reference = [r[:T] for r, T in zip(run.reference, lengths, strict=True)]  # (T, V) each
    converted = [c[:T] for c, T in zip(run.converted, lengths, strict=True)]
    adept = None if run.adept is None else [a[:T] for a, T in zip(run.adept, lengths, strict=True)]
    stats = [full_stats(r, c) for r, c in zip(reference, converted, strict=True)]
    metrics = [  # with the per-position KL just computed (not a second fp64 softmax of every position)
        compare_logits(r, c, tol, prompt=p.label, name=p.name, kl=st.kl)
        for p, r, c, st in zip(prompts, reference, converted, stats, strict=True)
    ]
    exact = tol.name == "fp32"
    entries = [
        judge(p.name, g, choices_from_logits(full, T, len(g), m.max_abs_tolerance), exact)
        for p, g, full, T, m in zip(prompts, generated, run.reference, lengths, metrics, strict=True)
    ]
    return Passes(
        prompts=prompts,
        run=run,
        generated=generated,
        reference=reference,
        converted=converted,
        adept=adept,
        metrics=metrics,
        generation=generation_record(new_tokens, tol.name, entries),
        kl=kl_record([p.name for p in prompts], stats, bound=tol.kl, exact=True),
        generation_seconds=gen_seconds,
    )


def add_check_failures(
    diagnosis: dict | None, generation: dict | None, tokenizer: Finding | None, findings: list[Finding]
) -> dict | None:
    """The diagnosis with the generation and tokenizer failures added (a diagnosis of its own when the logits
    and the exact checks passed)."""
    reasons = [describe_failure(generation)] if generation is not None else []
    reasons += [tokenizer.message] if tokenizer is not None else []
    reasons = [r for r in reasons if r]
    if not reasons:
        return diagnosis
    if diagnosis is not None:
        return {**diagnosis, "summary": f"{diagnosis['summary']}; " + "; ".join(reasons)}
    return {
        "summary": "the logits agree within tolerance, but " + "; ".join(reasons),
        "first_divergence": None,
        "most_likely": tokenizer.to_dict() if tokenizer is not None else None,
        "findings": [f.to_dict() for f in findings],
        "stage_errors": [],
    }


def write_stored_record(
    out_dir: Path,
    passes: Passes | None,
    source: dict[str, Any],
    tol: Tolerance,
    options: VerifyOptions,
    keep: str | None,
    device: str,
    dtype: torch.dtype,
    files: dict[str, dict[str, Any]],
) -> tuple[str, dict[str, Any]]:
    """Write the stored reference record (:mod:`persimmon_tools.verification.record`) when verification.json
    is written too; the ``reference_record`` check's (status, figures). ``files``: the folder's fingerprint
    (``fingerprint_folder``), updated in place with the record written, so the folder is hashed once."""
    if passes is None:
        return "skipped", {"reason": "no forward pass ran, so there is no reference to record"}
    if not options.write:
        return "skipped", {"reason": "not written (nothing is written into the folder)"}
    if keep is not None:
        return "skipped", {"reason": f"not written: {keep}"}
    meta = {
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "device": device,
        "rotary": "hf",
        "new_tokens": options.new_tokens,
        "tolerances": tol.to_dict(),
        "source": source,
        "folder_files": verified_files(files),
    }
    listed = [
        (p.name, p.label, list(p.ids), g, m.logit_scale)
        for p, g, m in zip(passes.prompts, passes.generated, passes.metrics, strict=True)
    ]
    data = build_record(listed, passes.run.reference, meta)
    positions = sum(r.shape[0] for r in passes.run.reference)
    if write_record(data, out_dir) is None:
        return "skipped", {"reason": f"not written: {len(data):,} bytes ({positions} positions) is too big"}
    written = describe(data)
    files[REFERENCE_RECORD_FILE] = {"sha256": written["sha256"], "size": written["bytes"]}
    ordered = sorted(files.items())  # in fingerprint_folder's order, as if the folder were hashed now
    files.clear()
    files.update(ordered)
    return "pass", {**written, "written": True, "positions": positions, "top_k": TOP_K}
