"""Write ``torch.save``-compatible zip checkpoints (and tar members) without holding tensors in memory.

Used by ``make-release``: an 8B release is ~19 GB, so each tensor is a :class:`TensorSpec` whose bytes are
produced in row blocks by a callback while the file is written. The format matches ``torch.save``:
``archive/data.pkl`` (storages as persistent ids ``("storage", torch.<Type>Storage, key, "cpu", numel)``,
tensors rebuilt by ``torch._utils._rebuild_tensor_v2``), ``archive/byteorder``, ``archive/data/<key>``
records stored uncompressed and 64-byte aligned, ``archive/version``. Tests load the result with
``torch.load`` to prove compatibility.

The zip is written as one forward stream (since 2026-12-07, 0.1.0): each record's local header carries flag
bit 3 with CRC and sizes 0, and a data descriptor after the record's bytes holds its CRC-32 and sizes (zip64
for the tensor records), as ``torch.save`` itself writes them in torch 2.x; the central directory holds the
same CRCs and sizes. Nothing is patched afterwards, so a writer can hash the file's bytes as they pass
(:class:`~persimmon_tools.megatron.manifest.HashingSink`: ``export``'s integrity manifest).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from persimmon_tools.megatron.manifest import HashingSink
from persimmon_tools.safe_write import open_new_file

_STORAGE_TYPES = {
    torch.bfloat16: "BFloat16Storage",
    torch.float16: "HalfStorage",
    torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.uint8: "ByteStorage",
    torch.int8: "CharStorage",
    torch.bool: "BoolStorage",
}
_ALIGN = 64
_MTIME = 1694131200  # fixed (2023-09-08), so the same release is written byte for byte the same


@dataclass(eq=False)
class TensorSpec:
    """A tensor to be written: shape, dtype and a producer of its row blocks (dim 0, in order)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: Callable[[], Iterator[torch.Tensor]]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        t = tensor.detach().contiguous()
        return cls(tuple(t.shape), t.dtype, lambda: iter([t]))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __reduce_ex__(self, protocol: int) -> Any:  # only ever pickled by _Pickler below
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (
            torch._utils._rebuild_tensor_v2,
            (
                _StorageToken(self),
                0,
                torch.Size(self.shape),
                tuple(reversed(stride)),
                False,
                collections.OrderedDict(),
            ),
        )


@dataclass(eq=False)
class _StorageToken:
    spec: TensorSpec


class _Pickler(pickle.Pickler):
    def __init__(self, fh: BinaryIO) -> None:
        super().__init__(fh, protocol=2)
        self.storages: list[TensorSpec] = []
        self._keys: dict[int, str] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):  # plain tensors are written like TensorSpecs (torch.save's layout)
            return TensorSpec.of(obj).__reduce_ex__(2)
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageToken):
            key = self._keys.get(id(obj.spec))
            if key is None:
                key = self._keys[id(obj.spec)] = str(len(self.storages))
                self.storages.append(obj.spec)
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.spec.dtype]), key, "cpu", obj.spec.numel)
        return None


def _aligned_info(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """A ZipInfo whose data starts on a 64-byte boundary (padding in an extra field, as torch does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_len = 30 + len(name.encode()) + 20 + 4  # + zip64 extra + our padding field header
    pad = -(zf.fp.tell() + header_len) % _ALIGN
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding field, like torch's writer
    return info


def payload_bytes(obj: Any) -> int:
    """The tensor bytes :func:`write_pt` writes for ``obj``: the sum of what it reports to ``on_bytes``
    (each storage once, however often it is referenced)."""
    pickler = _Pickler(io.BytesIO())
    pickler.dump(obj)
    return sum(spec.numel * spec.dtype.itemsize for spec in pickler.storages)


def write_pt(fh: BinaryIO, obj: Any, *, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write ``obj`` (dicts/Namespaces/... with :class:`TensorSpec` leaves) in torch's zip format to ``fh``."""
    pkl = io.BytesIO()
    pickler = _Pickler(pkl)
    pickler.dump(obj)
    out = fh if isinstance(fh, HashingSink) else HashingSink(fh, hash=False)  # forward only: no patching
    with zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(zipfile.ZipInfo("archive/data.pkl", date_time=(1980, 1, 1, 0, 0, 0)), pkl.getvalue())
        zf.writestr(zipfile.ZipInfo("archive/byteorder", date_time=(1980, 1, 1, 0, 0, 0)), "little")
        for key, spec in enumerate(pickler.storages):
            with zf.open(_aligned_info(zf, f"archive/data/{key}"), mode="w", force_zip64=True) as out:
                for block in spec.blocks():
                    data = block.to(spec.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
                    out.write(memoryview(data))
                    on_bytes(data.nbytes)
        zf.writestr(zipfile.ZipInfo("archive/version", date_time=(1980, 1, 1, 0, 0, 0)), "3\n")


class _MemberFile(io.RawIOBase):
    """A writable, seekable window of a file starting at ``base`` (a tar member being written)."""

    def __init__(self, fh: BinaryIO, base: int) -> None:
        super().__init__()
        self._fh, self._base = fh, base
        self._end = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._fh.tell() - self._base

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            pos += self._end
        elif whence == io.SEEK_CUR:
            pos += self.tell()
        self._fh.seek(self._base + pos)
        return pos

    def write(self, data) -> int:  # type: ignore[override]
        n = self._fh.write(data)
        self._end = max(self._end, self.tell())
        return n

    @property
    def size(self) -> int:
        return self._end


class TarWriter:
    """Write an uncompressed GNU tar whose members may be streamed without knowing their size first."""

    def __init__(self, target: os.PathLike[str] | str | BinaryIO) -> None:
        """Write into ``target``: an open binary file (left open by :meth:`close`), or a path, which is
        created exclusively and never through a symlink (write beside, then rename: see
        :func:`persimmon_tools.safe_write.atomic_file`)."""
        self._owns = not hasattr(target, "write")
        self._fh: BinaryIO = open_new_file(Path(target)) if self._owns else target  # type: ignore[arg-type]
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 - closed in close()

    def add_dir(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
        self._tar.addfile(info)

    def add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, _MTIME
        self._tar.addfile(info, io.BytesIO(data))

    def add_stream(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """Add a member whose content ``write(fileobj)`` produces; the header is patched afterwards."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = (
            1 << 40,
            0o644,
            _MTIME,
        )  # placeholder; GNU headers are 512 bytes whatever the size
        header_pos = self._fh.tell()
        header = info.tobuf(tarfile.GNU_FORMAT, self._tar.encoding, self._tar.errors)
        self._fh.write(header)
        member = _MemberFile(self._fh, self._fh.tell())
        write(member)
        size = member.size
        self._fh.seek(member._base + size)
        info.size = size
        new_header = info.tobuf(tarfile.GNU_FORMAT, self._tar.encoding, self._tar.errors)
        if len(new_header) != len(header):
            raise RuntimeError("tar header size changed while patching")  # pragma: no cover
        self._fh.write(b"\0" * (-size % tarfile.BLOCKSIZE))
        end = self._fh.tell()
        self._fh.seek(header_pos)
        self._fh.write(new_header)
        self._fh.seek(end)
        self._tar.offset = end

    def close(self) -> None:
        self._tar.close()
        if self._owns:
            self._fh.close()
        else:
            self._fh.flush()
