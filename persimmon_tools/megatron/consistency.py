"""Do the shards of one iteration belong together, each in its place? Checked before anything is merged.

Megatron saves one ``model_optim_rng.pt`` per (tensor rank, pipeline stage) of one training run at one
iteration (``iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d}]``, spec §A), each holding ``iteration`` and the run's
``args``. A shard copied from another run or iteration, folders swapped, or keys spelled in two ways would
otherwise merge without a word into weights that differ from the source. Checks:

- every shard's ``iteration`` is the same integer, and equals the number of the ``iter_*`` folder it is in;
- every shard's ``args`` agree field by field, except :data:`PER_RANK_ARGS` (set per process by Megatron:
  ``args.rank`` from ``$RANK``, ``args.local_rank`` from the launcher, in ``megatron/arguments.py`` and
  ``initialize.py``); when every shard carries a distinct ``args.rank``, that rank must sit at the shard's
  folder position in Megatron's rank layout (tensor rank fastest, pipeline stage outermost);
- stage roles: the word embedding only on the first pipeline stage, the final layernorm and the output
  head only on the last, stage-local layer numbers ``0..n-1`` on every stage;
- layer numbers are canonical ASCII decimals (``5``, never ``05``, ``+5`` or ``٥``);
- every shard's ``checkpoint_version`` is the same (absent from every shard, or one number in all), and
  :func:`check_checkpoint_version` accepts it.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.lazy import LazyTensor
from persimmon_tools.megatron.release import Release
from persimmon_tools.megatron.unpickle import Opaque
from persimmon_tools.safe_graph import Budget, small_repr

Rank = tuple[int, int]  # (tensor rank, pipeline stage)

#: ``args`` fields that legitimately differ between the processes that saved the shards.
PER_RANK_ARGS = frozenset(
    {
        "rank",  # global rank, from $RANK (megatron/arguments.py::parse_args)
        "local_rank",  # rank on the node, --local_rank / device index (megatron/initialize.py)
        "tensor_model_parallel_rank",
        "pipeline_model_parallel_rank",
        "virtual_pipeline_model_parallel_rank",
        "data_parallel_rank",
    }
)
#: Key prefixes that only the first / only the last pipeline stage holds (spec §B.2).
FIRST_STAGE_ONLY = ("language_model.embedding.",)
LAST_STAGE_ONLY = (
    "language_model.encoder.final_layernorm.",
    "language_model.transformer.final_layernorm.",
    "word_embeddings_for_head.",
    "language_model.output_layer.",
)
_CANONICAL_LAYER = re.compile(r"0|[1-9][0-9]*")
_HINT_MIXED = (
    "the shards come from different training runs or iterations; take every mp_rank_* folder of one "
    "iter_* folder from the same release"
)


def _show(value: Any) -> str:
    return small_repr(value, 60)  # bounded work: a pickled value may be a shared structure


# ---- layer keys ----------------------------------------------------------------------------------------


def check_layer_keys(keys: list[str], label: str) -> None:
    """Refuse ``layers.<n>.`` keys whose number is not canonical (``05``, ``+5``, ``٥``, `` 5``)."""
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part != "layers":
                continue
            number = parts[i + 1]
            if _CANONICAL_LAYER.fullmatch(number):
                continue
            if any(ch.isdigit() or ch.isnumeric() for ch in number):
                raise CheckpointError(
                    f"{label}: tensor {key!r} has the layer number {number!r}; Megatron writes layer numbers as "
                    "plain decimals (0, 1, ..., no leading zeros, signs or non-ASCII digits)",
                    hint="the model dict was edited by hand or tampered with: two spellings of one layer would "
                    "make one of them silently win; rename the keys or use the original checkpoint",
                )


# ---- iteration -----------------------------------------------------------------------------------------


def check_iterations(release: Release, objects: dict[Rank, Any]) -> int | None:
    """Every shard's ``iteration`` agrees with the others and with its ``iter_*`` folder; returns it."""
    values: dict[Rank, Any] = {}
    for rank, obj in objects.items():
        value = obj.get("iteration") if isinstance(obj, dict) else None
        if value is not None and (type(value) is not int or value < 0):
            raise CheckpointError(
                f"{release.shard_label(rank)}: 'iteration' is {_show(value)} ({type(value).__name__}); Megatron "
                "saves a non-negative integer",
                hint="the file is corrupt or was tampered with",
            )
        values[rank] = value
    ranks = sorted(values)
    first = ranks[0]
    for rank in ranks[1:]:
        if values[rank] != values[first]:
            a, b = (_show(values[r]) if values[r] is not None else "no iteration" for r in (first, rank))
            raise CheckpointError(
                f"shards disagree on the iteration: {release.shard_label(first)} holds {a} but "
                f"{release.shard_label(rank)} holds {b}",
                hint=_HINT_MIXED,
            )
    value = values[first]
    if value is not None and release.iteration is not None and value != release.iteration:
        raise CheckpointError(
            f"{release.shard_label(first)}: the checkpoint says iteration {_show(value)} but its folder says "
            f"{release.iteration}",
            hint="the shard was copied from another iteration or the folder was renamed; use the iter_* folder "
            "the checkpoint was saved in",
        )
    return value


