"""Command ``tokenizer``: write fast tokenizer files from a SentencePiece model, or check parity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from persimmon_tools.cli import Command, common_options, echo_json, is_quiet, plural
from persimmon_tools.cli.params import SafePath
from persimmon_tools.errors import UsageError

if TYPE_CHECKING:
    from persimmon_tools.tokenizer.check import ParityReport

_FILE = SafePath(exists=True, dir_okay=False, path_type=Path)


@click.command("tokenizer", cls=Command)
@click.argument("sp_model", type=_FILE)
@click.argument("paths", nargs=-1, type=SafePath(path_type=Path))
@click.option(
    "--check", is_flag=True, help="Compare with SentencePiece instead of writing; PATHS are corpus files."
)
@click.option(
    "--add-bos/--no-add-bos",
    default=True,
    show_default=True,
    help="add_bos_token in tokenizer_config.json (the published adept/persimmon-8b-* configs: on).",
)
@click.option(
    "--chat", is_flag=True, help="Add a chat_template for ADEPT's 'human: …\\n\\nadept:' prompt format."
)
@click.option(
    "--model-max-length",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="model_max_length in tokenizer_config.json (default: 16384, the 8B's max_position_embeddings; "
    "convert takes it from the checkpoint's max_position_embeddings).",
)
@click.option(
    "--allow-tokenizer-mismatch",
    "--force",
    "force",
    is_flag=True,
    help="Write even if an option cannot be expressed exactly or the parity check fails (with --check: "
    "check that approximation). --force is the older name.",
)
@click.option(
    "--allow-ties",
    is_flag=True,
    help="Accept mismatches that are all float32 ties (same exact score; SentencePiece picks by float32 "
    "rounding, which no tokenizer.json can reproduce): write anyway, or with --check exit 0; every other "
    "check stays on.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the result (written files or parity report) as JSON."
)
@common_options
def tokenizer_cmd(
    sp_model: Path,
    paths: tuple[Path, ...],
    check: bool,
    add_bos: bool,
    chat: bool,
    model_max_length: int | None,
    force: bool,
    allow_ties: bool,
    as_json: bool,
) -> None:
    """Build a Hugging Face fast tokenizer from a SentencePiece model, or check one against SentencePiece.

    \b
    Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model into OUT_DIR
    (after checking parity on a built-in multi-script sample). Existing files of those names are replaced
    only when OUT_DIR's conversion.json lists them (a converted folder); anything else is refused:
      persimmon-tools tokenizer adept_vocab.model ./persimmon-8b-chat-hf --chat
      persimmon-tools tokenizer adept_vocab.model ./out --no-add-bos

    \b
    Check parity on your own corpus (one text per line; several files allowed), exit 1 on any mismatch:
      persimmon-tools tokenizer --check adept_vocab.model corpus.txt more.txt
      persimmon-tools tokenizer --check adept_vocab.model --json
      persimmon-tools tokenizer --check --allow-tokenizer-mismatch toy.model corpus.txt  # the approximation
      persimmon-tools tokenizer --check --allow-ties t5.model runs.txt  # float32 ties only: exit 0
    """
    from persimmon_tools.tokenizer.check import ParityOptions, check_tokenizer
    from persimmon_tools.tokenizer.write import TokenizerOptions, write_tokenizer

    if check:
        if chat or not add_bos or model_max_length is not None:
            raise UsageError(
                "--chat, --no-add-bos and --model-max-length only apply when writing",
                hint="drop them with --check",
            )
        check_tokenizer(
            sp_model,
            paths,
            ParityOptions(strict=not force, allow_ties=allow_ties),
            on_report=lambda report: _show_report(report, paths, as_json),  # shown before the verdict
        )
        return
    if len(paths) != 1:
        raise UsageError(
            "writing needs exactly one OUT_DIR",
            hint="persimmon-tools tokenizer SP_MODEL OUT_DIR (or --check SP_MODEL [CORPUS ...])",
        )
    options = TokenizerOptions(
        add_bos_token=add_bos,
        chat=chat,
        check=not force,
        allow_ties=allow_ties,
        model_max_length=model_max_length,
        remove_created_out_dir=True,  # leave no empty OUT_DIR behind a refused model
    )
    written = write_tokenizer(sp_model, paths[0], options)
    if as_json:
        echo_json({"written": [str(p) for p in written]})
    elif not is_quiet():
        for path in written:
            click.echo(f"wrote {path}")


def _show_report(report: ParityReport, paths: tuple[Path, ...], as_json: bool) -> None:
    """The parity report of ``tokenizer --check`` (a mismatch is shown with ``-q`` too)."""
    if as_json:
        echo_json(report.to_dict(), ensure_ascii=False)  # on a mismatch (exit 1) too: "ok": false
    elif not is_quiet() or not report.ok:
        source = ", ".join(str(p) for p in paths) if paths else "built-in sample"
        n_ties, ties = report.tie_mismatches, ""
        if n_ties:
            are = "is a float32 tie" if n_ties == 1 else "are float32 ties"
            ties = f" ({plural(n_ties, 'encode mismatch', 'encode mismatches')} {are})"
        click.echo(
            f"compared {plural(report.items, 'text')} ({source}): {report.encode_mismatches} encode, "
            f"{report.decode_mismatches} decode mismatches{ties}"
        )
        for example in report.examples:
            click.echo(example)


COMMANDS = [tokenizer_cmd]
