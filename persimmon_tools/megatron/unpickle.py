"""A restricted unpickler for Megatron checkpoints: an explicit allowlist, inert stand-ins, nothing executed.

``model_optim_rng.pt`` pickles reference ``argparse.Namespace``, ADEPT's
``tool_use.megatron.megatron_utils.ModelBackend`` enum, possibly ``megatron.*`` classes, numpy RNG state and
torch dtypes (spec §B.4). Loading them with ``torch.load(weights_only=False)`` would import and run ADEPT's
code (or anything else a hostile file names). Here every global goes through :meth:`RestrictedUnpickler.find_class`:

- tensor rebuilds are replaced by functions that build :class:`~persimmon_tools.megatron.lazy.LazyTensor` records
  (no bytes are read while unpickling);
- ``tool_use.*``, ``megatron.*``, ``apex.*`` and numpy objects, and ``signal.Signals`` (an enum in today's
  Megatron-LM args), become :class:`Opaque` stand-ins that only record their name and arguments;
- a handful of plain containers and dtypes are allowed as themselves, ``torch.device`` as its name;
- anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ``torch`` internals other than
  tensor rebuilds, ...) raises :class:`UnsafeCheckpointError` naming the global, before it is called;
- ``BUILD`` (``__setstate__`` / ``__dict__`` update) is only allowed on stand-ins, ``argparse.Namespace`` and
  ``OrderedDict``: a pickle must not rewrite the fields of a validated tensor view or storage reference
  (e.g. point a tensor at ``/etc/passwd``).

After loading, :func:`~persimmon_tools.safe_graph.check_tree` bounds what any later walk of the object can
cost (values and text once shared parts are unfolded, nesting, integer sizes), and every message that shows
a pickled value uses :func:`~persimmon_tools.safe_graph.small_repr`.

It is the toolkit's only unpickler of checkpoints: convert, inspect, export and verify's reference side all
read through it (``tests/megatron/test_byte_layer_oracle.py`` compares what it gives with ``torch.load``).

The pure-Python unpickler is used, not the C one: the C unpickler sizes its memo table by the largest
``LONG_BINPUT`` index, so a 4-byte index in a corrupt file makes it allocate and zero tens of GB. A
checkpoint's ``data.pkl`` is small (about 150 kB for 8B), so the speed difference does not matter.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import struct
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError, UnsafeCheckpointError
from persimmon_tools.megatron.lazy import LazyTensor, StorageRef
from persimmon_tools.safe_graph import MAX_KEY_NODES, check_tree, guard_pickle_hashing, small_repr

#: torch stores sizes, strides, offsets and element counts as 64-bit integers.
_INT64 = range(-(1 << 63), 1 << 63)

#: Module prefixes whose classes become inert stand-ins (ADEPT / Megatron / numpy objects in args, rng state).
OPAQUE_PREFIXES = ("tool_use.", "megatron.", "apex.", "numpy.", "transformer_engine.")
OPAQUE_MODULES = ("tool_use", "megatron", "apex", "numpy")
#: Single standard-library classes that become inert stand-ins too: the enum today's Megatron-LM keeps in its
#: args (``args.exit_signal = signal.SIGTERM``, saved in a torch_dist checkpoint's ``common.pt``).
OPAQUE_GLOBALS = frozenset({("signal", "Signals")})

#: torch dtypes a pickle may name (``torch.bfloat16``, ``torch.float``, ...).
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
        "double float half long int short"
    ).split()
}
_STORAGE_DTYPES = {
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
}


class Opaque:
    """Inert stand-in for a class we must not import: remembers its qualified name, args and state."""

    qualname = "?"
    args: tuple = ()  # class defaults: NEWOBJ builds instances without calling __init__
    kwargs: dict = {}  # noqa: RUF012 - never mutated
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The enum value for Enum stand-ins (``ModelBackend("megatron")``), else the first argument."""
        return self.args[0] if self.args else None

    def __small_repr__(self, short: Any) -> str:
        """How :func:`~persimmon_tools.safe_graph.small_repr` shows a stand-in: ``short`` renders each shown
        argument one level down, so nested stand-ins sharing their arguments stay bounded."""
        inner = (
            ", ".join(short(a) for a in self.args[:4]) + (", ..." if len(self.args) > 4 else "")
            if self.args
            else ("..." if self.state is not None else "")
        )
        return f"{self.qualname}({inner})"

    def __repr__(self) -> str:  # bounded: args may be a shared structure that unfolds exponentially
        return small_repr(self, 200)


