"""``convert``: release → HF Persimmon folder (config, sharded safetensors, tokenizer files), all or nothing.

Data flows one way: release (find files) → checkpoint (lazy, merged) → config (dims from args + shapes)
→ plan (the mapping table) → writer (streamed shards; the tokenizer beside it) → atomic rename of the folder.
This is the conversion alone; :func:`persimmon_tools.workflow.convert` (``persimmon_tools.convert``, the CLI's
``convert``) runs it and then the automatic verify.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from persimmon_tools import __version__
from persimmon_tools.conversion.args_record import record_args
from persimmon_tools.conversion.config import ModelDims, derive_dims, generation_config, hf_config
from persimmon_tools.conversion.fingerprint import CONVERSION_FILE
from persimmon_tools.conversion.output_dir import (
    OutputClaim,
    claim_output_dir,
    recorded_files,
    refuse_unsafe_output,
)
from persimmon_tools.conversion.plan import PlannedTensor, drop_keys, plan_conversion, source_keys
from persimmon_tools.conversion.tokenizer_step import (
    chat_choice,
    fingerprint_entry,
    tokenizer_parity,
    write_tokenizer_into,
)
from persimmon_tools.conversion.values import WriteStats, dtype_name, output_dtype, refuse_bad_values
from persimmon_tools.conversion.writer import (
    CHUNK_BYTES,
    ShardPlan,
    finish_shard,
    plan_shards,
    write_index,
    write_json,
    write_shard,
)
from persimmon_tools.errors import ConversionError
from persimmon_tools.megatron.checkpoint import Checkpoint, load_release_checkpoint
from persimmon_tools.megatron.release import Release, open_release
from persimmon_tools.tokenizer.spm import ENDOFTEXT, eod_piece, load_sp_bytes

log = logging.getLogger(__name__)

BASE_RSS_ESTIMATE = 400 << 20  # python + torch + tokenizers on CPU builds (docs/performance.md: peak RSS)


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`convert` (mirrors the CLI flags)."""

    dtype: str = "auto"
    max_shard_size: int | str = "5GB"
    force: bool = False
    allow_overflow: bool = False
    allow_nonfinite: bool = False
    iteration: int | None = None
    vocab: Path | None = None
    tokenizer: bool = True
    add_bos_token: bool = True
    chat: bool | None = None  # None: from the release name (8b_chat_* → chat template)
    force_tokenizer: bool = False
    allow_tokenizer_ties: bool = (
        False  # write the tokenizer when its only parity differences are float32 ties
    )
    drop_keys: tuple[str, ...] = ()  # fnmatch patterns of source keys to leave out on purpose (--drop-key)


