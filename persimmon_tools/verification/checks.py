"""The verdict per check (``verification.json``'s ``checks``), the tokenizer fingerprint check, and their lines
in the table ``verify`` prints.

``checks``: one entry per check, ``{"name", "command", "status": "pass" | "fail" | "skipped", "figures"}``, in
this order: ``logits`` (every prompt within the logit tolerances), ``generation`` (greedy decoding,
:mod:`persimmon_tools.verification.generation`), ``kl`` (each prompt's mean KL within its bound; the
distribution is in ``kl``), ``tokenizer_fingerprint`` (below), ``readers`` (the converter's and verify's own
reading of the source agree), ``reference_record`` (the stored reference record written, or used),
``config`` (config.json against the checkpoint, tensor presence, transformers loads the folder) and
``weights`` (every tensor by value). The overall verdict fails when any check fails. ``command`` is the
``persimmon-tools verify`` command line that runs them all again.

Tokenizer fingerprint: ``conversion.json``'s ``tokenizer_fingerprint`` (:mod:`persimmon_tools.tokenizer.fingerprint`)
holds a probe text and the ids the source's SentencePiece model gave it; the folder's ``tokenizer.json`` must
give the same ids. Without a recorded fingerprint (a conversion before 2026-12-07, or ``--no-tokenizer``) the
check is skipped with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.fingerprint import CONVERSION_FILE
from persimmon_tools.errors import PersimmonToolsError, VerificationError
from persimmon_tools.safe_read import read_json_record
from persimmon_tools.tokenizer.fingerprint import CONVERSION_KEY
from persimmon_tools.verification.findings import Finding
from persimmon_tools.verification.metrics import PromptMetrics, Tolerance

log = logging.getLogger(__name__)

TOKENIZER_FAILURE = (
    "tokenizer.json does not encode the fingerprint probe as the source's SentencePiece model did"
)


def _check(name: str, command: str, status: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "command": command, "status": status, "figures": figures}


def tokenizer_fingerprint(out_dir: Path) -> tuple[str, dict[str, Any], Finding | None]:
    """(status, figures, the failing finding or None) of the folder's tokenizer against the recorded probe."""
    try:
        conv = read_json_record(
            Path(out_dir) / CONVERSION_FILE, what="conversion.json", error=VerificationError
        )
    except PersimmonToolsError as err:
        return "skipped", {"reason": f"conversion.json is unreadable ({err.message})"}, None
    recorded = (conv or {}).get(CONVERSION_KEY)
    if recorded is None:
        why = "no conversion.json" if conv is None else "conversion.json records no tokenizer fingerprint"
        return "skipped", {"reason": why + " (convert records one since 2026-12-07)"}, None
    if not (
        isinstance(recorded, dict)
        and isinstance(recorded.get("probe"), str)
        and isinstance(recorded.get("ids"), list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in recorded["ids"])
    ):
        return (
            "skipped",
            {"reason": "conversion.json's tokenizer_fingerprint is not a {probe, ids} record"},
            None,
        )
    figures: dict[str, Any] = {
        "scheme": recorded.get("scheme"),
        "probe_ids": len(recorded["ids"]),
        "sha256": recorded.get("sha256"),
    }
    if not (Path(out_dir) / "tokenizer.json").is_file():
        problem = "the folder has no tokenizer.json"
    else:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            return "skipped", {**figures, "reason": "tokenizers is not installed"}, None
        from persimmon_tools.tokenizer.fingerprint import compare, ids_sha256, tokenizer_json_ids

        try:
            got = tokenizer_json_ids(Path(out_dir), recorded["probe"])
        except PersimmonToolsError as err:
            problem = err.message
        else:
            figures["got_sha256"] = ids_sha256(got)
            problem = compare(recorded, got)
    if problem is None:
        return "pass", figures, None
    message = f"{TOKENIZER_FAILURE}: {problem}"
    return "fail", {**figures, "problem": problem}, Finding("tokenizer", "tokenizer", message)


