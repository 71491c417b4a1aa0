"""Command ``convert``: parse and validate options, call the library, render the plan or summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from persimmon_tools.cli import common_options, is_quiet
from persimmon_tools.cli.params import ITERATION, PATTERN, SIZE, DType, SafePath
from persimmon_tools.cli.progress import byte_progress, human_bytes, peak_rss_bytes

log = logging.getLogger("persimmon_tools.cli")
_DTYPE_CHOICES = DType("auto", "bf16", "fp16", "fp32")


@click.command("convert")
@click.argument("source", type=SafePath(exists=True, path_type=Path))
@click.argument("out_dir", type=SafePath(path_type=Path))
@click.option(
    "--dtype",
    type=_DTYPE_CHOICES,
    default="auto",
    show_default=True,
    help="Output dtype. 'auto' keeps the checkpoint's own dtype bit for bit (bf16 for ADEPT's releases); "
    "bfloat16/float16/float32 are accepted too.",
)
@click.option(
    "--max-shard-size",
    type=SIZE,
    default="5GB",
    show_default=True,
    help="Largest safetensors file: 5GB, 2GiB, 500MB, 1.5GB or bytes (KB/MB/GB: 1000^n, KiB/MiB/GiB: 1024^n).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT_DIR when it holds an earlier conversion (only the files that conversion recorded; "
    "the old folder is kept until the new one is complete).",
)
@click.option(
    "--allow-tokenizer-mismatch",
    is_flag=True,
    help="Write a tokenizer that fails the parity check with SentencePiece, or cannot express an option "
    "exactly (recorded in conversion.json and on the model card).",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (tensors, shards, bytes, peak memory); write nothing."
)
@click.option(
    "--allow-overflow",
    is_flag=True,
    help="Write values that --dtype cannot hold (beyond ±65504 for fp16, ±3.39e38 for bf16, ±3.40e38 for fp32) "
    "as inf instead of refusing.",
)
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if weights hold NaN/Inf.")
@click.option(
    "--iteration", type=ITERATION, help="Which iter_XXXXXXX to convert (default: the tracker file's)."
)
@click.option(
    "--drop-key",
    "drop_keys",
    type=PATTERN,
    metavar="PATTERN",
    multiple=True,
    help="Leave out source keys matching this fnmatch glob over the flattened Megatron key, on purpose "
    "(repeatable), e.g. 'language_model.encoder.layers.*.extra_adapter.*'. Dropped keys are listed in "
    "conversion.json; a pattern that matches nothing is an error; a dropped key the model needs is still "
    "reported as missing.",
)
@click.option(
    "--vocab",
    type=SafePath(exists=True, dir_okay=False, path_type=Path),
    help="adept_vocab.model to use when SOURCE has none next to the checkpoint.",
)
@click.option(
    "--tokenizer/--no-tokenizer",
    default=True,
    show_default=True,
    help="Write tokenizer files (tokenizer.model, tokenizer.json, ...).",
)
@click.option(
    "--allow-ties",
    is_flag=True,
    help="Write the tokenizer when its only parity differences are float32 ties (see `tokenizer --help`).",
)
@click.option(
    "--add-bos/--no-add-bos",
    default=True,
    show_default=True,
    help="tokenizer_config add_bos_token (the published adept/persimmon-8b-* configs: on).",
)
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Write ADEPT's chat_template (default: when SOURCE's name says chat).",
)
@click.option(
    "--verify/--no-verify",
    "run_verify",
    default=True,
    show_default=True,
    help="Run `verify` on CPU at the end (small models only; 8B: run `verify` yourself).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan/summary as JSON on stdout.")
@common_options
def convert_cmd(
    source: Path,
    out_dir: Path,
    dtype: str,
    max_shard_size: int,
    force: bool,
    allow_tokenizer_mismatch: bool,
    dry_run: bool,
    allow_overflow: bool,
    allow_nonfinite: bool,
    iteration: int | None,
    drop_keys: tuple[str, ...],
    vocab: Path | None,
    tokenizer: bool,
    allow_ties: bool,
    add_bos: bool,
    chat: bool | None,
    run_verify: bool,
    as_json: bool,
) -> None:
    """Convert a Persimmon release SOURCE into a Hugging Face folder OUT_DIR.

    SOURCE is a release tarball (read in place, never extracted), an extracted release folder, an
    iter_XXXXXXX folder or one model_optim_rng.pt. TP/PP shards are merged. OUT_DIR appears complete or
    not at all.

    \b
    Examples:
      persimmon-tools convert 8b_chat_model_release.tar ./persimmon-8b-chat-hf
      persimmon-tools convert ./my_finetune/iter_0002000 ./ft-hf --dtype bf16 --max-shard-size 2GB
      persimmon-tools convert fixtures/tiny_release.tar /tmp/tiny-hf --dry-run
    """
    from persimmon_tools.conversion.convert import ConvertOptions, convert, prepare

    options = ConvertOptions(
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        allow_overflow=allow_overflow,
        allow_nonfinite=allow_nonfinite,
        iteration=iteration,
        drop_keys=tuple(drop_keys),
        vocab=vocab,
        tokenizer=tokenizer,
        add_bos_token=add_bos,
        chat=chat,
        force_tokenizer=allow_tokenizer_mismatch,
        allow_tokenizer_ties=allow_ties,
    )
    if dry_run:
        plan = prepare(source, options)
        _print_plan(_plan_summary(plan, run_verify), out_dir, as_json)
        return
    total: dict[str, int] = {}
    with byte_progress(None, "convert") as advance:

        def on_plan(plan) -> None:
            total["bytes"] = plan.shards.total_size
            log.info(
                "converting %s: %d tensors, %s, TP=%d PP=%d, iteration %s",
                plan.release.source,
                len(plan.tensors),
                human_bytes(plan.shards.total_size),
                plan.release.tp,
                plan.release.pp,
                plan.checkpoint.iteration,
            )

        result = convert(source, out_dir, options, progress=advance, on_plan=on_plan)
    convert_rss = peak_rss_bytes()  # before verify: ru_maxrss only grows, so this is convert's own peak
    summary = {
        "out_dir": str(out_dir),
        "tensors": result.stats.tensors,
        "bytes": result.stats.bytes_written,
        "seconds": round(result.seconds, 2),  # the convert phase (as "convert" below)
        "peak_rss_bytes": convert_rss,  # the process's peak at the end of convert (as "convert" below)
        "files": result.files,
        "convert": {"seconds": round(result.seconds, 2), "peak_rss_bytes": convert_rss},
    }
    verified = None
    if run_verify:
        verified = _auto_verify(result, source, convert_rss)
        summary["verification"] = verified["result"]
        summary["verify"] = verified
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not is_quiet():
        click.echo(
            f"Converted {result.stats.tensors} tensors ({human_bytes(result.stats.bytes_written)}) to {out_dir} "
            f"in {result.seconds:.2f} s, peak RSS {human_bytes(convert_rss)} (at the end of convert).",
            err=True,
        )
        if verified is not None:
            click.echo(_verify_line(verified), err=True)


def _verify_line(verified: dict) -> str:
    """The human line of the automatic verify: its own time, and the process's peak RSS after it."""
    if verified["seconds"] is None:
        return f"Verify: {verified['result']}."
    peak = human_bytes(verified["peak_rss_bytes"])
    where = (
        "reached during verify"
        if verified["peak_rss_reached_in_verify"]
        else "verify stayed at or below convert's peak"
    )
    return (
        f"Verify: {verified['result']} in {verified['seconds']:.2f} s, "
        f"peak RSS of the process {peak} (convert and verify together; {where})."
    )


