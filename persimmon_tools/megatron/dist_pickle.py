"""The ``.metadata`` pickle of a torch_dist checkpoint, unpickled by the restricted unpickler with its own,
SEPARATE allow-list (what a ``model_optim_rng.pt`` may name is not widened).

torch's ``FileSystemWriter`` pickles ``torch.distributed.checkpoint.metadata.Metadata`` with protocol 4
(``STACK_GLOBAL``; dataclasses by ``NEWOBJ`` + ``BUILD``, enums by ``REDUCE``). Here:

- the DCP dataclasses (``Metadata``, ``TensorStorageMetadata``, ``TensorProperties``,
  ``ChunkStorageMetadata``, ``BytesStorageMetadata``, ``MetadataIndex``, ``StorageMeta``, ``_StorageInfo``,
  the savers' ``SavePlan``/``WriteItem``/``TensorWriteData``/``BytesIOWriteData``) and Megatron-Core's
  placeholder classes ``MCoreSavePlan`` and ``MCoreMetadata`` become :class:`DcpRecord` stand-ins that only
  record their state (``BUILD`` is allowed on them and nothing else);
- the enums ``_MEM_FORMAT_ENCODING`` and ``WriteItemType`` become checked :class:`DcpEnum` values;
- ``torch.Size`` becomes a tuple, torch dtypes themselves, ``torch.serialization._get_layout`` the layout's
  name, ``pathlib`` paths their text (``StorageMeta.checkpoint_id``), ``OrderedDict`` a dict;
- any other global, and any persistent id, is refused (:class:`~persimmon_tools.errors.UnsafeCheckpointError`
  naming the file and the global) before it is called.

What the stand-ins say is checked by :mod:`persimmon_tools.megatron.dist_metadata`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persimmon_tools.errors import UnsafeCheckpointError
from persimmon_tools.megatron.unpickle import _DTYPES, RestrictedUnpickler, load_checked
from persimmon_tools.safe_graph import small_repr

_DCP = "torch.distributed.checkpoint."
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"
_RECORDS = {
    (_DCP + "metadata", "Metadata"),
    (_DCP + "metadata", "TensorStorageMetadata"),
    (_DCP + "metadata", "TensorProperties"),
    (_DCP + "metadata", "ChunkStorageMetadata"),
    (_DCP + "metadata", "BytesStorageMetadata"),
    (_DCP + "metadata", "MetadataIndex"),
    (_DCP + "metadata", "StorageMeta"),
    (_DCP + "filesystem", "_StorageInfo"),
    (_DCP + "planner", "SavePlan"),
    (_DCP + "planner", "WriteItem"),
    (_DCP + "planner", "TensorWriteData"),
    (_DCP + "planner", "BytesIOWriteData"),
    (_MCORE, "MCoreSavePlan"),
    (_MCORE, "MCoreMetadata"),
}
_ENUMS = {
    (_DCP + "metadata", "_MEM_FORMAT_ENCODING"): range(3),
    (_DCP + "planner", "WriteItemType"): range(4),
}
TAMPERED = "the checkpoint is damaged or was tampered with; save it again with Megatron-LM"


def shown(name: str, limit: int = 120) -> str:
    """A key or global name for messages: as it is, or bounded when a hostile file made it long."""
    return name if len(name) <= limit else small_repr(name, limit)


class DcpRecord:
    """Inert stand-in for a DCP dataclass: its qualified name and the state the pickle gave it."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> DcpRecord:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def fields(self) -> dict[str, Any] | None:
        """The dataclass fields set by ``BUILD`` (a dict, or ``(dict, slots)``); None for another state."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]} if isinstance(state[0], dict | None) else None
        return state if isinstance(state, dict) else None

    def __repr__(self) -> str:
        return f"{self.qualname}(...)"


@dataclass(frozen=True)
class DcpEnum:
    """An enum member of the DCP classes (``WriteItemType.SHARD``), as its class name and value."""

    qualname: str
    value: int


_CLASSES = {
    key: type(key[1], (DcpRecord,), {"qualname": ".".join(key), "__module__": __name__}) for key in _RECORDS
}


def _enum(qualname: str, values: range) -> Any:
    def member(value: Any) -> DcpEnum:
        if type(value) is not int or value not in values:
            raise UnsafeCheckpointError(f"{qualname} with the unexpected value {small_repr(value, 40)}")
        return DcpEnum(qualname, value)

    return member


def _layout(name: Any) -> str:
    if not (type(name) is str and len(name) <= 64):
        raise UnsafeCheckpointError(f"torch.serialization._get_layout of {small_repr(name, 40)}")
    return name


def _path(*parts: Any) -> str:
    if not all(type(p) is str and len(p) <= 4096 for p in parts) or len(parts) > 64:
        raise UnsafeCheckpointError("a pathlib path made of something other than a few strings")
    return "/".join(parts)


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch", "Size"): tuple,
    ("torch.serialization", "_get_layout"): _layout,
    ("collections", "OrderedDict"): dict,
    **{("pathlib", n): _path for n in ("Path", "PosixPath", "PurePosixPath")},
    **{key: _enum(".".join(key), values) for key, values in _ENUMS.items()},
}


class _MetadataUnpickler(RestrictedUnpickler):
    """The restricted unpickler with the ``.metadata`` allow-list (module docstring); no storages."""

    buildable = (DcpRecord,)

    def find_class(self, module: str, name: str) -> Any:
        qual = f"{module}.{name}"
        if (module, name) in _CLASSES:
            self.globals_seen.setdefault(qual, "inert stand-in")
            return _CLASSES[(module, name)]
        if (module, name) in _FUNCTIONS:
            self.globals_seen.setdefault(qual, "allowed")
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _DTYPES:
            self.globals_seen.setdefault(qual, "dtype")
            return _DTYPES[name]
        raise UnsafeCheckpointError(
            f"{self.origin} references the global {shown(qual)}, which is not on the allowlist of a "
            "torch_dist .metadata file; nothing was executed",
            hint="a torch_dist .metadata holds only torch.distributed.checkpoint's metadata classes; the "
            "file is damaged, was tampered with or was written by a newer torch (report it as an issue)",
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.origin}: a .metadata pickle holds no storages (persistent id)")


def load_metadata_pickle(data: bytes, origin: str) -> tuple[Any, dict[str, str]]:
    """Unpickle a ``.metadata`` file's bytes with the allow-list above; returns the object (stand-ins) and
    the globals it named. Any failure is a CheckpointError naming ``origin``."""
    unpickler = _MetadataUnpickler(data, origin, None)
    obj = load_checked(
        unpickler,
        damaged="the file is damaged or not a torch_dist .metadata; copy the checkpoint again",
        tampered=TAMPERED,
    )
    return obj, unpickler.globals_seen