@dataclass(frozen=True)
class ConversionPlan:
    """Everything decided before a byte is written (what ``--dry-run`` prints)."""

    release: Release
    checkpoint: Checkpoint
    dims: ModelDims
    tensors: list[PlannedTensor]
    shards: ShardPlan
    config: dict[str, Any]
    special_id: int | None
    vocab_bytes: bytes | None
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> the --drop-key pattern
    drop_patterns: tuple[str, ...] = ()

    @property
    def dropped_keys(self) -> list[str]:
        return sorted(self.dropped)

    @property
    def estimated_peak_bytes(self) -> int:
        """Streaming keeps about two chunks (or one dim-1 interleave block) plus the largest small tensor."""
        small = max(
            (p.nbytes for p in self.tensors if p.source.concat_dim is None and len(p.shape) == 1), default=0
        )
        return BASE_RSS_ESTIMATE + 3 * CHUNK_BYTES + small

    def summary(self) -> dict[str, Any]:
        return {
            "source": str(self.release.source),
            "kind": self.release.kind,
            "iteration": self.checkpoint.iteration,
            "tp": self.release.tp,
            "pp": self.release.pp,
            "variant": self.release.variant,
            "variant_from": self.release.variant_from,
            "tensors": len(self.tensors),
            "bytes": self.shards.total_size,
            "parameters": sum(p.nbytes // p.out_dtype.itemsize for p in self.tensors),
            "dtype": self.config["torch_dtype"],
            "dropped_keys": self.dropped_keys,
            "shards": {
                f: {"tensors": len(ts), "bytes": sum(p.nbytes for p in ts)}
                for f, ts in self.shards.files.items()
            },
            "estimated_peak_memory_bytes": self.estimated_peak_bytes,
            "config": self.config,
        }


@dataclass(frozen=True)
class ConversionResult:
    out_dir: Path
    plan: ConversionPlan
    stats: WriteStats
    seconds: float
    files: list[str] = field(default_factory=list)


def check_vocab_fits(vocab_bytes: bytes, origin: str, rows: int) -> int | None:
    """The SentencePiece model ``vocab_bytes`` fits an embedding of ``rows`` rows: no more pieces than rows,
    its end-of-document piece within them (else ConversionError naming ``origin``). Returns that piece's id
    (None: the model has none). The one check for convert and export."""
    sp = load_sp_bytes(vocab_bytes, origin)
    if sp.get_piece_size() > rows:
        raise ConversionError(
            f"{origin} has {sp.get_piece_size()} pieces but the checkpoint's embedding has only {rows} rows",
            hint=_WRONG_VOCAB,
        )
    special = eod_piece(sp, origin)
    special_id = special[1] if special else None
    if special_id is not None and special_id >= rows:
        raise ConversionError(
            f"{ENDOFTEXT} has id {special_id}, beyond the {rows} embedding rows", hint=_WRONG_VOCAB
        )
    return special_id


_WRONG_VOCAB = (
    "the vocabulary does not belong to this checkpoint; pass the right --vocab; nothing was written"
)


def prepare(source: Path, options: ConvertOptions = ConvertOptions()) -> ConversionPlan:
    """Read the release (lazily), derive the config and map every tensor; writes nothing."""
    release = open_release(Path(source), iteration=options.iteration, vocab=options.vocab)
    ckpt = load_release_checkpoint(release)
    dims = derive_dims(ckpt)
    out_dtype = output_dtype(options.dtype)
    tensors = plan_conversion(ckpt, dims, out_dtype, options.drop_keys)
    dropped = drop_keys(source_keys(ckpt), options.drop_keys)
    for key in sorted(dropped):
        log.info("dropping %s (--drop-key %r)", key, dropped[key])
    written_dtype = out_dtype or _single_source_dtype(tensors)
    special_id, vocab_bytes = None, None
    if release.vocab is not None:
        vocab_bytes = release.vocab.read_all()
        special_id = check_vocab_fits(vocab_bytes, release.vocab.name, dims.vocab_size)
    elif options.tokenizer:
        raise ConversionError(
            f"{release.source}: no adept_vocab.model found next to the checkpoint",
            hint="pass --vocab PATH/adept_vocab.model, or --no-tokenizer to write the weights only "
            "(bos/eos ids are then left unset)",
        )
    config = hf_config(dims, written_dtype, special_id)
    shards = plan_shards(tensors, options.max_shard_size)
    return ConversionPlan(
        release, ckpt, dims, tensors, shards, config, special_id, vocab_bytes, dropped, options.drop_keys
    )


def _single_source_dtype(tensors: list[PlannedTensor]) -> torch.dtype:
    """The one dtype ``--dtype auto`` writes, which ``config.json``'s ``torch_dtype`` then names.

    Only written tensors count: ``rotary_emb.inv_freq`` (and anything ``--drop-key`` drops) is never
    written, so its dtype says nothing about the output; Megatron forks often keep that buffer in fp32
    beside bf16 weights, which must still convert bit for bit.
    """
    first: dict[torch.dtype, PlannedTensor] = {}
    for p in tensors:
        first.setdefault(p.source.dtype, p)
    if len(first) == 1:
        return next(iter(first))
    a, b = list(first.values())[:2]
    counts = ", ".join(f"{sum(p.source.dtype == d for p in tensors)} {dtype_name(d)}" for d in first)
    raise ConversionError(
        f"the checkpoint mixes floating dtypes across its weights: {a.source.key} is "
        f"{dtype_name(a.source.dtype)} but {b.source.key} is {dtype_name(b.source.dtype)} ({counts} tensors); "
        "--dtype auto keeps each tensor's dtype and config.json's torch_dtype can name only one",
        hint="pick the output dtype with --dtype bf16|fp16|fp32 (every weight is cast to it; values that would "
        "overflow are refused)",
    )


def _provenance(plan: ConversionPlan, options: ConvertOptions) -> dict[str, Any]:
    rel = plan.release
    return {
        # chat: whether the chat template was written (--chat, or a release named chat); push reads it
        "tokenizer": {"parity": tokenizer_parity(options), "chat": chat_choice(plan, options)},
        "tool": "persimmon-tools",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(rel.source.absolute()),
            "kind": rel.kind,
            "name": rel.source.name,
            "variant": rel.variant,
            # which name decided base/chat, or why it is unknown (persimmon_tools.megatron.variant)
            "variant_from": rel.variant_from,
            "iteration": plan.checkpoint.iteration,
            "tp": rel.tp,
            "pp": rel.pp,
            "checkpoint_files": [
                {
                    "name": src.name.split(":")[-1]
                    if rel.kind == "tar"
                    else str(Path(src.name).relative_to(rel.source) if rel.source.is_dir() else src.name),
                    "size": src.size,
                }
                for src in rel.source_files()  # shards, or a torch_dist checkpoint's files
            ],
        },
        "dtype": plan.config["torch_dtype"],
        "dropped_keys": plan.dropped_keys,
        "drop_key_patterns": list(plan.drop_patterns),
        "num_parameters": plan.summary()["parameters"],
        # the source's args, exactly (export rebuilds ckpt["args"] from this: persimmon_tools.conversion.args_record)
        **record_args(plan.checkpoint.args),
        # as saved (>= 2.0, the same in every shard), or None: absent (ADEPT's loader never reads it);
        # megatron.consistency.check_checkpoint_version is the rule, export applies it to this record again
        "checkpoint_version": plan.checkpoint.checkpoint_version,
    }


