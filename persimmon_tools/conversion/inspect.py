"""``inspect``: what a release (or a converted folder) holds, as a JSON-able dict. Never parses tensor data.

For a converted folder with ``verification.json``, its files are hashed (sha256, as ``push`` does) to tell
whether the folder is still what was verified (:func:`~persimmon_tools.conversion.fingerprint.verification_status`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.config import derive_dims
from persimmon_tools.conversion.fingerprint import (
    CONVERSION_FILE,
    REFERENCE_RECORD_FILE,
    VERIFICATION_FILE,
    verification_status,
    verify_command,
)
from persimmon_tools.errors import CheckpointError, ConversionError, PersimmonToolsError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.dist_layout import COMMON_FILE
from persimmon_tools.megatron.release import open_release
from persimmon_tools.safe_graph import Budget, small_repr
from persimmon_tools.safe_read import (
    MAX_SAFETENSORS_HEADER_BYTES,
    open_regular,
    parse_json,
    read_json_record,
    scan_folder,
)


def _jsonable(value: Any, budget: Budget, depth: int = 0) -> Any:
    """``value`` as JSON (other objects as their bounded repr); every value visited, a shared one once per
    visit, is spent from ``budget``."""
    budget.visit(value, depth)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, budget, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            budget.visit(k, depth + 1)
            out[k if isinstance(k, str) else small_repr(k, 200)] = _jsonable(v, budget, depth + 1)
        return out
    return small_repr(value, 200)


def _args_json(ckpt: Any, shard: str) -> Any:
    """``ckpt["args"]`` as JSON: a Namespace's or stand-in's fields, a dict's items (an ``OrderedDict``'s
    instance attributes are not args), other values as they are."""
    args = ckpt.args
    fields = args if isinstance(args, dict) else vars(args) if hasattr(args, "__dict__") else args
    budget = Budget(
        f"{shard}: ckpt['args']",
        CheckpointError,
        hint="real Megatron args hold a few hundred plain values; the file is corrupt or was tampered with",
    )
    return _jsonable(fields, budget)


def inspect_release(source: Path, *, iteration: int | None = None) -> dict[str, Any]:
    release = open_release(source, iteration=iteration)
    ckpt = load_release_checkpoint(release)
    dist = release.dist
    args_file = str(dist.path / COMMON_FILE) if dist is not None else release.shard_list()[0][1].name
    info: dict[str, Any] = {
        "type": "release",
        "source": str(release.source),
        "kind": release.kind,
        "variant": release.variant,
        "iteration": ckpt.iteration,
        "tp": release.tp,
        "pp": release.pp,
        "shards": [
            {"rank": list(rank), "file": src.name, "bytes": src.size} for rank, src in release.shard_list()
        ],
        "vocab": release.vocab.name if release.vocab else None,
        "top_level_keys": ckpt.top_level_keys,
        "pickle_globals": ckpt.globals_seen,
        "args": _args_json(ckpt, args_file),
        "tensors": [
            {
                "name": k,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "bytes": t.nbytes,
                "parallel": t.kind.value if t.kind else None,
            }
            for k, t in ckpt.tensors.items()
        ],
    }
    if dist is not None:  # a Megatron-Core torch_dist checkpoint: its files, objects and unread tensors
        info["torch_dist"] = {
            "folder": str(dist.path),
            "files": [{"file": src.name, "bytes": src.size} for src in dist.files],
            "metadata_version": dist.metadata.version,
            "stored_tensors": {k: list(t.shape) for k, t in dist.tensors.items()},
            "byte_objects": len(dist.objects),
            "tensors_not_read": len(dist.skipped),
        }
    try:
        dims = derive_dims(ckpt)
        info["dims"] = dims.to_dict()
        info["num_parameters"] = dims.num_parameters()
    except PersimmonToolsError as err:
        info["dims_error"] = err.message
    return info


def _safetensors_summary(path: Path) -> dict[str, Any]:
    """File size, tensor count and metadata from a safetensors header (read here: never through a link, never
    from a FIFO; the header is bounded and parsed with typed errors)."""
    with open_regular(
        path, what="safetensors shard", max_bytes=None, follow_symlinks=False, error=ConversionError
    ) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
        if not 0 < n <= min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise ConversionError(
                f"{path} is not a safetensors file (header size {n}, file size {size})",
                hint="the file is truncated or damaged; convert again",
            )
        header = parse_json(fh.read(n), origin=f"{path} (safetensors header)", error=ConversionError)
    metadata = header.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise ConversionError(f"{path}: __metadata__ of the safetensors header is not an object")
    return {
        "file": path.name,
        "bytes": size,
        "tensors": sum(1 for k in header if k != "__metadata__"),
        "metadata": metadata,
    }


def _record(folder: Path, name: str) -> dict[str, Any] | None:
    return read_json_record(folder / name, what=name, error=ConversionError)


def inspect_converted(folder: Path) -> dict[str, Any]:
    """What a converted folder holds; links and other non-regular files are listed, never read."""
    scan = scan_folder(folder, max_depth=1)
    info: dict[str, Any] = {
        "type": "converted",
        "folder": str(folder),
        "config": _record(folder, "config.json"),
    }
    weights = [f for f in scan.files if f.endswith(".safetensors") and f != REFERENCE_RECORD_FILE]
    info["shards"] = [_safetensors_summary(folder / f) for f in weights]
    conversion = _record(folder, CONVERSION_FILE)
    if conversion is not None:
        info["conversion"] = conversion
    report = _record(folder, VERIFICATION_FILE)
    if report is not None:
        # the same judgement as push's (hashes the recorded files): "stale" here exactly when push refuses
        # the folder as stale
        status = verification_status(folder, report)
        info["verification"] = {
            "verdict": report.get("verdict"),
            "created": report.get("created"),
            **status.to_dict(),
        }
    else:  # never verified (--no-verify, an interrupted automatic verify): the command that checks it
        recorded = (conversion or {}).get("source")
        source = recorded.get("path") if isinstance(recorded, dict) else None
        command = verify_command(folder, source if isinstance(source, str) else "SOURCE")
        info["verification"] = {
            "verdict": None,
            "created": None,
            **verification_status(folder, None).to_dict(),  # state "missing", as push judges it
            "status": f"not run ({command})",
            "command": command,
        }
    info["files"] = scan.files
    if scan.irregular:
        info["not_regular_files"] = scan.irregular
    return info


@dataclass(frozen=True)
class InspectOptions:
    """Options of :func:`inspect_source` (the ``inspect`` command's flags).

    Attributes:
        iteration: which ``iter_XXXXXXX`` of a release to inspect (default: the one the release names).
        tensors: list every tensor of a release (``"tensors"``); ``False`` leaves the list out.
    """

    iteration: int | None = None
    tensors: bool = True


def inspect_source(source: Path, options: InspectOptions = InspectOptions()) -> dict[str, Any]:
    """Inspect a release (tar / folder / iter_* / .pt / Megatron-Core torch_dist) or a converted HF folder
    (has config.json)."""
    source = Path(source)
    if source.is_dir() and os.path.lexists(source / "config.json"):
        info = inspect_converted(source)
    else:
        info = inspect_release(source, iteration=options.iteration)
    if not options.tensors:
        info.pop("tensors", None)
    return info
