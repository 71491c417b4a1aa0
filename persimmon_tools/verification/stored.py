"""``verify OUT_DIR`` with no usable source: the folder against its stored reference record.

When no ``--reference`` is given and the source ``conversion.json`` records is gone or changed
(:mod:`persimmon_tools.verification.recorded_source`), and the folder holds the record an earlier verify
wrote (:mod:`persimmon_tools.verification.record`), the converted model is checked against that record:

* logits: at every position of each recorded prompt, the converted logits of the reference's stored top-k
  tokens within the max |Δ| tolerance (``max_rel x`` the recorded logit scale), their mean within the mean
  tolerance, and the log-sum-exp over the whole vocabulary within the max tolerance (it moves by at most
  max |Δ logit|, so it catches changes outside the top-k);
* KL: per position, the top-k-plus-tail lower bound (:mod:`persimmon_tools.verification.kl`), its mean within
  the KL bound;
* generation: the converted model generates the recorded number of tokens; the stored top-k along the
  recorded sequence give the reference's choice and logit gap at each step while the new tokens follow the
  recorded ones (:mod:`persimmon_tools.verification.generation`'s rule);
* the tokenizer fingerprint as always.

The tolerance row is the coarser of the record's and this run's dtype. No config or weight comparison runs
(there is no checkpoint to compare with); files changed since the last ``verification.json`` are named.
The summary and the report say "checked against the stored reference record, not the source".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE, fingerprint_folder
from persimmon_tools.errors import VerificationError
from persimmon_tools.safe_read import read_json_record
from persimmon_tools.verification import checks as check_list
from persimmon_tools.verification.environment import environment, rerun_command
from persimmon_tools.verification.findings import Finding, presence_findings
from persimmon_tools.verification.generation import (
    Choices,
    describe_failure,
    generation_record,
    greedy,
    judge,
)
from persimmon_tools.verification.hf_side import HFWeights
from persimmon_tools.verification.kl import PositionStats, topk_stats
from persimmon_tools.verification.kl import kl_record as make_kl
from persimmon_tools.verification.metrics import TOLERANCES, PromptMetrics, Tolerance, tolerance_for
from persimmon_tools.verification.record import (
    StoredPrompt,
    StoredRecord,
    changed_since_recorded,
    describe,
    read_record,
    record_path,
)
from persimmon_tools.verification.report import VerifyReport, verification_path, write_report
from persimmon_tools.verification.run import LayerwiseModel, peak_memory
from persimmon_tools.verification.sides import (
    DTYPES,
    choose_loader,
    converted_side,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    from persimmon_tools.verification.verify import VerifyOptions

log = logging.getLogger(__name__)

AGAINST = "checked against the stored reference record, not the source"
_ORDER = ("fp32", "fp16", "bf16")


def compare_with_record(
    p: StoredPrompt, conv: torch.Tensor, tol: Tolerance
) -> tuple[PromptMetrics, PositionStats]:
    """Converted logits ``conv`` (T + n, V) at a prompt's own positions against its stored top-k and lse;
    with the per-position KL (lower bound), top-1 and top-p figures."""
    T, dev = len(p.ids), conv.device
    values, idx, lse = p.values[:T].to(dev), p.indices[:T].to(dev), p.lse[:T].to(dev)  # (T, k), (T, k), (T,)
    c = conv[:T].float()
    diff = (c.gather(-1, idx) - values).abs()  # (T, k)
    lse_diff = (torch.logsumexp(c.double(), -1) - lse.double()).abs()  # (T,)
    max_abs, mean_abs, scale = float(diff.max()), float(diff.double().mean()), p.logit_scale
    if diff.isnan().any():
        max_abs = float("nan")
    stats = topk_stats(values, idx, lse, c)
    k = min(5, idx.shape[-1])
    top5 = (c.topk(k, -1).indices[:, :, None] == idx[:, None, :k]).any(-1).double().sum(-1) / k  # (T,)
    failed = []
    if not max_abs <= tol.max_rel * scale:
        failed.append(
            f"max |Δ| {max_abs:.3g} over the stored top-{idx.shape[-1]} > {tol.max_rel:g} x scale {scale:.3g}"
        )
    if not float(lse_diff.max()) <= tol.max_rel * scale:
        failed.append(f"|Δ log-sum-exp| {float(lse_diff.max()):.3g} > {tol.max_rel:g} x scale {scale:.3g}")
    if not mean_abs <= tol.mean_rel * scale:
        failed.append(
            f"mean |Δ| {mean_abs:.3g} over the stored top-{idx.shape[-1]} > {tol.mean_rel:g} x scale {scale:.3g}"
        )
    if not float(stats.kl.mean()) <= tol.kl:
        failed.append(f"KL (lower bound) {float(stats.kl.mean()):.3g} > {tol.kl:g}")
    metrics = PromptMetrics(
        prompt=p.label,
        name=p.name,
        tokens=T,
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        kl_div=float(stats.kl.mean()),
        kl_div_max=float(stats.kl.max()),
        top1_agreement=float(stats.top1.double().mean()),
        top5_agreement=float(top5.mean()),
        logit_scale=scale,
        max_abs_tolerance=tol.max_rel * scale,
        mean_abs_tolerance=tol.mean_rel * scale,
        passed=not failed,
        failed=tuple(failed),
    )
    return metrics, stats


def recorded_choices(p: StoredPrompt, generated: list[int], tolerance: float) -> Choices:
    """The reference's choices for the new tokens, from the record, while ``generated`` follows the recorded
    sequence (after the first token where it does not, the stored logits belong to another prefix). The gap to
    a token outside the stored top-k is the lower bound ``values[0] - values[-1]``."""
    T, rec = len(p.ids), p.generated
    limit = next(
        (j + 1 for j, (a, b) in enumerate(zip(generated, rec, strict=False)) if a != b),
        min(len(rec), len(generated)),
    )
    rows = range(T - 1, T - 1 + limit)
    top = [int(p.indices[r, 0]) for r in rows]

    def gap(j: int, b: int) -> float:
        row = p.indices[T - 1 + j]
        at = (row == b).nonzero()
        other = p.values[T - 1 + j, int(at[0, 0])] if at.numel() else p.values[T - 1 + j, -1]
        return float(p.values[T - 1 + j, 0] - other)

    return Choices(top, gap, tolerance)


def _tolerance(record: StoredRecord, dtype: torch.dtype) -> Tolerance:
    names = [tolerance_for(dtype).name]
    stored = (record.meta.get("tolerances") or {}).get("name")
    if stored in TOLERANCES:
        names.append(stored)
    return TOLERANCES[max(names, key=_ORDER.index)]


def _changed_files(out_dir: Path, files: dict) -> list[str]:
    """Files that differ from the last ``verification.json``'s fingerprint (nothing when there is none)."""
    try:
        old = read_json_record(verification_path(out_dir), what=VERIFICATION_FILE, error=VerificationError)
    except VerificationError:
        return []
    before = (old or {}).get("files")
    if not isinstance(before, dict):
        return []
    return sorted(k for k in set(before) | set(files) if before.get(k) != files.get(k))


