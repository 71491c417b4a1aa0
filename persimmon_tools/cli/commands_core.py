"""Commands ``convert``, ``inspect``, ``unpack`` and ``make-release``: parse, call the library, render."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from persimmon_tools.cli import common_options, is_quiet
from persimmon_tools.cli.progress import byte_progress, human_bytes, peak_rss_bytes

log = logging.getLogger("persimmon_tools.cli")
_DTYPE_CHOICES = click.Choice(["auto", "bf16", "fp16", "fp32"])
_PATH = click.Path(path_type=Path)


@click.command("convert")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=_PATH)
@click.option(
    "--dtype",
    type=_DTYPE_CHOICES,
    default="auto",
    show_default=True,
    help="Output dtype. 'auto' keeps the checkpoint's own dtype bit for bit (bf16 for ADEPT's releases).",
)
@click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file, e.g. 5GB, 500MB."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace a non-empty OUT_DIR (kept until the new one is complete); "
    "also write a tokenizer that fails the parity check.",
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
@click.option("--iteration", type=int, help="Which iter_XXXXXXX to convert (default: the tracker file's).")
@click.option(
    "--drop-key",
    "drop_keys",
    metavar="PATTERN",
    multiple=True,
    help="Leave out source keys matching this fnmatch glob over the flattened Megatron key, on purpose "
    "(repeatable), e.g. 'language_model.encoder.layers.*.extra_adapter.*'. Dropped keys are listed in "
    "conversion.json; a pattern that matches nothing is an error; a dropped key the model needs is still "
    "reported as missing.",
)
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
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
    max_shard_size: str,
    force: bool,
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
        force_tokenizer=force,
        allow_tokenizer_ties=allow_ties,
    )
    if dry_run:
        plan = prepare(source, options)
        _print_plan(plan.summary(), out_dir, as_json)
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
    summary = {
        "out_dir": str(out_dir),
        "tensors": result.stats.tensors,
        "bytes": result.stats.bytes_written,
        "seconds": round(result.seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "files": result.files,
    }
    if run_verify:
        summary["verification"] = _auto_verify(result, source)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not is_quiet():
        click.echo(
            f"Converted {result.stats.tensors} tensors ({human_bytes(result.stats.bytes_written)}) to {out_dir} "
            f"in {result.seconds:.2f} s, peak RSS {human_bytes(peak_rss_bytes())}.",
            err=True,
        )


def _auto_verify(result, source: Path) -> str:
    try:
        from persimmon_tools.verification.verify import VerifyOptions, should_auto_verify, verify
    except ImportError:
        return "skipped (verify not available)"
    if not should_auto_verify(result.plan.dims, "cpu"):
        log.info(
            "model too large for the automatic CPU check; run `persimmon-tools verify %s --reference %s`",
            result.out_dir,
            source,
        )
        return "skipped (model too large for the automatic check)"
    report = verify(result.out_dir, source, VerifyOptions(device="cpu"))
    if not report.passed:
        from persimmon_tools.errors import VerificationError

        raise VerificationError(
            f"the converted model in {result.out_dir} does not match the original: {report.summary_line()}",
            hint="see verification.json in OUT_DIR; re-run `persimmon-tools verify` for the full report",
        )
    log.info("verify: %s", report.summary_line())
    return "pass"


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
    click.echo(f"  estimated peak memory: {human_bytes(summary['estimated_peak_memory_bytes'])}")
    click.echo("  config.json: " + json.dumps(summary["config"]))


@click.command("inspect")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--iteration", type=int, help="Which iter_XXXXXXX to inspect.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
@common_options
def inspect_cmd(source: Path, iteration: int | None, as_json: bool, tensors: bool) -> None:
    """Show what SOURCE holds: layout, iteration, TP/PP, args, pickle globals, tensors.

    SOURCE may also be a converted folder (shows its config, shards and verification). Reads no tensor data
    and runs nothing from the pickle.

    \b
    Examples:
      persimmon-tools inspect 8b_base_model_release.tar --no-tensors
      persimmon-tools inspect ./persimmon-8b-chat-hf --json
    """
    from persimmon_tools.conversion.inspect import inspect_source

    info = inspect_source(source, iteration=iteration)
    if not tensors:
        info.pop("tensors", None)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "tensors":
            click.echo(f"tensors ({len(value)}):")
            for t in value:
                click.echo(
                    f"  {t['name']:<70} {str(t['shape']):<16} {t['dtype']:<9} {human_bytes(t['bytes']):>11}"
                    f"  {t['parallel'] or '?'}"
                )
        elif isinstance(value, (dict, list)):
            click.echo(f"{key}: {json.dumps(value)}")
        else:
            click.echo(f"{key}: {value}")


@click.command("unpack")
@click.argument("release_tar", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=_PATH)
@click.option("--no-md5", is_flag=True, help="Skip the md5 check of known release names.")
@common_options
def unpack_cmd(release_tar: Path, dest: Path, no_md5: bool) -> None:
    """Safely extract RELEASE_TAR into DEST (a new or empty folder).

    Refuses links, devices and paths escaping DEST; checks ADEPT's published md5 for
    8b_base_model_release.tar / 8b_chat_model_release.tar. `convert` reads tarballs in place, so
    unpacking is optional.

    \b
    Example:
      persimmon-tools unpack 8b_chat_model_release.tar ./releases/
    """
    from persimmon_tools.megatron.unpack import unpack

    with byte_progress(release_tar.stat().st_size, "unpack") as advance:
        result = unpack(release_tar, dest, progress=advance, check_md5=not no_md5)
    md5 = (
        "md5 matches the published checksum"
        if result.md5_expected
        else f"md5 {result.md5} (no published value)"
    )
    if not is_quiet():
        click.echo(
            f"Extracted {result.files} files ({human_bytes(result.bytes)}) into {dest}; {md5}.", err=True
        )


@click.command("make-release")
@click.argument("out_tar", type=_PATH)
@click.option(
    "--preset",
    type=click.Choice(["tiny", "mid", "8b"]),
    default="tiny",
    show_default=True,
    help="tiny: 6 layers x 64 hidden; mid: ~1 GB; 8b: the real shapes (~18.8 GB in bf16).",
)
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel shards (mp_rank_XX).")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline stages (mp_rank_XX_YYY).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Same seed = same logical tensors for any TP/PP."
)
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="SentencePiece model to ship as adept_vocab.model (needs a |ENDOFTEXT| piece).",
)
@click.option("--force", is_flag=True, help="Overwrite OUT_TAR if it exists.")
@common_options
def make_release_cmd(
    out_tar: Path, preset: str, tp: int, pp: int, dtype: str, seed: int, vocab: Path | None, force: bool
) -> None:
    """Write a random-weight release tarball in ADEPT's exact layout (for tests, demos, benchmarks).

    \b
    Examples:
      persimmon-tools make-release /tmp/tiny_release.tar
      persimmon-tools make-release /tmp/tp2pp3.tar --tp 2 --pp 3 --seed 0
      persimmon-tools make-release /data/8b_synthetic_release.tar --preset 8b
    """
    import torch

    from persimmon_tools.errors import UsageError
    from persimmon_tools.synth.build import make_release

    if out_tar.exists() and not force:
        raise UsageError(f"{out_tar} exists", hint="pass --force to overwrite it, or choose another path")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    with byte_progress(None, "make-release") as advance:
        make_release(
            out_tar,
            preset=preset,
            tp=tp,
            pp=pp,
            dtype=dtypes[dtype],
            seed=seed,
            vocab_model=vocab.read_bytes() if vocab else None,
            progress=advance,
        )
    if not is_quiet():
        click.echo(f"Wrote {out_tar} ({human_bytes(out_tar.stat().st_size)}).", err=True)


COMMANDS = [convert_cmd, inspect_cmd, unpack_cmd, make_release_cmd]