# ---- args ----------------------------------------------------------------------------------------------


_MAX_NODES = 1_000_000  # real args hold a few hundred scalars; a pickle can share one list a million times


def _args_budget() -> Budget:
    """The visits every comparison of one release's args may make together (see :func:`_canon`)."""
    return Budget(
        "the checkpoint's args",
        CheckpointError,
        nodes=_MAX_NODES,
        max_depth=12,
        summary="the checkpoint's args are too large or too deeply nested to compare between shards",
        hint="real Megatron args hold a few hundred plain values; the file is corrupt or was tampered with",
    )


def _canon(value: Any, budget: Budget | None = None, depth: int = 0) -> Any:
    """A comparable stand-in for an args value (pickled objects may be stand-ins, NaN, nested, shared,
    cyclic); every value visited, a shared one once per visit, is spent from ``budget`` (CheckpointError past
    :data:`_MAX_NODES` values, 64 MiB of text or 12 levels)."""
    budget = _args_budget() if budget is None else budget
    budget.visit(value, depth)
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value)
    if value is None or isinstance(value, bool | int | str | bytes):
        return (type(value).__name__, value)
    if isinstance(value, list | tuple | set | frozenset):
        items = [_canon(v, budget, depth + 1) for v in value]
        return (
            type(value).__name__,
            tuple(sorted(items, key=repr) if isinstance(value, set | frozenset) else items),
        )
    if isinstance(value, dict):  # keys canonical too: their repr may be truncated (stand-ins) or huge
        pairs = sorted(
            ((_canon(k, budget, depth + 1), _canon(v, budget, depth + 1)) for k, v in value.items()),
            key=lambda kv: repr(kv[0]),
        )
        return ("dict", tuple(pairs))
    if isinstance(value, argparse.Namespace):
        return ("Namespace", _canon(vars(value), budget, depth + 1))
    if isinstance(value, Opaque):
        parts = (value.args, value.kwargs, value.state)
        return ("opaque", value.qualname, *(_canon(p, budget, depth + 1) for p in parts))
    if isinstance(value, slice):
        return ("slice", *(_canon(p, budget, depth + 1) for p in (value.start, value.stop, value.step)))
    if isinstance(value, torch.dtype):
        return ("dtype", str(value))
    if isinstance(value, LazyTensor):
        return ("tensor", value.shape, str(value.dtype))
    return ("other", type(value).__name__, small_repr(value, 200))


def _fields(args: Any) -> dict[str, Any] | None:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict) and all(isinstance(k, str) for k in args):
        return dict(args)
    return None


