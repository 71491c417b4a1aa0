"""Are the ``args`` an export writes ones that describe the model, and that ``convert`` accepts?

Two checks, run on the final args (the source's or derived ones, with every ``--set``) before anything is
written:

- **values** (:data:`VALUE_RULES`): each field ``convert`` reads (:func:`~persimmon_tools.conversion.config.
  derive_dims`), and ``make_vocab_size_divisible_by`` (export pads with it), has the type and range convert
  accepts: whole numbers >= 1 for sizes, finite numbers > 0 for the rotary base and the layernorm epsilon,
  ``rotary_pct`` in (0, 1], ``pos_emb`` ``"rotary"``, no post-layernorm residual;
- **facts** (:func:`model_facts`): what the model is, which the args must not contradict. For an HF folder
  that is ``config.json`` (transformers computes with it): sizes, ``rope_theta``, ``layer_norm_eps``,
  ``partial_rotary_factor``, ``tie_word_embeddings``, ``hidden_act`` and a ``max_position_embeddings`` it
  names. For a Megatron source it is the checkpoint (its tensors, its own args as ``convert`` reads them).

A ``--set`` that breaks either is a :class:`UsageError` naming the flag and the key. Args recorded in
``conversion.json`` that contradict ``config.json`` (the folder was edited after conversion) are a
:class:`ConfigError` naming the ``config.json`` key and both values: the export refuses rather than pick one
silently; ``--set FIELD=VALUE`` with ``config.json``'s value exports the model as transformers runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from persimmon_tools.conversion.config import (
    ADEPT_DEFAULT_EPS,
    ADEPT_DEFAULT_ROPE_BASE,
    HF_DEFAULT_MAX_POSITIONS,
    numeric_arg_problem,
)
from persimmon_tools.conversion.hf_config import short
from persimmon_tools.errors import ConfigError, UsageError

#: The largest ``make_vocab_size_divisible_by`` export pads with (Megatron uses 128; larger ones only add
#: zero rows).
MAX_DIVISIBLE_BY = 1 << 16
_SIZES = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "seq_length",
    "max_position_embeddings",
)


def _whole(high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if type(value) is int and 1 <= value <= high else f"a whole number in [1, {high}]"

    return check


def _flag(value: Any) -> str | None:
    return None if type(value) is bool else "True or False"


def _only(allowed: Any, why: str) -> Callable[[Any], str | None]:
    return lambda value: None if value == allowed and type(value) is type(allowed) else why


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


#: field -> check(value) -> what the value must be (None: fine). ``None`` values are not checked.
VALUE_RULES: dict[str, Callable[[Any], str | None]] = {
    # the numbers derive_dims reads: convert's own rule (conversion.config.numeric_arg_problem)
    **{
        name: functools.partial(numeric_arg_problem, name)
        for name in (*_SIZES, "rotary_pct", "rotary_emb_base", "layernorm_epsilon")
    },
    "make_vocab_size_divisible_by": _whole(MAX_DIVISIBLE_BY),
    "untie_embeddings": _flag,
    "sq_relu": _flag,
    "apply_residual_connection_post_layernorm": _only(
        False, "False (HF Persimmon and convert are pre-LN only)"
    ),
    "pos_emb": _only("rotary", "'rotary' (Persimmon's position embedding)"),
    "tokenizer_type": _text,
    "sp_model_file": _text,
}

#: Fields export sets itself: field -> what sets it (a ``--set`` of them is refused).
COMPUTED = {
    "tensor_model_parallel_size": "--tp",
    "pipeline_model_parallel_size": "--pp",
    "padded_vocab_size": "the embedding's rows (padded with make_vocab_size_divisible_by x TP when TP "
    "does not divide them)",
    "iteration": "--iteration",
    "params_dtype": "--dtype",
    "bf16": "--dtype",
    "fp16": "--dtype",
    **dict.fromkeys(
        (
            "rank",
            "local_rank",
            "world_size",
            "tensor_model_parallel_rank",
            "pipeline_model_parallel_rank",
            "data_parallel_size",
            "data_parallel_rank",
        ),
        "the layout (--tp, --pp)",
    ),
}


def _value(args: dict[str, Any], name: str) -> Any:
    return args.get(name)


def _max_positions(args: dict[str, Any]) -> Any:
    """What convert writes as ``max_position_embeddings``: ``args.max_position_embeddings or seq_length``."""
    return args.get("max_position_embeddings") or args.get("seq_length")


@dataclass(frozen=True)
class Fact:
    """One thing the model is, which ``args.field`` must agree with."""

    field: str
    value: Any  # the model's value, as args spell it (the value a --set should give)
    where: str  # who says so, e.g. "config.json rope_theta = 25000.0"
    same: Callable[[Any], bool]
    read: Callable[[dict[str, Any]], Any] = lambda args: None  # what convert reads from args (None: absent)
    default: Any = None  # what convert uses when args lack it (None: it reads the tensors instead)


def model_facts(source: Any) -> list[Fact]:
    """The facts of an :class:`~persimmon_tools.export.source.ExportSource` (module docstring)."""
    d, cfg = source.dims, source.config
    hf = source.kind == "hf"

    def where(key: str, value: Any, megatron: str) -> str:
        return f"config.json {key} = {short(value)}" if hf else f"{megatron} = {short(value)}"

    def fact(field: str, value: Any, key: str, megatron: str, same=None, default=None, says=None) -> Fact:
        return Fact(
            field,
            value,
            where(key, value if says is None else says, megatron),
            same or (lambda v, value=value: v == value),
            read=lambda args, field=field: _value(args, field),
            default=default,
        )

    relu2 = d.hidden_act == "relu2"
    facts = [
        fact("num_layers", d.num_layers, "num_hidden_layers", "the checkpoint's layers"),
        fact("hidden_size", d.hidden_size, "hidden_size", "the embedding width"),
        fact("ffn_hidden_size", d.intermediate_size, "intermediate_size", "mlp.dense_h_to_4h rows"),
        fact("num_attention_heads", d.num_heads, "num_attention_heads", "the attention heads"),
        fact("kv_channels", d.head_dim, "hidden_size / num_attention_heads", "the q_layernorm size"),
        fact("padded_vocab_size", d.vocab_size, "vocab_size", "the embedding rows"),
        fact(
            "rotary_pct",
            d.partial_rotary_factor,
            "partial_rotary_factor",
            "the rotary dimension / head_dim",
            same=lambda v: int(v * d.head_dim) == d.rotary_dim,
        ),
        fact(
            "rotary_emb_base",
            _number(d.rope_theta),
            "rope_theta",
            "the checkpoint's rotary base",
            same=lambda v: float(v) == d.rope_theta,
            default=ADEPT_DEFAULT_ROPE_BASE,
            says=d.rope_theta,
        ),
        fact(
            "layernorm_epsilon",
            d.layer_norm_eps,
            "layer_norm_eps",
            "the checkpoint's layernorm epsilon",
            same=lambda v: float(v) == d.layer_norm_eps,
            default=ADEPT_DEFAULT_EPS,
        ),
        fact(
            "untie_embeddings",
            d.untied,
            "tie_word_embeddings" if hf else "untie",
            "the checkpoint's separate output head",
            says=not d.untied if hf else d.untied,
        ),
        Fact(
            "sq_relu",
            relu2,
            where("hidden_act", d.hidden_act, "the checkpoint's activation"),
            lambda v: (v is not False) == relu2,
            read=lambda args: _value(args, "sq_relu"),
            default=True,
        ),
    ]
    if hf and cfg is not None and "max_position_embeddings" not in cfg.defaulted:
        facts.append(
            Fact(
                "max_position_embeddings",
                d.max_position_embeddings,
                where("max_position_embeddings", d.max_position_embeddings, ""),
                lambda v: v == d.max_position_embeddings,
                read=_max_positions,
                default=HF_DEFAULT_MAX_POSITIONS,
            )
        )
    return facts


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def fill_missing(source: Any, args: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """For an HF folder's recorded args: add a fact the args lack where convert's default would differ from
    ``config.json`` (e.g. no ``rotary_emb_base`` and a ``rope_theta`` other than ADEPT's 25000). Returns the
    added fields as ``(field, value, where from)``."""
    if source.kind != "hf":
        return []
    added = []
    for fact in model_facts(source):
        if fact.read(args) is None and fact.default is not None and not fact.same(fact.default):
            args[fact.field] = fact.value
            added.append((fact.field, fact.value, f"{fact.where} (the recorded args lack it)"))
    return added


def check_args(source: Any, args: dict[str, Any], sets: dict[str, Any]) -> None:
    """Refuse args that convert would refuse or that contradict the model (module docstring)."""
    origin = source.args_from if source.args is not None else "the derived args"
    hf = source.kind == "hf"
    bad_sets, bad_other = [], []
    for name, rule in VALUE_RULES.items():
        value = args.get(name)
        need = rule(value) if value is not None else None
        if need is None:
            continue
        if name in sets:
            bad_sets.append(f"--set {name}={short(value)}: expected {need}")
        else:
            bad_other.append(f"{origin} holds args.{name} = {short(value)}; convert needs {need}")
    if not bad_sets and not bad_other:
        for fact in model_facts(source):
            value = fact.read(args)
            if value is None or fact.same(value):
                continue
            field = fact.field
            if field == "max_position_embeddings" and "seq_length" in sets and not args.get(field):
                field = "seq_length"
            if field in sets:
                bad_sets.append(
                    f"--set {field}={short(value)}: {fact.where} (use --set {fact.field}={short(fact.value)} "
                    "or leave it out)"
                )
            else:
                fix = (
                    f"--set {fact.field}={short(fact.value)} exports {'config.json' if hf else 'the source'}'s "
                    "value"
                    if fact.field not in COMPUTED
                    else f"move {origin} out of the folder to derive the args from config.json"
                )
                bad_other.append(
                    f"{fact.where} but {origin} records args.{fact.field} = {short(value)} ({fix})"
                )
    if bad_sets:
        raise UsageError(
            "--set gives values the model contradicts or convert refuses:\n  - " + "\n  - ".join(bad_sets),
            hint="--set may change what the model's weights and config.json do not say (seq_length, "
            "tokenizer fields, ...), never what they do; nothing was written",
        )
    if bad_other:
        folder = source.path
        raise ConfigError(
            f"{folder}: the args do not describe the model:\n  - " + "\n  - ".join(bad_other),
            hint=_recorded_hint(source),
        )


def _recorded_hint(source: Any) -> str:
    if source.kind == "hf" and source.args is not None:
        return (
            "config.json changed after conversion, and transformers computes with config.json: restore "
            "config.json, or export what config.json says with the --set above (or move conversion.json out "
            "of the folder to derive every field from config.json), or convert the release again; nothing "
            "was written"
        )
    return "the source is damaged or was edited by hand; nothing was written"
