"""The verification report: dataclass, ``verification.json``, the stdout table and the source fingerprint.

``verification.json`` (read by ``push``) holds: tool, tool_version, created, verdict, device, dtype, rotary,
converted_loader, source {path, kind, files [{name, size, sha256}], sha256_of, iteration, tp, pp, variant,
bytes_read, bytes_reread},
readers {agree, tensors_compared, bytes_compared, seconds, readers, differences} (the converter's
interpretation of the source against verify's own, :mod:`persimmon_tools.verification.agreement`), tolerances, metrics [per prompt], diagnosis, published_reference (8B chat only), adept_drift (``--rotary
adept``), config_findings, tokenizer, checked_against, generation, kl, checks, environment (since
2026-12-07: :mod:`~persimmon_tools.verification.generation`, :mod:`~persimmon_tools.verification.kl`,
:mod:`~persimmon_tools.verification.checks`, :mod:`~persimmon_tools.verification.environment`), timings, memory,
and files = fingerprint_folder(OUT_DIR).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE
from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.hashing import HashingReader
from persimmon_tools.megatron.release import Release
from persimmon_tools.safe_write import atomic_file
from persimmon_tools.verification.checks import check_lines, generation_lines, kl_lines
from persimmon_tools.verification.metrics import PromptMetrics

_CHUNK = 8 << 20


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`persimmon_tools.verification.verify.verify`; ``passed`` decides the exit code (0 / 3)."""

    out_dir: Path
    verdict: str  # "pass" | "fail"
    device: str
    dtype: str
    rotary: str
    converted_loader: str  # "transformers" | "persimmon-tools"
    loader_reason: str
    source: dict[str, Any]
    tolerances: dict[str, Any]
    metrics: tuple[PromptMetrics, ...]
    tokenizer: str
    config_findings: tuple[dict, ...] = ()
    readers: dict | None = None  # Agreement.to_dict(): do both readers of the source agree?
    forward_pass: dict | None = None  # {"ran", "prompts", "skipped_because"}: were logits compared at all?
    weights: dict | None = None  # {"compared": n, "differing": [findings], "scope": ...}
    diagnosis: dict | None = None
    published_reference: dict | None = None
    adept_drift: tuple[dict, ...] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    tool_version: str = ""
    created: str = ""
    generation: dict | None = None  # generation.generation_record(): greedy decoding against the reference
    kl: dict | None = None  # kl.kl_record(): KL per position as a distribution, top-1, same top-p
    environment: dict | None = None  # environment.environment(): versions, commit, device, dtype, date
    checks: tuple[dict, ...] = ()  # checks.build_checks(): {name, command, status, figures} per check
    checked_against: str = "source"  # "source" | "stored reference record"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def summary_line(self) -> str:
        """One line: verdict, worst prompt, dtype/device/loader; the diagnosis when failed."""
        where = f"{self.dtype} on {self.device}, converted side via {self.converted_loader}"
        if self.metrics:
            worst = max(self.metrics, key=lambda m: m.max_abs_diff / m.logit_scale if m.logit_scale else 0.0)
            ok = sum(m.passed for m in self.metrics)
            head = (
                f"{self.verdict}: {ok}/{len(self.metrics)} prompts within tolerance, worst max|Δ logit| "
                f"{worst.max_abs_diff:.3g} ({worst.max_abs_diff / (worst.logit_scale or 1):.2g} of scale, "
                f"prompt {worst.name}), {where}"
            )
        else:  # why: the diagnosis says
            head = f"{self.verdict}: no logits compared, {where}"
        if self.generation is not None:
            same = sum(p["same"] for p in self.generation["prompts"])
            head += f"; greedy generation {same}/{len(self.generation['prompts'])} prompts the same"
        if self.checked_against != "source" and not self.diagnosis:
            head += "; checked against the stored reference record, not the source"
        if self.diagnosis:
            head += "; " + self.diagnosis["summary"]
        return head

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tool": "persimmon-tools",
            "tool_version": self.tool_version,
            "created": self.created,
            "verdict": self.verdict,
            "out_dir": str(self.out_dir),
            "device": self.device,
            "dtype": self.dtype,
            "rotary": self.rotary,
            "converted_loader": self.converted_loader,
            "loader_reason": self.loader_reason,
            "tokenizer": self.tokenizer,
            "source": self.source,
            "readers": self.readers,
            "forward_pass": self.forward_pass,
            "tolerances": self.tolerances,
            "metrics": [m.to_dict() for m in self.metrics],
            "config_findings": list(self.config_findings),
            "weights": self.weights,
            "diagnosis": self.diagnosis,
        }
        if self.published_reference is not None:
            d["published_reference"] = self.published_reference
        if self.adept_drift is not None:
            d["adept_drift"] = list(self.adept_drift)
        d.update(
            {
                "checked_against": self.checked_against,
                "generation": self.generation,
                "kl": self.kl,
                "checks": list(self.checks),
                "environment": self.environment,
                "timings": self.timings,
                "memory": self.memory,
                "files": self.files,
            }
        )
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=True) + "\n"