def verify_stored(
    out_dir: Path, options: VerifyOptions, why: str, *, progress: Callable[[str], None] = lambda s: None
) -> VerifyReport:
    """Check ``out_dir`` against its stored reference record (module docstring); ``why``: why no source."""
    start = time.perf_counter()
    record = read_record(out_dir)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    log.info(
        "verify: %s; checking %s against the stored reference record %s, not the source",
        why,
        out_dir,
        record_path(out_dir),
    )
    conv = HFWeights(out_dir)
    tol = _tolerance(record, dtype)
    findings = [Finding("note", "reference", f"{AGAINST}: {why}")] + presence_findings(conv)
    top = max((int(p.indices.max()) for p in record.prompts if p.indices.numel()), default=-1)
    top = max([top, *(max(p.sequence, default=-1) for p in record.prompts)])
    if top >= conv.hyper.vocab_size:
        findings.append(
            Finding(
                "structure",
                "config.json vocab_size",
                f"is {conv.hyper.vocab_size}, but the record holds token id {top}",
            )
        )
    files = fingerprint_folder(out_dir)  # nothing is written into the folder before the report
    changed = changed_since_recorded(files, record.meta.get("folder_files"))
    edited = None
    if changed:  # weights, config or tokenizer files edited after the verification that wrote the record
        edited = Finding(
            "config",
            "the folder's files",
            f"differ from the folder the record was made for ({'; '.join(changed[:5])}"
            f"{f' and {len(changed) - 5} more' if len(changed) > 5 else ''})",
        )
        findings.append(edited)
    structural = [f for f in findings if f.kind == "structure"]
    loader, reason = choose_loader(options, conv, dtype, device)
    metrics, generation, kl, seconds = [], None, None, {}
    if not structural:
        model, loader, reason = converted_side(loader, reason, conv, dtype, device, findings)
        t = time.perf_counter()
        progress("greedy generation")
        gen = greedy(model, [p.ids for p in record.prompts], [len(p.generated) for p in record.prompts])
        seconds["generation_s"] = round(time.perf_counter() - t, 3)
        progress("converted model over the recorded sequences")
        t = time.perf_counter()
        seqs = [p.sequence for p in record.prompts]
        logits = model.forward(seqs) if isinstance(model, LayerwiseModel) else model.run(seqs)[1]
        seconds["converted_s"] = round(time.perf_counter() - t, 3)
        compared = [compare_with_record(p, lg, tol) for p, lg in zip(record.prompts, logits, strict=True)]
        metrics = [m for m, _ in compared]
        exact = tol.name == "fp32"
        entries = [
            judge(p.name, g, recorded_choices(p, g, m.max_abs_tolerance), exact)
            for p, g, m in zip(record.prompts, gen, metrics, strict=True)
        ]
        generation = generation_record(int(record.meta.get("new_tokens") or 0), tol.name, entries)
        kl = make_kl([p.name for p in record.prompts], [st for _, st in compared], bound=tol.kl, exact=False)
    errors = [f for f in findings if f.kind in ("structure", "load")]
    if edited is not None:  # fails the verdict; the comparison above still ran, for the figures
        errors.append(edited)
    tok_status, tok_figures, tok_finding = check_list.tokenizer_fingerprint(out_dir)
    if tok_finding is not None:
        findings.append(tok_finding)
        errors.append(tok_finding)
    command = rerun_command(out_dir, None, options, device=str(device), dtype=dtype_name)
    record_check = ("pass", {**describe(record), "used": True, "created": record.meta.get("created")})
    checks = check_list.build_checks(
        command=command,
        metrics=metrics,
        tol=tol,
        skipped="no prompts were compared: " + structural[0].line() if structural else None,
        generation=generation,
        kl=kl,
        tokenizer=(tok_status, tok_figures),
        readers=None,
        record=record_check,
        config=[f for f in errors if f.kind != "tokenizer"],
        weights=None,
    )
    passed = bool(metrics) and not errors and not check_list.failing(checks)
    diagnosis = None
    if not passed:
        bad = [m for m in metrics if not m.passed]
        more = f" ({len(bad)} of {len(metrics)} prompts fail)" if len(bad) > 1 else ""
        reasons = [f"prompt {bad[0].name!r}: {bad[0].failed[0]}{more}"] if bad else []
        reasons += [f.line() for f in errors if f.kind != "tokenizer"]
        if generation is not None:
            reasons.append(describe_failure(generation) or "")
        if tok_finding is not None:
            reasons.append(tok_finding.message)
        changed = _changed_files(out_dir, files)
        if changed:
            reasons.append("files changed since the last verification.json: " + ", ".join(changed[:5]))
        diagnosis = {
            "summary": f"{AGAINST}: " + "; ".join(r for r in reasons if r),
            "first_divergence": None,
            "most_likely": None,
            "findings": [f.to_dict() for f in findings],
            "stage_errors": [],
        }
    source = dict(record.meta.get("source") or {})
    source["reference_from"] = f"{record_path(out_dir).name} (no usable source: {why})"
    report = VerifyReport(
        out_dir=out_dir,
        verdict="pass" if passed else "fail",
        device=str(device),
        dtype=dtype_name,
        rotary=options.rotary,
        converted_loader=loader,
        loader_reason=reason,
        source=source,
        tolerances=tol.to_dict(),
        metrics=tuple(metrics),
        tokenizer="the token ids stored in the record",
        config_findings=tuple(f.to_dict() for f in findings),
        readers=None,
        forward_pass={
            "ran": bool(metrics),
            "prompts": len(metrics),
            "skipped_because": None if metrics else checks[0]["figures"].get("reason"),
            "against": "the stored reference record",
        },
        weights={
            "compared": 0,
            "differing": [],
            "scope": "not run (no source: checked against the stored reference record)",
        },
        diagnosis=diagnosis,
        timings={"total_s": round(time.perf_counter() - start, 3), **seconds},
        memory=peak_memory(device),
        files=files,
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=generation,
        kl=kl,
        environment=environment(device, dtype_name),
        checks=tuple(checks),
        checked_against="stored reference record",
    )
    if options.write:
        write_report(report, verification_path(out_dir))
    return report
