"""``export --format torch_dist``: the source as a Megatron-Core ``torch_dist`` checkpoint, the format
Megatron-LM saves and loads with ``--ckpt-format torch_dist`` (GPTModel, local layer spec).

OUT is Megatron-LM's checkpoint root (what ``--load`` names)::

    OUT/latest_checkpointed_iteration.txt
    OUT/iter_{N:07d}/__0_0.distcp  .metadata  common.pt  metadata.json   (megatron.dist_writer)
    OUT/iter_{N:07d}/tokenizer/tokenizer.model   the SentencePiece model, where Megatron-LM's
                                                 save_tokenizer_assets puts it
    OUT/megatron_lm_args.txt     the flags that build and load the model (export.core_args), one per line
    OUT/export.json              the record (what ``--force`` may replace)

Keys come from THE TABLE's Megatron-Core column (``Rule.core``): per-layer tensors stacked ``[L, ...]``, one
chunk per layer; ``inv_freq`` is not stored (Megatron-Core computes it from ``--rotary-base``; reading the
source checked the stored buffers against that base). Values stream from the source in row blocks through
:class:`~persimmon_tools.export.layout.ShardTensor` at TP 1 (the dtype cast, its overflow check and the NaN/Inf
count of a legacy export), one chunk at a time. There is no TP/PP split (Megatron-Core reshards a
``torch_dist`` checkpoint when it loads it), so ``--tp``/``--pp`` other than 1, ``--tar`` and ``--name`` are
refused.

Before it is installed, the checkpoint is read back through the toolkit's own ``torch_dist`` reader
(:func:`~persimmon_tools.megatron.dist_checkpoint.open_torch_dist`: the metadata's tiling of every tensor,
each chunk's zip, ``common.pt``) and must hold exactly the planned tensors and byte objects, with ``args``
as written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persimmon_tools import __version__
from persimmon_tools.conversion.config import arg
from persimmon_tools.errors import ConversionError, PersimmonToolsError, UsageError
from persimmon_tools.export.checks import ValueCounts, read_back, refuse_nonfinite
from persimmon_tools.export.core_args import MegatronLMArgs, common_state, megatron_lm_args, vocab_flag
from persimmon_tools.export.layout import ShardTensor, megatron_keys
from persimmon_tools.export.output import claim_export_dir, write_record
from persimmon_tools.mapping import match_source
from persimmon_tools.megatron.dist_checkpoint import open_torch_dist
from persimmon_tools.megatron.dist_writer import (
    COMMON_FILE,
    DATA_FILE,
    METADATA_FILE,
    METADATA_JSON,
    TRACKER_FILE,
    Chunk,
    GlobalTensor,
    extra_state_keys,
    iteration_dir,
    write_checkpoint,
    write_tracker,
)
from persimmon_tools.megatron.release_writer import EMBEDDING, HEAD
from persimmon_tools.ops import Parallel
from persimmon_tools.safe_write import write_new_file

if TYPE_CHECKING:
    from persimmon_tools.export.export import ExportPlan

log = logging.getLogger(__name__)

LEGACY = "legacy"
TORCH_DIST = "torch_dist"
FORMATS = (LEGACY, TORCH_DIST)
FLAGS_FILE = "megatron_lm_args.txt"
TOKENIZER_FILE = "tokenizer/tokenizer.model"


def check_format_options(fmt: str, *, tp: int, pp: int, tar: bool, name: str | None) -> None:
    """Refuse what ``--format`` cannot go with (before anything is read)."""
    if fmt not in FORMATS:
        raise UsageError(
            f"--format {fmt!r}: expected one of {', '.join(FORMATS)}", hint="e.g. --format torch_dist"
        )
    if fmt != TORCH_DIST:
        return
    if tp != 1 or pp != 1:
        raise UsageError(
            f"--tp {tp} --pp {pp} with --format torch_dist: a torch_dist checkpoint is not split by rank "
            "(Megatron-Core reshards it when it loads it, at any TP/PP)",
            hint="leave --tp and --pp out; Megatron-LM's --tensor-model-parallel-size and "
            "--pipeline-model-parallel-size choose the layout it loads into",
        )
    if tar:
        raise UsageError(
            "--tar with --format torch_dist: a torch_dist checkpoint is a folder (what Megatron-LM's --load "
            "names)",
            hint="leave --tar out (archive OUT afterwards if you need one file)",
        )
    if name is not None:
        raise UsageError(
            "--name with --format torch_dist: OUT itself is the checkpoint root, with no release folder inside",
            hint="leave --name out",
        )


def output_files(iteration: int) -> list[str]:
    """The files the checkpoint consists of, relative to OUT (the plan's list)."""
    it = iteration_dir(iteration)
    names = (DATA_FILE, METADATA_FILE, COMMON_FILE, METADATA_JSON, TOKENIZER_FILE)
    return [TRACKER_FILE, *(f"{it}/{n}" for n in names), FLAGS_FILE]


def _shape(plan: ExportPlan, key: str) -> tuple[int, ...]:
    shape = tuple(plan.source.tensors[key].shape)
    return (plan.vocab_rows, *shape[1:]) if key in (EMBEDDING, HEAD) else shape


def core_plan(plan: ExportPlan) -> tuple[list[GlobalTensor], list[tuple[str, str, int | None]]]:
    """``(global tensors, chunks)``: every stored tensor (first-read order) and every ``(Megatron key, core
    key, layer)`` in the order the source is read (its own order for a Megatron checkpoint)."""
    tensors: dict[str, GlobalTensor] = {}
    order: list[tuple[str, str, int | None]] = []
    layers = plan.source.dims.num_layers
    for key in megatron_keys(plan.source):
        match = match_source(key)
        if match is None:
            raise ConversionError(f"{key}: no rule of the mapping table names it", hint=_BUG)
        core = match.rule.core
        if core is None or key not in plan.source.tensors:
            continue  # inv_freq: Megatron-Core does not store it
        shape, stacked = _shape(plan, key), match.layer is not None
        want = GlobalTensor(core, (layers, *shape) if stacked else shape, plan.dtype, stacked)
        if tensors.setdefault(core, want) != want:
            raise ConversionError(
                f"{key}: shape {list(shape)} differs from another layer's {list(tensors[core].shape[1:])}",
                hint="every layer of a Megatron-Core model has the same shapes; nothing was written",
            )
        order.append((key, core, match.layer))
    return list(tensors.values()), order


def payload_bytes(plan: ExportPlan) -> int:
    """Tensor bytes the checkpoint holds (what ``progress`` is told, in all)."""
    return sum(t.dtype.itemsize * _numel(t.shape) for t in core_plan(plan)[0])


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _chunks(
    plan: ExportPlan, order: Sequence[tuple[str, str, int | None]], counts: ValueCounts
) -> Iterator[Chunk]:
    """Each chunk's value, read from the source in row blocks when the writer gets to it."""
    for key, core, layer in order:
        kind = Parallel.REPLICATED if (m := match_source(key)) is None else m.rule.parallel
        piece = ShardTensor(
            key, plan.source.tensors[key], kind, _shape(plan, key), 1, 0, plan.dtype, counts=counts
        )
        yield core, layer, piece.spec()


def _lm_args(plan: ExportPlan, out: Path) -> MegatronLMArgs:
    src, it = plan.source, iteration_dir(plan.iteration)
    return megatron_lm_args(
        src.dims,
        plan.args,
        dtype=plan.dtype,
        rope_base=plan.rope_base,
        vocab_rows=plan.vocab_rows,
        vocab_bytes=src.vocab_bytes or b"",
        vocab_origin=src.vocab_origin,
        iteration=plan.iteration,
        load_dir=out,
        tokenizer_model=out / it / TOKENIZER_FILE,
    )


def check_core_model(plan: ExportPlan) -> None:
    """Refuse (before anything is written, ``--dry-run`` too) a model Megatron-LM cannot build as it is."""
    _lm_args(plan, Path("OUT"))


def export_torch_dist(
    plan: ExportPlan,
    out: Path,
    protected: Sequence[tuple[str, Path | None]],
    *,
    progress: Callable[[int], None],
) -> tuple[list[str], MegatronLMArgs, float]:
    """Write the checkpoint at OUT (all or nothing, :func:`~persimmon_tools.export.output.claim_export_dir`);
    returns ``(files listed in export.json, the Megatron-LM args, read-back seconds)``."""
    src, it = plan.source, iteration_dir(plan.iteration)
    tensors, order = core_plan(plan)
    lm = _lm_args(plan, out)
    counts = ValueCounts()
    with claim_export_dir(out, plan.options.force, protected) as tmp:
        write_checkpoint(
            tmp / it,
            tensors,
            _chunks(plan, order, counts),
            num_layers=src.dims.num_layers,
            common=common_state(lm.namespace, plan.iteration),
            checkpoint_id=str(out / it),
            progress=progress,
        )
        (tmp / it / TOKENIZER_FILE).parent.mkdir()
        write_new_file(tmp / it / TOKENIZER_FILE, src.vocab_bytes or b"")
        write_tracker(tmp, plan.iteration)
        write_new_file(tmp / FLAGS_FILE, lm.text().encode())
        src.finish_records()  # the source's records this pass started, CRC-checked
        refuse_nonfinite(counts, plan.options.allow_nonfinite)
        seconds = read_back_plan(tmp, plan.iteration, tensors, lm, src.dims.num_layers)
        seconds += read_back(tmp, src, plan.vocab_rows, vocab=tmp / it / TOKENIZER_FILE)
        listed = write_record(tmp, plan.summary(), __version__)
    return listed, lm, seconds


_BUG = "this is a bug in persimmon-tools; please report it; nothing was written"


def read_back_plan(
    root: Path, iteration: int, tensors: Sequence[GlobalTensor], lm: MegatronLMArgs, num_layers: int
) -> float:
    """Open the checkpoint just written (still in the private temporary) with the toolkit's ``torch_dist``
    reader and check that it holds exactly ``tensors`` (keys, global shapes, dtypes), the byte objects GPTModel
    expects, ``iteration`` and the args as written. Raises :class:`ConversionError` otherwise, so that nothing
    is installed. Returns the seconds it took. (Then :func:`~persimmon_tools.export.checks.read_back` reads it
    as ``convert`` does: it must describe the source's model.)"""
    start = time.perf_counter()
    try:
        back = open_torch_dist(root)
    except PersimmonToolsError as err:
        raise ConversionError(
            f"the toolkit's torch_dist reader refuses the checkpoint this export wrote, so it was not "
            f"installed: {err.message}",
            hint=_BUG,
        ) from err
    want = {t.key: (tuple(t.shape), t.dtype) for t in tensors}
    got = {k: (tuple(t.shape), t.dtype) for k, t in back.tensors.items()}
    problems = [
        f"{k}: {got.get(k)} (planned {want.get(k)})"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]
    expected_objects = set(extra_state_keys(num_layers))
    if set(back.objects) != expected_objects:
        problems.append(f"byte objects {sorted(set(back.objects) ^ expected_objects)[:5]} differ")
    if back.iteration != iteration or back.checkpoint_version != 3.0:
        problems.append(f"iteration {back.iteration!r}, checkpoint_version {back.checkpoint_version!r}")
    for name, value in vars(lm.namespace).items():
        if arg(back.args, name) != value:
            problems.append(f"args.{name} = {arg(back.args, name)!r} (written: {value!r})")
    if problems:
        raise ConversionError(
            "the torch_dist checkpoint this export wrote reads back differently, so it was not installed: "
            + "; ".join(problems[:10]),
            hint=_BUG,
        )
    seconds = time.perf_counter() - start
    log.debug("read back %s: %.2f s", root, seconds)
    return seconds


def summary_fields(plan: ExportPlan) -> dict[str, Any]:
    """What the plan's summary says differently for a torch_dist checkpoint."""
    src = plan.source
    _, note = vocab_flag(plan.vocab_rows, src.vocab_bytes or b"", src.vocab_origin, plan.args)
    return {
        "name": None,
        "shards": output_files(plan.iteration),
        "checkpoint_version": 3.0,  # what Megatron-LM's generate_state_dict writes
        # the notes on ADEPT's args pickle (args.NAME ...) concern the legacy layout only
        "notes": [n for n in plan.notes if not n.startswith("args.")] + ([note] if note else []),
    }
