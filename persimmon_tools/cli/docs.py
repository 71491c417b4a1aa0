"""Generate ``docs/cli.md`` from the commands' own ``--help``: ``python -m persimmon_tools.cli.docs > docs/cli.md``.

``tests/cli/test_docs.py`` regenerates it and fails when the committed file is out of date.
"""

from __future__ import annotations

import click

from persimmon_tools.cli import main
from persimmon_tools.errors import EXIT_CODES

WIDTH = 100


def _help(cmd: click.Command, parent: click.Context | None, name: str) -> str:
    ctx = click.Context(
        cmd,
        info_name=name,
        parent=parent,
        terminal_width=WIDTH,
        max_content_width=WIDTH,
        help_option_names=["-h", "--help"],
    )
    return cmd.get_help(ctx)


def cli_reference_markdown() -> str:
    """The whole CLI reference as Markdown (the group's help, then each command's, alphabetically)."""
    root = click.Context(
        main,
        info_name="persimmon-tools",
        terminal_width=WIDTH,
        max_content_width=WIDTH,
        help_option_names=["-h", "--help"],
    )
    parts = [
        "# CLI reference",
        "",
        "Generated from `--help` by `python -m persimmon_tools.cli.docs > docs/cli.md`; "
        "`tests/cli/test_docs.py` fails when it is out of date.",
        "",
        "Exit codes, the same for every command (also at the end of each `--help`):",
        "",
        "| exit | name | meaning |",
        "|---|---|---|",
        *(
            f"| {code} | {name} | {meaning.replace('|', chr(92) + '|')} |"
            for code, name, meaning in EXIT_CODES
        ),
        "",
        "`--json` is a flag of every command: one JSON document on stdout. On failure it is "
        '`{"error": {"message": ..., "hint": ..., "exit_code": N, "type": ...}}` (`Error:` / `Hint:` still go '
        "to stderr), except where the command printed its own report first: `verify` (exit 3) prints its report "
        'with `"verdict": "fail"`, `tokenizer --check` (exit 1) its parity report with `"ok": false`.',
        "",
        "## persimmon-tools",
        "",
        "```",
        main.get_help(root),
        "```",
    ]
    for name in sorted(main.commands):
        parts += ["", f"## persimmon-tools {name}", "", "```", _help(main.commands[name], root, name), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    click.echo(cli_reference_markdown(), nl=False)