def write_report(report: VerifyReport, path: Path) -> Path:
    """Write ``report`` as JSON at ``path`` atomically (a private temp file beside it + rename; a link at
    ``path`` is refused, never written through)."""
    path = Path(path)
    with atomic_file(path, "verification report", PersimmonToolsError) as fh:
        fh.write(report.to_json().encode("utf-8"))
    return path


def verification_path(out_dir: Path) -> Path:
    return Path(out_dir) / VERIFICATION_FILE


def sha256_bytesource(src: ByteSource) -> str:
    return src.sha256(_CHUNK)[0]


def member_name(release: Release, src: ByteSource) -> str:
    """How the report names a source file: a tar member's name, a path relative to the release folder, or
    the file's name."""
    if release.kind == "tar":
        return src.name.removeprefix(f"{release.source}:")
    if src.path != release.source:
        try:
            return src.path.relative_to(release.source).as_posix()
        except ValueError:
            pass
    return src.path.name


def fingerprint_sources(release: Release) -> list[ByteSource]:
    """What :func:`source_fingerprint` hashes, in its order: the checkpoint's files (the shards, or a torch_dist
    checkpoint's files), then the vocabulary."""
    return release.source_files() + ([release.vocab] if release.vocab is not None else [])


def source_fingerprint(
    release: Release,
    iteration: int | None,
    *,
    hash_files: bool = True,
    digests: Sequence[str | None] | None = None,
    reads: HashingReader | None = None,
) -> dict[str, Any]:
    """File names, sizes and sha256 of the checkpoint shards (and vocabulary) of ``release``.

    For a tar source the sha256 is of each member's bytes (its byte range inside the tar), so it equals
    the sha256 of the extracted file. ``digests`` (one per :func:`fingerprint_sources` entry) are sha256s
    computed already, e.g. by verify's :class:`~persimmon_tools.megatron.hashing.HashingReader` while it
    read the weights; without them each file is read here. ``reads`` adds that reader's counts:
    ``bytes_read`` (bytes of the source files read for the weights and the hashes) and ``bytes_reread``
    (of those, bytes read twice; null when not hashed).
    """
    sources = fingerprint_sources(release)
    if digests is None:
        digests = [sha256_bytesource(s) if hash_files else None for s in sources]
    if len(digests) != len(sources):
        raise ValueError(f"{len(digests)} digests for {len(sources)} source files")
    files = [
        {"name": member_name(release, s), "size": s.size, "sha256": d if hash_files else None}
        for s, d in zip(sources, digests, strict=True)
    ]
    counts = {} if reads is None else {"bytes_read": reads.bytes_read, "bytes_reread": reads.bytes_reread}
    return {
        "path": str(Path(release.source).absolute()),
        "kind": release.kind,
        "files": files,
        "sha256_of": (
            "tar member bytes (equal to the extracted files' sha256)"
            if release.kind == "tar"
            else "whole files"
        )
        if hash_files
        else "not hashed (--no-source-hash)",
        "iteration": iteration,
        "tp": release.tp,
        "pp": release.pp,
        "variant": release.variant,
        **counts,
    }


def _fmt(x: float) -> str:
    return f"{x:.2e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.4f}"


