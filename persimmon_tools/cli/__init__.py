"""The ``persimmon-tools`` command line: a click group over the library.

Each command lives in its own module and calls one library function, then renders the result. This file
holds the only place where library errors become ``Error:``/``Hint:`` text and exit codes (the table is
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
from typing import Any, NoReturn

import click

from persimmon_tools import __version__
from persimmon_tools.errors import EXIT_CODES, EXIT_FAILURE, PersimmonToolsError

_DEBUG_KEY = "persimmon_tools.debug"
_QUIET_KEY = "persimmon_tools.quiet"
_JSON_KEY = "persimmon_tools.json"  # the running command was given --json
_JSON_DONE_KEY = "persimmon_tools.json_printed"  # ... and has printed its JSON document already


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
    click.get_current_context().meta[_JSON_DONE_KEY] = True


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
        ctx.meta[_JSON_KEY] = bool(kwargs.get("as_json"))  # parsed: wins over the raw-args guess of invoke()
        level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
        return func(*args, **kwargs)

    return wrapper


def is_quiet() -> bool:
    """Whether the running command was given ``--quiet`` (progress bars off)."""
    return bool(click.get_current_context().meta.get(_QUIET_KEY, False))


def _fail(ctx: click.Context, message: str, hint: str | None, exit_code: int, kind: str) -> NoReturn:
    """The one way a command fails: ``Error:``/``Hint:`` on stderr, with ``--json`` also an error object on
    stdout (unless the command printed its own JSON document already), then exit with ``exit_code``."""
    click.secho(f"Error: {message}", err=True, fg="red")
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    if ctx.meta.get(_JSON_KEY) and not ctx.meta.get(_JSON_DONE_KEY):
        error = {"message": message, "hint": hint, "exit_code": exit_code, "type": kind}
        with contextlib.suppress(OSError):  # stdout closed: stderr has said it
            click.echo(json.dumps({"error": error}, indent=2))
        ctx.meta[_JSON_DONE_KEY] = True
    ctx.exit(exit_code)


def _wants_json(args: list[str]) -> bool:
    """Whether raw command-line ``args`` hold ``--json`` (before ``--``): for errors raised while click parses
    them, before ``common_options`` has the parsed value."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def _command_path(ctx: click.Context | None) -> str:
    """``persimmon-tools convert`` whatever the program was invoked as (``main`` under CliRunner)."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["persimmon-tools", *names])


def _click_error_hint(err: click.ClickException, fallback: click.Context | None = None) -> str:
    """The ``Hint:`` for click's own errors (unknown option, missing argument, bad choice): usage and --help."""
    ctx = getattr(err, "ctx", None) or fallback
    path = _command_path(ctx)
    usage = ""
    if ctx is not None:
        usage = "usage: " + " ".join([path, *ctx.command.collect_usage_pieces(ctx)]) + "; "
    return f"{usage}run `{path} --help` for every option and examples"


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
        wants_json = _wants_json(list(args))
        try:  # the group's own options and the command name; a command's options fail in invoke()
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:
            ctx = click.Context(self, info_name=info_name, parent=parent)
            ctx.meta[_JSON_KEY] = wants_json
            _fail(ctx, err.format_message(), _click_error_hint(err), err.exit_code, "UsageError")

    def invoke(self, ctx: click.Context) -> Any:
        _install_sigterm_handler()
        pending = getattr(ctx, "_protected_args", None)  # click >= 8.2; before: protected_args
        pending = ctx.protected_args if pending is None else pending
        ctx.meta[_JSON_KEY] = _wants_json([*pending, *ctx.args])  # common_options then sets the parsed value
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:  # parsing the command's arguments and options
            name = ctx.invoked_subcommand
            cmd = self.get_command(ctx, name) if name else None
            hint = _click_error_hint(err, click.Context(cmd, info_name=name, parent=ctx) if cmd else None)
            _fail(ctx, err.format_message(), hint, err.exit_code, "UsageError")
        except PersimmonToolsError as err:
            if ctx.meta.get(_DEBUG_KEY):
                raise
            _fail(ctx, err.message, err.hint, err.exit_code, type(err).__name__)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted; temporary output was removed.", None, 130, "Interrupted")
        except OSError as err:
            if isinstance(err, BrokenPipeError) and _stdout_reader_gone():
                # Point stdout at /dev/null so that flushing it at exit cannot fail as well.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                ctx.exit(EXIT_STDOUT_CLOSED)
            if ctx.meta.get(_DEBUG_KEY):
                raise
            _fail(
                ctx,
                f"{err.strerror or err} ({err.filename or 'no file'})",
                "check the path, free disk space and permissions; --debug shows the traceback.",
                EXIT_FAILURE,
                type(err).__name__,
            )


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


def _add(cmd: click.Command) -> None:
    """Register a command; its ``--help`` ends with the one exit code table."""
    cmd.epilog = exit_codes_epilog()
    main.add_command(cmd)


def _register() -> None:
    from persimmon_tools.cli import commands_core

    for cmd in commands_core.COMMANDS:
        _add(cmd)
    for mod_name in ("commands_tokenizer", "commands_verify", "commands_push", "commands_export"):
        try:
            mod = __import__(f"persimmon_tools.cli.{mod_name}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as err:  # a command module not written yet
            if err.name != f"persimmon_tools.cli.{mod_name}":
                raise
            continue
        for cmd in mod.COMMANDS:
            _add(cmd)


_register()
