"""The generic mapping engine: apply THE TABLE to a checkpoint and account for every key.

Every source key must match exactly one rule (mapped or dropped); every expected target must be produced
exactly once with the expected shape. All problems are collected and raised together in one MappingError.

Keys the user drops on purpose (``convert --drop-key PATTERN``, :func:`drop_keys`) are taken out first, so
they are never reported as unknown; a target whose only source was dropped is still reported as missing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from persimmon_tools.conversion.config import ModelDims
from persimmon_tools.errors import MappingError, UsageError
from persimmon_tools.mapping import RULES, match_source, source_matches
from persimmon_tools.megatron.checkpoint import Checkpoint, MergedTensor

_MAX_LISTED = 20
#: dtypes a model weight can have (a damaged or hostile pickle can name int, bool or complex storages).
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: HF name, the merged Megatron source, and the dtype it is written in."""

    target: str
    source: MergedTensor
    shape: tuple[int, ...]
    out_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.out_dtype.itemsize


def _leaf_key(leaf: str) -> str:
    """The key of a ``Checkpoint.non_tensor_leaves`` entry (``"key (type)"``)."""
    return leaf.rsplit(" (", 1)[0] if leaf.endswith(")") else leaf


def source_keys(ckpt: Checkpoint) -> list[str]:
    """Every flattened Megatron key of ``ckpt``: tensors and non-tensor leaves (what --drop-key matches)."""
    return [*ckpt.tensors, *map(_leaf_key, ckpt.non_tensor_leaves)]


def drop_keys(keys: Iterable[str], patterns: Sequence[str]) -> dict[str, str]:
    """``{key: first pattern matching it}`` for the flattened Megatron ``keys`` that ``patterns`` drop.

    Patterns are ``fnmatch`` globs matched case-sensitively against the whole dotted key (``*`` also
    matches dots). A pattern that matches no key raises :class:`UsageError`: a typo must not pass silently.
    """
    keys = list(keys)
    dropped: dict[str, str] = {}
    unmatched = []
    for pattern in patterns:
        hits = [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
        if not hits:
            unmatched.append(pattern)
        for key in hits:
            dropped.setdefault(key, pattern)
    if unmatched:
        near = sorted(keys)[:3]
        raise UsageError(
            f"--drop-key {' / '.join(map(repr, unmatched))} matches none of the checkpoint's {len(keys)} keys "
            f"(e.g. {', '.join(near)})",
            hint="patterns are fnmatch globs over the whole flattened Megatron key, e.g. "
            "'language_model.encoder.layers.*.extra_adapter.*'; `persimmon-tools inspect SOURCE` lists the keys",
        )
    return dropped


def plan_conversion(
    ckpt: Checkpoint,
    dims: ModelDims,
    out_dtype: torch.dtype | None = None,
    drop: Sequence[str] = (),
) -> list[PlannedTensor]:
    """Map every Megatron key to its HF target in HF order; raise one MappingError listing all problems.

    ``out_dtype`` None keeps each tensor's source dtype. ``drop``: fnmatch patterns of source keys (tensors
    or non-tensor leaves) to leave out on purpose (:func:`drop_keys`).
    """
    dropped = drop_keys(source_keys(ckpt), drop)
    problems: list[str] = [
        f"unexpected non-tensor value at {leaf}"
        for leaf in ckpt.non_tensor_leaves
        if _leaf_key(leaf) not in dropped
    ]
    produced: dict[str, PlannedTensor] = {}
    reported: set[str] = set()  # targets whose source was already reported (no second "missing" line)
    lost: dict[str, str] = {}  # target -> why its source is gone (dropped by a pattern)
    for key, merged in ckpt.tensors.items():
        if key in dropped:
            target = _target_of(key)
            if target is not None:
                lost[target] = f"{key} was dropped by --drop-key {dropped[key]!r}"
            continue
        matches = source_matches(key)
        if not matches:
            problems.append(f"unknown source key {key} {list(merged.shape)} (no rule maps it)")
            continue
        if len(matches) > 1:
            problems.append(f"source key {key} matches {len(matches)} rules")
            continue
        rule, layer, target = matches[0].rule, matches[0].layer, matches[0].target
        if layer is not None and layer >= dims.num_layers:
            problems.append(f"{key}: layer {layer} is beyond num_layers {dims.num_layers}")
            continue
        expected = rule.shape_for(dims.symbols())
        if target is not None:
            reported.add(target)
        if tuple(merged.shape) != expected:
            problems.append(f"{key}: shape {list(merged.shape)}, expected {list(expected)}")
            continue
        if merged.dtype not in _WEIGHT_DTYPES:
            problems.append(f"{key}: dtype {str(merged.dtype).removeprefix('torch.')} is not a weight dtype")
            continue
        if target is None:
            continue  # dropped on purpose (inv_freq)
        if not dims.flag(rule.when):
            problems.append(f"{key} present although {rule.when} is off")
            continue
        if target in produced:
            problems.append(
                f"{target} would be produced twice (from {produced[target].source.key} and {key})"
            )
            continue
        produced[target] = PlannedTensor(target, merged, expected, out_dtype or merged.dtype)

    ordered: list[PlannedTensor] = []
    for target in expected_targets(dims):
        if target in produced:
            ordered.append(produced.pop(target))
        elif target not in reported:
            why = f" ({lost[target]})" if target in lost else ""
            problems.append(f"missing: no source tensor for {target}{why}")
    if problems:
        listed = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise MappingError(
            f"{len(problems)} problem(s) mapping {ckpt.release.source} to HF Persimmon:\n  - "
            + "\n  - ".join(listed)
            + more,
            hint="`persimmon-tools inspect SOURCE` lists every tensor; the checkpoint may be damaged or of "
            "another architecture",
        )
    return ordered


def _target_of(key: str) -> str | None:
    """The HF target THE TABLE maps ``key`` to (None: no rule, several rules, or dropped by the table)."""
    match = match_source(key)
    return None if match is None else match.target


def expected_targets(dims: ModelDims) -> list[str]:
    """Every HF key a complete conversion produces, in HF order (embeddings, layers, final norm, head)."""
    out: list[str] = []
    layered = [r for r in RULES if r.target and r.per_layer and dims.flag(r.when)]
    flat = [r for r in RULES if r.target and not r.per_layer and dims.flag(r.when)]
    out += [r.target for r in flat if r.target.startswith("model.embed")]
    for i in range(dims.num_layers):
        out += [r.target_key(i) for r in layered]
    out += [r.target for r in flat if not r.target.startswith("model.embed")]
    return out
