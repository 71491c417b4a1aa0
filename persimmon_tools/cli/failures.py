"""The one place where a failure becomes ``Error:``/``Hint:`` on stderr, an exit code and, with ``--json``,
the JSON error object on stdout.

Every command is a :class:`Command`. Its errors come from two places, both handled here: parsing its
arguments (:meth:`Command.make_context`: click's usage errors, the toolkit's parameter types and one check
of every value for bytes that are not UTF-8, :func:`~persimmon_tools.cli.params.refuse_undecodable`) and
running it (:meth:`Command.invoke`). Whether ``--json`` was asked for is what click parsed: ``ctx.params`` once the
command runs; for an error raised while parsing, before ``ctx.params`` holds the flag, a second parse of the
same arguments by the command's own click parser (:func:`json_requested`), so ``--json`` after ``--`` or as
the value of another option is no flag, exactly as for the command itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from persimmon_tools.cli.params import refuse_undecodable
from persimmon_tools.errors import EXIT_FAILURE, PersimmonToolsError

EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a tool that a closed pipe stopped
_HANDLED = (click.ClickException, PersimmonToolsError, KeyboardInterrupt, OSError)
# The flag alone, for arguments no command parsed (an unknown command, the group's own options).
JSON_FLAG_ONLY = click.Command(None, params=[click.Option(["--json", "as_json"], is_flag=True)])


class Context(click.Context):
    """A command's context; ``json_printed``: the command has printed its one JSON document (a failure
    after it, such as ``verify``'s exit 3, prints no second one)."""

    json_printed = False


def fail(ctx: click.Context, err: BaseException, *, as_json: bool) -> NoReturn:
    """``Error:``/``Hint:`` on stderr, with ``as_json`` also the error object on stdout (unless the command
    printed its own JSON document already), then exit with the error's code."""
    message, hint, exit_code, kind = _describe(err, ctx)
    click.secho(f"Error: {message}", err=True, fg="red")
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    if as_json and not getattr(ctx, "json_printed", False):
        error = {"message": message, "hint": hint, "exit_code": exit_code, "type": kind}
        with contextlib.suppress(OSError):  # stdout closed: stderr has said it
            click.echo(json.dumps({"error": error}, indent=2))
    ctx.exit(exit_code)


def _describe(err: BaseException, ctx: click.Context) -> tuple[str, str | None, int, str]:
    """``(message, hint, exit code, type)`` of a handled error (one of ``_HANDLED``)."""
    if isinstance(err, click.ClickException):
        return err.format_message(), click_error_hint(err, ctx), err.exit_code, "UsageError"
    if isinstance(err, PersimmonToolsError):
        return err.message, err.hint, err.exit_code, type(err).__name__
    if isinstance(err, KeyboardInterrupt):
        message, hint = interrupted(ctx)
        return message, hint, EXIT_INTERRUPTED, "Interrupted"
    assert isinstance(err, OSError)
    return (
        f"{err.strerror or err} ({err.filename or 'no file'})",
        "check the path, free disk space and permissions; --debug shows the traceback.",
        EXIT_FAILURE,
        type(err).__name__,
    )


_AGAIN = "run the same command again"
#: Commands whose output appears complete or not at all: (the work, the output's label, its parameter).
_STAGED = {
    "convert": ("the conversion", "OUT_DIR", "out_dir"),
    "export": ("the export", "OUT", "out"),
    "unpack": ("the extraction", "DEST", "dest"),
    "make-release": ("the release", "OUT_TAR", "out_tar"),
}


def _as_it_was(label: str, path: Any) -> str:
    """``OUT_DIR x is as it was`` or ``... was not created``: outputs appear complete or not at all, so after an
    interruption an existing one is the one from before the command."""
    if path is None:
        return f"{label} is as it was"
    return f"{label} {path} " + ("is as it was" if os.path.lexists(path) else "was not created")


