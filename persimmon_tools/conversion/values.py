"""What the written values may not do: NaN/Inf in the source, finite values that a cast turns into ±inf.

The writer (:mod:`persimmon_tools.conversion.writer`) counts both per tensor while it streams row blocks;
:func:`refuse_bad_values` turns the counts into one :class:`ConversionError` before the output folder is
renamed into place, so a refused conversion leaves nothing behind.

Casts the converter can make (``--dtype`` against the checkpoint's own dtype): every floating pair. A cast
*narrows* when the target's largest finite value is below the source's (fp32/fp64 → bf16 or fp16,
bf16 → fp16, fp64 → fp32); only those can overflow. Widening casts and same-dtype copies are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from persimmon_tools.errors import ConversionError, UsageError

#: The names ``--dtype`` uses, for messages (fp64 only ever appears as a source dtype).
DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
_LISTED = 10

#: ``--dtype`` of convert and export: a name → the dtype written (``auto``: None, each tensor's own).
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def output_dtype(name: str) -> torch.dtype | None:
    """The dtype ``--dtype name`` writes (None for ``auto``); an unknown name is a :class:`UsageError`."""
    if name not in DTYPES:
        raise UsageError(
            f"--dtype {name!r} is not one of {', '.join(DTYPES)}",
            hint="use --dtype auto to keep the checkpoint's own dtype bit for bit",
        )
    return DTYPES[name]


@dataclass
class WriteStats:
    """What writing saw: per-tensor counts of finite values that a cast turned into ±inf (``overflow``, with
    the dtype each tensor was cast to in ``overflow_dtype``) and of NaN/Inf source values (``nonfinite``)."""

    tensors: int = 0
    bytes_written: int = 0
    overflow: dict[str, int] = field(default_factory=dict)
    overflow_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16``/``fp16``/``fp32``/``fp64`` (the ``--dtype`` spelling), else torch's name."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def count_nonfinite(block: torch.Tensor) -> int:
    """NaN/Inf count, screened first with ``aminmax`` (8 GB/s on bf16; NaN and ±inf propagate to it)."""
    if not block.is_floating_point() or block.numel() == 0:
        return 0
    lo, hi = torch.aminmax(block)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    return block.numel() - int(torch.isfinite(block).sum())


def narrows(src: torch.dtype, out: torch.dtype) -> bool:
    """Whether casting ``src`` to ``out`` can turn finite values into ±inf (module docstring)."""
    return src.is_floating_point and out.is_floating_point and torch.finfo(out).max < torch.finfo(src).max


def count_overflow(block: torch.Tensor, cast: torch.Tensor) -> int:
    """Values finite in ``block`` whose cast result ``cast`` is ±inf.

    What counts is the rounded result, not a comparison with ``finfo(out).max``: a value slightly above the
    maximum rounds down to it and is kept exactly as a cast keeps any value. Screened first with ``aminmax``
    of the source: when every value is within ``finfo(cast.dtype).max`` nothing can round to inf (a NaN in
    the block makes the screen fall through to the exact count, which ignores NaN)."""
    if block.numel() == 0:
        return 0
    lo, hi = torch.aminmax(block)
    bound = torch.finfo(cast.dtype).max
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and max(-float(lo), float(hi)) <= bound:
        return 0
    return int(torch.isinf(cast).logical_and(torch.isfinite(block)).sum())


def _wider_choices(out: torch.dtype) -> list[str]:
    wider = [d for d in (torch.bfloat16, torch.float32) if torch.finfo(d).max > torch.finfo(out).max]
    return [f"--dtype {dtype_name(d)}" for d in wider]


def refuse_bad_values(stats: WriteStats, *, allow_nonfinite: bool, allow_overflow: bool) -> None:
    """Raise :class:`ConversionError` for NaN/Inf source values or cast overflow, unless allowed."""
    if stats.nonfinite and not allow_nonfinite:
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(stats.nonfinite.items())[:_LISTED])
        raise ConversionError(
            f"the checkpoint holds NaN/Inf values in {len(stats.nonfinite)} tensor(s) ({listing}); nothing was written",
            hint="the checkpoint is damaged (re-download it) or diverged in training; --allow-nonfinite converts anyway",
        )
    if not stats.overflow or allow_overflow:
        return
    by_dtype: dict[torch.dtype, dict[str, int]] = {}
    for name, count in sorted(stats.overflow.items()):
        by_dtype.setdefault(stats.overflow_dtype.get(name, torch.float16), {})[name] = count
    # --dtype casts every tensor to one dtype, so there is one group; more are listed one after the other.
    parts = []
    for out, counts in by_dtype.items():
        listing = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:_LISTED])
        more = f", ... {len(counts) - _LISTED} more tensor(s)" if len(counts) > _LISTED else ""
        parts.append(
            f"{sum(counts.values())} value(s) exceed the {dtype_name(out)} range "
            f"(±{torch.finfo(out).max:.6g}) and would become inf ({listing}{more})"
        )
    narrowest = min(by_dtype, key=lambda d: torch.finfo(d).max)
    choices = ["--dtype auto (the checkpoint's own dtype, bit for bit)", *_wider_choices(narrowest)]
    raise ConversionError(
        "; ".join(parts) + "; nothing was written",
        hint=f"use {' or '.join(choices)}; --allow-overflow writes them as inf anyway",
    )
