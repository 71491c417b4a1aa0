"""Click parameter types that validate option values before any work starts.

Each type turns a malformed value into a :class:`~persimmon_tools.errors.UsageError` that names the flag,
what it expected and what it got, with a hint; the CLI renders it as ``Error:``/``Hint:`` and exits 2.
"""

from __future__ import annotations

import os
import re
from typing import Any

import click

from persimmon_tools.conversion.sizes import SIZE_HINT, parse_size
from persimmon_tools.errors import UsageError

_MAX_INT = 2**63 - 1  # what Megatron, torch and safetensors can store


def flag_name(param: click.Parameter | None) -> str:
    """``--max-shard-size`` for an option, ``SOURCE`` for an argument."""
    if param is None:
        return "value"
    if isinstance(param, click.Option) and param.opts:
        return max(param.opts, key=len)
    return (param.name or "value").upper()


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(param: click.Parameter | None, value: Any, expected: str, hint: str) -> UsageError:
    return UsageError(f"{flag_name(param)} {_shown(value)}: expected {expected}", hint=hint)


class Size(click.ParamType):
    """A byte count: ``5GB``, ``2GiB``, ``500MB``, ``1.5GB`` or plain bytes (``1048576``) -> int
    (:func:`persimmon_tools.conversion.sizes.parse_size`)."""

    name = "size"
    hint = SIZE_HINT

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as err:
            raise fail(param, value, str(err).removeprefix("expected "), self.hint) from None


class BoundedInt(click.ParamType):
    """An integer in ``[low, high]`` (decimal digits only: no ``1e3``, ``0x10`` or ``1_000``)."""

    name = "integer"

    def __init__(self, low: int, high: int = _MAX_INT, what: str = "an integer") -> None:
        self.low, self.high, self.what = low, high, what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?\d{1,30}", text, re.ASCII):
                raise fail(param, value, f"{self.what} from {self.low} to {self.high}", self._hint(param))
            number = int(text)
        if not self.low <= number <= self.high:
            raise fail(param, value, f"{self.what} from {self.low} to {self.high}", self._hint(param))
        return number

    def _hint(self, param: click.Parameter | None) -> str:
        return f"e.g. {flag_name(param)} {max(self.low, min(self.high, 1))}"


POSITIVE_INT = BoundedInt(1, 4096, "a whole number")
ITERATION = BoundedInt(0, _MAX_INT, "an iteration number")
SEED = BoundedInt(0, 2**32 - 1, "a seed")  # numpy's RandomState (the rng state Megatron saves)
SIZE = Size()


class TokenIds(click.ParamType):
    """``71013,1,2`` or ``"71013 1 2"`` -> a tuple of non-negative ints."""

    name = "ids"
    hint = "comma- or space-separated token ids, e.g. --ids 71013,1,2"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        parts = str(value).replace(",", " ").split()
        if not parts or not all(re.fullmatch(r"\d{1,10}", p, re.ASCII) for p in parts):
            raise fail(param, value, "one or more non-negative integer token ids", self.hint)
        ids = tuple(int(p) for p in parts)
        if max(ids) >= 2**31:
            raise fail(param, value, "token ids below 2**31", self.hint)
        return ids


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", text, re.ASCII):
            return text
        raise fail(param, value, "auto, cpu, cuda or cuda:N", "e.g. --device cpu, --device cuda:1")


class Text(click.ParamType):
    """Non-empty text that can be written as UTF-8 (no lone surrogates from undecodable argv bytes)."""

    name = "text"

    def __init__(self, what: str = "text", hint: str = "quote it in the shell") -> None:
        self.what, self.hint = what, hint

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text.strip():
            raise fail(param, value, f"non-empty {self.what}", self.hint)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise fail(
                param, value, f"{self.what} that is valid UTF-8", "check the terminal's encoding"
            ) from None
        return text


class DType(click.Choice):
    """``bf16``/``fp16``/``fp32`` (plus ``auto`` where allowed), also spelled as torch and transformers spell
    them (``bfloat16``, ``float16``, ``float32``); the value passed on is always the short name."""

    ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

    def __init__(self, *names: str) -> None:
        super().__init__(list(names))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value).strip().lower().removeprefix("torch.")
        return super().convert(self.ALIASES.get(text, text), param, ctx)


def _undecodable(value: Any) -> tuple[str, list[int]] | None:
    """``(shown, bad bytes)`` when ``value`` (a str or path) holds bytes that are not UTF-8 (Python surfaces
    them as lone surrogates): ``shown`` has them as ``\\xff``. None when it is clean."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    text = os.fspath(value)
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        bad = sorted({ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF})
        return os.fsencode(text).decode("utf-8", "backslashreplace"), bad
    return None


def refuse_undecodable(ctx: click.Context) -> None:
    """Refuse, before the command runs, every argument and option value (paths, names, texts, each item of
    a repeatable one) holding bytes that are not UTF-8 (e.g. a file name with byte 0xff from the shell):
    the toolkit writes paths into UTF-8 JSON records, safetensors metadata and tokenizer files, which cannot
    hold them. One check for every command (:class:`persimmon_tools.cli.failures.Command` calls it)."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        for item in value if isinstance(value, (tuple, list)) else (value,):
            found = _undecodable(item)
            if found is None:
                continue
            shown, bad = found
            is_path = isinstance(param.type, click.Path)
            what = "a path" if is_path else "text"
            listed = ("byte " if len(bad) == 1 else "bytes ") + ", ".join(f"0x{b:02x}" for b in bad)
            listed = listed if bad else "a lone surrogate"
            raise UsageError(
                f"{flag_name(param)} '{shown}': expected {what} that is valid UTF-8, but it holds {listed}",
                hint="rename it to a UTF-8 name (or pass a symbolic link with a UTF-8 name): persimmon-tools "
                "records paths in UTF-8 JSON and file metadata"
                if is_path
                else "check the terminal's encoding",
            )


class SafePath(click.Path):
    """``click.Path`` that refuses NUL characters (which the OS cannot take) with a usage error."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if "\x00" in str(value):
            raise fail(param, value, "a path without NUL characters", "check the quoting of the argument")
        return super().convert(value, param, ctx)


TOKEN_IDS = TokenIds()
DEVICE = Device()
PROMPT = Text("prompt text", 'e.g. --prompt "human: Hi\\n\\nadept:"')
PATTERN = Text("glob pattern", "e.g. --drop-key 'language_model.encoder.layers.*.extra_adapter.*'")