def render_table(report: VerifyReport) -> str:
    """The human summary printed by ``persimmon-tools verify``."""
    chosen = report.source.get("reference_from") or "--reference"
    recorded = "" if chosen == "--reference" else ", recorded in conversion.json"
    against = f"reference: {report.source.get('path')}{recorded}"
    if report.checked_against != "source":
        against = f"checked against the stored reference record, not the source: {chosen}"
    skipped = (report.forward_pass or {}).get("skipped_because")
    lines = [
        f"verify {report.out_dir}  ({against})",
        f"device {report.device}, dtype {report.dtype}, rotary {report.rotary}, converted side loaded with "
        f"{report.converted_loader}; tokenizer: {report.tokenizer}",
        "",
    ]
    head = (
        f"{'prompt':<10} {'tokens':>6} {'max|Δ|':>9} {'mean|Δ|':>9} {'KL':>9} {'top1':>6} {'top5':>6} "
        f"{'scale':>8}  ok"
    )
    lines += [head, "-" * len(head)] if report.metrics or not skipped else [skipped]
    for m in report.metrics:
        lines.append(
            f"{m.name[:10]:<10} {m.tokens:>6} {_fmt(m.max_abs_diff):>9} {_fmt(m.mean_abs_diff):>9} "
            f"{_fmt(m.kl_div):>9} {m.top1_agreement:>6.3f} {m.top5_agreement:>6.3f} "
            f"{_fmt(m.logit_scale):>8}  {'yes' if m.passed else 'NO'}"
        )
    tol = report.tolerances
    if report.metrics or not skipped:
        lines.append(
            f"tolerance ({tol.get('name')}): max|Δ| <= {tol.get('max_rel')} x scale, mean|Δ| <= "
            f"{tol.get('mean_rel')} x scale, KL <= {tol.get('kl')}"
        )
    lines += kl_lines(report.kl) + generation_lines(report.generation)
    if report.readers is not None:
        lines.append(_readers_line(report.readers))
    for f in report.config_findings:
        lines.append(f"{f['kind']}: {f['where']}: {f['message']}")
    if report.weights and report.weights.get("compared"):
        bad = report.weights["differing"]
        lines.append(
            f"weights: {report.weights['compared'] - len(bad)}/{report.weights['compared']} tensors equal "
            "the checkpoint's" + ("" if not bad else f"; {len(bad)} differ")
        )
    if report.adept_drift:
        lines += ["", "HF (fp32 rotary) vs ADEPT's bf16 rotary, by position:"]
        for r in report.adept_drift:
            lines.append(
                f"  positions {r['positions']:<8} max|Δ| {_fmt(r['max_abs_diff']):>9}  mean|Δ| "
                f"{_fmt(r['mean_abs_diff']):>9}  top1 {r['top1_agreement']:.3f}"
            )
    pub = report.published_reference
    if pub is not None:
        lines += [
            "",
            f"published 8B-chat logits ({'match' if pub['passed'] else 'DO NOT match'}; not part of "
            f"the verdict): max|Δ mean| {pub['max_abs_diff_mean']} (tol {pub['tolerance']['mean']}), "
            f"max|Δ slice| {pub['max_abs_diff_slice']} (tol {pub['tolerance']['slice']})",
        ]
    if report.diagnosis:
        lines += ["", "diagnosis: " + report.diagnosis["summary"]]
        for f in report.diagnosis.get("findings", [])[:12]:
            lines.append(f"  - {f['where']}: {f['message']}")
    lines += ["", *check_lines(list(report.checks), report.environment)]
    lines += [f"verdict: {report.verdict.upper()}" + (f" ({skipped})" if skipped else "")]
    return "\n".join(lines)


def _readers_line(r: dict[str, Any]) -> str:
    """The agreement of the two readings of the source, and what the tensors read are: the converted model
    holds the weights; the rotary ``inv_freq`` buffers are not in it (transformers computes them)."""
    kinds = r.get("source_tensors") or {}
    parts = [f"{kinds['weights']} weights (what the HF model holds)"] if "weights" in kinds else []
    if kinds.get("inv_freq_buffers"):
        parts.append(
            f"{kinds['inv_freq_buffers']} rotary inv_freq buffers, not in the HF model (transformers computes "
            "them from rope_theta, which is checked against them)"
        )
    if kinds.get("other"):
        parts.append(f"{kinds['other']} other tensors the conversion does not write")
    what = ": " + " + ".join(parts) if parts else ""
    verdict = "agree" if r["agree"] else f"DISAGREE ({len(r.get('differences') or [])} differences below)"
    return (
        f"readers: {verdict}: {r['tensors_compared']} checkpoint tensors, as the converter and verify's own "
        f"reader interpret the source (shapes, dtypes, byte ranges; {r['seconds']:.2f} s){what}"
    )
