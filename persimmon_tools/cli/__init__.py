"""The ``persimmon-tools`` command line: a click group over the library.

Each command lives in its own module (a :class:`~persimmon_tools.cli.failures.Command`): it parses its
options, calls one library function and renders the result. :mod:`persimmon_tools.cli.failures` is the only
place where errors become ``Error:``/``Hint:`` text and exit codes (the table is
``persimmon_tools.errors.EXIT_CODES``, shown in every command's ``--help``): 1 = failure, 2 = usage,
3 = verification failed, 130 = interrupted, 141 = the reader of stdout went away (``| head``: no message,
like tools that SIGPIPE stops).

``--json`` is a flag of every command, as in the ``hf`` CLI: the command prints one JSON document on stdout.
When it fails, that document is ``{"error": {"message", "hint", "exit_code", "type"}}`` (the ``Error:``/
``Hint:`` lines still go to stderr), unless the command had already printed its own document, a report that
says it failed (``verify``'s report with ``"verdict": "fail"``, ``tokenizer --check``'s with ``"ok": false``):
stdout never holds two documents.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from persimmon_tools import __version__
from persimmon_tools.cli.failures import JSON_FLAG_ONLY, Command, Context, fail, json_requested
from persimmon_tools.errors import EXIT_CODES

__all__ = ["Command", "common_options", "echo_json", "is_quiet", "json_option", "main", "plural", "run"]


def exit_codes_epilog() -> str:
    """The exit code table as a ``--help`` epilog (``\\b``: click keeps the lines as they are)."""
    rows = [f"  {code:<4} {name}: {meaning}" for code, name, meaning in EXIT_CODES]
    return "\n".join(
        [
            "\b",
            "Exit codes:",
            *rows,
            "",
            'With --json, a failure prints {"error": {"message", "hint", "exit_code", "type"}} on stdout '
            "(Error:/Hint: still go to stderr).",
        ]
    )


def json_option(help: str = "Print the result as one JSON object on stdout.") -> Callable[..., Any]:
    """The ``--json`` flag (parameter ``as_json``) that every command with machine output shares."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def echo_json(data: Any, *, ensure_ascii: bool = True) -> None:
    """Print the command's one JSON document on stdout (a str is printed as it is).

    An error raised after it (``verify``'s exit 3) then prints no second document."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2, ensure_ascii=ensure_ascii)
    click.echo(text.rstrip("\n"))
    ctx = click.get_current_context()
    if isinstance(ctx, Context):
        ctx.json_printed = True


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``-q/--quiet``, ``-v/--verbose`` and ``--debug`` to a command and set up logging."""

    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or info messages; errors only.")
    @click.option("-v", "--verbose", is_flag=True, help="Log debug messages from the library.")
    @click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool, verbose: bool, debug: bool, **kwargs: Any) -> Any:
        from persimmon_tools.cli.progress import BarSafeHandler  # imports this module

        level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
        # Messages go above a progress bar being drawn, never onto its line (cli/progress.py).
        handler = BarSafeHandler(sys.stderr)
        logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
        return func(*args, **kwargs)

    return wrapper


def plural(n: int, word: str, words: str | None = None) -> str:
    """``n`` and the noun that agrees with it: ``plural(1, "tensor") == "1 tensor"``,
    ``plural(3, "entry", "entries") == "3 entries"``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def is_quiet() -> bool:
    """Whether the running command was given ``--quiet`` (progress bars off)."""
    return bool(click.get_current_context().params.get("quiet", False))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_sigterm_handler() -> None:
    """SIGTERM, SIGHUP (terminal closed) and SIGQUIT (Ctrl-\\) behave like Ctrl-C: the running command
    unwinds and removes its temporary output. A SIGHUP or SIGQUIT the parent set to be ignored (``nohup``)
    stays ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    for name in ("SIGHUP", "SIGQUIT"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_interrupt)


class _Group(click.Group):
    """The command group: its own usage errors (an unknown command, a bad group option) go through the same
    :func:`~persimmon_tools.cli.failures.fail` as the commands' errors."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        given = list(args)  # click's parser consumes the list it is given
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:
            ctx = click.Context(self, info_name=info_name, parent=parent)
            fail(ctx, err, as_json=json_requested(JSON_FLAG_ONLY, given, parent))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.ClickException as err:  # no such command
            if ctx.resilient_parsing:  # shell completion
                raise
            fail(ctx, err, as_json=json_requested(JSON_FLAG_ONLY, args[1:], ctx))

    def invoke(self, ctx: click.Context) -> Any:
        _install_sigterm_handler()
        return super().invoke(ctx)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=exit_codes_epilog(),
)
@click.version_option(__version__, prog_name="persimmon-tools")
def main() -> None:
    """Take ADEPT Persimmon-8B Megatron checkpoints to verified Hugging Face models.

    \b
    Typical flow:
      persimmon-tools inspect 8b_chat_model_release.tar
      persimmon-tools convert 8b_chat_model_release.tar ./persimmon-8b-chat-hf
      persimmon-tools verify ./persimmon-8b-chat-hf --reference 8b_chat_model_release.tar
      persimmon-tools push ./persimmon-8b-chat-hf you/persimmon-8b-chat

    Every command has --help with examples. Nothing here needs ADEPT's code or the network (except push).
    """


def run() -> None:
    """The console script: :func:`main`, then exit without the interpreter's teardown.

    Tearing down an interpreter that has imported torch takes a noticeable part of a short command
    (docs/performance.md, "Other figures", has the figure and its command). When a command returns, its work
    is done: outputs renamed into place, temporary folders removed, threads joined. So the streams and
    logging are flushed and the process exits with the command's code. An unexpected exception (a bug) takes
    the normal path, with its traceback.
    """
    try:
        main()
    except SystemExit as done:
        code = done.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
                stream.flush()
        os._exit(code or 0)


def _add(cmd: click.Command) -> None:
    """Register a command; its ``--help`` ends with the one exit code table."""
    if not isinstance(cmd, Command):  # its failures would bypass fail(): no Error:/Hint:, no JSON error
        raise TypeError(
            f"command {cmd.name!r} must be a persimmon_tools.cli.Command (click.command(cls=Command))"
        )
    cmd.epilog = exit_codes_epilog()
    main.add_command(cmd)


def _register() -> None:
    from persimmon_tools.cli import (
        commands_core,
        commands_export,
        commands_push,
        commands_tokenizer,
        commands_verify,
    )

    for mod in (commands_core, commands_tokenizer, commands_verify, commands_push, commands_export):
        for cmd in mod.COMMANDS:
            _add(cmd)


_register()