def check_args(release: Release, objects: dict[Rank, Any]) -> None:
    """Every shard's ``args`` agree with the first shard's, except :data:`PER_RANK_ARGS`."""
    args = {rank: obj.get("args") if isinstance(obj, dict) else None for rank, obj in objects.items()}
    ranks = sorted(args)
    first = ranks[0]
    ref = _fields(args[first])
    budget = _args_budget()  # shared by every comparison below
    ref_canon: dict[str, Any] = {}

    def canon(fields: dict[str, Any], name: str) -> Any:
        if name not in fields:
            return ("<missing>",)  # never a _canon result
        if fields is ref:
            if name not in ref_canon:
                ref_canon[name] = _canon(fields[name], budget)
            return ref_canon[name]
        return _canon(fields[name], budget)

    for rank in ranks[1:]:
        a_label, b_label = release.shard_label(first), release.shard_label(rank)
        if (args[first] is None) != (args[rank] is None):
            has, lacks = (a_label, b_label) if args[rank] is None else (b_label, a_label)
            raise CheckpointError(f"{has} holds training args but {lacks} holds none", hint=_HINT_MIXED)
        other = _fields(args[rank])
        if ref is None or other is None:
            if _canon(args[first], budget) != _canon(args[rank], budget):
                raise CheckpointError(
                    f"shards disagree on their args: {a_label} holds {_show(args[first])} but {b_label} holds "
                    f"{_show(args[rank])}",
                    hint=_HINT_MIXED,
                )
            continue
        names = [n for n in ref if n not in PER_RANK_ARGS] + [
            n for n in other if n not in ref and n not in PER_RANK_ARGS
        ]
        differ = [n for n in names if canon(ref, n) != canon(other, n)]
        if differ:

            def shown(fields: dict[str, Any], name: str) -> str:
                return f"{name}={_show(fields[name])}" if name in fields else f"no {name}"

            listed = "; ".join(
                f"{a_label} has {shown(ref, n)} but {b_label} has {shown(other, n)}" for n in differ[:3]
            )
            more = f" (and {len(differ) - 3} more field(s))" if len(differ) > 3 else ""
            raise CheckpointError(f"shards disagree on their training args: {listed}{more}", hint=_HINT_MIXED)


def check_rank_positions(release: Release, objects: dict[Rank, Any]) -> None:
    """When every shard carries a distinct ``args.rank`` (each saved by its own process), that rank must map
    to the shard's folder: ``rank % tp`` is the tensor rank and the pipeline stage is ``rank // (world/pp)``
    (Megatron's default order) or ``(rank // tp) % pp`` (tp-pp-dp order). Resharded checkpoints, written by
    one process, carry one rank for all shards and are not checked."""
    tp, pp = release.tp, release.pp
    if tp * pp == 1:
        return
    found: dict[Rank, int] = {}
    world = None
    for rank, obj in objects.items():
        fields = _fields(obj.get("args") if isinstance(obj, dict) else None) or {}
        value, world = fields.get("rank"), fields.get("world_size")
        if type(value) is not int or type(world) is not int or world <= 0 or world % (tp * pp):
            return
        found[rank] = value
    if len(set(found.values())) != len(found):
        return
    for (t, p), global_rank in sorted(found.items()):
        stage_ok = global_rank // (world // pp) == p or (global_rank // tp) % pp == p
        if global_rank % tp != t or not stage_ok or not 0 <= global_rank < world:
            raise CheckpointError(
                f"{release.shard_label((t, p))} was saved by global rank {global_rank} of {world} (args.rank), "
                f"which in Megatron's layout is tensor rank {global_rank % tp}, pipeline stage "
                f"{global_rank // (world // pp)}, not the folder's tensor rank {t}, stage {p}",
                hint="the mp_rank_* folders were renamed or swapped; restore the names Megatron gave them",
            )


# ---- pipeline stage roles ------------------------------------------------------------------------------


def check_stage_roles(release: Release, stage_keys: dict[int, list[str]]) -> None:
    """The embedding only on stage 0; final layernorm and head only on the last stage (PP > 1)."""
    last = release.pp - 1
    problems = []
    for stage, keys in sorted(stage_keys.items()):
        label = release.shard_label((0, stage))
        for prefixes, allowed, where in ((FIRST_STAGE_ONLY, 0, "first"), (LAST_STAGE_ONLY, last, "last")):
            if stage == allowed:
                continue
            held = sorted({k for k in keys if k.startswith(prefixes)})
            if held:
                problems.append(
                    f"stage {stage} ({label}) holds {held[0]}, which only the {where} stage holds"
                )
    if problems:
        raise CheckpointError(
            "pipeline stages are out of order: " + "; ".join(problems[:3]),
            hint="the mp_rank_XX_YYY folders were swapped, renamed or mixed from different releases; "
            "restore the names Megatron gave them (stage 000 holds the embedding, the last stage the head)",
        )


