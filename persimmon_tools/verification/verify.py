"""``verify``: prove that a converted folder computes what the original Megatron checkpoint computes.

    report = verify(Path("persimmon-8b-chat-hf"), Path("8b_chat_model_release.tar"), VerifyOptions())
    report.passed, report.to_json()

The reference side is :mod:`persimmon_tools.verification.reference` on the checkpoint's Megatron tensors as
verify's own interpretation (:mod:`persimmon_tools.verification.source_merge`: grid, stage roles, renumbering,
TP merge) makes them of the one byte layer (:mod:`persimmon_tools.megatron`'s release discovery, torch zip
reader, restricted unpickler and lazy tensors); it shares none of the converter's merge. Before any forward
pass both interpretations must agree on the iteration, the keys and every tensor's shape, dtype and byte
ranges (:mod:`persimmon_tools.verification.agreement`; no weights are read for that); otherwise the verdict
is fail and nothing runs. The converter's merge (:mod:`persimmon_tools.megatron.checkpoint`) is used here
for that check only. Base or chat (for ADEPT's published 8B-chat logits) is the release's own name
(:mod:`persimmon_tools.megatron.variant`), never a word elsewhere in the path. The converted
side is ``transformers.PersimmonForCausalLM`` when installed and the model fits, else the toolkit's own
layer-by-layer reader of the HF layout (:mod:`persimmon_tools.verification.hf_side`). Both run every prompt;
logits are compared with the tolerances of :mod:`persimmon_tools.verification.metrics`. On failure a diagnosis
names the first diverging layer and the most likely tensor or config value. ``verification.json`` is
written into the folder either way; :func:`check_passed` turns a failing report into a VerificationError.
The source files' sha256 it records are computed while the weights are read
(:class:`~persimmon_tools.megatron.hashing.HashingReader`), so a release stored layer by layer is read
once; ``source.bytes_read`` and ``source.bytes_reread`` say how many bytes were read, and read twice.

Since 2026-12-07 (:mod:`~persimmon_tools.verification.passes`): the converted model first generates
``new_tokens`` greedy tokens per prompt, and the one lockstep pass runs over prompt + generated tokens, which
also checks greedy generation against the reference (:mod:`~persimmon_tools.verification.generation`) and
gives the KL distribution (:mod:`~persimmon_tools.verification.kl`); the tokenizer fingerprint is checked
and every check gets its verdict (:mod:`~persimmon_tools.verification.checks`); the stored reference record
(:mod:`~persimmon_tools.verification.record`) is written beside ``verification.json``, and with no usable
source the folder is checked against it instead (:mod:`~persimmon_tools.verification.stored`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import fingerprint_folder
from persimmon_tools.errors import ConfigError, UsageError, VerificationError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.hashing import HashingReader
from persimmon_tools.megatron.records import finish_records
from persimmon_tools.megatron.release import open_release
from persimmon_tools.verification import checks as check_list
from persimmon_tools.verification.agreement import compare_readers
from persimmon_tools.verification.content import ContentChecker, weight_findings
from persimmon_tools.verification.diagnose import diagnose
from persimmon_tools.verification.environment import environment, rerun_command
from persimmon_tools.verification.findings import (
    FULL_SCAN_PARAMS,
    Finding,
    all_fields,
    config_findings,
    presence_findings,
    source_tensor_kinds,
    why_skipped,
)
from persimmon_tools.verification.generation import DEFAULT_NEW_TOKENS
from persimmon_tools.verification.hf_side import HFWeights
from persimmon_tools.verification.metrics import drift_by_position, tolerance_for
from persimmon_tools.verification.passes import add_check_failures, run_with_generation, write_stored_record
from persimmon_tools.verification.prompts import Prompt, build_prompts
from persimmon_tools.verification.provenance import keep_existing_report, reference_mismatch
from persimmon_tools.verification.published import INPUT_IDS, compare_published, is_8b_chat
from persimmon_tools.verification.record import record_path
from persimmon_tools.verification.recorded_source import check_digests, open_recorded, recorded_source
from persimmon_tools.verification.reference import MEGATRON_GLOBALS, ROTARY_MODES, MegatronWeights
from persimmon_tools.verification.report import (
    VerifyReport,
    fingerprint_sources,
    source_fingerprint,
    verification_path,
    write_report,
)
from persimmon_tools.verification.run import LayerwiseModel, peak_memory
from persimmon_tools.verification.sides import (
    DTYPES,
    choose_loader,
    converted_side,
    resolve_device,
    resolve_dtype,
)
from persimmon_tools.verification.source_core import load_dist_source
from persimmon_tools.verification.source_merge import load_source
from persimmon_tools.verification.stored import verify_stored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyOptions:
    """Options of :func:`verify` (mirrors the CLI flags)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # fp32 | bf16 | fp16; None: fp32 on CPU, bf16 on CUDA
    rotary: str = "hf"  # hf | adept (adept also reports the drift from ADEPT's bf16 rotary)
    prompts: tuple[str, ...] = ()
    ids: tuple[tuple[int, ...], ...] = ()
    default_prompts: bool = True
    loader: str = "auto"  # auto | transformers | persimmon-tools
    iteration: int | None = None
    vocab: Path | None = None
    published: bool = True  # compare with transformers' published 8B-chat logits when the source is that
    hash_source: bool = True
    check_weights: bool | None = None  # compare every tensor by value; None: for models < 500M parameters
    write: bool = True  # write verification.json (and the stored reference record) into OUT_DIR
    new_tokens: int = DEFAULT_NEW_TOKENS  # greedy new tokens per prompt for the generation check; 0: none


