"""verify's own checks of two things a release says beside its weights, written apart from the converter's.

The converter applies the same rules (:mod:`persimmon_tools.megatron.consistency` for
``checkpoint_version``, :mod:`persimmon_tools.conversion.rotary` for ``inv_freq``); verify's reference side
must not import them (an import-linter contract in ``pyproject.toml``), so that a mistake there cannot hide
here. Both are written from the spec and Megatron-LM's loader:

- ``checkpoint_version`` (:func:`checkpoint_version`): every shard records the same one, or none. None is
  accepted: ADEPT's inference code never reads the key (spec §B.1), and its releases were written and served
  by that code. A recorded one must be a finite real number of at least 2.0; Megatron-LM's loader reorders
  the fused query_key_value rows of older checkpoints (``fix_query_key_value_ordering``), which the
  reference does not do, so it would compute with rows in an order Megatron never used.
- ``rotary_emb.inv_freq`` (:func:`stored_inv_freq_problems`): ADEPT computes every layer with the buffer
  stored for it (a persistent buffer, spec §B.2, §F.4), while the converted model recomputes one from
  ``rope_theta``. Every layer's buffer must therefore be the one the reference's base gives, up to the
  rounding of its dtype. Copies on other tensor-parallel ranks were compared byte for byte when the shards
  were merged (:mod:`persimmon_tools.verification.source_merge`), so one copy per layer is read.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.safe_graph import small_repr

MIN_VERSION = 2.0
_INV_FREQ = re.compile(r"^language_model\.encoder\.layers\.([0-9]+)\.self_attention\.rotary_emb\.inv_freq$")
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}  # else (bf16, fp16): 2**-7, half a bf16 ulp x 2


def _spelled(value: Any) -> str:
    """One shard's checkpoint_version as a comparable word: absent, a number (3 and 3.0 alike), or else."""
    if value is None:
        return "absent"
    if type(value) in (int, float):
        try:
            return repr(float(value))
        except OverflowError:
            return f"int of {value.bit_length()} bits"
    return f"{type(value).__name__} {small_repr(value, 60)}"


def checkpoint_version(objects: Mapping[Any, Any], labels: Mapping[Any, str]) -> float | None:
    """The release's ``checkpoint_version`` (None: recorded by no shard), once every shard agrees and it is
    one the reference computes faithfully; :class:`CheckpointError` naming the shards otherwise."""
    values = {r: o.get("checkpoint_version") if isinstance(o, dict) else None for r, o in objects.items()}
    ranks = sorted(values)
    for rank in ranks[1:]:
        if _spelled(values[rank]) != _spelled(values[ranks[0]]):
            a, b = (_spelled(values[r]) for r in (ranks[0], rank))
            raise CheckpointError(
                f"{labels[ranks[0]]} records checkpoint_version {a} but {labels[rank]} records {b}: the "
                "shards were saved by different runs or tools",
                hint="take every mp_rank_* folder of one iter_* folder from the same release",
            )
    value = values[ranks[0]]
    where = labels[ranks[0]] + (" (and every other shard)" if len(ranks) > 1 else "")
    if value is None:
        return None
    number = None
    if type(value) in (int, float):
        with contextlib.suppress(OverflowError):  # an int beyond any float
            number = float(value)
    if number is None or not math.isfinite(number):
        raise CheckpointError(
            f"{where}: checkpoint_version is {_spelled(value)}, not a finite number",
            hint="the file is corrupt or was tampered with; load and save it again with a current Megatron-LM",
        )
    if number < MIN_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint_version {value} is below {MIN_VERSION}: Megatron-LM reorders the fused "
            "query_key_value rows of such checkpoints when it loads them (fix_query_key_value_ordering), "
            "and verify's reference does not, so it cannot say what this checkpoint computes",
            hint="load and save the checkpoint again with a current Megatron-LM (it writes 3.0)",
        )
    return number


def stored_inv_freq_problems(
    tensors: Mapping[str, Any],
    where: Callable[[str], str],
    base: float,
    base_from: str,
    rotary_dim: int,
    like: Sequence[float] | None = None,
) -> list[str]:
    """One line per layer whose stored ``inv_freq`` is not ``1/base**(arange(0, rd, 2)/rd)`` (or, with
    ``like``, not ``like``: layer 0's buffer, when the base was estimated from it) up to its dtype's rounding.

    ``tensors``: merged key -> object with ``materialize()``; ``where(key)`` names the shard holding it."""
    if like is not None:
        expected = torch.tensor(list(like), dtype=torch.float64)
    elif math.isfinite(base) and base > 0 and rotary_dim > 0:
        expected = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    else:
        return []  # a base that is no number: the forward pass and the config comparison say it
    out = []
    for key, tensor in tensors.items():
        m = _INV_FREQ.match(key)
        if m is None:
            continue
        stored = tensor.materialize().reshape(-1).double()
        if stored.numel() != expected.numel():
            out.append(
                f"layer {m[1]}'s inv_freq in {where(key)} has {stored.numel()} entries, not "
                f"{expected.numel()} (rotary_dim {rotary_dim})"
            )
            continue
        rel = ((stored - expected).abs() / expected).max().item()
        if not rel <= _TOLERANCE.get(tensor.dtype, 2.0**-7):
            pts = [-math.log(f) * rotary_dim / (2 * j) for j, f in enumerate(stored.tolist()) if j and f > 0]
            implied = math.exp(sum(pts) / len(pts)) if pts else float("nan")
            out.append(
                f"layer {m[1]}'s stored inv_freq in {where(key)} implies a rotary base of about "
                f"{implied:.6g}, but the rotary base is {base:g} ({base_from})"
            )
    return out


def arg(args: Any, name: str) -> Any:
    """``args.name`` of the checkpoint's args (a Namespace, a dict or an inert stand-in); None when absent."""
    if args is None:
        return None
    if isinstance(args, dict):
        return args.get(name)
    value = getattr(args, name, None)
    state = getattr(args, "state", None)
    return state.get(name) if value is None and isinstance(state, dict) else value


#: ADEPT's args name → the name today's Megatron-LM gives the same setting (a torch_dist checkpoint's args).
MODERN_NAMES = {
    "sq_relu": "squared_relu",
    "rotary_pct": "rotary_percent",
    "rotary_emb_base": "rotary_base",
    "layernorm_epsilon": "norm_epsilon",
}


def named_arg(args: Any, name: str) -> tuple[Any, str]:
    """``(value, "args.<name found>")`` for ADEPT's ``name`` or, when absent, today's Megatron-LM name for it."""
    value = arg(args, name)
    modern = MODERN_NAMES.get(name)
    if value is None and modern is not None and arg(args, modern) is not None:
        return arg(args, modern), f"args.{modern}"
    return value, f"args.{name}"