# ---- checkpoint_version ----------------------------------------------------------------------------------

#: Megatron-LM's legacy loader (``megatron/checkpointing.py``) calls ``fix_query_key_value_ordering`` on
#: checkpoints whose ``checkpoint_version`` is below this: their fused query_key_value rows are in another order.
MIN_CHECKPOINT_VERSION = 2.0


def check_checkpoint_version(value: Any, where: str) -> float | None:
    """The one rule for ``ckpt["checkpoint_version"]`` (convert's reader, export; verify has its own copy).

    ``None`` (absent) is accepted and returns None: ADEPT's inference code never reads the key (spec §B.1,
    ``_CHECKPOINT_VERSION`` is never set) and its releases were written and served by that code, so an absent
    version says nothing about the layout (Megatron-LM would read absent as 0; we do not). A present version
    must be a real, finite number (``int`` or ``float``, not ``bool``) of at least
    :data:`MIN_CHECKPOINT_VERSION`: older checkpoints hold their fused query_key_value rows in an order that
    Megatron-LM reorders on load, which persimmon-tools does not re-implement. Returns the version as a float;
    raises :class:`CheckpointError` naming ``where`` (the shard or record the value came from) otherwise.
    """
    if value is None:
        return None
    finite = isinstance(value, int | float) and not isinstance(value, bool)
    try:
        finite = finite and math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        shown = f"<{value.bit_length()}-bit integer>" if isinstance(value, int) else _show(value)
        raise CheckpointError(
            f"{where}: checkpoint_version is {shown} ({type(value).__name__}); Megatron saves a number "
            "(current Megatron-LM: 3.0)",
            hint="the file is corrupt or was tampered with; load and save it again with a current Megatron-LM",
        )
    version = float(value)
    if version < MIN_CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint_version is {_show(value)}, older than {MIN_CHECKPOINT_VERSION}. Megatron-LM's "
            "loader reorders the fused query_key_value rows of such checkpoints "
            "(fix_query_key_value_ordering); persimmon-tools does not re-implement that reordering, so their "
            "rows would be copied in an order Megatron never computes with",
            hint="load the checkpoint with a current Megatron-LM and save it again (it writes "
            "checkpoint_version 3.0), then convert that",
        )
    return version


def _version_key(value: Any) -> tuple[Any, ...]:
    """What two shards' ``checkpoint_version`` must share: absent, a number (3 == 3.0, NaN == NaN), or else
    the type and a bounded repr."""
    if value is None or isinstance(value, bool):
        return ("absent",) if value is None else ("bool", value)
    if isinstance(value, int | float):
        return ("number", "nan" if value != value else value)
    return ("other", type(value).__name__, small_repr(value, 200))


def check_checkpoint_versions(release: Release, objects: dict[Rank, Any]) -> float | int | None:
    """Every shard's ``checkpoint_version`` agrees (absent everywhere, or the same number everywhere) and
    :func:`check_checkpoint_version` accepts it; returns the value as saved (None when absent)."""
    values = {r: o.get("checkpoint_version") if isinstance(o, dict) else None for r, o in objects.items()}
    ranks = sorted(values)
    first = ranks[0]
    for rank in ranks[1:]:
        if _version_key(values[rank]) != _version_key(values[first]):
            a, b = (
                "no checkpoint_version" if values[r] is None else f"checkpoint_version {_show(values[r])}"
                for r in (first, rank)
            )
            raise CheckpointError(
                f"shards disagree on their checkpoint_version: {release.shard_label(first)} holds {a} but "
                f"{release.shard_label(rank)} holds {b}",
                hint=_HINT_MIXED,
            )
    where = (
        release.shard_label(first) if len(ranks) == 1 else f"every shard ({release.shard_label(first)}, ...)"
    )
    check_checkpoint_version(values[first], where)
    return values[first]
