"""``persimmon-tools verify``: does a converted folder compute what the original checkpoint computes?"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from persimmon_tools.cli import Command, common_options, echo_json, is_quiet, json_option
from persimmon_tools.cli.params import DEVICE, ITERATION, PROMPT, TOKEN_IDS, DType, SafePath
from persimmon_tools.errors import UsageError


@click.command("verify", cls=Command)
@click.argument("out_dir", type=SafePath(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--reference",
    "-r",
    "reference",
    default=None,
    metavar="SOURCE",
    type=SafePath(exists=True, path_type=Path),
    help="The original release: tarball, extracted folder, iter_* folder or model_optim_rng.pt [default: the "
    "source OUT_DIR/conversion.json records, while it holds the recorded files].",
)
@click.option(
    "--device",
    type=DEVICE,
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda",
    help="Where both sides run; auto picks cuda when available.",
)
@click.option(
    "--dtype",
    type=DType("fp32", "bf16", "fp16"),
    default=None,
    help="Compute dtype of both sides (float32/bfloat16/float16 accepted too) [default: fp32 on CPU, bf16 on "
    "CUDA].",
)
@click.option(
    "--rotary",
    type=click.Choice(["hf", "adept"]),
    default="hf",
    show_default=True,
    help="adept: also report how far the HF model drifts from ADEPT's bf16 rotary, per position range.",
)
@click.option(
    "--prompt", "prompts", type=PROMPT, multiple=True, metavar="TEXT", help="A prompt to add (repeatable)."
)
@click.option(
    "--prompts-file",
    type=SafePath(exists=True, dir_okay=False, path_type=Path),
    help="Prompts to add: one per line (\\n escapes) or a .json list of strings.",
)
@click.option(
    "--ids",
    "ids",
    type=TOKEN_IDS,
    multiple=True,
    metavar="IDS",
    help="Token ids to add, e.g. 71013,1,2 (repeatable).",
)
@click.option(
    "--no-default-prompts", is_flag=True, help="Only the prompts given with --prompt/--prompts-file/--ids."
)
@click.option(
    "--loader",
    type=click.Choice(["auto", "transformers", "persimmon-tools"]),
    default="auto",
    show_default=True,
    help="How to run the converted folder (auto: transformers when it fits).",
)
@click.option(
    "--check-weights/--no-check-weights",
    default=None,
    help="Compare every tensor with the checkpoint by value [default: below 500M parameters].",
)
@click.option(
    "--iteration", type=ITERATION, help="Which iter_XXXXXXX of SOURCE (default: the tracker file's)."
)
@click.option(
    "--vocab",
    type=SafePath(exists=True, dir_okay=False, path_type=Path),
    help="adept_vocab.model, when SOURCE has none.",
)
@click.option(
    "--no-source-hash", is_flag=True, help="Do not sha256 the checkpoint files (faster; JSON says so)."
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    metavar="N",
    help="Greedy new tokens per prompt for the generation check (0: none).",
)
@json_option("Print the report as JSON on stdout instead of the table (also when it failed: exit 3).")
@click.option(
    "--json-file",
    "json_path",
    type=SafePath(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Also write the report to PATH (the same JSON as OUT_DIR/verification.json).",
)
@common_options
def verify_cmd(
    out_dir: Path,
    reference: Path | None,
    device: str,
    dtype: str | None,
    rotary: str,
    prompts: tuple[str, ...],
    prompts_file: Path | None,
    ids: tuple[tuple[int, ...], ...],
    no_default_prompts: bool,
    loader: str,
    check_weights: bool | None,
    iteration: int | None,
    vocab: Path | None,
    no_source_hash: bool,
    new_tokens: int,
    as_json: bool,
    json_path: Path | None,
) -> None:
    """Prove that converted folder OUT_DIR computes what the original checkpoint SOURCE computes.

    Runs an independent forward pass on the checkpoint's Megatron tensors and the converted model
    (transformers, or the toolkit's layer-by-layer reader for big models) on the same prompts, and
    compares the logits: max and mean |Δ|, KL, top-1/top-5 agreement. Also checks config.json against
    the checkpoint and (small models) every tensor by value. On failure it names the first diverging
    layer and the most likely tensor or config value. Writes OUT_DIR/verification.json either way.
    Without --reference, SOURCE is the release OUT_DIR/conversion.json records, if it still holds the
    recorded files (names, sizes, and the sha256 recorded for them); otherwise exit 2 saying what differs.

    \b
    Examples:
      persimmon-tools verify ./persimmon-8b-chat-hf --reference 8b_chat_model_release.tar
      persimmon-tools verify ./persimmon-8b-chat-hf  # the source its conversion.json records
      persimmon-tools verify ./out -r release.tar --device cuda --rotary adept --json-file report.json
      persimmon-tools verify ./out -r release.tar --json > report.json  # printed on exit 3 too
      persimmon-tools verify ./out -r release.tar --prompt $'human: Hi\\n\\nadept:' --ids 71013,1,2  # $'...': real newlines
    """
    from persimmon_tools.verification.report import render_table, write_report
    from persimmon_tools.verification.verify import VerifyOptions, check_passed, verify

    if json_path is not None:
        inputs = {"--reference": reference, "--vocab": vocab, "--prompts-file": prompts_file}
        _check_json_file(json_path, out_dir, inputs)
    texts = list(prompts) + (_read_prompts(prompts_file) if prompts_file else [])
    options = VerifyOptions(
        device=device,
        dtype=dtype,
        rotary=rotary,
        prompts=tuple(texts),
        ids=tuple(ids),
        default_prompts=not no_default_prompts,
        loader=loader,
        iteration=iteration,
        vocab=vocab,
        hash_source=not no_source_hash,
        check_weights=check_weights,
        new_tokens=new_tokens,
    )
    show = not is_quiet() and sys.stderr.isatty()
    report = verify(
        out_dir,
        reference,
        options,
        progress=(lambda s: click.echo(f"  {s}", err=True)) if show else (lambda s: None),
    )
    if json_path is not None:
        write_report(report, json_path)
    if as_json:  # the report is the one JSON document, also when it failed (exit 3, no error object)
        echo_json(report.to_json())
    elif not is_quiet() or not report.passed:
        click.echo(render_table(report))
    check_passed(report)


def _check_json_file(path: Path, out_dir: Path, inputs: dict[str, Path | None]) -> None:
    """``--json-file``, checked before any work (not after the whole verify): a writable folder holds it, it
    is no folder, link or path through a file (:func:`~persimmon_tools.safe_write.check_file_destination`),
    it is none of the inputs (by identity: a symlinked folder or bind mount is the same place) and lies not
    inside OUT_DIR, whose verified files it would change (OUT_DIR/verification.json itself is fine)."""
    from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE
    from persimmon_tools.safe_write import check_file_destination, relation

    if str(path) == "-":
        raise UsageError("--json-file -: expected a file path", hint="--json prints the report on stdout")
    target = check_file_destination(path, "--json-file", UsageError)
    for flag, given in inputs.items():
        if given is not None and relation(target, given) == "is":
            raise UsageError(
                f"--json-file {path} is the {flag} file {given}; writing the report would replace it",
                hint="choose another path for the report",
            )
    the_report = target.name == VERIFICATION_FILE and relation(target.parent, out_dir) == "is"
    if relation(target, out_dir) == "inside" and not the_report:
        raise UsageError(
            f"--json-file {path} is inside OUT_DIR {out_dir}: a file added there changes the verified folder "
            "(push would call it stale)",
            hint=f"write the report outside OUT_DIR; verify writes {out_dir / VERIFICATION_FILE} anyway",
        )


def _read_prompts(path: Path) -> list[str]:
    """--prompts-file, with malformed content reported as a usage error naming the file."""
    import json

    from persimmon_tools.verification.prompts import read_prompts_file

    expected = "a .json list of strings" if path.suffix == ".json" else "UTF-8 text, one prompt per line"
    try:
        return read_prompts_file(path)
    except UnicodeDecodeError as err:
        raise UsageError(
            f"--prompts-file {path}: expected {expected}; byte {err.start} is not UTF-8",
            hint="save the file as UTF-8",
        ) from err
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--prompts-file {path}: expected {expected}; invalid JSON at line {err.lineno} column {err.colno} "
            f"({err.msg})",
            hint='e.g. ["human: Hi\\n\\nadept:", "The capital of France is"]',
        ) from err
    except RecursionError as err:
        raise UsageError(
            f"--prompts-file {path}: expected {expected}; the JSON is nested too deeply",
            hint="a flat list of strings",
        ) from err


COMMANDS = [verify_cmd]
