"""The ``persimmon-tools`` command line: a click group over the library.

Each command lives in its own module and calls one library function, then renders the result. This file
holds the only place where library errors become ``Error:``/``Hint:`` text and exit codes:
1 = failure, 2 = usage, 3 = verification failed, 130 = interrupted, 141 = the reader of stdout went away
(``| head``: no message, like tools that SIGPIPE stops).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from persimmon_tools import __version__
from persimmon_tools.errors import EXIT_FAILURE, PersimmonToolsError

_DEBUG_KEY = "persimmon_tools.debug"
_QUIET_KEY = "persimmon_tools.quiet"


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``-q/--quiet``, ``-v/--verbose`` and ``--debug`` to a command and set up logging."""

    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or info messages; errors only.")
    @click.option("-v", "--verbose", is_flag=True, help="Log debug messages from the library.")
    @click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool, verbose: bool, debug: bool, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta[_DEBUG_KEY] = debug
        ctx.meta[_QUIET_KEY] = quiet
        level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
        return func(*args, **kwargs)

    return wrapper


def is_quiet() -> bool:
    """Whether the running command was given ``--quiet`` (progress bars off)."""
    return bool(click.get_current_context().meta.get(_QUIET_KEY, False))


def report_error(err: PersimmonToolsError) -> None:
    """Render a library error as ``Error:`` / ``Hint:`` lines on stderr."""
    click.secho(f"Error: {err.message}", err=True, fg="red")
    if err.hint:
        click.echo(f"Hint: {err.hint}", err=True)


def _command_path(ctx: click.Context | None) -> str:
    """``persimmon-tools convert`` whatever the program was invoked as (``main`` under CliRunner)."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["persimmon-tools", *names])


def report_click_error(err: click.ClickException, fallback: click.Context | None = None) -> None:
    """Render click's own errors (unknown option, missing argument, bad choice) as ``Error:``/``Hint:``."""
    click.secho(f"Error: {err.format_message()}", err=True, fg="red")
    ctx = getattr(err, "ctx", None) or fallback
    path = _command_path(ctx)
    usage = ""
    if ctx is not None:
        usage = "usage: " + " ".join([path, *ctx.command.collect_usage_pieces(ctx)]) + "; "
    click.echo(f"Hint: {usage}run `{path} --help` for every option and examples", err=True)


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


EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a tool that a closed pipe stopped


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports POLLERR on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real fd (CliRunner, closed stream)
        return False


class _Group(click.Group):
    """Click group that turns known library errors into messages and exit codes (no traceback)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent=None, **extra: Any
    ) -> click.Context:
        try:  # the group's own options and the command name; a command's options fail in invoke()
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:
            report_click_error(err)
            raise click.exceptions.Exit(err.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        _install_sigterm_handler()
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:  # parsing the command's arguments and options
            name = ctx.invoked_subcommand
            cmd = self.get_command(ctx, name) if name else None
            report_click_error(err, click.Context(cmd, info_name=name, parent=ctx) if cmd else None)
            ctx.exit(err.exit_code)
        except PersimmonToolsError as err:
            if ctx.meta.get(_DEBUG_KEY):
                raise
            report_error(err)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; temporary output was removed.", err=True)
            ctx.exit(130)
        except OSError as err:
            if isinstance(err, BrokenPipeError) and _stdout_reader_gone():
                # Point stdout at /dev/null so that flushing it at exit cannot fail as well.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                ctx.exit(EXIT_STDOUT_CLOSED)
            if ctx.meta.get(_DEBUG_KEY):
                raise
            click.secho(f"Error: {err.strerror or err} ({err.filename or 'no file'})", err=True, fg="red")
            click.echo(
                "Hint: check the path, free disk space and permissions; --debug shows the traceback.",
                err=True,
            )
            ctx.exit(EXIT_FAILURE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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

    Tearing down an interpreter that has imported torch takes ~0.35 s here (``python -c "import torch"``:
    1.07 s; with ``os._exit(0)`` at the end: 0.71 s), which is 4% of converting an 8B release. When a
    command returns, its work is done: outputs renamed into place, temporary folders removed, threads
    joined. So the streams and logging are flushed and the process exits with the command's code. An
    unexpected exception (a bug) takes the normal path, with its traceback.
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


def _register() -> None:
    from persimmon_tools.cli import commands_core

    for cmd in commands_core.COMMANDS:
        main.add_command(cmd)
    for mod_name in ("commands_tokenizer", "commands_verify", "commands_push"):
        try:
            mod = __import__(f"persimmon_tools.cli.{mod_name}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as err:  # a command module not written yet
            if err.name != f"persimmon_tools.cli.{mod_name}":
                raise
            continue
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register()
