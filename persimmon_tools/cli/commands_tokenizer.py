"""Command ``tokenizer``: write fast tokenizer files from a SentencePiece model, or check parity."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from persimmon_tools.cli import common_options, echo_json, is_quiet
from persimmon_tools.cli.params import SafePath
from persimmon_tools.errors import TokenizerError, UsageError

_FILE = SafePath(exists=True, dir_okay=False, path_type=Path)


def _read_corpus(paths: tuple[Path, ...]) -> list[str]:
    texts: list[str] = []
    for path in paths:
        try:
            texts.extend(path.read_text(encoding="utf-8").split("\n"))
        except UnicodeDecodeError as err:
            raise TokenizerError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start})",
                hint="pass UTF-8 files, one text per line",
            ) from err
        if texts and texts[-1] == "":
            texts.pop()  # the file's final newline ends the last line, it is not an empty item
    return texts


@click.command("tokenizer")
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
    from persimmon_tools.tokenizer.check import TIE_EXPLANATION
    from persimmon_tools.tokenizer.write import MODEL_MAX_LENGTH, check_parity, write_tokenizer

    if check:
        if chat or not add_bos or model_max_length is not None:
            raise UsageError(
                "--chat, --no-add-bos and --model-max-length only apply when writing",
                hint="drop them with --check",
            )
        missing = [p for p in paths if not p.is_file()]
        if missing:
            what = "is a directory" if missing[0].is_dir() else "does not exist"
            raise UsageError(
                f"corpus file {missing[0]} {what}; expected a text file",
                hint="pass UTF-8 text files, one item per line",
            )
        texts = _read_corpus(paths) if paths else None
        report = check_parity(sp_model, texts, strict=not force)
        if as_json:
            echo_json(report.to_dict(), ensure_ascii=False)  # on a mismatch (exit 1) too: "ok": false
        elif not is_quiet() or not report.ok:
            source = ", ".join(str(p) for p in paths) if paths else "built-in sample"
            click.echo(
                f"compared {report.items} texts ({source}): {report.encode_mismatches} encode, {report.decode_mismatches} decode mismatches"
                + (
                    f" ({report.tie_mismatches} encode mismatches are float32 ties)"
                    if report.tie_mismatches
                    else ""
                )
            )
            for example in report.examples:
                click.echo(example)
        if report.only_ties and allow_ties:
            return
        if not report.ok:
            ties = report.tie_mismatches
            raise TokenizerError(
                f"{report.encode_mismatches + report.decode_mismatches} mismatches between the fast tokenizer and SentencePiece"
                + (f" ({ties} of them float32 ties)" if ties else ""),
                hint="see the differences above; docs/tokenizer.md lists what cannot be expressed exactly"
                + (f" (a float32 tie: {TIE_EXPLANATION})" if ties else ""),
            )
        return
    if len(paths) != 1:
        raise UsageError(
            "writing needs exactly one OUT_DIR",
            hint="persimmon-tools tokenizer SP_MODEL OUT_DIR (or --check SP_MODEL [CORPUS ...])",
        )
    out_dir = paths[0]
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"{out_dir} exists and is not a directory", hint="choose another OUT_DIR")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        written = write_tokenizer(
            sp_model,
            out_dir,
            add_bos_token=add_bos,
            chat=chat,
            check=not force,
            allow_ties=allow_ties,
            model_max_length=MODEL_MAX_LENGTH if model_max_length is None else model_max_length,
        )
    except BaseException:
        if created:  # leave no empty OUT_DIR behind a refused model
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    if as_json:
        echo_json({"written": [str(p) for p in written]})
    elif not is_quiet():
        for path in written:
            click.echo(f"wrote {path}")


COMMANDS = [tokenizer_cmd]
