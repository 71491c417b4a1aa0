"""The value types push relies on in a converted folder's records (``conversion.json``, ``verification.json``).

``push`` reads fields of both records for the verification check, the commit message and the model card. A
record that is valid JSON but holds a value of another type (``"output_files": 5``, ``"passed": "yes"``, a
list where an object belongs) would fail deep inside those with a traceback; :func:`check_record_types`
refuses it first, as a :class:`~persimmon_tools.errors.HubError` naming the file and the key. ``null`` is
accepted for a key (a value the run did not know), not for an item of a list or object; keys a record does
not have are not required. :func:`read_record` reads a record of the folder (never through a link) and
checks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persimmon_tools.errors import HubError
from persimmon_tools.safe_read import read_json_record
from persimmon_tools.tokenizer.fingerprint import CONVERSION_KEY

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_DICT = (dict,)
_LIST = (list,)
_SCALAR = (str, int, float, bool)

_SOURCE = {"name": _STR, "path": _STR, "kind": _STR, "variant": _STR, "variant_from": _STR}
_SOURCE |= {"iteration": _INT, "tp": _INT, "pp": _INT}
_FILE_ENTRY = {"name": _STR, "size": _INT, "sha256": _STR}
_ENVIRONMENT = "persimmon_tools commit python torch transformers tokenizers device dtype date".split()

#: ``key path -> allowed types``; ``[]`` stands for every item of a list, ``{}`` for every value of an object.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "conversion.json": {
        "tool": _STR,
        "tool_version": _STR,
        "created": _STR,
        "dtype": _STR,
        "num_parameters": _INT,
        "output_files": _LIST,
        "output_files[]": _STR,
        "tokenizer": _DICT,
        "tokenizer.parity": _SCALAR,
        "source": _DICT,
        **{f"source.{k}": v for k, v in _SOURCE.items()},
        "source.checkpoint_files": _LIST,
        "source.checkpoint_files[]": _DICT,
        **{f"source.checkpoint_files[].{k}": v for k, v in _FILE_ENTRY.items()},
        # since 2026-12-07: persimmon_tools.tokenizer.fingerprint's record
        CONVERSION_KEY: _DICT,
        **{f"{CONVERSION_KEY}.{k}": _STR for k in ("probe", "sha256", "scheme")},
        f"{CONVERSION_KEY}.ids": _LIST,
        f"{CONVERSION_KEY}.ids[]": _INT,
    },
    "verification.json": {
        "tool": _STR,
        "tool_version": _STR,
        "created": _STR,
        "verdict": _STR,
        "device": _STR,
        "dtype": _STR,
        "rotary": _STR,
        "converted_loader": _STR,
        "files": _DICT,
        "files{}": _DICT,
        "files{}.sha256": _STR,
        "files{}.size": _INT,
        "source": _DICT,
        **{f"source.{k}": v for k, v in _SOURCE.items()},
        "source.files": _LIST,
        "source.files[]": _DICT,
        **{f"source.files[].{k}": v for k, v in _FILE_ENTRY.items()},
        "tolerances": _DICT,
        "tolerances.name": _STR,
        **{f"tolerances.{k}": _NUM for k in ("max_rel", "mean_rel", "kl")},
        "metrics": _LIST,
        "metrics[]": _DICT,
        "metrics[].prompt": _STR,
        "metrics[].passed": _BOOL,
        "metrics[].tokens": _INT,
        **{
            f"metrics[].{k}": _NUM
            for k in ("max_abs_diff", "mean_abs_diff", "kl_div", "top1_agreement", "top5_agreement")
        },
        # since 2026-12-07: the environment, the checks, greedy generation and the KL summary (the card's
        # tables; persimmon_tools.hub.card_checks). A check's figures may be of any JSON type.
        "environment": _DICT,
        **{f"environment.{k}": _SCALAR for k in _ENVIRONMENT},
        "checks": _LIST,
        "checks[]": _DICT,
        **{f"checks[].{k}": _STR for k in ("name", "command", "status")},
        "generation": _DICT,
        "generation.new_tokens": _INT,
        "generation.prompts": _LIST,
        "generation.verdict": _STR,
        "generation.rule": _STR,
        "kl": _DICT,
        "kl.overall": _DICT,
        **{f"kl.overall.{k}": _NUM for k in ("p50", "p90", "p99", "max", "top1_agreement", "same_top_p")},
        "kl.prompts": _LIST,
    },
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _expected(types: tuple[type, ...]) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "a whole number",
        float: "a number",
        bool: "true or false",
    }
    if types == _NUM:
        return "a number"
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _matches(value: Any, types: tuple[type, ...], nullable: bool) -> bool:
    if value is None:
        return nullable
    if isinstance(value, bool):  # JSON true/false is no number
        return bool in types
    return isinstance(value, types)


def _walk(data: Any, pattern: str, shown: str = "") -> list[tuple[str, Any]]:
    """Every ``(key path as shown, value)`` that ``pattern`` names in ``data`` (present ones only)."""
    if not pattern:
        return [(shown, data)]
    head, _, rest = pattern.partition(".")
    key, suffix = head.rstrip("[]{}"), head[len(head.rstrip("[]{}")) :]
    if not isinstance(data, dict) or key not in data:
        return []
    value, where = data[key], f"{shown}.{key}" if shown else key
    if suffix == "[]":
        items = list(enumerate(value)) if isinstance(value, list) else []
        return [hit for i, item in items for hit in _walk(item, rest, f"{where}[{i}]")]
    if suffix == "{}":
        items = list(value.items()) if isinstance(value, dict) else []
        return [hit for k, item in items for hit in _walk(item, rest, f"{where}[{k!r}]")]
    return _walk(value, rest, where)


def check_record_types(path: Path, data: dict[str, Any]) -> None:
    """Raise :class:`HubError` naming ``path`` and the first key whose value has a type push cannot use
    (see :data:`SCHEMAS`, chosen by the file's name; other files are not checked)."""
    schema = SCHEMAS.get(Path(path).name)
    if schema is None:
        return
    for pattern, types in schema.items():
        nullable = not pattern.endswith(("[]", "{}"))  # an item of a list or object is never null
        for where, value in _walk(data, pattern):
            if not _matches(value, types, nullable):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise HubError(
                    f"{path}: key {where!r} is {_type_name(value)} ({shown}), expected {_expected(types)}",
                    hint=f"{Path(path).name} is damaged or was edited; run `persimmon-tools "
                    f"{'convert' if Path(path).name == 'conversion.json' else 'verify'}` again to re-create "
                    "it",
                )


def read_record(folder: Path, name: str) -> dict[str, Any] | None:
    """A JSON record of the folder as a dict, or ``None`` when it is missing.

    A record that is there but is a link, FIFO or other non-regular file, larger than
    :data:`~persimmon_tools.safe_read.MAX_JSON_BYTES`, not UTF-8 JSON or not a JSON object raises
    :class:`~persimmon_tools.errors.HubError` naming the file (it is never read through a link), and so does
    a value of a type push cannot use (:func:`~persimmon_tools.hub.records.check_record_types`).
    """
    record = read_json_record(
        Path(folder) / name,
        what=f"the {name} record",
        error=HubError,
        hint=f"{name} is damaged; convert (or verify) again to re-create it",
    )
    if record is not None:
        check_record_types(Path(folder) / name, record)  # a value of the wrong type: named, no traceback
    return record
