"""Command ``convert``: parse and validate options, call :func:`persimmon_tools.workflow.convert` (or its
``plan_summary`` for ``--dry-run``), render the plan or the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from persimmon_tools.cli import Command, common_options, echo_json, is_quiet, json_option, plural
from persimmon_tools.cli.params import ITERATION, PATTERN, SIZE, DType, SafePath
from persimmon_tools.cli.progress import byte_progress, step_progress
from persimmon_tools.safe_read import format_size

if TYPE_CHECKING:
    from persimmon_tools.workflow import AutoVerify

_DTYPE_CHOICES = DType("auto", "bf16", "fp16", "fp32")


@click.command("convert", cls=Command)
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
@json_option("Print the plan/summary as JSON on stdout.")
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
    iter_XXXXXXX folder or one model_optim_rng.pt. TP/PP shards are merged. SOURCE may also be a
    Megatron-Core torch_dist checkpoint (what today's Megatron-LM saves: the folder holding
    latest_checkpointed_iteration.txt, or one iter_XXXXXXX folder with .metadata and *.distcp); its
    vocabulary is iter_*/tokenizer/tokenizer.model when Megatron-LM saved one, else pass --vocab. OUT_DIR
    appears complete or not at all.

    \b
    Examples:
      persimmon-tools convert 8b_chat_model_release.tar ./persimmon-8b-chat-hf
      persimmon-tools convert ./my_finetune/iter_0002000 ./ft-hf --dtype bf16 --max-shard-size 2GB
      persimmon-tools convert fixtures/tiny_release.tar /tmp/tiny-hf --dry-run
      persimmon-tools convert ./megatron_lm_run ./run-hf --vocab ./tokenizer.model
    """
    from persimmon_tools.conversion.convert import ConvertOptions
    from persimmon_tools.workflow import convert, plan_summary

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
    verify = "auto" if run_verify else "off"
    if dry_run:
        _print_plan(plan_summary(source, options, verify=verify), out_dir, as_json)
        return
    steps = step_progress()  # the automatic verify's steps, as `verify` shows them

    def verify_step(step: str) -> None:
        bar.close()  # the bytes are written: the bar is done (it closes itself at its total anyway)
        steps(step)

    with byte_progress(None, "convert") as bar:
        report = convert(
            source,
            out_dir,
            options,
            verify=verify,
            progress=bar,
            on_plan=lambda plan: bar.set_total(plan.shards.total_size),
            verify_progress=verify_step,
        )
    if as_json:
        echo_json(report.summary())
    elif not is_quiet():
        res = report.conversion
        click.echo(
            f"Converted {plural(res.stats.tensors, 'tensor')} ({format_size(res.stats.bytes_written, digits=2)}) to {out_dir} "
            f"in {res.seconds:.2f} s, peak RSS {format_size(report.peak_rss_bytes, digits=2)} (at the end of convert).",
            err=True,
        )
        if report.verify is not None:
            click.echo(_verify_line(report.verify), err=True)


def _verify_line(verified: AutoVerify) -> str:
    """The human line of the automatic verify: its own time, and the process's peak RSS after it."""
    if verified.seconds is None:
        return f"Verify: {verified.result}."
    where = (
        "reached during verify"
        if verified.peak_rss_reached_in_verify
        else "verify stayed at or below convert's peak"
    )
    return (
        f"Verify: {verified.result} in {verified.seconds:.2f} s, peak RSS of the process "
        f"{format_size(verified.peak_rss_bytes, digits=2)} (convert and verify together; {where})."
    )


def _print_plan(summary: dict, out_dir: Path, as_json: bool) -> None:
    if as_json:
        echo_json(summary)
        return
    click.echo(f"Plan for {summary['source']} -> {out_dir} (dry run: nothing written)")
    click.echo(
        f"  layout: {summary['kind']}, iteration {summary['iteration']}, TP={summary['tp']} PP={summary['pp']}, "
        f"variant {summary['variant']}"
    )
    click.echo(
        f"  tensors: {summary['tensors']} ({summary['parameters']:,} parameters), dtype {summary['dtype']}, "
        f"{format_size(summary['bytes'], digits=2)}"
    )
    if summary.get("dropped_keys"):
        click.echo(f"  dropped (--drop-key): {', '.join(summary['dropped_keys'])}")
    for fname, shard in summary["shards"].items():
        click.echo(
            f"  {fname}: {plural(shard['tensors'], 'tensor')}, {format_size(shard['bytes'], digits=2)}"
        )
    click.echo(
        f"  estimated peak memory (convert): {format_size(summary['estimated_peak_memory_bytes'], digits=2)}; "
        "time not estimated (bound by the disks)"
    )
    ver = summary.get("verify") or {}
    if ver.get("runs"):
        click.echo(f"  automatic verify: would run ({ver['why']})")
        click.echo(
            f"  estimated peak memory (verify): {format_size(ver['estimated_peak_memory_bytes'], digits=2)} "
            f"(converted side loaded by {ver['loader']}; the process's peak is the larger of the two); "
            f"time roughly {ver['estimated_seconds']:.0f} s ({ver['basis']})"
        )
    else:
        click.echo(f"  automatic verify: would not run ({ver.get('why', 'unknown')})")
    click.echo("  config.json: " + json.dumps(summary["config"]))


COMMANDS = [convert_cmd]
