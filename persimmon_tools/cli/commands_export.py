"""Command ``export``: back to ADEPT's Megatron layout, at any TP/PP."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from persimmon_tools.cli import Command, common_options, echo_json, is_quiet, json_option
from persimmon_tools.cli.params import ITERATION, POSITIVE_INT, DType, SafePath, Text
from persimmon_tools.cli.progress import byte_progress
from persimmon_tools.safe_read import format_size

log = logging.getLogger(__name__)

SET_ITEM = Text("KEY=VALUE", "e.g. --set seq_length=16384")


@click.command("export", cls=Command)
@click.argument("source", type=SafePath(exists=True, path_type=Path))
@click.argument("out", type=SafePath(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["legacy", "torch_dist"]),
    default="legacy",
    show_default=True,
    help="legacy: ADEPT's release layout (mp_rank_*/model_optim_rng.pt). torch_dist: a Megatron-Core "
    "checkpoint for Megatron-LM's --ckpt-format torch_dist (OUT/iter_*/, one rank; no --tp/--pp/--tar/--name).",
)
@click.option("--tp", type=POSITIVE_INT, default=1, show_default=True, help="Tensor-parallel ranks to write.")
@click.option("--pp", type=POSITIVE_INT, default=1, show_default=True, help="Pipeline stages to write.")
@click.option(
    "--iteration",
    type=ITERATION,
    help="Iteration number of the exported checkpoint (iter_XXXXXXX). Default: the source's, else 1.",
)
@click.option(
    "--source-iteration",
    type=ITERATION,
    help="Which iteration of a Megatron SOURCE to read (default: latest_checkpointed_iteration.txt).",
)
@click.option(
    "--name",
    help="Top folder of the release (default: the source's release name, else persimmon_model_release).",
)
@click.option(
    "--dtype",
    type=DType("auto", "bf16", "fp16", "fp32"),
    default="auto",
    show_default=True,
    help="Weights dtype (and args bf16/fp16/params_dtype). auto keeps the source's.",
)
@click.option("--tar", is_flag=True, help="Write one uncompressed tarball at OUT instead of a folder.")
@click.option(
    "--vocab",
    type=SafePath(exists=True, dir_okay=False, path_type=Path),
    help="SentencePiece model to ship as adept_vocab.model (default: the source's tokenizer.model / "
    "adept_vocab.model).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    type=SET_ITEM,
    metavar="KEY=VALUE",
    help="Set an args field (repeatable), e.g. seq_length, which no config.json holds. Checked: a value "
    "the model contradicts (sizes, rotary base, epsilon, tying) or convert refuses is an error.",
)
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Export even if weights hold NaN/Inf (convert then needs --allow-nonfinite too).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is an earlier export (folder: every file listed in its export.json; with --tar, "
    "only a tarball persimmon-tools wrote).",
)
@click.option(
    "--dry-run", is_flag=True, help="Check and print the plan (layout, args and where each comes from)."
)
@json_option("Print the plan or the summary as one JSON object on stdout.")
@common_options
def export_cmd(
    source: Path,
    out: Path,
    fmt: str,
    tp: int,
    pp: int,
    iteration: int | None,
    source_iteration: int | None,
    name: str | None,
    dtype: str,
    tar: bool,
    vocab: Path | None,
    sets: tuple[str, ...],
    allow_nonfinite: bool,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Write SOURCE as a release in ADEPT's Megatron layout (OUT/NAME/iter_*/mp_rank_*/model_optim_rng.pt).

    SOURCE is a Hugging Face Persimmon folder (what `convert` or `save_pretrained` writes) or any Megatron
    source `convert` reads (a reshard). Each shard holds model, args, iteration and checkpoint_version: no
    optimizer or RNG state (ADEPT loads with --no-load-optim --no-load-rng), no classes beyond torch and
    argparse.Namespace, so torch.load(path, weights_only=False) loads it without ADEPT's code (on trusted
    files only; with torch's default weights_only=True, allow argparse.Namespace first with
    torch.serialization.add_safe_globals). Before it is installed, the release is read back as `convert`
    reads one: output appears complete, and convertible, or not at all.

    With --format torch_dist, OUT is a Megatron-Core torch_dist checkpoint root (OUT/iter_*/ with .metadata,
    __0_0.distcp, common.pt; OUT/latest_checkpointed_iteration.txt) that Megatron-LM loads with
    --load OUT --ckpt-format torch_dist at any TP/PP; OUT/megatron_lm_args.txt holds the flags that build
    and load the model, printed at the end. It is read back before it is installed.

    \b
    Examples:
      persimmon-tools export ./my-finetuned-hf ./adept-release --tp 2 --vocab ./persimmon-8b-chat-hf/tokenizer.model
      persimmon-tools export 8b_chat_model_release.tar ./tp1 --tp 1 --pp 1 --tar
      persimmon-tools export ./tp4_run/ ./tp1_run --tp 1 --dry-run
      persimmon-tools export ./persimmon-8b-chat-hf ./mcore_ckpt --format torch_dist
    """
    from persimmon_tools.export.export import ExportOptions, check_destination, export_release, prepare
    from persimmon_tools.export.torch_dist import FLAGS_FILE
    from persimmon_tools.workflow import peak_rss_bytes

    options = ExportOptions(
        tp=tp,
        pp=pp,
        iteration=iteration,
        source_iteration=source_iteration,
        name=name,
        dtype=dtype,
        tar=tar,
        force=force,
        vocab=vocab,
        sets=sets,
        allow_nonfinite=allow_nonfinite,
        format=fmt,
    )
    if dry_run:
        check_destination(out, source, options)
        plan = prepare(source, options)
        _print_plan(plan.summary(), out, as_json)
        return
    with byte_progress(None, "export") as advance:
        result = export_release(
            source, out, options, progress=advance, on_plan=lambda plan: advance.set_total(plan.nbytes)
        )
    summary = result.plan.summary() | {
        "out": str(result.out),
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 2),
        "read_back_seconds": round(result.read_back_seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if result.megatron_lm_args:
        summary["megatron_lm_args"] = result.megatron_lm_args
    if as_json:
        echo_json(summary)
        return
    if is_quiet():
        return
    what = (
        "Megatron-Core torch_dist checkpoint"
        if fmt == "torch_dist"
        else f"{'tarball' if tar else 'folder'} {result.plan.name}/, TP={tp} PP={pp}"
    )
    click.echo(
        f"Exported {source} to {result.out} ({what}, iteration {result.plan.iteration}, {summary['dtype']}): "
        f"{format_size(result.bytes_written, digits=2)} in {result.seconds:.2f} s, "
        f"peak RSS {format_size(summary['peak_rss_bytes'], digits=2)}.",
        err=True,
    )
    if result.megatron_lm_args:
        click.echo(f"Megatron-LM flags that build and load it (also in {result.out / FLAGS_FILE}):", err=True)
        click.echo(" \\\n".join("  " + line for line in result.megatron_lm_args))


def _print_plan(summary: dict, out: Path, as_json: bool) -> None:
    if as_json:
        echo_json(summary)
        return
    click.echo(f"Plan for {summary['source']} -> {out} (dry run: nothing written)")
    layout = summary["source_layout"]
    click.echo(
        f"  source: {summary['source_kind']}"
        + (f" TP={layout['tp']} PP={layout['pp']}" if layout else "")
        + f"; args from {summary['args_from']}"
    )
    target = (
        "Megatron-Core torch_dist checkpoint"
        if summary.get("format") == "torch_dist"
        else f"release: {summary['name']}/, TP={summary['tp']} PP={summary['pp']}"
    )
    click.echo(
        f"  {target}, iteration {summary['iteration']}, "
        f"{summary['dtype']}, checkpoint_version {summary['checkpoint_version']}, "
        f"{summary['vocab_rows']} vocab rows, about {format_size(summary['bytes'], digits=2)}"
    )
    for shard in summary["shards"]:
        click.echo(f"  {shard}")
    for item in summary["derived_args"]:
        click.echo(f"  args.{item['field']} = {json.dumps(item['value'])}  ({item['from']})")
    for note in summary["notes"]:
        click.echo(f"  note: {note}")


COMMANDS = [export_cmd]