def verify(
    out_dir: Path,
    reference: Path | None,
    options: VerifyOptions = VerifyOptions(),
    *,
    progress: Callable[[str], None] = lambda s: None,
) -> VerifyReport:
    """Compare converted folder ``out_dir`` with release ``reference``; writes ``verification.json``.

    ``reference=None``: the source ``out_dir/conversion.json`` records, while it is still that source
    (:mod:`persimmon_tools.verification.recorded_source`); when it is gone or changed, the folder's stored
    reference record (:mod:`persimmon_tools.verification.stored`); without one, a UsageError naming what
    differs.
    """
    out_dir, start = Path(out_dir), time.perf_counter()
    if options.rotary not in ROTARY_MODES:
        raise UsageError(f"--rotary {options.rotary!r} is not one of {', '.join(ROTARY_MODES)}")
    if options.new_tokens < 0:
        raise UsageError(
            f"--new-tokens {options.new_tokens} is negative", hint="e.g. --new-tokens 16 (0: none)"
        )
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    recorded = None
    if reference is None:
        try:
            recorded = recorded_source(out_dir)
            release = open_recorded(recorded, iteration=options.iteration, vocab=options.vocab)
        except UsageError as err:  # gone or changed: its stored record instead
            return _stored_instead(err, out_dir, options, progress)
        log.info(
            "verify: no --reference given; comparing with the source recorded in %s: %s (%s)",
            recorded.record,
            recorded.path,
            recorded.describe(hashed=options.hash_source),
        )
        reference = recorded.path
    else:
        release = open_release(Path(reference), iteration=options.iteration, vocab=options.vocab)
    # Every weight verify reads goes through this reader, which hashes the source files in the same pass.
    reads = HashingReader(fingerprint_sources(release), hash_files=options.hash_source)
    progress("comparing the converter's and verify's own reading of the source")
    # verify's own interpretation of the shared byte layer (a legacy release's shards, or torch_dist chunks)
    ckpt = (load_dist_source if release.kind == "torch_dist" else load_source)(release, reader=reads)
    readers = compare_readers(load_release_checkpoint(release), ckpt)  # ... against the converter's
    try:
        src = MegatronWeights(ckpt)
    except ConfigError as err:
        if readers.agree:
            raise
        lines = "; ".join(f.line() for f in readers.findings[:3])
        raise VerificationError(
            f"the converter's and verify's own interpretation of {reference} disagree ({lines}), and "
            f"verify's own view is not a complete Persimmon checkpoint ({err.message})",
            hint="no forward pass was run; report a bug with this message",
        ) from err
    conv = HFWeights(out_dir)
    findings = list(readers.findings) + config_findings(src.hyper, conv.hyper)
    if not any(f.kind == "structure" for f in findings):
        findings += presence_findings(conv)
    structural = [f for f in findings if f.kind in ("structure", "reader")]  # no forward pass on those
    # names and sizes only (nothing read): is --reference the source conversion.json records?
    wrong_reference = reference_mismatch(
        out_dir, source_fingerprint(release, ckpt.iteration, hash_files=False)
    )
    skipped = why_skipped(structural, wrong_reference)
    source_dtype = ckpt.tensors[MEGATRON_GLOBALS["embed"]].dtype
    tol = tolerance_for(dtype, source_dtype, conv.storage_dtype())
    loader, reason = choose_loader(options, conv, dtype, device)
    vocab = min(src.hyper.vocab_size, conv.hyper.vocab_size)
    max_tokens = int(conv.config.get("max_position_embeddings") or 16384)
    prompts, tok_desc = build_prompts(
        out_dir,
        texts=options.prompts,
        ids=options.ids,
        defaults=options.default_prompts,
        vocab=vocab,
        max_tokens=max_tokens,
    )
    published = options.published and is_8b_chat(src.hyper, ckpt.iteration, release.variant)
    if published:
        prompts.append(Prompt("published", None, INPUT_IDS))
    metrics, run, drift, pub, passes = [], None, None, None, None
    if not structural:
        ref_model = LayerwiseModel(src, dtype=dtype, device=device)
        conv_model, loader, reason = converted_side(loader, reason, conv, dtype, device, findings)
        passes = run_with_generation(
            ref_model, conv_model, prompts, tol, options.new_tokens, max_tokens, options.rotary, progress
        )
        run, metrics = passes.run, passes.metrics
        if passes.adept is not None:
            drift = tuple(drift_by_position(passes.adept, passes.converted))
        if published:
            pub = compare_published(passes.converted[-1])
    checker = None if structural else ContentChecker(src, conv)
    check_weights = options.check_weights
    if check_weights is None:
        check_weights = src.hyper.num_parameters() <= FULL_SCAN_PARAMS
    tensors = weight_findings(checker, None) if checker is not None and check_weights else None
    errors = [f for f in findings if f.kind in ("reader", "structure", "config", "load")] + (tensors or [])
    tokenizer = check_list.tokenizer_fingerprint(out_dir)
    findings += [tokenizer[2]] if tokenizer[2] is not None else []
    core = bool(metrics) and all(m.passed for m in metrics) and not errors
    passed = core and tokenizer[0] != "fail" and (passes is None or passes.generation["verdict"] == "pass")
    diagnosis = None
    if not core:
        progress("diagnosis")
        failing = next((k for k, m in enumerate(metrics) if not m.passed), None)
        diagnosis = diagnose(
            config=findings,
            stages=run.stages_for(failing) if run is not None and failing is not None else None,
            prompt=prompts[failing].name if failing is not None else None,
            hidden_rel=tol.hidden_rel,
            checker=checker,
            tensors=tensors,
            skipped=why_skipped(structural, None),  # the summary names a wrong --reference itself
        )
    diagnosis = add_check_failures(diagnosis, passes.generation if passes else None, tokenizer[2], findings)
    progress("fingerprints")
    t_fp = time.perf_counter()
    digests = reads.finish()
    finish_records(release)  # the CRC-32 of records read only in part (with --no-source-hash too)
    source_fp = source_fingerprint(
        release, ckpt.iteration, hash_files=options.hash_source, digests=digests, reads=reads
    )
    if recorded is not None:  # a file rewritten in place with its old size: refused before any report
        try:
            check_digests(recorded, source_fp["files"])
        except UsageError as err:  # gone or changed: its stored record instead
            return _stored_instead(err, out_dir, options, progress)
    source_fp["reference_from"] = "conversion.json (no --reference given)" if recorded else "--reference"
    if wrong_reference is not None:
        findings.append(Finding("note", "--reference", f"likely not this folder's source: {wrong_reference}"))
        if diagnosis is not None:
            diagnosis["summary"] = f"likely wrong --reference ({wrong_reference}); " + str(
                diagnosis.get("summary")
            )
    keep = keep_existing_report(verification_path(out_dir), source_fp, passed) if options.write else None
    files = fingerprint_folder(out_dir)  # once: the record's folder_files and the report's files
    record = write_stored_record(out_dir, passes, source_fp, tol, options, keep, str(device), dtype, files)
    timings = {
        "total_s": round(time.perf_counter() - start, 3),
        "readers_s": round(readers.seconds, 3),
        "fingerprints_s": round(time.perf_counter() - t_fp, 3),
    }
    if passes is not None:
        timings.update({f"{k}_s": round(v, 3) for k, v in run.seconds.items()})
        timings["generation_s"] = round(passes.generation_seconds, 3)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    command = rerun_command(
        out_dir, reference if recorded is None else None, options, device=str(device), dtype=dtype_name
    )
    checks = check_list.build_checks(
        command=command,
        metrics=metrics,
        tol=tol,
        skipped=skipped,
        generation=passes.generation if passes else None,
        kl=passes.kl if passes else None,
        tokenizer=tokenizer[:2],
        readers=readers.to_dict(),
        record=record,
        config=[f for f in errors if f.kind in ("structure", "config", "load")],
        weights=tensors,
    )
    report = VerifyReport(
        out_dir=out_dir,
        verdict="pass" if passed else "fail",
        device=str(device),
        dtype=dtype_name,
        rotary=options.rotary,
        converted_loader=loader,
        loader_reason=reason,
        source=source_fp,
        tolerances=tol.to_dict(),
        metrics=tuple(metrics),
        tokenizer=tok_desc,
        config_findings=tuple(f.to_dict() for f in findings),
        readers={**readers.to_dict(), "source_tensors": source_tensor_kinds(src, ckpt.tensors)},
        forward_pass={"ran": run is not None, "prompts": len(metrics), "skipped_because": skipped},
        diagnosis=diagnosis,
        published_reference=pub,
        weights={
            "compared": len(all_fields(src.hyper)) if tensors is not None else 0,
            "differing": [f.to_dict() for f in tensors or []],
            "scope": "every tensor, by value"
            if tensors is not None
            else "not run (model too big; "
            "--check-weights runs it); on failure the diverging stage's tensors are compared",
        },
        adept_drift=drift,
        timings=timings,
        memory=peak_memory(device),
        files=files,
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=passes.generation if passes else None,
        kl=passes.kl if passes else None,
        environment=environment(device, dtype_name),
        checks=tuple(checks),
    )
    if options.write:
        if keep is None:
            write_report(report, verification_path(out_dir))
        else:
            log.warning("%s", keep)
    return report


