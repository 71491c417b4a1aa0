"""Read a Hugging Face folder's safetensors without ``mmap``: the header of every shard, then rows on demand.

Shared by ``verify`` (the converted side) and ``export`` (an HF folder as the source). ``pread`` keeps an
8B folder out of the process's RSS (an ``mmap`` of the files, as ``safetensors.safe_open`` uses, counts every
touched page); reads are bounded by the caller's row ranges.

Headers are read as strictly as the ``safetensors`` library reads them (``Metadata::validate`` and
``read_metadata`` in its ``tensor.rs``), so no file it refuses is read here from neighbouring bytes:

- the 8-byte little-endian size ``N`` of the JSON header is at most :data:`MAX_SAFETENSORS_HEADER_BYTES`
  (the library's limit is 100 MB) and ``8 + N`` at most the file's size;
- the header is one UTF-8 JSON object; ``__metadata__``, when present, maps strings to strings; every other
  key is a tensor with ``dtype``, ``shape`` (whole numbers >= 0) and ``data_offsets`` ``[begin, end]``;
- names are unique (a JSON object naming a key twice, at any level, is refused; the library keeps the last
  one and would then refuse the file only when the hidden tensor's bytes leave a hole);
- sorted by offsets, each tensor begins where the previous one ends (the first at 0): no overlap, no gap;
  each range holds exactly ``numel x itemsize`` bytes; the last ends at the end of the file.

A folder is one unambiguous set of weight files: ``model.safetensors`` or ``model.safetensors.index.json``
with its shards, never both (transformers would load ``model.safetensors`` and ignore the index); the
index's ``weight_map`` names exactly the tensors its shards hold, each in its own shard, and no tensor is in
two shards.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.megatron.lazy import pread_exact
from persimmon_tools.safe_read import MAX_SAFETENSORS_HEADER_BYTES, open_regular, read_json

ErrorType = type[PersimmonToolsError]
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_BLOCK_BYTES = 64 << 20
_LISTED = 5


@dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int  # absolute byte offset of the data
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_nbytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def weight_files(folder: Path) -> list[str]:
    """The weight files of ``folder`` as transformers names them (``model.safetensors``, the index or both);
    a link or FIFO there counts, so that it is refused by the reader rather than skipped."""
    return [name for name in (SINGLE_FILE, INDEX_FILE) if os.path.lexists(Path(folder) / name)]


class SafetensorsFolder:
    """Tensor index of ``model.safetensors`` or ``model.safetensors.index.json`` shards; reads on demand.

    Problems raise ``error`` (the caller's error class: ``VerificationError`` in verify, ``ConversionError``
    in export), with ``redo`` as the hint's remedy.
    """

    def __init__(self, folder: Path, error: ErrorType, redo: str = "convert again") -> None:
        self.folder = Path(folder)
        self.error, self.redo = error, redo
        found = weight_files(self.folder)
        if len(found) == 2:
            raise error(
                f"{self.folder} holds both {SINGLE_FILE} and {INDEX_FILE}: two sets of weights, and "
                f"transformers loads {SINGLE_FILE} alone (it never reads the index then)",
                hint=f"keep one set: remove {INDEX_FILE} and the shards it names if {SINGLE_FILE} is the "
                f"model, else remove {SINGLE_FILE}",
            )
        if not found:
            raise error(
                f"{self.folder} holds no {SINGLE_FILE} or {INDEX_FILE}",
                hint="pass a Hugging Face folder (what `persimmon-tools convert` or `save_pretrained` writes)",
            )
        self.weights_file = found[0]
        weight_map = _index_map(self.folder / INDEX_FILE, error, redo) if found[0] == INDEX_FILE else None
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self.entries: dict[str, _Entry] = {}
        for name in files:
            for tensor, entry in _read_header(self.folder / name, error, redo).items():
                if tensor in self.entries:
                    raise error(
                        f"{self.folder}: tensor {tensor} is in two shards, {self.entries[tensor].path.name} "
                        f"and {name}",
                        hint=f"the shards come from different saves; {redo}",
                    )
                self.entries[tensor] = entry
        if weight_map is not None:
            _check_index(self.folder / INDEX_FILE, weight_map, self.entries, error, redo)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise self.error(
                f"{self.folder} has no tensor {name}",
                hint=f"the folder is incomplete; {self.redo}",
            ) from None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        e = self.entry(name)
        if not e.shape:
            start, stop = 0, 1
        buf = pread_exact(e.path, e.offset + start * e.row_nbytes, (stop - start) * e.row_nbytes, str(e.path))
        if not buf:
            return torch.empty((0, *e.shape[1:]), dtype=e.dtype)
        return (
            torch.frombuffer(buf, dtype=e.dtype).view(-1, *e.shape[1:])
            if e.shape
            else torch.frombuffer(buf, dtype=e.dtype).reshape(())
        )

    def read(self, name: str) -> torch.Tensor:
        e = self.entry(name)
        return self.read_rows(name, 0, e.shape[0] if e.shape else 1)

    def iter_rows(self, name: str, max_bytes: int = _BLOCK_BYTES) -> Iterator[torch.Tensor]:
        e = self.entry(name)
        step = max(1, max_bytes // max(1, e.row_nbytes))
        for a in range(0, e.shape[0], step):
            yield self.read_rows(name, a, min(e.shape[0], a + step))


def _index_map(index: Path, error: ErrorType, redo: str) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json``: tensor name -> a plain file name of this folder."""
    data = read_json(index, what="safetensors index", error=error, follow_symlinks=False)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and "/" not in v and "\\" not in v and not v.startswith(".")
        for v in weight_map.values()
    ):
        raise error(
            f"{index}: 'weight_map' should map tensor names to shard file names of this folder",
            hint=f"the index is damaged; {redo}",
        )
    return weight_map


