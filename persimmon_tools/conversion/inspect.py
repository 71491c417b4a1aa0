"""``inspect``: what a release (or a converted folder) holds, as a JSON-able dict. Reads no tensor data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.config import derive_dims
from persimmon_tools.conversion.fingerprint import CONVERSION_FILE, VERIFICATION_FILE
from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def inspect_release(source: Path, *, iteration: int | None = None) -> dict[str, Any]:
    release = open_release(source, iteration=iteration)
    ckpt = load_release_checkpoint(release)
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
        "args": _jsonable(vars(ckpt.args)) if hasattr(ckpt.args, "__dict__") else _jsonable(ckpt.args),
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
    try:
        dims = derive_dims(ckpt)
        info["dims"] = dims.to_dict()
        info["num_parameters"] = dims.num_parameters()
    except PersimmonToolsError as err:
        info["dims_error"] = err.message
    return info


def inspect_converted(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    info: dict[str, Any] = {
        "type": "converted",
        "folder": str(folder),
        "config": json.loads((folder / "config.json").read_text()),
    }
    shards = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            shards.append(
                {
                    "file": path.name,
                    "bytes": path.stat().st_size,
                    "tensors": len(names),
                    "metadata": f.metadata(),
                }
            )
    info["shards"] = shards
    for name, key in ((CONVERSION_FILE, "conversion"), (VERIFICATION_FILE, "verification")):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            info[key] = (
                data
                if key == "conversion"
                else {"verdict": data.get("verdict"), "created": data.get("created")}
            )
    info["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
    return info


def inspect_source(source: Path, *, iteration: int | None = None) -> dict[str, Any]:
    """Inspect a release (tar / folder / iter_* / .pt) or a converted HF folder (has config.json)."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").is_file():
        return inspect_converted(source)
    return inspect_release(source, iteration=iteration)