class _StorageType:
    """Stand-in for ``torch.BFloat16Storage`` etc. in persistent ids: carries the dtype only."""

    def __init__(self, name: str, dtype: torch.dtype | None) -> None:
        self.name = name
        self.dtype = dtype


def _opaque_class(module: str, name: str) -> type[Opaque]:
    return type(
        name, (Opaque,), {"qualname": f"{module}.{name}", "__module__": "persimmon_tools.megatron.unpickle"}
    )


def _view(offset: Any, size: Any, stride: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Offset, shape and stride as 64-bit ints, checked here: messages about them must not ``repr`` a pickle
    bomb, and arithmetic on them (the view's extent) must not run on integers of millions of digits."""
    dims = (size, stride)
    if not (type(offset) is int and offset in _INT64) or not all(
        isinstance(d, tuple | list) and len(d) <= 64 and all(type(n) is int and n in _INT64 for n in d)
        for d in dims
    ):
        raise CheckpointError(
            f"malformed tensor view: offset {small_repr(offset, 30)}, size {small_repr(size, 60)}, "
            f"stride {small_repr(stride, 60)} (expected 64-bit integers)",
            hint="the checkpoint is corrupt or was tampered with",
        )
    return offset, tuple(size), tuple(stride)


def _storage(storage: Any) -> StorageRef:
    if not isinstance(storage, StorageRef):
        raise UnsafeCheckpointError(f"a tensor rebuild got a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: tuple,
    stride: tuple,
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    return LazyTensor.from_storage(_storage(storage), *_view(storage_offset, size, stride))


def _rebuild_tensor_v3(
    storage: StorageRef,
    storage_offset: int,
    size: tuple,
    stride: tuple,
    requires_grad: bool,
    backward_hooks: Any,
    dtype: torch.dtype,
    metadata: Any = None,
) -> LazyTensor:
    if not isinstance(dtype, torch.dtype):
        raise UnsafeCheckpointError(f"_rebuild_tensor_v3 got a {type(dtype).__name__}, not a torch dtype")
    return LazyTensor.from_storage(_storage(storage).with_dtype(dtype), *_view(storage_offset, size, stride))


def _rebuild_parameter(
    data: LazyTensor, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None
) -> LazyTensor:
    if not isinstance(data, LazyTensor):
        raise UnsafeCheckpointError(f"_rebuild_parameter got {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise UnsafeCheckpointError("_rebuild_from_type_v2 wraps a function that is not a tensor rebuild")
    return func(*args)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to classes the allowlist already produced."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls(state)
    if cls in (argparse.Namespace, collections.OrderedDict):
        return cls()
    raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _device(kind: str, index: int | None = None) -> str:
    """``torch.device(kind[, index])`` as its name (``"cpu"``, ``"cuda:0"``); only a short name and a small
    index (``str()`` of a pickled shared structure would unfold all of it)."""
    small_index = index is None or (type(index) is int and 0 <= index < 1 << 16)
    if not (type(kind) is str and 0 < len(kind) <= 32 and small_index):
        raise UnsafeCheckpointError(
            f"torch.device with unexpected arguments ({small_repr(kind, 40)}, {small_repr(index, 40)})",
            hint="torch pickles a device as torch.device('cuda', 0); the file is corrupt or tampered with",
        )
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise UnsafeCheckpointError("_codecs.encode with unexpected arguments")
    return obj.encode(encoding, errors)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "Tensor"): _StorageType("Tensor", None),  # only a marker for _rebuild_from_type_v2
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "device"): _device,
}


#: Objects a pickle may ``BUILD`` (set state on); everything else it built must stay as constructed.
_BUILDABLE = (Opaque, argparse.Namespace, collections.OrderedDict)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # pure Python: see module doc
    """Unpickles a checkpoint's ``data.pkl`` with the allowlist above; storages become lazy references."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    #: What ``BUILD`` may set the state of. A subclass with its own, separate allow-list (the ``.metadata``
    #: of a torch_dist checkpoint: :mod:`persimmon_tools.megatron.dist_metadata`) names its own stand-ins.
    buildable: tuple[type, ...] = _BUILDABLE

    def __init__(self, data: bytes, origin: str, storage_resolver: Any) -> None:
        super().__init__(io.BytesIO(data))
        self.origin = origin
        self.globals_seen: dict[str, str] = {}  # "module.name" -> how it was treated
        self._resolve = storage_resolver

    def find_class(self, module: str, name: str) -> Any:
        # As pickle does: protocol 2 (torch.save's) names Python 2 modules (__builtin__.set, copy_reg).
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qual = f"{module}.{name}"
        if (module, name) in _ALLOWED:
            self.globals_seen.setdefault(qual, "allowed")
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            self.globals_seen.setdefault(qual, "dtype")
            return _DTYPES[name]
        if module in ("torch", "torch.storage") and (
            name in _STORAGE_DTYPES or name in ("UntypedStorage", "TypedStorage")
        ):
            self.globals_seen.setdefault(qual, "storage type")
            return _StorageType(name, _STORAGE_DTYPES.get(name))
        if module.startswith(OPAQUE_PREFIXES) or module in OPAQUE_MODULES or (module, name) in OPAQUE_GLOBALS:
            self.globals_seen.setdefault(qual, "inert stand-in")
            return _opaque_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.origin} references the global {qual}, which is not on the allowlist; nothing was executed",
            hint="a Persimmon/Megatron checkpoint only needs tensors, argparse.Namespace and ADEPT enums; "
            "if this file is trusted and legitimately needs it, report it as an issue",
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.origin}: unexpected persistent id {small_repr(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.name == "Tensor":
            raise UnsafeCheckpointError(
                f"{self.origin}: persistent id names {small_repr(storage_type)}, not a storage type"
            )
        if type(key) is not str or type(numel) is not int or not 0 <= numel < 1 << 63:  # torch: str and int64
            raise UnsafeCheckpointError(f"{self.origin}: malformed storage reference {small_repr(pid)}")
        return self._resolve(key, storage_type.dtype, numel)

    def load_build(self) -> None:
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(inst, self.buildable):
            raise UnsafeCheckpointError(
                f"{self.origin}: the pickle sets the state of a {type(inst).__name__}, which is not allowed; "
                "nothing was executed",
                hint="a genuine checkpoint only sets the state of argparse.Namespace and ADEPT objects; "
                "the file is corrupt or was tampered with",
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _check_hashed(unpickler: RestrictedUnpickler, value: Any) -> None:
    check_tree(
        value,
        what=f"{unpickler.origin}: a dict key or set member",
        error=CheckpointError,
        limit=MAX_KEY_NODES,
    )


guard_pickle_hashing(RestrictedUnpickler.dispatch, _check_hashed)


def _children(obj: Any) -> Any:
    """What :func:`~persimmon_tools.safe_graph.check_tree` walks below stand-ins and Namespaces."""
    if isinstance(obj, Opaque):
        return (obj.args, obj.kwargs, obj.state)
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return None


#: What the pure-Python unpickler raises on a malformed pickle (besides the allow-list's own errors).
MALFORMED_PICKLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    MemoryError,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
    struct.error,
)


def load_checked(unpickler: RestrictedUnpickler, *, damaged: str, tampered: str) -> Any:
    """``unpickler.load()``, every failure a CheckpointError naming the unpickler's origin: ``damaged`` the
    hint for a malformed pickle, ``tampered`` for a refusal that has no hint of its own."""
    origin = unpickler.origin
    try:
        return unpickler.load()
    except CheckpointError as err:  # name the file and say what to do where a rebuild or check did not
        if err.message.startswith(origin) and err.hint:
            raise
        message = err.message if err.message.startswith(origin) else f"{origin}: {err.message}"
        raise type(err)(message, hint=err.hint or tampered) from err
    except MALFORMED_PICKLE as err:
        raise CheckpointError(
            f"{origin}: the pickle is corrupt or malformed ({type(err).__name__}: {str(err)[:120]})",
            hint=damaged,
        ) from err


def restricted_loads(data: bytes, origin: str, storage_resolver: Any) -> tuple[Any, dict[str, str]]:
    """Unpickle ``data``; returns the object and the globals it referenced (name -> treatment)."""
    unpickler = RestrictedUnpickler(data, origin, storage_resolver)
    obj = load_checked(
        unpickler,
        damaged="the file is damaged or not a PyTorch checkpoint; download it again",
        tampered="the file is corrupt or was tampered with",
    )
    # Shared sub-structures unfold exponentially under any later walk (flatten, args comparison, repr, JSON).
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # named first: the usual target
        check_tree(
            obj["model"], what=f"{origin}: the model dict", error=CheckpointError, children_of=_children
        )
    check_tree(obj, what=f"{origin}: the pickled checkpoint", error=CheckpointError, children_of=_children)
    return obj, unpickler.globals_seen
