"""Commands ``inspect``, ``unpack`` and ``make-release`` (``convert`` lives in ``commands_convert``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from persimmon_tools.cli import Command, common_options, echo_json, is_quiet, json_option, plural
from persimmon_tools.cli.commands_convert import convert_cmd
from persimmon_tools.cli.params import ITERATION, POSITIVE_INT, SEED, DType, SafePath
from persimmon_tools.cli.progress import byte_progress
from persimmon_tools.safe_read import format_size

_PATH = SafePath(path_type=Path)


@click.command("inspect", cls=Command)
@click.argument("source", type=SafePath(exists=True, path_type=Path))
@click.option("--iteration", type=ITERATION, help="Which iter_XXXXXXX to inspect.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
@common_options
def inspect_cmd(source: Path, iteration: int | None, as_json: bool, tensors: bool) -> None:
    """Show what SOURCE holds: layout, iteration, TP/PP, args, pickle globals, tensors.

    SOURCE is anything convert reads (a release, a Megatron-Core torch_dist checkpoint) or a converted
    folder (shows its config, shards and verification; its files are hashed, as push does, to tell whether
    it is still what was verified). Never parses tensor data and runs nothing from the pickle.

    \b
    Examples:
      persimmon-tools inspect 8b_base_model_release.tar --no-tensors
      persimmon-tools inspect ./persimmon-8b-chat-hf --json
    """
    from persimmon_tools.conversion.inspect import InspectOptions, inspect_source

    info = inspect_source(source, InspectOptions(iteration=iteration, tensors=tensors))
    if as_json:
        echo_json(info)
        return
    for key, value in info.items():
        if key == "tensors":
            click.echo(f"tensors ({len(value)}):")
            for t in value:
                click.echo(
                    f"  {t['name']:<70} {str(t['shape']):<16} {t['dtype']:<9} {format_size(t['bytes'], digits=2):>11}"
                    f"  {t['parallel'] or '?'}"
                )
        elif key == "verification" and isinstance(value, dict) and "status" in value:
            created = value.get("created")
            click.echo(f"verification: {value['status']}" + (f" (report of {created})" if created else ""))
        elif isinstance(value, (dict, list)):
            click.echo(f"{key}: {json.dumps(value)}")
        else:
            click.echo(f"{key}: {value}")


@click.command("unpack", cls=Command)
@click.argument("release_tar", type=SafePath(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=SafePath(path_type=str))  # a str keeps a trailing "/" (DEST is a parent)
@click.option("--no-md5", is_flag=True, help="Skip the md5 check of known release names.")
@json_option("Print what was extracted (dest, files, bytes, md5) as JSON on stdout.")
@common_options
def unpack_cmd(release_tar: Path, dest: str, no_md5: bool, as_json: bool) -> None:
    """Safely extract RELEASE_TAR into DEST: a new folder, or, when DEST is an existing folder or ends
    with "/", into DEST/NAME (NAME: the archive's top folder), which must be new or empty; nothing else in
    DEST is touched, so several releases can go side by side.

    Refuses links, devices and paths escaping DEST; checks ADEPT's published md5 for
    8b_base_model_release.tar / 8b_chat_model_release.tar. `convert` reads tarballs in place, so
    unpacking is optional.

    \b
    Example:
      persimmon-tools unpack 8b_chat_model_release.tar ./releases/
    """
    from persimmon_tools.megatron.unpack import UnpackOptions, unpack

    with byte_progress(release_tar.stat().st_size, "unpack") as advance:
        result = unpack(release_tar, dest, UnpackOptions(check_md5=not no_md5), progress=advance)
    md5 = (
        "md5 matches the published checksum"
        if result.md5_expected
        else f"md5 {result.md5} (no published value)"
    )
    if as_json:
        echo_json(
            {
                "dest": str(result.dest),
                "files": result.files,
                "bytes": result.bytes,
                "md5": result.md5,
                "md5_expected": result.md5_expected,
            }
        )
    elif not is_quiet():
        click.echo(
            f"Extracted {plural(result.files, 'file')} ({format_size(result.bytes, digits=2)}) into {result.dest}; {md5}.",
            err=True,
        )


@click.command("make-release", cls=Command)
@click.argument("out_tar", type=_PATH)
@click.option(
    "--preset",
    type=click.Choice(["tiny", "mid", "8b"]),
    default="tiny",
    show_default=True,
    help="tiny: 6 layers x 64 hidden; mid: ~1 GB; 8b: the real shapes (~18.8 GB in bf16).",
)
@click.option(
    "--tp",
    type=POSITIVE_INT,
    default=1,
    show_default=True,
    help="Tensor-parallel shards (mp_rank_XX); must divide the preset's heads and FFN width (tiny: 1, 2, 4).",
)
@click.option(
    "--pp",
    type=POSITIVE_INT,
    default=1,
    show_default=True,
    help="Pipeline stages (mp_rank_XX_YYY); must divide the preset's layers (tiny: 1, 2, 3, 6).",
)
@click.option(
    "--dtype",
    type=DType("bf16", "fp16", "fp32"),
    default="bf16",
    show_default=True,
    help="bfloat16/float16/float32 are accepted too.",
)
@click.option(
    "--seed",
    type=SEED,
    default=0,
    show_default=True,
    help="0 to 2**32-1. Same seed = same logical tensors for any TP/PP.",
)
@click.option(
    "--vocab",
    type=SafePath(exists=True, dir_okay=False, path_type=Path),
    help="SentencePiece model to ship as adept_vocab.model (needs a |ENDOFTEXT| piece).",
)
@click.option("--force", is_flag=True, help="Replace OUT_TAR if it is a tarball persimmon-tools wrote.")
@json_option("Print what was written (out_tar, bytes, preset, tp, pp, dtype, seed) as JSON on stdout.")
@common_options
def make_release_cmd(
    out_tar: Path,
    preset: str,
    tp: int,
    pp: int,
    dtype: str,
    seed: int,
    vocab: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a random-weight release tarball in ADEPT's exact layout (for tests, demos, benchmarks).

    \b
    Examples:
      persimmon-tools make-release /tmp/tiny_release.tar
      persimmon-tools make-release /tmp/tp2pp3.tar --tp 2 --pp 3 --seed 0
      persimmon-tools make-release /data/8b_synthetic_release.tar --preset 8b
    """
    from persimmon_tools.synth.build import ReleaseOptions, make_release

    # an existing OUT_TAR is exit 1; --force replaces only a tarball the toolkit wrote
    options = ReleaseOptions(preset=preset, tp=tp, pp=pp, dtype=dtype, seed=seed, vocab=vocab, force=force)
    with byte_progress(None, "make-release") as advance:
        make_release(out_tar, options, progress=advance, on_total=advance.set_total)
    size = out_tar.stat().st_size
    if as_json:
        echo_json(
            {
                "out_tar": str(out_tar),
                "bytes": size,
                "preset": preset,
                "tp": tp,
                "pp": pp,
                "dtype": dtype,
                "seed": seed,
            }
        )
    elif not is_quiet():
        click.echo(
            f"Wrote {out_tar} ({format_size(size, digits=2)}; preset {preset}, TP={tp} PP={pp}, {dtype}, seed {seed}).",
            err=True,
        )


COMMANDS = [convert_cmd, inspect_cmd, unpack_cmd, make_release_cmd]
