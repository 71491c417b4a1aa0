"""verify's own reader of one ``model_optim_rng.pt``: torch's zip format, a pickle allowlist, lazy tensors.

Part of the independent reference reader (see :mod:`.source_layout` for why it shares no code with
``persimmon_tools.megatron``). What it reads, per ``torch.save``'s zip format:

- ``<prefix>/data.pkl``: the pickled checkpoint dict (spec §B.1). Storages are persistent ids
  ``("storage", torch.<Type>Storage, key, location, numel)``; tensors are
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``;
- ``<prefix>/data/<key>``: each storage's raw bytes, stored uncompressed;
- ``<prefix>/byteorder``: ``little`` or ``big`` (missing: little, as ``torch.load`` assumes). Big-endian
  records are byte-swapped element by element when read (complex: per component), as ``torch.load`` does.

Why not ``torch.load(..., mmap=True, weights_only=True)``: a release tarball is read in place, and the 8B
release is one 18.8 GB ``.pt`` member of it; ``torch.load`` can only mmap a whole file, and on a file-like
object (a tar member) it reads every storage into RAM. So :mod:`zipfile` reads the zip directory over a
bounded slice of the file, and tensor bytes are read later, one row block at a time (seek + read, then
``torch.frombuffer``): memory stays bounded by the block size whatever the source kind.

The pickle is read by :class:`SourceUnpickler`, a subclass of the standard library's pure-Python
unpickler (the C one sizes its memo table by the largest index a file names, so one corrupt 4-byte index
would allocate tens of GB). Its allowlist: ``collections.OrderedDict``, ``argparse.Namespace``,
``torch.Size``, torch dtypes, the storage classes (markers only), the tensor rebuild functions (which
build lazy :class:`~persimmon_tools.verification.source_tensor.TensorView` s, reading nothing), ``builtins.set``/``frozenset``, and restricted
``_codecs.encode`` / ``copyreg._reconstructor``; classes of ``megatron.*``, ``tool_use.*`` (ADEPT's
``ModelBackend`` enum in args), ``apex.*`` and ``numpy.*`` (rng state) become inert :class:`Inert`
stand-ins. Any other global raises :class:`~persimmon_tools.errors.UnsafeCheckpointError` before it is
called; ``BUILD`` may only set the state of stand-ins, Namespaces and OrderedDicts.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError, UnsafeCheckpointError
from persimmon_tools.safe_graph import MAX_KEY_NODES, check_tree, guard_pickle_hashing, small_repr
from persimmon_tools.verification.source_layout import FileSlice
from persimmon_tools.verification.source_tensor import Record, TensorView, make_view

MAX_PICKLE_BYTES = 64 << 20  # an 8B checkpoint's data.pkl is ~150 kB; each pickle byte can make an object
_INERT_MODULES = ("megatron", "tool_use", "apex", "numpy", "transformer_engine")
_STORAGES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
    "double float half long int short"
).split()


def _dims(offset: Any, size: Any, stride: Any) -> tuple[Any, tuple, tuple]:
    """Checked before :func:`make_view` formats them: a shared nested list would unfold in its message."""
    if type(offset) is not int or not all(
        isinstance(d, tuple | list) and len(d) <= 64 and all(type(n) is int for n in d)
        for d in (size, stride)
    ):
        raise CheckpointError(
            f"malformed tensor view: offset {small_repr(offset, 30)}, size {small_repr(size, 60)}, "
            f"stride {small_repr(stride, 60)} (expected integers)",
            hint="the file is corrupt or was tampered with",
        )
    return offset, tuple(size), tuple(stride)


def _rebuild_v2(storage, offset, size, stride, *_rest) -> TensorView:
    return make_view(storage, *_dims(offset, size, stride))


def _rebuild_v3(storage, offset, size, stride, _grad, _hooks, dtype, *_rest) -> TensorView:
    if not isinstance(storage, Record) or not isinstance(dtype, torch.dtype):
        raise UnsafeCheckpointError("_rebuild_tensor_v3 got something other than a storage and a dtype")
    nbytes = storage.nbytes - storage.nbytes % dtype.itemsize
    return make_view(
        Record(storage.file, storage.offset, nbytes, dtype, storage.big_endian, storage.name),
        offset,
        size,
        stride,
    )


def _parameter(data: Any, *_rest: Any) -> TensorView:
    if not isinstance(data, TensorView):
        raise UnsafeCheckpointError(f"a Parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _from_type(func: Any, _new_type: Any, args: tuple, _state: Any) -> Any:
    if func not in (_rebuild_v2, _rebuild_v3, _parameter):
        raise UnsafeCheckpointError("_rebuild_from_type_v2 wraps a function that is not a tensor rebuild")
    return func(*args)


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise UnsafeCheckpointError("_codecs.encode called with unexpected arguments")
    return text.encode(encoding, errors)


class Inert:
    """Stand-in for a class that must not be imported (ADEPT, Megatron, numpy): keeps args and state only."""

    qualname = "?"
    args: tuple = ()  # class defaults: NEWOBJ builds instances without calling __init__
    kwargs: dict = {}  # noqa: RUF012 - never mutated
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """An enum stand-in's value (``ModelBackend("megatron")`` -> ``"megatron"``)."""
        return self.args[0] if self.args else None

    def __repr__(self) -> str:  # bounded: args may be a shared structure that unfolds exponentially
        return f"{self.qualname}({', '.join(small_repr(a, 40) for a in self.args[:4])})"