@contextlib.contextmanager
def _abandoned_on_failure(pool: ThreadPoolExecutor) -> Iterator[ThreadPoolExecutor]:
    """``pool``, shut down when the block ends: waited for when it succeeds, abandoned (queued work
    cancelled, running work left to fail on its own) when it raises."""
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def convert(
    source: Path,
    out_dir: Path,
    options: ConvertOptions = ConvertOptions(),
    *,
    progress: Callable[[int], None] = lambda n: None,
    on_plan: Callable[[ConversionPlan], None] = lambda p: None,
) -> ConversionResult:
    """Convert SOURCE into OUT_DIR; OUT_DIR appears complete or not at all."""
    out_dir = Path(out_dir)
    refuse_unsafe_output(out_dir, source=Path(source), vocab=options.vocab)  # before anything is read
    with claim_output_dir(out_dir, options.force) as claim:  # lock, leftovers, what OUT_DIR holds
        return _convert_into(claim, source, out_dir, options, progress, on_plan)


def _convert_into(
    claim: OutputClaim,
    source: Path,
    out_dir: Path,
    options: ConvertOptions,
    progress: Callable[[int], None],
    on_plan: Callable[[ConversionPlan], None],
) -> ConversionResult:
    start = time.perf_counter()
    plan = prepare(source, options)
    on_plan(plan)
    stats = WriteStats()
    # The tokenizer (build, parity gate, files) runs beside the shard writer, which spends its time in
    # syscalls and torch kernels; a refusal stops the conversion at the next shard. When the conversion
    # fails or is interrupted, the tokenizer thread is abandoned, not waited for (it may be seconds into
    # importing transformers): it writes only into the temp folder, never creates it, so it fails once the
    # folder is removed (remove_tree repeats the removal should it add an entry meanwhile).
    # Each shard's fsync and read-back check run in a third thread while the next shard is written
    # (otherwise each shard stalls on its own fsync; docs/performance.md).
    with (
        claim.staging() as tmp,
        _abandoned_on_failure(ThreadPoolExecutor(1, "tokenizer")) as pool,
        ThreadPoolExecutor(1, "fsync") as syncer,
    ):
        tokenizer = None
        if plan.vocab_bytes is not None and options.tokenizer:
            tokenizer = pool.submit(write_tokenizer_into, plan, tmp, options)
        finishing = []
        for fname, tensors in plan.shards.files.items():
            for done in [tokenizer, *finishing]:
                if done is not None and done.done():
                    done.result()  # raises an error now rather than after all the weights
            write_shard(
                tmp / fname,
                tensors,
                stats,
                check_finite=not options.allow_nonfinite,
                progress=progress,
                sync=False,
            )
            finishing.append(syncer.submit(finish_shard, tmp / fname, tensors))
        for done in finishing:
            done.result()
        plan.checkpoint.finish_records()  # the CRC-32 of records read only in part (megatron.records)
        refuse_bad_values(
            stats, allow_nonfinite=options.allow_nonfinite, allow_overflow=options.allow_overflow
        )
        if plan.shards.is_sharded:
            write_index(tmp, plan.shards)
        write_json(tmp / "config.json", plan.config)
        length = plan.config["max_position_embeddings"]  # the checkpoint's own: generate's default length
        write_json(tmp / "generation_config.json", generation_config(plan.special_id, length))
        fingerprint = tokenizer.result() if tokenizer is not None else None
        # conversion.json lists every file written: `--force` later replaces only those
        files = recorded_files(tmp)
        record = {**_provenance(plan, options), **fingerprint_entry(fingerprint), "output_files": files}
        write_json(tmp / CONVERSION_FILE, record)
    return ConversionResult(out_dir, plan, stats, time.perf_counter() - start, files)
