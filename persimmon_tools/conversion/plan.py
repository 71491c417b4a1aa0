"""The generic mapping engine: apply THE TABLE to a checkpoint and account for every key.

Every source key must match exactly one rule (mapped or dropped); every expected target must be produced
exactly once with the expected shape. All problems are collected and raised together in one MappingError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from persimmon_tools.conversion.config import ModelDims
from persimmon_tools.errors import MappingError
from persimmon_tools.mapping import RULES, Rule
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


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED = [(_compile(rule.source), rule) for rule in RULES]


def _expected_shape(rule: Rule, dims: ModelDims) -> tuple[int, ...]:
    symbols = dims.symbols()
    return tuple(symbols[s] for s in rule.shape)


def plan_conversion(
    ckpt: Checkpoint, dims: ModelDims, out_dtype: torch.dtype | None = None
) -> list[PlannedTensor]:
    """Map every Megatron key to its HF target in HF order; raise one MappingError listing all problems.

    ``out_dtype`` None keeps each tensor's source dtype.
    """
    problems: list[str] = [f"unexpected non-tensor value at {leaf}" for leaf in ckpt.non_tensor_leaves]
    produced: dict[str, PlannedTensor] = {}
    reported: set[str] = set()  # targets whose source was already reported (no second "missing" line)
    for key, merged in ckpt.tensors.items():
        matches = [(m, rule) for pattern, rule in _COMPILED if (m := pattern.match(key))]
        if not matches:
            problems.append(f"unknown source key {key} {list(merged.shape)} (no rule maps it)")
            continue
        if len(matches) > 1:
            problems.append(f"source key {key} matches {len(matches)} rules")
            continue
        match, rule = matches[0]
        layer = match.groupdict().get("i")
        if layer is not None and int(layer) >= dims.num_layers:
            problems.append(f"{key}: layer {layer} is beyond num_layers {dims.num_layers}")
            continue
        expected = _expected_shape(rule, dims)
        target = None
        if rule.target is not None:
            target = rule.target.replace("{i}", layer) if layer is not None else rule.target
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
            problems.append(f"missing: no source tensor for {target}")
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


def expected_targets(dims: ModelDims) -> list[str]:
    """Every HF key a complete conversion produces, in HF order (embeddings, layers, final norm, head)."""
    out: list[str] = []
    layered = [r for r in RULES if r.target and "{i}" in r.target and dims.flag(r.when)]
    flat = [r for r in RULES if r.target and "{i}" not in r.target and dims.flag(r.when)]
    out += [r.target for r in flat if r.target.startswith("model.embed")]
    for i in range(dims.num_layers):
        out += [r.target.replace("{i}", str(i)) for r in layered]
    out += [r.target for r in flat if not r.target.startswith("model.embed")]
    return out
