"""``ckpt["args"]`` ↔ JSON, both directions, for ``conversion.json`` (``convert`` writes, ``export`` reads).

A Megatron ``argparse.Namespace`` holds plain values (numbers, strings, lists), a torch dtype
(``params_dtype``) and ADEPT's ``ModelBackend`` enum (spec §B.4; read as an inert stand-in). The record keeps
the plain values under ``args`` as they are, and the others under ``args_special`` in a tagged form:
``{"torch_dtype": "bfloat16"}``, ``{"tuple": [...]}`` or ``{"enum": "tool_use.megatron.megatron_utils.ModelBackend", "value":
"megatron"}``. Values of other classes are listed under ``args_dropped`` by name and type.

:func:`restore_args` is the inverse, with one deliberate difference: an enum comes back as its plain value
(``"megatron"``), because an exported checkpoint must load without ADEPT's code (no custom classes in the
pickle); ADEPT's loader never reads ``model_backend``.

Every walk over the args spends a :class:`~persimmon_tools.safe_graph.Budget` (a pickle can share one list
a million times; CheckpointError past it).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.safe_graph import Budget

_PLAIN = (bool, int, str, type(None))


def _budget() -> Budget:
    """What reading one checkpoint's args may visit (a pickle can share one list a million times)."""
    return Budget(
        "the checkpoint's args",
        CheckpointError,
        hint="real Megatron args hold a few hundred plain values; the file is corrupt or was tampered with",
    )


def _is_plain(value: Any, budget: Budget, depth: int = 0) -> bool:
    """JSON holds ``value`` as it is: finite numbers, strings, lists/tuples and str-keyed dicts nested at most
    4 deep. Every value visited (a shared one once per visit) is spent from ``budget``."""
    budget.visit(value, depth)
    if isinstance(value, float):
        return math.isfinite(value)  # JSON has no NaN/inf
    if isinstance(value, _PLAIN):
        return True
    if depth < 4 and isinstance(value, (list, tuple)):
        return all(_is_plain(v, budget, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, budget, depth + 1) for k, v in value.items())
    return False


def args_fields(args: Any) -> dict[str, Any] | None:
    """The fields of an ``argparse.Namespace`` (or of a stand-in's state, or a dict); None when absent."""
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    state = getattr(args, "state", None)
    return dict(state) if isinstance(state, dict) else None


def enum_value(value: Any, budget: Budget | None = None) -> tuple[str, Any] | None:
    """``(class name, value)`` of an enum member or an enum stand-in holding one plain value, else None."""
    budget = _budget() if budget is None else budget
    qualname = getattr(value, "qualname", None)
    args = getattr(value, "args", None)
    if (
        isinstance(qualname, str)
        and isinstance(args, tuple)
        and len(args) == 1
        and _is_plain(args[0], budget)
    ):
        return qualname, args[0]
    member = getattr(value, "value", None)
    if hasattr(type(value), "__members__") and _is_plain(member, budget):
        return f"{type(value).__module__}.{type(value).__qualname__}", member
    return None


def record_args(args: Any) -> dict[str, Any]:
    """``{"args": {...}, "args_special": {...}, "args_dropped": [...]}`` for ``conversion.json``."""
    fields = args_fields(args)
    if fields is None:
        return {"args": None, "args_special": {}, "args_dropped": []}
    plain, special, dropped = {}, {}, []
    budget = _budget()  # one for all fields
    for name, value in sorted(fields.items()):
        is_plain = _is_plain(value, budget)
        if isinstance(value, tuple) and is_plain:
            special[name] = {"tuple": list(value)}
        elif is_plain:
            plain[name] = value
        elif isinstance(value, torch.dtype):
            special[name] = {"torch_dtype": str(value).removeprefix("torch.")}
        elif (enum := enum_value(value, budget)) is not None:
            special[name] = {"enum": enum[0], "value": enum[1]}
        else:
            dropped.append(f"{name} ({type(value).__name__})")
    return {"args": plain, "args_special": special, "args_dropped": dropped}


def restore_args(record: dict[str, Any]) -> dict[str, Any] | None:
    """The args fields a :func:`record_args` record describes (enums as their plain values)."""
    plain = record.get("args")
    if not isinstance(plain, dict):
        return None
    out = dict(plain)
    special = record.get("args_special")
    for name, tagged in (special if isinstance(special, dict) else {}).items():
        if not isinstance(tagged, dict):
            continue
        if "torch_dtype" in tagged:
            dtype = getattr(torch, str(tagged["torch_dtype"]), None)
            if isinstance(dtype, torch.dtype):
                out[name] = dtype
        elif isinstance(tagged.get("tuple"), list):
            out[name] = tuple(tagged["tuple"])
        elif "enum" in tagged and _is_plain(tagged.get("value"), _budget()):
            out[name] = tagged["value"]
    return out
