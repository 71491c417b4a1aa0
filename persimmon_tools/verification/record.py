"""The stored reference record: ``OUT_DIR/verification_reference.record``.

``verify`` against a source writes it beside ``verification.json`` (same atomic write; ``convert --force``
replaces it like ``verification.json``; ``verification.json``'s ``files`` fingerprint it, so ``push``
publishes it). ``verify OUT_DIR`` with no usable source checks the folder against it
(:mod:`persimmon_tools.verification.stored`).

The file is in safetensors format, but its name does not end in ``.safetensors``: loaders that take every
``*.safetensors`` of a folder without an index (vLLM, for a single-shard model) must not read it as weights.

Layout (safetensors; prompt ``i``, ``T`` its tokens, ``n`` its new tokens, ``k`` = :data:`TOP_K`)::

    prompt.{i}.ids           int32   (T,)        the prompt's token ids
    prompt.{i}.generated     int32   (n,)        the new tokens that were teacher-forced after it (the
                                                 converted model's greedy tokens; in a passing fp32 run
                                                 the reference's own)
    prompt.{i}.topk_values   float32 (T + n, k)  the reference's k largest logits at each position of
                                                 ids + generated, descending (row t predicts token t + 1)
    prompt.{i}.topk_indices  int32   (T + n, k)  their token ids (column 0: the reference's greedy choice)
    prompt.{i}.lse           float32 (T + n,)    log-sum-exp of the reference's logits over the vocabulary

``__metadata__``: ``format`` (:data:`FORMAT`), ``version`` (:data:`VERSION`) and ``record``, a JSON object:
``tool_version``, ``created``, ``dtype``, ``device``, ``rotary``, ``top_k``, ``new_tokens``, ``tolerances``
(the row verify applied), ``source`` (path, kind, files with name/size/sha256, iteration, tp, pp, variant:
as ``verification.json`` records it) and ``prompts`` [{``name``, ``label``, ``tokens``, ``new_tokens``,
``logit_scale``}] in tensor order.

Size: ``Σ_i [4·T_i + 4·n_i + (T_i + n_i)·(8k + 4)]`` bytes of tensors plus a header of about
``5 × 110`` bytes per prompt and the metadata (it holds the prompts' texts: 2-4 kB with the default
prompts): 260 bytes per position for k = 32, independent of the vocabulary and the model's size.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.conversion.fingerprint import (
    CONVERSION_FILE,
    REFERENCE_RECORD_FILE,
    VERIFICATION_FILE,
)
from persimmon_tools.errors import VerificationError
from persimmon_tools.safe_read import read_small
from persimmon_tools.safe_write import atomic_file

FORMAT = "persimmon-tools verification reference"
VERSION = 1
TOP_K = 32
MAX_RECORD_BYTES = 64 << 20  # ~250,000 positions; a bigger record is not written (and never read)
_HINT = "run verify with --reference SOURCE, which writes the record again"
_SOURCE_KEYS = ("path", "kind", "files", "sha256_of", "iteration", "tp", "pp", "variant")


def record_path(out_dir: Path) -> Path:
    return Path(out_dir) / REFERENCE_RECORD_FILE


def record_bytes(positions: int, prompt_tokens: int, new_tokens: int, k: int = TOP_K) -> int:
    """Bytes of the record's tensors (without header and metadata): the module docstring's formula."""
    return 4 * prompt_tokens + 4 * new_tokens + positions * (8 * k + 4)


@dataclass(frozen=True)
class StoredPrompt:
    """One prompt of the record (layouts in the module docstring)."""

    name: str
    label: str
    ids: list[int]
    generated: list[int]
    values: torch.Tensor  # (T + n, k) float32
    indices: torch.Tensor  # (T + n, k) int32
    lse: torch.Tensor  # (T + n,) float32
    logit_scale: float

    @property
    def sequence(self) -> list[int]:
        return self.ids + self.generated


@dataclass(frozen=True)
class StoredRecord:
    meta: dict[str, Any]
    prompts: list[StoredPrompt]
    sha256: str
    size: int


def build_record(
    prompts: list[tuple[str, str, list[int], list[int], float]], ref_logits: list[torch.Tensor], meta: dict
) -> bytes:
    """The record's bytes. ``prompts``: (name, label, ids, generated, logit_scale) each; ``ref_logits``: the
    reference's logits (T + n, V) over ids + generated, one per prompt."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    listed = []
    for i, ((name, label, ids, gen, scale), logits) in enumerate(zip(prompts, ref_logits, strict=True)):
        lf = logits.float()  # (T + n, V)
        top = lf.topk(min(TOP_K, lf.shape[-1]), dim=-1)  # sorted, descending
        tensors[f"prompt.{i}.ids"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"prompt.{i}.generated"] = torch.tensor(gen, dtype=torch.int32)
        tensors[f"prompt.{i}.topk_values"] = top.values.contiguous().cpu()
        tensors[f"prompt.{i}.topk_indices"] = top.indices.to(torch.int32).contiguous().cpu()
        tensors[f"prompt.{i}.lse"] = torch.logsumexp(lf.double(), dim=-1).float().cpu()
        listed.append(
            {"name": name, "label": label, "tokens": len(ids), "new_tokens": len(gen), "logit_scale": scale}
        )
    record = {**meta, "top_k": TOP_K, "prompts": listed}
    record["source"] = {k: v for k, v in (meta.get("source") or {}).items() if k in _SOURCE_KEYS}
    metadata = {"format": FORMAT, "version": str(VERSION), "record": json.dumps(record, ensure_ascii=False)}
    return save(tensors, metadata=metadata)