def _auto_verify(result, source: Path, convert_rss: int) -> dict:
    """Run verify on CPU when the model is small enough: ``{"result", "seconds", "peak_rss_bytes",
    "peak_rss_reached_in_verify"}``. ``peak_rss_bytes`` is the process's peak after verify (``ru_maxrss``
    only grows, so it covers convert too); ``peak_rss_reached_in_verify`` says whether verify raised it
    above ``convert_rss``. Seconds and peak are None when verify did not run."""

    def skipped(why: str) -> dict:
        return {"result": why, "seconds": None, "peak_rss_bytes": None, "peak_rss_reached_in_verify": None}

    try:
        from persimmon_tools.verification.auto_check import should_auto_verify
        from persimmon_tools.verification.verify import VerifyOptions, verify
    except ImportError:
        return skipped("skipped (verify not available)")
    if not should_auto_verify(result.plan.dims, "cpu"):
        log.info(
            "model too large for the automatic CPU check; run `persimmon-tools verify %s --reference %s`",
            result.out_dir,
            source,
        )
        return skipped("skipped (model too large for the automatic check)")
    start = time.perf_counter()
    report = verify(result.out_dir, source, VerifyOptions(device="cpu"))
    seconds, peak = time.perf_counter() - start, peak_rss_bytes()
    if not report.passed:
        from persimmon_tools.errors import VerificationError

        raise VerificationError(
            f"the converted model in {result.out_dir} does not match the original: {report.summary_line()}",
            hint="see verification.json in OUT_DIR; re-run `persimmon-tools verify` for the full report",
        )
    log.info("verify: %s", report.summary_line())
    return {
        "result": "pass",
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "peak_rss_reached_in_verify": peak > convert_rss,
    }