def _stored_instead(
    err: UsageError, out_dir: Path, options: VerifyOptions, progress: Callable[[str], None]
) -> VerifyReport:
    """The recorded source is gone or changed (``err`` says how): check the folder against its stored
    reference record instead; without one, or when ``--iteration`` asks for a checkpoint, ``err`` stands."""
    if options.iteration is not None or not os.path.lexists(record_path(out_dir)):
        raise err
    return verify_stored(out_dir, options, err.message, progress=progress)


def check_passed(report: VerifyReport) -> None:
    """Raise VerificationError (exit code 3) naming the diagnosis when ``report`` failed."""
    if report.passed:
        return
    summary = (report.diagnosis or {}).get("summary", "see verification.json")
    failed = [m.name for m in report.metrics if not m.passed]
    what = "does not compute what the checkpoint computes" if report.metrics else "fails verification"
    if report.metrics and report.checked_against != "source":
        what = "does not compute what its stored reference record holds"
    raise VerificationError(
        f"{report.out_dir} {what}"
        + (f" (prompts failing: {', '.join(failed)})" if failed else "")
        + f": {summary}",
        hint=(
            "check --reference: it is likely not the source this folder was converted from (see conversion.json); "
            "without --reference verify uses the source conversion.json records, while it is still there"
            if any(f.get("where") == "--reference" for f in report.config_findings)
            else f"details in {verification_path(report.out_dir)}; convert again, or verify against the source "
            "with --reference SOURCE"
            if report.checked_against != "source"
            else f"details in {verification_path(report.out_dir)}; convert again, or report a bug with that file"
        ),
    )
