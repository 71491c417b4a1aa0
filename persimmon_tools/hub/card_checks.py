"""The model card's record of what was checked: the environment verify ran in, its checks (a table of
verdicts, commands and key figures), greedy generation and the KL summary, the tokenizer fingerprint, and how
a user re-checks a downloaded copy.

Since 2026-12-07 ``verification.json`` records ``environment`` {persimmon_tools, commit, python, torch,
transformers, tokenizers, device, dtype, date}, ``checks`` [{name, command, status, figures}],
``generation`` {new_tokens, prompts, verdict, rule} and ``kl`` {overall {p50, p90, p99, max, top1_agreement,
same_top_p}, prompts}; ``verify`` writes the compact reference record (:data:`REFERENCE_RECORD_FILE`) beside
it, and ``conversion.json`` records ``tokenizer_fingerprint``. Older records lack them: what exists is
rendered and the rest says "not recorded", never failing.
"""

from __future__ import annotations

import shlex
from typing import Any

from persimmon_tools.conversion.fingerprint import REFERENCE_RECORD_FILE
from persimmon_tools.safe_read import format_size
from persimmon_tools.tokenizer.fingerprint import CONVERSION_KEY

NOT_RECORDED = "not recorded"
#: The checks ``verify`` records, in the card's order; others it records follow them.
CHECK_NAMES = ("logits", "generation", "kl", "tokenizer_fingerprint", "readers", "reference_record")
_FIGURES_SHOWN = 4
_FIGURE_CHARS = 60


def _text(value: Any, limit: int = 90) -> str:
    """A Markdown table cell: ``not recorded`` for None, no newlines or pipes, shortened."""
    text = NOT_RECORDED if value is None or value == "" else str(value)
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _figure(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".3g")
    if isinstance(value, (list, tuple)):
        return f"{len(value)} items"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    text = str(value)
    if len(text) >= 32 and all(c in "0123456789abcdef" for c in text):  # a digest: its start names it
        return text[:12] + "…"
    return text if len(text) <= _FIGURE_CHARS else text[: _FIGURE_CHARS - 1] + "…"


def _figures(figures: Any) -> str:
    """A check's key figures in one cell: ``name value`` pairs, the first few."""
    if isinstance(figures, dict):
        pairs = [f"{k} {_figure(v)}" for k, v in figures.items()][:_FIGURES_SHOWN]
        more = len(figures) - _FIGURES_SHOWN
        return ", ".join(pairs) + (f" (+{more} more)" if more > 0 else "") if pairs else "—"
    if figures is None:
        return "—"
    return _figure(figures)


def _status(value: Any) -> str:
    """``pass``, ``**fail**`` (anything but pass or skipped stands out), ``skipped``, or not recorded."""
    if value is None:
        return NOT_RECORDED
    return _text(value, 20) if value in ("pass", "skipped") else f"**{_text(value, 20)}**"


def environment_lines(ver: dict[str, Any]) -> list[str]:
    """The environment ``verify`` ran in, pinned: tool version and commit, Python, torch, transformers,
    tokenizers, device, dtype, date (from ``environment``, else the older report's own keys)."""
    env = ver.get("environment") if isinstance(ver.get("environment"), dict) else {}
    version = env.get("persimmon_tools") or ver.get("tool_version")
    commit = env.get("commit")
    tool = None
    if version:
        tool = f"{version} (commit `{commit}`)" if commit else f"{version} (commit {NOT_RECORDED})"
    rows = [
        ("persimmon-tools", tool),
        ("Python", env.get("python")),
        ("torch", env.get("torch")),
        ("transformers", env.get("transformers")),
        ("tokenizers", env.get("tokenizers")),
        ("Device", env.get("device") or ver.get("device")),
        ("dtype", env.get("dtype") or ver.get("dtype")),
        ("Date", env.get("date") or ver.get("created")),
    ]
    lines = ["### Environment", ""]
    if not env:
        lines += [
            "This `verification.json` predates the recorded environment (2026-12-07); what it says is shown.",
            "",
        ]
    return lines + ["| | |", "|---|---|"] + [f"| {k} | {_text(v)} |" for k, v in rows]


def checks_lines(ver: dict[str, Any]) -> list[str]:
    """One row per check (verdict, key figures, the command that ran it), then generation and KL."""
    lines = ["### Checks", ""]
    checks = [c for c in ver.get("checks") or [] if isinstance(c, dict)]
    if not isinstance(ver.get("checks"), list):
        lines.append(
            f"Per-check results: {NOT_RECORDED} (this `verification.json` predates them; "
            "`persimmon-tools verify` records them since 2026-12-07)."
        )
    else:
        lines += _checks_table(checks)
    return lines + ["", _generation(ver.get("generation")), "", *_kl(ver.get("kl"))]


