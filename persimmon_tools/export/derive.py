"""``ckpt["args"]`` of an export: the source's own, or derived from ``config.json``; ``--set`` overrides.

When no args travel with the source (an HF folder not written by ``convert``), the fields ADEPT's loader
restores (``_get_checkpoint_specific_args``, spec §B.5) are derived from the model's dimensions, each listed
with where it came from. Fields no ``config.json`` holds (``seq_length``) take the nearest value
(``max_position_embeddings``) and can be set with ``--set seq_length=16384``. Every ``--set`` is checked
(:mod:`persimmon_tools.export.args_check`): it may set what the model does not say, never contradict it.

The pickled args hold only plain values and ``torch`` dtypes: an ADEPT enum (``model_backend``) becomes its
plain value, so the file loads without ADEPT's code.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from persimmon_tools.conversion.args_record import enum_value
from persimmon_tools.conversion.hf_config import short
from persimmon_tools.errors import UsageError
from persimmon_tools.export.args_check import COMPUTED, VALUE_RULES, check_args, fill_missing
from persimmon_tools.export.source import ExportSource

log = logging.getLogger(__name__)

_PLAIN = (bool, int, float, str, type(None))


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["seq_length=16384", "sp_model_file='x.model'"]`` → fields; values are Python literals, else strings.

    Refused (:class:`UsageError` naming the flag and the key): no ``=`` or a KEY that is not a field name, a
    field export sets itself (:data:`~persimmon_tools.export.args_check.COMPUTED`), one KEY given twice, and
    a value of the wrong type or range for a field convert reads (:data:`~persimmon_tools.export.args_check.
    VALUE_RULES`). Whether a value agrees with the model is checked once the source is open."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(
                f"--set {item!r}: expected KEY=VALUE with an args field name as KEY",
                hint="e.g. --set seq_length=16384 or --set tokenizer_type=SentencePiece",
            )
        if key in COMPUTED:
            raise UsageError(
                f"--set {key}: export sets args.{key} itself, from {COMPUTED[key]}",
                hint=f"use {COMPUTED[key]} instead" if COMPUTED[key].startswith("--") else "leave it out",
            )
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            value = raw.strip()
        if not isinstance(value, _PLAIN) or (isinstance(value, float) and not math.isfinite(value)):
            raise UsageError(
                f"--set {item!r}: the value must be a number, a string, True/False or None",
                hint="e.g. --set rotary_emb_base=25000",
            )
        rule = VALUE_RULES.get(key)
        need = rule(value) if rule is not None and value is not None else None
        if need is not None:
            raise UsageError(
                f"--set {key}={short(value)}: args.{key} must be {need}",
                hint="convert refuses a release whose args hold anything else; nothing was written",
            )
        if key in out and out[key] != value:
            raise UsageError(
                f"--set {key} is given twice, as {short(out[key])} and {short(value)}",
                hint="give each field once",
            )
        out[key] = value
    return out


def _plain(name: str, value: Any, notes: list[str]) -> tuple[bool, Any]:
    """A value the exported pickle may hold as it is, or its plain form; ``(False, None)``: drop it."""
    if isinstance(value, (*_PLAIN, torch.dtype)):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [_plain(name, v, notes) for v in value]
        if all(ok for ok, _ in items):
            return True, type(value)(v for _, v in items)
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(name, v, notes) for k, v in value.items()}
        if all(ok for ok, _ in items.values()):
            return True, {k: v for k, (_, v) in items.items()}
    if (enum := enum_value(value)) is not None:
        notes.append(
            f"args.{name}: {enum[0]} written as its plain value {enum[1]!r} (no ADEPT classes in the file)"
        )
        return True, enum[1]
    notes.append(f"args.{name}: a {type(value).__name__} object cannot be written without its code; left out")
    return False, None


def config_args(source: ExportSource, dtype: torch.dtype, iteration: int) -> list[tuple[str, Any, str]]:
    """Every derived field as ``(name, value, where from)``."""
    d = source.dims
    theta = int(d.rope_theta) if float(d.rope_theta).is_integer() else d.rope_theta
    return [
        ("num_layers", d.num_layers, "config.json num_hidden_layers"),
        ("hidden_size", d.hidden_size, "config.json hidden_size"),
        ("ffn_hidden_size", d.intermediate_size, "config.json intermediate_size"),
        ("num_attention_heads", d.num_heads, "config.json num_attention_heads"),
        ("kv_channels", d.head_dim, "hidden_size / num_attention_heads"),
        ("seq_length", d.max_position_embeddings, "config.json max_position_embeddings (--set seq_length=N)"),
        ("max_position_embeddings", d.max_position_embeddings, "config.json max_position_embeddings"),
        ("pos_emb", "rotary", "Persimmon uses rotary embeddings"),
        ("rotary_pct", d.partial_rotary_factor, "config.json partial_rotary_factor"),
        ("rotary_emb_base", theta, "config.json rope_theta"),
        ("layernorm_epsilon", d.layer_norm_eps, "config.json layer_norm_eps"),
        ("untie_embeddings", d.untied, "config.json tie_word_embeddings (negated)"),
        ("sq_relu", d.hidden_act == "relu2", "config.json hidden_act"),
        ("bias_gelu_fusion", False, "squared ReLU / plain GeLU MLP"),
        ("qk_layernorm", "weights_per_layer", "one q/k layernorm per layer (the HF layout)"),
        ("apply_residual_connection_post_layernorm", False, "HF Persimmon is pre-LN"),
        ("bf16", dtype == torch.bfloat16, "the exported dtype"),
        ("fp16", dtype == torch.float16, "the exported dtype"),
        ("params_dtype", dtype, "the exported dtype"),
        ("tokenizer_type", "SentencePiece", "ADEPT's only tokenizer type"),
        ("sp_model_file", "adept_vocab.model", "the release's SentencePiece model"),
        ("make_vocab_size_divisible_by", 128, "Megatron's default"),
        ("iteration", iteration, "the exported iteration"),
    ]


def derive_args(
    source: ExportSource, dtype: torch.dtype, iteration: int, sets: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, Any, str]]]:
    """``(args fields, derived list)``: the source's args (dtype fields following ``dtype``), or derived;
    then ``--set``. The result is checked (:func:`~persimmon_tools.export.args_check.check_args`): values
    convert accepts, agreeing with the model (``config.json`` for an HF folder)."""
    derived: list[tuple[str, Any, str]] = []
    if source.args is not None:
        args: dict[str, Any] = {}
        for name, value in source.args.items():
            ok, plain = _plain(name, value, source.notes)
            if ok:
                args[name] = plain
        changed = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "params_dtype": dtype}
        for name, value in changed.items():
            if name in args and args[name] != value:
                derived.append((name, value, f"--dtype {str(dtype).removeprefix('torch.')}"))
                args[name] = value
        derived += fill_missing(source, args)
    else:
        derived = config_args(source, dtype, iteration)
        args = {name: value for name, value, _ in derived}
    for name, value in sets.items():
        derived = [item for item in derived if item[0] != name] + [(name, value, "--set")]
        args[name] = value
    check_args(source, args, sets)
    return args, derived