def _plan_summary(plan, run_verify: bool) -> dict:
    """The plan's summary plus what the automatic verify would do (``verify``: runs, why, loader, estimated
    peak memory and seconds; see :func:`persimmon_tools.verification.auto_check.estimate_auto_verify`)."""
    summary = plan.summary()
    if not run_verify:
        summary["verify"] = {"runs": False, "why": "--no-verify"}
        return summary
    try:
        from persimmon_tools.verification.auto_check import estimate_auto_verify
    except ImportError:
        summary["verify"] = {"runs": False, "why": "verify not available"}
        return summary
    summary["verify"] = estimate_auto_verify(plan.dims, plan.shards.total_size, "cpu").to_dict()
    return summary


def _print_plan(summary: dict, out_dir: Path, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"Plan for {summary['source']} -> {out_dir} (dry run: nothing written)")
    click.echo(
        f"  layout: {summary['kind']}, iteration {summary['iteration']}, TP={summary['tp']} PP={summary['pp']}, "
        f"variant {summary['variant']}"
    )
    click.echo(
        f"  tensors: {summary['tensors']} ({summary['parameters']:,} parameters), dtype {summary['dtype']}, "
        f"{human_bytes(summary['bytes'])}"
    )
    if summary.get("dropped_keys"):
        click.echo(f"  dropped (--drop-key): {', '.join(summary['dropped_keys'])}")
    for fname, shard in summary["shards"].items():
        click.echo(f"  {fname}: {shard['tensors']} tensors, {human_bytes(shard['bytes'])}")
    click.echo(
        f"  estimated peak memory (convert): {human_bytes(summary['estimated_peak_memory_bytes'])}; "
        "time not estimated (bound by the disks)"
    )
    ver = summary.get("verify") or {}
    if ver.get("runs"):
        click.echo(f"  automatic verify: would run ({ver['why']})")
        click.echo(
            f"  estimated peak memory (verify): {human_bytes(ver['estimated_peak_memory_bytes'])} "
            f"(converted side loaded by {ver['loader']}; the process's peak is the larger of the two); "
            f"time roughly {ver['estimated_seconds']:.0f} s ({ver['basis']})"
        )
    else:
        click.echo(f"  automatic verify: would not run ({ver.get('why', 'unknown')})")
    click.echo("  config.json: " + json.dumps(summary["config"]))


COMMANDS = [convert_cmd]
