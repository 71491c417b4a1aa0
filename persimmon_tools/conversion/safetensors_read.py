"""Read a Hugging Face folder's safetensors without ``mmap``: the header of every shard, then rows on demand.

Shared by ``verify`` (the converted side) and ``export`` (an HF folder as the source). ``pread`` keeps an
8B folder out of the process's RSS (an ``mmap`` of the files, as ``safetensors.safe_open`` uses, counts every
touched page); reads are bounded by the caller's row ranges. Every header value is checked before use.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.megatron.lazy import pread_exact
from persimmon_tools.safe_read import MAX_SAFETENSORS_HEADER_BYTES, open_regular, parse_json, read_json

ErrorType = type[PersimmonToolsError]
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int  # absolute byte offset of the data
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_nbytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class SafetensorsFolder:
    """Tensor index of ``model.safetensors`` or ``model.safetensors.index.json`` shards; reads on demand.

    Problems raise ``error`` (the caller's error class: ``VerificationError`` in verify, ``ConversionError``
    in export), with ``redo`` as the hint's remedy.
    """

    def __init__(self, folder: Path, error: ErrorType, redo: str = "convert again") -> None:
        self.folder = Path(folder)
        self.error, self.redo = error, redo
        index = self.folder / "model.safetensors.index.json"
        if os.path.lexists(index):  # a link or FIFO there is refused by read_json, not skipped
            files = _index_files(index, error, redo)
        elif os.path.lexists(self.folder / "model.safetensors"):
            files = ["model.safetensors"]
        else:
            raise error(
                f"{self.folder} holds no model.safetensors(.index.json)",
                hint="pass a Hugging Face folder (what `persimmon-tools convert` or `save_pretrained` writes)",
            )
        self.entries: dict[str, _Entry] = {}
        for name in files:
            self.entries.update(_read_header(self.folder / name, error, redo))

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


def _index_files(index: Path, error: ErrorType, redo: str) -> list[str]:
    """The shard names of ``model.safetensors.index.json``: plain file names of this folder."""
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
    return sorted(set(weight_map.values()))


def _read_header(path: Path, error: ErrorType, redo: str) -> dict[str, _Entry]:
    with open_regular(
        path, what="safetensors shard", max_bytes=None, follow_symlinks=False, error=error
    ) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) != 8:
            raise error(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise error(
                f"{path}: the safetensors header claims {n} bytes (file: {size} bytes, limit "
                f"{MAX_SAFETENSORS_HEADER_BYTES})",
                hint=f"the file is truncated or damaged; {redo}",
            )
        header = parse_json(fh.read(n), origin=f"{path} (safetensors header)", error=error, hint=redo)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (start, stop), shape = info["dtype"], info["data_offsets"], info["shape"]
            ok = isinstance(dtype, str) and all(type(v) is int and v >= 0 for v in (start, stop, *shape))
            ok = ok and start <= stop
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise error(
                f"{path}: the header entry of tensor {name} is malformed (needs dtype, shape and data_offsets)",
                hint=f"the file is damaged; {redo}",
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise error(
                f"{path}: tensor {name} has dtype {dtype}, which is not a model weight dtype (BF16, F16, F32, F64)"
            )
        if 8 + n + stop > size:
            raise error(
                f"{path}: tensor {name} runs past the end of the file",
                hint=f"the file is truncated; {redo}",
            )
        out[name] = _Entry(path, 8 + n + start, SAFETENSORS_DTYPES[dtype], tuple(shape))
    return out
