"""Bounded work on object graphs a pickle built (the restricted unpickler, and whatever walks its results).

- :func:`check_tree` bounds the work a pickled object graph can cause: shared sub-structures (``b = [a, a]``,
  ``c = [b, b]``, ...) unfold exponentially under any naive walk (``repr``, ``==``, ``json.dumps``,
  flattening), so the unfolded size is counted with memoisation, in time linear in the distinct objects.
- :func:`small_repr` is a ``repr`` whose work and length are bounded whatever it is given.
- :func:`guard_pickle_hashing` checks dict keys and set members before an unpickler hashes them (hashing a
  tuple of shared tuples takes exponential time).

Only :mod:`persimmon_tools.errors` and the standard library are imported (the byte layer in
:mod:`persimmon_tools.megatron`, the shard checks, ``inspect`` and verify's own interpretation of the source
use this module).
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

from persimmon_tools.errors import PersimmonToolsError

ErrorType = type[PersimmonToolsError]
KiB = 1 << 10

#: Unfolded nodes a pickled object may hold (a real 8B ``data.pkl`` holds a few thousand).
MAX_TREE_NODES = 1_000_000
#: Nesting a pickled object may have (``ckpt["model"]`` nests 4 deep, args 2-3).
MAX_TREE_DEPTH = 64


def _children(obj: Any, children_of: Any) -> Iterable[Any] | None:
    if isinstance(obj, str | bytes | bytearray | int | float | complex | bool) or obj is None:
        return None
    if isinstance(obj, dict):
        return [x for kv in obj.items() for x in kv]
    if isinstance(obj, list | tuple | set | frozenset):
        return obj
    return children_of(obj) if children_of is not None else None


def check_tree(
    obj: Any,
    *,
    what: str,
    error: ErrorType,
    limit: int = MAX_TREE_NODES,
    max_depth: int = MAX_TREE_DEPTH,
    children_of: Any = None,
    hint: str | None = None,
) -> int:
    """The number of nodes ``obj`` has once shared parts are unfolded (what any naive walk visits).

    Raises ``error`` when that exceeds ``limit``, when it nests deeper than ``max_depth`` or contains itself.
    Strings and bytes weigh one node per 1 KiB. ``children_of(obj)`` returns the children of other objects
    (stand-ins, Namespaces) or None for a leaf. Time and memory are linear in the *distinct* objects.
    """
    fix = hint or "real checkpoints hold a few thousand values; the file is corrupt or was tampered with"
    sizes: dict[int, int] = {}
    active: set[int] = set()
    keep: list[Any] = []  # ids stay valid while we hold the objects

    def size(node: Any, depth: int) -> int:
        if isinstance(node, str | bytes | bytearray):
            return 1 + len(node) // KiB
        key = id(node)
        if key in sizes:
            return sizes[key]
        kids = _children(node, children_of)
        if kids is None:
            return 1
        if depth > max_depth:
            raise error(f"{what} nests deeper than {max_depth} levels", hint=fix)
        if key in active:
            raise error(f"{what} is not a tree: it contains itself", hint=fix)
        active.add(key)
        total = 1
        for kid in kids:
            total += size(kid, depth + 1)
            if total > limit:
                raise error(
                    f"{what} is not a tree: it holds more than {limit:,} values once its shared parts are unfolded",
                    hint=fix,
                )
        active.discard(key)
        sizes[key] = total
        keep.append(node)
        return total

    return size(obj, 0)


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
for _attr in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _attr, 4)


def small_repr(value: Any, limit: int = 80) -> str:
    """``repr`` bounded in work and length (at most ~4**3 nodes visited), for messages about hostile data."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Unfolded nodes a dict key or set member may have before it is hashed (hashing a tuple walks all of it).
MAX_KEY_NODES = 10_000


def guard_pickle_hashing(dispatch: dict[int, Any], check: Any) -> None:
    """Make a pure-Python ``pickle._Unpickler`` dispatch table call ``check(unpickler, value)`` on every value
    it is about to hash (dict keys, set members) before hashing it: ``hash`` of a tuple of shared tuples
    takes time exponential in its nesting, and nothing else in a pickle can make the unpickler slow.

    Covers ``SETITEM``, ``SETITEMS``, ``DICT``, ``ADDITEMS``, ``FROZENSET`` and ``REDUCE`` of ``set`` /
    ``frozenset`` (protocol 2 pickles sets that way).
    """
    import pickle

    def wrap(opcode: bytes, values: Any) -> None:
        original = dispatch[opcode[0]]

        def load(self: Any) -> None:
            for value in values(self):
                check(self, value)
            original(self)

        dispatch[opcode[0]] = load

    wrap(pickle.SETITEM, lambda u: u.stack[-2:-1])
    wrap(pickle.SETITEMS, lambda u: u.stack[0::2])
    wrap(pickle.DICT, lambda u: u.stack[0::2])
    wrap(pickle.ADDITEMS, lambda u: u.stack)
    wrap(pickle.FROZENSET, lambda u: u.stack)

    def reduce_values(u: Any) -> Any:
        if len(u.stack) >= 2 and u.stack[-2] in (set, frozenset):
            args = u.stack[-1]
            if (
                isinstance(args, tuple)
                and args
                and isinstance(args[0], list | tuple | set | frozenset | dict)
            ):
                return list(args[0])
        return []

    wrap(pickle.REDUCE, reduce_values)
