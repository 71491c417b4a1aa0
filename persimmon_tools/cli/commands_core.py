"""Commands ``inspect``, ``unpack`` and ``make-release`` (``convert`` lives in ``commands_convert``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from persimmon_tools.cli import common_options, echo_json, is_quiet, json_option
from persimmon_tools.cli.commands_convert import convert_cmd
from persimmon_tools.cli.params import ITERATION, POSITIVE_INT, SEED, DType, SafePath
from persimmon_tools.cli.progress import byte_progress, human_bytes
from persimmon_tools.errors import PersimmonToolsError, UsageError

_PATH = SafePath(path_type=Path)


@click.command("inspect")
@click.argument("source", type=SafePath(exists=True, path_type=Path))
@click.option("--iteration", type=ITERATION, help="Which iter_XXXXXXX to inspect.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
@common_options
def inspect_cmd(source: Path, iteration: int | None, as_json: bool, tensors: bool) -> None:
    """Show what SOURCE holds: layout, iteration, TP/PP, args, pickle globals, tensors.

    SOURCE may also be a converted folder (shows its config, shards and verification; its files are hashed,
    as push does, to tell whether it is still what was verified). Never parses tensor data and runs nothing
    from the pickle.

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
        echo_json(info)
        return
    for key, value in info.items():
        if key == "tensors":
            click.echo(f"tensors ({len(value)}):")
            for t in value:
                click.echo(
                    f"  {t['name']:<70} {str(t['shape']):<16} {t['dtype']:<9} {human_bytes(t['bytes']):>11}"
                    f"  {t['parallel'] or '?'}"
                )
        elif key == "verification" and isinstance(value, dict) and "status" in value:
            click.echo(f"verification: {value['status']} (report of {value.get('created')})")
        elif isinstance(value, (dict, list)):
            click.echo(f"{key}: {json.dumps(value)}")
        else:
            click.echo(f"{key}: {value}")


@click.command("unpack")
@click.argument("release_tar", type=SafePath(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=_PATH)
@click.option("--no-md5", is_flag=True, help="Skip the md5 check of known release names.")
@json_option("Print what was extracted (dest, files, bytes, md5) as JSON on stdout.")
@common_options
def unpack_cmd(release_tar: Path, dest: Path, no_md5: bool, as_json: bool) -> None:
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
    if as_json:
        echo_json(
            {
                "dest": str(dest),
                "files": result.files,
                "bytes": result.bytes,
                "md5": result.md5,
                "md5_expected": result.md5_expected,
            }
        )
    elif not is_quiet():
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
@click.option("--force", is_flag=True, help="Overwrite OUT_TAR if it exists.")
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
    import torch

    from persimmon_tools.synth.build import make_release

    _check_layout(preset, tp, pp)
    if out_tar.exists() and (not force or out_tar.is_dir()):  # exit 1 like convert's non-empty OUT_DIR
        kind = "a directory" if out_tar.is_dir() else "a file"
        raise PersimmonToolsError(
            f"OUT_TAR {out_tar} exists and is {kind}",
            hint="choose another path" + ("" if out_tar.is_dir() else ", or pass --force to overwrite it"),
        )
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
        click.echo(f"Wrote {out_tar} ({human_bytes(size)}).", err=True)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_layout(preset: str, tp: int, pp: int) -> None:
    """--tp must divide the preset's heads, FFN width and (padded) vocab; --pp its layers."""
    from persimmon_tools.synth.values import PRESETS

    p = PRESETS[preset]
    vocab = p.vocab or 1024  # the tiny vocab is padded to a multiple of 1024 (128 x TP up to 8)
    tps = [d for d in _divisors(p.heads) if p.ffn % d == 0 and vocab % d == 0]
    if tp not in tps:
        raise UsageError(
            f"--tp {tp} does not divide the {preset} preset's {p.heads} heads, FFN width {p.ffn} and "
            f"vocab {vocab}",
            hint=f"choose --tp from {', '.join(map(str, tps))} (or another --preset)",
        )
    pps = _divisors(p.layers)
    if pp not in pps:
        raise UsageError(
            f"--pp {pp} does not divide the {preset} preset's {p.layers} layers",
            hint=f"choose --pp from {', '.join(map(str, pps))} (or another --preset)",
        )


COMMANDS = [convert_cmd, inspect_cmd, unpack_cmd, make_release_cmd]
