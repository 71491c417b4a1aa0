"""Generate ``docs/cli.md`` from the commands' own ``--help``: ``python -m persimmon_tools.cli.docs > docs/cli.md``.

``tests/cli/test_docs.py`` regenerates it and fails when the committed file is out of date.
"""

from __future__ import annotations

import click

from persimmon_tools.cli import main

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
        "Exit codes: 0 success, 1 failure (`Error:` / `Hint:` on stderr), 2 usage error, "
        "3 verification failed, 130 interrupted (Ctrl-C / SIGTERM; temporary output removed), "
        "141 stdout closed by its reader (`| head`; no message).",
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