def _reconstructor(cls: Any, _base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls(state)
    if cls in (argparse.Namespace, collections.OrderedDict):
        return cls()
    raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed")


class _StorageMarker:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _STORAGES[name]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch.nn.parameter", "Parameter"): _parameter,
    ("torch", "Tensor"): Inert,  # only ever a marker argument of _rebuild_from_type_v2
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _encode,
}


class SourceUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # pure Python: see module doc
    """Unpickles ``data.pkl`` with the allowlist above; storages resolve to lazy :class:`Record` s."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(
        self,
        data: bytes,
        label: str,
        records: dict[str, tuple[int, int]],
        prefix: str,
        file: FileSlice,
        big_endian: bool,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self.label, self._records, self._prefix = label, records, prefix
        self._file, self._big = file, big_endian
        self._made: dict[str, Record] = {}
        self.globals_seen: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        qual = f"{module}.{name}"
        self.globals_seen.add(qual)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if module in ("torch", "torch.storage") and name in _STORAGES:
            return _StorageMarker(name)
        if module.split(".")[0] in _INERT_MODULES:
            return type(name, (Inert,), {"qualname": qual, "__module__": __name__})
        raise UnsafeCheckpointError(
            f"{self.label} references the global {qual}, which verify's reader does not allow; nothing "
            "from the file was executed",
            hint="a Megatron checkpoint needs only tensors, dtypes, argparse.Namespace and ADEPT's enums; "
            "the file is not a genuine release, or was tampered with",
        )

    def persistent_load(self, pid: Any) -> Record:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.label}: unexpected persistent id {small_repr(pid)}")
        _, marker, key, _location, numel = pid
        if not isinstance(marker, _StorageMarker) or not isinstance(key, str) or type(numel) is not int:
            raise UnsafeCheckpointError(f"{self.label}: malformed storage reference {small_repr(pid)}")
        name = f"{self._prefix}data/{key}"
        if name not in self._records:
            raise CheckpointError(
                f"{self.label}: the pickle names storage {key!r} but there is no record {name}",
                hint="the file is truncated or corrupt",
            )
        offset, nbytes = self._records[name]
        if numel * marker.dtype.itemsize > nbytes:
            raise CheckpointError(
                f"{self.label}: storage {key} claims {numel} x {marker.dtype}, its record holds {nbytes} bytes",
                hint="the file is corrupt or was tampered with",
            )
        rec = Record(
            self._file, offset, numel * marker.dtype.itemsize, marker.dtype, self._big, f"{self.label}:{name}"
        )
        if self._made.setdefault(key, rec).dtype != rec.dtype:
            raise CheckpointError(f"{self.label}: storage {key} is referenced with two dtypes")
        return self._made[key]

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, (Inert, argparse.Namespace, collections.OrderedDict)):
            raise UnsafeCheckpointError(
                f"{self.label}: the pickle sets the state of a {type(target).__name__}; nothing was executed",
                hint="a genuine checkpoint only sets the state of argparse.Namespace and ADEPT objects",
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _check_hashed(unpickler: SourceUnpickler, value: Any) -> None:
    check_tree(
        value, what=f"{unpickler.label}: a dict key or set member", error=CheckpointError, limit=MAX_KEY_NODES
    )


guard_pickle_hashing(SourceUnpickler.dispatch, _check_hashed)


def _children(obj: Any) -> Any:
    if isinstance(obj, Inert):
        return (obj.args, obj.kwargs, obj.state)
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return None


def _records(zf: zipfile.ZipFile, fh: Any, piece: FileSlice) -> dict[str, tuple[int, int]]:
    """``{name: (offset of the data in the slice, size)}``; every record must be stored and inside the slice."""
    out = {}
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{piece.label}: record {info.filename} is compressed; torch.save stores records as they are",
                hint="the file is not an unmodified torch.save checkpoint",
            )
        fh.seek(info.header_offset)
        head = fh.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(
                f"{piece.label}: record {info.filename} has no local header", hint="the file is corrupt"
            )
        start = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
        if start + info.file_size > piece.size:
            raise CheckpointError(
                f"{piece.label}: record {info.filename} runs past the end ({start + info.file_size} > {piece.size})",
                hint="the file is truncated; download it again",
            )
        out[info.filename] = (start, info.file_size)
    return out


def read_shard(piece: FileSlice) -> tuple[Any, set[str]]:
    """Unpickle one ``.pt`` with :class:`TensorView` leaves (no tensor bytes read); also the globals seen."""
    with piece.open() as fh:
        if fh.read(2) != b"PK":
            raise CheckpointError(
                f"{piece.label} is not a torch zip checkpoint (legacy or not torch.save at all)",
                hint="re-save it with a current torch on a trusted machine",
            )
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error) as err:
            raise CheckpointError(
                f"{piece.label} is not a readable zip ({err})", hint="the file is corrupt"
            ) from err
        with zf:
            pkls = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise CheckpointError(f"{piece.label}: expected one <prefix>/data.pkl, found {pkls}")
            prefix = pkls[0][: -len("data.pkl")]
            records = _records(zf, fh, piece)
    pkl_at, pkl_size = records[pkls[0]]
    if pkl_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{piece.label}: data.pkl is {pkl_size} bytes; refusing to unpickle it")
    order = b"little"
    if prefix + "byteorder" in records:
        order = piece.pread(*records[prefix + "byteorder"]).strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{piece.label}: byteorder record says {order[:20]!r}, not little or big")
    unpickler = SourceUnpickler(
        piece.pread(pkl_at, pkl_size), piece.label, records, prefix, piece, order == b"big"
    )
    try:
        obj = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        raise
    except Exception as err:  # any malformation of the pickle stream (the allowlist executed nothing else)
        raise CheckpointError(
            f"{piece.label}: data.pkl is malformed ({type(err).__name__}: {str(err)[:120]})",
            hint="the file is damaged; download it again",
        ) from err
    # Shared sub-structures unfold exponentially under any later walk (flatten, repr, comparisons).
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # named first: the usual target
        check_tree(
            obj["model"], what=f"{piece.label}: the model dict", error=CheckpointError, children_of=_children
        )
    check_tree(obj, what=f"{piece.label}: data.pkl", error=CheckpointError, children_of=_children)
    return obj, unpickler.globals_seen