def _interrupted_verify(params: dict[str, Any]) -> tuple[str, str | None]:
    out_dir, json_path = params.get("out_dir"), params.get("json_path")
    if out_dir is None:
        return "verify interrupted; nothing was written", _AGAIN
    report = Path(out_dir) / "verification.json"
    kept = "the previous one is kept" if os.path.lexists(report) else "none was written"
    also = f"; --json-file {json_path} was not written" if json_path is not None else ""
    return f"verify interrupted before it finished; {report} is unchanged ({kept}){also}", _AGAIN


def interrupted(ctx: click.Context | None) -> tuple[str, str | None]:
    """``(message, hint)`` for a Ctrl-C (or SIGTERM, SIGHUP, SIGQUIT) that stopped the command of ``ctx``: what
    it left, which is what it had before, since every output appears complete or not at all, and what to run
    next. An interruption the library describes itself (``Interrupted``: convert's automatic verify, push) is a
    PersimmonToolsError with its own message and never comes here."""
    command = ctx.command.name if ctx is not None and ctx.command is not None else None
    params: dict[str, Any] = dict(ctx.params) if ctx is not None else {}
    if command == "inspect" or params.get("dry_run") or (command == "tokenizer" and params.get("check")):
        flag = " --dry-run" if params.get("dry_run") else " --check" if params.get("check") else ""
        return f"{command}{flag} interrupted; it writes nothing", None
    if command in _STAGED:
        work, label, param = _STAGED[command]
        left = _as_it_was(label, params.get(param))
        return f"interrupted before {work} was complete; {left} (the temporary output was removed)", _AGAIN
    if command == "tokenizer":
        paths = params.get("paths") or ()
        where = f" to {paths[0]}" if len(paths) == 1 else ""
        return f"interrupted; no tokenizer file was written{where}", _AGAIN
    if command == "verify":
        return _interrupted_verify(params)
    if command == "push":  # push_folder itself describes an interruption of its work
        return "push interrupted before it began; nothing was uploaded", _AGAIN
    return "interrupted", None


def json_requested(command: click.Command, args: list[str], parent: click.Context | None) -> bool:
    """Whether click's parser of ``command`` finds the ``--json`` flag in ``args``: options unknown to it are
    skipped, and the parse stops quietly at a malformed one (what it found until then counts)."""
    probe = click.Context(command, parent=parent, resilient_parsing=True, ignore_unknown_options=True)
    opts, _, _ = command.make_parser(probe).parse_args(args=list(args))
    return bool(opts.get("as_json"))


def _command_path(ctx: click.Context | None) -> str:
    """``persimmon-tools convert`` whatever the program was invoked as (``main`` under CliRunner)."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["persimmon-tools", *names])


def click_error_hint(err: click.ClickException, fallback: click.Context | None = None) -> str:
    """The ``Hint:`` for click's own errors (unknown option, missing argument, bad choice): usage and --help."""
    ctx = getattr(err, "ctx", None) or fallback
    path = _command_path(ctx)
    usage = ""
    if ctx is not None:
        usage = "usage: " + " ".join([path, *ctx.command.collect_usage_pieces(ctx)]) + "; "
    return f"{usage}run `{path} --help` for every option and examples"


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports POLLERR on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real fd (CliRunner, closed stream)
        return False


class Command(click.Command):
    """A ``persimmon-tools`` command: its failures, while parsing or running, go through :func:`fail`."""

    context_class = Context

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        given = list(args)  # click's parser consumes the list it is given
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
            if not ctx.resilient_parsing:
                refuse_undecodable(ctx)  # every path and text value, before any work: one check
            return ctx
        except _HANDLED as err:
            ctx = Context(self, info_name=info_name, parent=parent)
            fail(ctx, err, as_json=json_requested(self, given, parent))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _HANDLED as err:
            if isinstance(err, BrokenPipeError) and _stdout_reader_gone():  # `| head`: no message
                # Point stdout at /dev/null so that flushing it at exit cannot fail as well.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                ctx.exit(EXIT_STDOUT_CLOSED)
            if ctx.params.get("debug") and isinstance(err, (PersimmonToolsError, OSError)):
                raise
            fail(ctx, err, as_json=bool(ctx.params.get("as_json")))