def _check_index(
    index: Path, weight_map: dict[str, str], entries: dict[str, _Entry], error: ErrorType, redo: str
) -> None:
    """The index names exactly the tensors its shards hold, each in the shard that holds it."""
    problems = [f"{t} is in {entries[t].path.name}, not in the index" for t in entries if t not in weight_map]
    for tensor, file in weight_map.items():
        if tensor not in entries:
            problems.append(f"{tensor}: the index names {file}, which does not hold it")
        elif entries[tensor].path.name != file:
            problems.append(f"{tensor}: the index names {file} but it is in {entries[tensor].path.name}")
    if problems:
        more = f" (and {len(problems) - _LISTED} more)" if len(problems) > _LISTED else ""
        raise error(
            f"{index} does not describe its shards: " + "; ".join(sorted(problems)[:_LISTED]) + more,
            hint=f"the index and the shards come from different saves; {redo}",
        )


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _parse(data: bytes, path: Path, error: ErrorType, redo: str) -> dict[str, Any]:
    """The JSON header: one object, every key unique at every level (``object_pairs_hook``)."""
    hint = f"the file is damaged; {redo}"
    try:
        header = json.loads(data.decode("utf-8"), object_pairs_hook=_unique)
    except _Duplicate as dup:
        raise error(
            f"{path}: the safetensors header names {str(dup.key)[:80]!r} twice in one JSON object (a tensor "
            "named twice hides one of the two)",
            hint=hint,
        ) from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: the safetensors header is not UTF-8 (byte {err.start})", hint=hint) from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise error(
            f"{path}: the safetensors header is not valid JSON ({str(err)[:80]})", hint=hint
        ) from None
    if not isinstance(header, dict):
        raise error(f"{path}: the safetensors header is not a JSON object", hint=hint)
    return header


def _tensor_info(path: Path, name: str, info: Any, error: ErrorType, redo: str) -> tuple[str, int, int, list]:
    try:
        dtype, (start, stop), shape = info["dtype"], info["data_offsets"], info["shape"]
        ok = isinstance(dtype, str) and isinstance(shape, list) and len(info["data_offsets"]) == 2
        ok = ok and all(type(v) is int and v >= 0 for v in (start, stop, *shape))
        name.encode("utf-8")  # a lone surrogate (\ud800) is not a name the library can read
    except (KeyError, TypeError, ValueError, UnicodeEncodeError):
        ok = False
    if not ok:
        raise error(
            f"{path}: the header entry of tensor {name[:80]!r} is malformed (needs dtype, shape and "
            "data_offsets [begin, end] as whole numbers >= 0)",
            hint=f"the file is damaged; {redo}",
        )
    if dtype not in SAFETENSORS_DTYPES:
        raise error(
            f"{path}: tensor {name} has dtype {dtype[:20]}, which is not a model weight dtype "
            "(BF16, F16, F32, F64)",
            hint=f"save the model in one of those dtypes; {redo}",
        )
    return dtype, start, stop, shape


def _read_header(path: Path, error: ErrorType, redo: str) -> dict[str, _Entry]:
    damaged = f"the file is truncated or damaged; {redo}"
    with open_regular(
        path, what="safetensors shard", max_bytes=None, follow_symlinks=False, error=error
    ) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) != 8:
            raise error(f"{path} is not a safetensors file (too short: {size} bytes)", hint=damaged)
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise error(
                f"{path}: the safetensors header claims {n} bytes (file: {size} bytes, limit "
                f"{MAX_SAFETENSORS_HEADER_BYTES})",
                hint=damaged,
            )
        header = _parse(fh.read(n), path, error, redo)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise error(f"{path}: the header's __metadata__ is not a map of strings", hint=damaged)
    infos = {name: _tensor_info(path, name, info, error, redo) for name, info in header.items()}
    data_bytes = size - 8 - n
    end, previous = 0, None
    for name, (dtype, start, stop, shape) in sorted(infos.items(), key=lambda kv: kv[1][1:3]):
        if start != end or stop < start:
            after = f"{previous}, which ends at {end}" if previous else "the start of the data (offset 0)"
            what = f"overlap {after}" if start < end else f"leave a gap after {after}"
            what = "end before they begin" if stop < start else what
            raise error(
                f"{path}: tensor {name} has data_offsets [{start}, {stop}], which {what}",
                hint=f"the header does not describe the file's bytes; {damaged}",
            )
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if stop - start != need:
            raise error(
                f"{path}: tensor {name} ({dtype} {shape}) needs {need} bytes but its data_offsets "
                f"[{start}, {stop}] hold {stop - start}",
                hint=damaged,
            )
        end, previous = stop, name
    if end != data_bytes:
        raise error(
            f"{path}: the tensors' data ends at byte {end} of the data but the file holds {data_bytes} data "
            "bytes" + (" (the file is shorter)" if end > data_bytes else " (bytes no tensor describes)"),
            hint=damaged,
        )
    return {
        name: _Entry(path, 8 + n + start, SAFETENSORS_DTYPES[dtype], tuple(shape))
        for name, (dtype, start, _, shape) in infos.items()
    }