def build_checks(
    *,
    command: str,
    metrics: list[PromptMetrics] | tuple[PromptMetrics, ...],
    tol: Tolerance,
    skipped: str | None,
    generation: dict | None,
    kl: dict | None,
    tokenizer: tuple[str, dict[str, Any]],
    readers: dict | None,
    record: tuple[str, dict[str, Any]],
    config: list[Finding] | None,
    weights: list[Finding] | None,
) -> list[dict[str, Any]]:
    """``verification.json``'s ``checks`` (module docstring). ``config``/``weights``/``readers`` None: not
    run (no source)."""
    out = []
    if metrics:
        worst = max(m.max_abs_diff / m.logit_scale if m.logit_scale else 0.0 for m in metrics)
        figures = {
            "prompts": len(metrics),
            "within_tolerance": sum(m.passed for m in metrics),
            "worst_max_abs_diff_of_scale": worst,
            "positions": sum(m.tokens for m in metrics),
            "tolerance": tol.name,
        }
        out.append(_check("logits", command, "pass" if all(m.passed for m in metrics) else "fail", figures))
    else:
        out.append(_check("logits", command, "skipped", {"reason": skipped or "no prompts were compared"}))
    if generation is None:
        out.append(_check("generation", command, "skipped", {"reason": skipped or "no forward pass"}))
    else:
        ps = generation["prompts"]
        figures = {
            "new_tokens": generation["new_tokens"],
            "prompts": len(ps),
            "same": sum(p["same"] for p in ps),
            "differing_within_tolerance": sum(p["passed"] and not p["same"] for p in ps),
        }
        out.append(_check("generation", command, generation["verdict"], figures))
    if kl is None or not metrics:
        out.append(_check("kl", command, "skipped", {"reason": skipped or "no forward pass"}))
    else:
        ok = all(m.kl_div <= tol.kl for m in metrics)
        figures = {k: v for k, v in kl["overall"].items() if k != "positions"}
        figures.update(bound=tol.kl, exact=kl["exact"])
        out.append(_check("kl", command, "pass" if ok else "fail", figures))
    out.append(_check("tokenizer_fingerprint", command, *tokenizer))
    if readers is None:
        out.append(
            _check(
                "readers",
                command,
                "skipped",
                {"reason": "no source: checked against the stored reference record"},
            )
        )
    else:
        figures = {"agree": readers["agree"], "tensors_compared": readers["tensors_compared"]}
        out.append(_check("readers", command, "pass" if readers["agree"] else "fail", figures))
    out.append(_check("reference_record", command, *record))
    if config is None:
        out.append(_check("config", command, "skipped", {"reason": "no source to compare config.json with"}))
    else:
        figures = {"findings": len(config), "first": config[0].line() if config else None}
        out.append(_check("config", command, "fail" if config else "pass", figures))
    if weights is None:
        out.append(_check("weights", command, "skipped", {"reason": "not run (see weights.scope)"}))
    else:
        figures = {"differing": len(weights), "first": weights[0].line() if weights else None}
        out.append(_check("weights", command, "fail" if weights else "pass", figures))
    return out


def failing(checks: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in checks if c["status"] == "fail"]


# ---------------------------------------------------------------- the table's lines


def _e(x: Any) -> str:
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def kl_lines(kl: dict | None) -> list[str]:
    if not kl or not kl["overall"].get("positions"):
        return []
    how = "" if kl["exact"] else " (lower bound from the stored top-k)"
    head = f"{'KL/position':<12} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} {'top1':>6} {'top-p':>6}"
    lines = ["", f"KL(reference || converted) per position{how}; top-p: reference top token in the converted "
             f"top-{kl['top_p']} set", head, "-" * len(head)]  # fmt: skip
    for row in [*kl["prompts"], {"name": "all", **kl["overall"]}]:
        if not row.get("positions"):
            continue
        lines.append(
            f"{row['name'][:12]:<12} {_e(row['p50']):>9} {_e(row['p90']):>9} {_e(row['p99']):>9} "
            f"{_e(row['max']):>9} {row['top1_agreement']:>6.3f} {row['same_top_p']:>6.3f}"
        )
    return lines


def generation_lines(gen: dict | None) -> list[str]:
    if not gen:
        return []
    parts = []
    for p in gen["prompts"]:
        d = p["first_difference"]
        if d is None:
            parts.append(f"{p['name']} same")
        else:
            verdict = "within tolerance" if p["passed"] else "FAILS"
            parts.append(
                f"{p['name']} differs at new token {d['position']} ({d['converted_token']} vs the reference's "
                f"{d['reference_token']}, gap {d['logit_gap']:.3g}: {verdict})"
            )
    return [
        f"generation ({gen['new_tokens']} greedy new tokens per prompt): {gen['verdict'].upper()}: "
        + "; ".join(parts)
    ]


def check_lines(checks: list[dict[str, Any]], environment: dict | None) -> list[str]:
    lines = []
    tok = next((c for c in checks if c["name"] == "tokenizer_fingerprint"), None)
    if tok is not None:
        f = tok["figures"]
        what = {
            "pass": f"tokenizer.json encodes the recorded probe to the same {f.get('probe_ids')} ids",
            "fail": f"FAIL: {f.get('problem')}",
        }.get(tok["status"], f"skipped ({f.get('reason')})")
        lines.append(f"tokenizer fingerprint: {what}")
    if checks:
        lines.append(
            "checks: "
            + ", ".join(f"{c['name']} {c['status'] if c['status'] != 'fail' else 'FAIL'}" for c in checks)
        )
    if environment:
        e = environment
        commit = f" (commit {e['commit'][:12]})" if e.get("commit") else ""
        lines.append(
            f"environment: persimmon-tools {e['persimmon_tools']}{commit}, Python {e['python']}, torch "
            f"{e['torch']}, transformers {e['transformers']}, tokenizers {e['tokenizers']}, {e['device']}, {e['dtype']}"
        )
    return lines