def _checks_table(checks: list[dict[str, Any]]) -> list[str]:
    """The table: the known checks in order (a missing one says so), then the others. One command shared
    by every check (``verify`` runs them all at once) is shown once under the table."""
    by_name = {c.get("name"): c for c in checks}
    names = [*CHECK_NAMES, *(c.get("name") for c in checks if c.get("name") not in CHECK_NAMES)]
    commands = {c.get("command") for c in checks}
    shared = commands.pop() if len(commands) == 1 else None
    lines = ["| check | verdict | key figures |" + ("" if shared else " command |")]
    lines.append("|---|---|---|" + ("" if shared else "---|"))
    for name in names:
        check = by_name.get(name) or {}
        figures = _text(_figures(check.get("figures")), 100)
        row = f"| {_text(name, 40)} | {_status(check.get('status'))} | {figures} |"
        command = check.get("command")
        lines.append(row + ("" if shared else f" {f'`{_text(command, 120)}`' if command else '—'} |"))
    if shared:
        lines += ["", f"Every check ran with `{' '.join(str(shared).split())}`."]
    return lines


def _generation(gen: Any) -> str:
    if not isinstance(gen, dict):
        return f"Greedy generation: {NOT_RECORDED}."
    prompts = gen.get("prompts")
    count = f"{len(prompts)} prompt(s)" if isinstance(prompts, list) else f"prompts {NOT_RECORDED}"
    tokens = gen.get("new_tokens")
    what = f"{tokens} new tokens on each of {count}" if isinstance(tokens, int) else count
    rule = f"; rule: {_text(gen.get('rule'), 200)}" if gen.get("rule") else ""
    return f"Greedy generation: {_status(gen.get('verdict'))}, {what}{rule}."


def _kl(kl: Any) -> list[str]:
    overall = kl.get("overall") if isinstance(kl, dict) else None
    if not isinstance(overall, dict):
        return [f"KL divergence (reference ‖ converted, per position): {NOT_RECORDED}."]
    prompts, positions = kl.get("prompts"), overall.get("positions")
    keys = ("p50", "p90", "p99", "max", "top1_agreement", "same_top_p")
    cells = [_num(overall.get(k)) for k in keys]
    return [
        "KL divergence (reference ‖ converted) over every position"
        + (f" ({positions})" if isinstance(positions, int) and not isinstance(positions, bool) else "")
        + (f" of {len(prompts)} prompt(s)" if isinstance(prompts, list) else "")
        + ":",
        "",
        "| p50 | p90 | p99 | max | top-1 agreement | same top-p |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(cells) + " |",
    ]


def _num(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, ".3g")
    return NOT_RECORDED


def fingerprint_text(conv: dict[str, Any]) -> str | None:
    """``sha256:… (scheme)`` of ``conversion.json``'s tokenizer fingerprint; None when not recorded."""
    fp = conv.get(CONVERSION_KEY)
    if not isinstance(fp, dict) or not fp.get("sha256"):
        return None
    return f"`sha256:{fp['sha256']}` ({fp.get('scheme') or 'scheme ' + NOT_RECORDED})"


def reference_record(files: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """``{sha256, size}`` of the reference record among the files pushed (``verify`` fingerprints it like the
    weights); None when the folder has none."""
    entry = files.get(REFERENCE_RECORD_FILE)
    return entry if isinstance(entry, dict) else None


def recheck_lines(
    repo_id: str, conv: dict[str, Any], ver: dict[str, Any], reference: dict[str, Any] | None
) -> list[str]:
    """How a user re-checks a downloaded copy: ``verify`` against the stored reference record, or against
    the source release with ``--reference``."""
    local = "./" + repo_id.split("/")[-1]
    src = conv.get("source") if isinstance(conv.get("source"), dict) else {}
    release = src.get("name") or "RELEASE.tar"
    files = (ver.get("source") or {}).get("files") or src.get("checkpoint_files") or []
    sizes = [f.get("size") for f in files if isinstance(f, dict)]
    total = sum(sizes) if sizes and all(isinstance(s, int) for s in sizes) else None
    source = "ADEPT's source release" + (f" ({format_size(total)})" if total else "")
    fingerprint = fingerprint_text(conv)
    verify = shlex.join(["persimmon-tools", "verify", local])
    full = shlex.join(["persimmon-tools", "verify", local, "--reference", release])
    lines = ["## Re-check a downloaded copy", "", "```bash", "pip install persimmon-tools"]
    lines += [shlex.join(["hf", "download", repo_id, "--local-dir", local])]
    if reference is not None:
        lines += [verify, "```", ""]
        lines.append(
            f"`{verify}` checks the downloaded copy against the reference record stored in this repository "
            f"(`{REFERENCE_RECORD_FILE}`, {format_size(reference.get('size'))}, sha256 "
            f"`{reference.get('sha256')}`), without {source}. With the release at hand, `{full}` compares "
            "it with ADEPT's original tensors again."
        )
    else:
        lines += [full, "```", ""]
        lines.append(
            f"This upload holds no stored reference record (`{REFERENCE_RECORD_FILE}`), so a re-check needs "
            f"{source}: `{full}`."
        )
    lines += [
        "",
        "The tokenizer fingerprint is the sha256 of the ids SentencePiece gives a fixed probe text, as "
        "recorded by `convert` in `conversion.json` (`tokenizer_fingerprint`): "
        + (
            f"{fingerprint}; `verify` re-encodes the probe with the downloaded `tokenizer.json` and compares."
            if fingerprint
            else f"{NOT_RECORDED} for this conversion."
        ),
    ]
    return lines