def verified_files(files: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """The folder as it was verified, from its fingerprint (``fingerprint_folder``): ``{relative path:
    {"sha256", "size"}}`` of every file but the toolkit's records (``verification.json``, ``conversion.json``,
    the record itself), which say how the folder was made and checked and change nothing it computes (the
    record's ``folder_files``)."""
    skip = {VERIFICATION_FILE, CONVERSION_FILE, REFERENCE_RECORD_FILE}
    return {k: v for k, v in files.items() if k not in skip}


def changed_since_recorded(files: dict[str, dict[str, object]], recorded: object) -> list[str] | None:
    """How the folder (its fingerprint now, ``files``) differs from the record's ``folder_files`` (empty:
    not at all); None for a record written before 2026-12-07 that has no ``folder_files``."""
    if not isinstance(recorded, dict):
        return None
    now = verified_files(files)
    return [
        f"{name}: {'missing' if name not in now else 'not in the verified folder' if name not in recorded else 'changed'}"
        for name in sorted(set(now) | set(recorded))
        if now.get(name) != recorded.get(name)
    ]


def write_record(data: bytes, out_dir: Path) -> Path | None:
    """Write the record into ``out_dir`` atomically (like ``verification.json``); None when it is bigger than
    :data:`MAX_RECORD_BYTES` (not written)."""
    if len(data) > MAX_RECORD_BYTES:
        return None
    path = record_path(out_dir)
    with atomic_file(path, "stored reference record", VerificationError) as fh:
        fh.write(data)
    return path


def _damaged(path: Path, why: str) -> VerificationError:
    return VerificationError(f"{path} (the stored reference record) is damaged: {why}", hint=_HINT)


def _metadata(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < 8:
        raise _damaged(path, "shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8")) if 8 + n <= len(data) else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _damaged(path, "no safetensors header with __metadata__")
    return header["__metadata__"]


def read_record(out_dir: Path) -> StoredRecord:
    """The record of ``out_dir``, checked for its format, version and tensor shapes.

    Raises:
        VerificationError: unreadable, another format or version, or tensors that do not fit together.
    """
    from safetensors.torch import load

    path = record_path(out_dir)
    data = read_small(
        path,
        what="the stored reference record",
        max_bytes=MAX_RECORD_BYTES,
        follow_symlinks=False,
        error=VerificationError,
        hint=_HINT,
    )
    meta = _metadata(data, path)
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise _damaged(
            path, f"format {meta.get('format')!r} version {meta.get('version')!r}, not {FORMAT!r} {VERSION}"
        )
    try:
        record = json.loads(meta.get("record", ""))
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error type; json a ValueError
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompts"), list) or not record["prompts"]:
        raise _damaged(path, "its metadata lists no prompts")
    prompts = []
    for i, p in enumerate(record["prompts"]):
        try:
            ids, gen = tensors[f"prompt.{i}.ids"], tensors[f"prompt.{i}.generated"]
            values, indices = tensors[f"prompt.{i}.topk_values"], tensors[f"prompt.{i}.topk_indices"]
            lse = tensors[f"prompt.{i}.lse"]
            rows = ids.numel() + gen.numel()
            if (
                values.shape != indices.shape
                or values.ndim != 2
                or values.shape[0] != rows
                or lse.shape != (rows,)
            ):
                raise ValueError("its tensors do not fit together")
            if any(t.is_floating_point() for t in (ids, gen, indices)) or ids.ndim != 1 or gen.ndim != 1:
                raise ValueError("its ids or top-k indices are not integers")
            if not (values.is_floating_point() and lse.is_floating_point()):
                raise ValueError("its top-k values or log-sum-exp are not floating point")
            if (
                not ids.numel()
                or not values.shape[1]
                or any(int(t.min()) < 0 for t in (ids, gen, indices) if t.numel())
            ):
                raise ValueError("no token ids, no top-k, or negative token ids")
            if not isinstance(p, dict) or not math.isfinite(float(p["logit_scale"])):
                raise ValueError("no finite logit_scale")
            prompts.append(
                StoredPrompt(
                    name=str(p["name"]),
                    label=str(p.get("label", p["name"])),
                    ids=ids.tolist(),
                    generated=gen.tolist(),
                    values=values.float(),
                    indices=indices.to(torch.int64),
                    lse=lse.float(),
                    logit_scale=float(p["logit_scale"]),
                )
            )
        except KeyError as err:
            raise _damaged(path, f"prompt {i}: no {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise _damaged(path, f"prompt {i}: {err}") from None
    return StoredRecord(record, prompts, hashlib.sha256(data).hexdigest(), len(data))


def describe(data_or_record: bytes | StoredRecord) -> dict[str, Any]:
    """The record's identity as ``verification.json``'s ``reference_record`` check reports it."""
    if isinstance(data_or_record, StoredRecord):
        return {"file": REFERENCE_RECORD_FILE, "bytes": data_or_record.size, "sha256": data_or_record.sha256}
    return {
        "file": REFERENCE_RECORD_FILE,
        "bytes": len(data_or_record),
        "sha256": hashlib.sha256(data_or_record).hexdigest(),
    }
