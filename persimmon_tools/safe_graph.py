"""Bounded work on object graphs a pickle built (the restricted unpickler, and whatever walks its results).

A pickle's memo lets a few dozen objects describe a graph whose tree expansion is astronomically large
(``a = [x]; b = [a, a]; c = [b, b]; ...`` is ``2**depth`` nodes): any naive walk (``repr``, ``str``, ``==``,
``json.dumps``, flattening, rendering) visits every path. Every walk of an unpickled graph is therefore
bounded by the *visits* it makes, a shared object counting once per visit:

- :class:`Budget` is the one allowance every walker spends (consistency's args comparison, the
  ``conversion.json`` args record, ``inspect``'s rendering): visits, text bytes visited, nesting depth.
- :func:`check_tree` computes, with memoisation, what a naive walk of the whole object would spend (time
  and memory linear in the *distinct* objects) and refuses it when over the same limits; the unpickler runs
  it on every loaded checkpoint, so later walks start from a graph that is known to be small.
- :func:`small_repr` is a ``repr`` whose work and length are bounded whatever it is given.
- :func:`guard_pickle_hashing` checks dict keys and set members before an unpickler hashes them (hashing a
  tuple of shared tuples takes exponential time).

Only :mod:`persimmon_tools.errors` and the standard library are imported (the byte layer in
:mod:`persimmon_tools.megatron`, the shard checks, ``inspect`` and verify's own interpretation of the source
use this module).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from persimmon_tools.errors import PersimmonToolsError

ErrorType = type[PersimmonToolsError]
MiB = 1 << 20

#: Visits a walk of one pickled object may make, shared parts counted once per visit. A real 8B shard's
#: ``data.pkl`` holds a few thousand values (~600 tensors, a few hundred args fields, RNG state).
MAX_TREE_NODES = 1_000_000
#: Bytes of strings, bytes and integers a walk may visit: the largest ``data.pkl`` we unpickle (64 MiB), so
#: only sharing can exceed it (a 32 KiB string referenced 2**15 times is 1 GiB of text to render).
MAX_TREE_TEXT = 64 * MiB
#: Nesting a pickled object may have (``ckpt["model"]`` nests 4 deep, args 2-3).
MAX_TREE_DEPTH = 64
#: Bits an integer may have: ``str()`` refuses ints of over 4300 digits (~14,000 bits) and arithmetic on
#: huge ones is slow. Checkpoints hold counters, sizes and 32-bit RNG words.
MAX_INT_BITS = 4096
#: Unfolded nodes a dict key or set member may have before it is hashed (hashing a tuple walks all of it).
MAX_KEY_NODES = 10_000

_DEFAULT_HINT = "real checkpoints hold a few thousand values; the file is corrupt or was tampered with"


def children(obj: Any, children_of: Callable[[Any], Any] | None = None) -> Iterable[Any] | None:
    """What a walk visits below ``obj``: None for a leaf (numbers, strings, bytes, None, unknown objects).

    Dicts give their keys and values (and a dict subclass its instance attributes, which ``BUILD`` sets:
    ``OrderedDict._metadata``), lists, tuples and sets their items, slices their three bounds;
    ``children_of(obj)`` answers for other objects (stand-ins, Namespaces): an iterable, or a dict (such as
    ``vars(obj)``) whose keys and values are the children."""
    if isinstance(obj, str | bytes | bytearray | int | float | complex) or obj is None:
        return None
    if isinstance(obj, dict):
        kids = [x for kv in obj.items() for x in kv]
        extra = getattr(obj, "__dict__", None) if type(obj) is not dict else None
        return kids + list(extra.values()) if extra else kids
    if isinstance(obj, list | tuple | set | frozenset):
        return obj
    if isinstance(obj, slice):
        return (obj.start, obj.stop, obj.step)
    kids = children_of(obj) if children_of is not None else None
    return [x for kv in kids.items() for x in kv] if isinstance(kids, dict) else kids  # vars(): values too


def text_size(obj: Any) -> int:
    """Bytes of text a walk copies for a leaf: a string's or bytes' length, an integer's bytes; else 0."""
    if isinstance(obj, str | bytes | bytearray):
        return len(obj)
    if isinstance(obj, int):
        return (obj.bit_length() + 7) // 8
    return 0


class Budget:
    """What one walk of an unpickled object graph may spend; walkers call :meth:`visit` on every node.

    Counts visits (a shared object once per visit: what makes ``b = [a, a]`` expensive), the text bytes of
    the leaves visited and checks the nesting depth and integer sizes; past a limit it raises ``error``
    naming ``what`` (the file or key), with ``hint``; with ``summary`` the message is the summary and the
    reason in parentheses. One budget may be shared by several walks (all shards' args).
    """

    def __init__(
        self,
        what: str,
        error: ErrorType,
        *,
        nodes: int = MAX_TREE_NODES,
        text: int = MAX_TREE_TEXT,
        max_depth: int = MAX_TREE_DEPTH,
        hint: str | None = None,
        summary: str | None = None,
    ) -> None:
        self.what, self.error, self.summary = what, error, summary
        self.nodes, self.text, self.max_depth = nodes, text, max_depth
        self.hint = hint or _DEFAULT_HINT
        self.nodes_left, self.text_left = nodes, text

    def visit(self, node: Any, depth: int = 0) -> None:
        """Count one visit of ``node`` at nesting ``depth``; raise when a limit is passed."""
        self.nodes_left -= 1
        if isinstance(node, str | bytes | bytearray | int):
            self.text_left -= text_size(node)
            self.check_leaf(node)
        if depth > self.max_depth:
            self.refuse_depth()
        if self.nodes_left < 0:
            self.refuse_nodes()
        if self.text_left < 0:
            self.refuse_text()

    def check_leaf(self, node: Any) -> None:
        """Refuse an integer of more than :data:`MAX_INT_BITS` bits (it cannot even be printed)."""
        if isinstance(node, int) and node.bit_length() > MAX_INT_BITS:
            bits = f"an integer of {node.bit_length():,} bits"
            self.refuse(f"{self.what} holds {bits} (at most {MAX_INT_BITS:,} expected)", bits)

    def refuse_depth(self) -> None:
        self.refuse(
            f"{self.what} nests deeper than {self.max_depth} levels", f"over {self.max_depth} levels deep"
        )

    def refuse_nodes(self) -> None:
        what = f"more than {self.nodes:,} values once its shared parts are unfolded"
        self.refuse(f"{self.what} is not a tree: it holds {what}", what)

    def refuse_text(self) -> None:
        what = f"more than {self.text // MiB:,} MiB of text once its shared parts are unfolded"
        self.refuse(f"{self.what} is not a tree: it holds {what}", what)

    def refuse(self, message: str, detail: str) -> None:
        """Raise ``error`` with ``message``, or with ``"<summary> (<detail>)"`` when a summary was given."""
        raise self.error(f"{self.summary} ({detail})" if self.summary else message, hint=self.hint)


def check_tree(
    obj: Any,
    *,
    what: str,
    error: ErrorType,
    limit: int = MAX_TREE_NODES,
    max_depth: int = MAX_TREE_DEPTH,
    children_of: Callable[[Any], Any] | None = None,
    hint: str | None = None,
    text_limit: int = MAX_TREE_TEXT,
) -> int:
    """The number of nodes ``obj`` has once shared parts are unfolded (what any naive walk visits).

    Raises ``error`` when that exceeds ``limit``, when the strings, bytes and integers visited exceed
    ``text_limit`` bytes, when it nests deeper than ``max_depth``, contains itself or holds an integer of
    over :data:`MAX_INT_BITS` bits. :func:`children` says what is below a node. Time and memory are linear in
    the *distinct* objects.
    """
    budget = Budget(what, error, nodes=limit, text=text_limit, max_depth=max_depth, hint=hint)
    sizes: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    keep: list[Any] = []  # ids stay valid while we hold the objects

    def size(node: Any, depth: int) -> tuple[int, int]:
        kids = children(node, children_of)
        if kids is None:
            budget.check_leaf(node)
            return 1, text_size(node)
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > max_depth:
            budget.refuse_depth()
        if key in active:
            budget.refuse(f"{what} is not a tree: it contains itself", "it contains itself")
        active.add(key)
        nodes, text = 1, 0
        for kid in kids:
            n, t = size(kid, depth + 1)
            nodes, text = nodes + n, text + t
            if nodes > limit:
                budget.refuse_nodes()
            if text > text_limit:
                budget.refuse_text()
        active.discard(key)
        sizes[key] = nodes, text
        keep.append(node)
        return nodes, text

    return size(obj, 0)[0]


# ---- bounded repr --------------------------------------------------------------------------------------

_LEVELS = 3  # nesting shown
_ITEMS = 4  # items shown per container
_STRING = 60  # characters shown per string


def _short(x: Any, level: int) -> str:
    """``repr(x)`` showing at most :data:`_ITEMS` items per container, :data:`_LEVELS` deep: at most ~4**3
    nodes are visited. Dispatches on ``isinstance``, never on type names (a stand-in may be named ``str``)."""
    if x is None or isinstance(x, bool | float | complex):
        return repr(x)
    if isinstance(x, int):
        return repr(x) if x.bit_length() <= 256 else f"<int of {x.bit_length():,} bits>"
    if isinstance(x, str | bytes | bytearray):
        return repr(x[:_STRING]) + ("..." if len(x) > _STRING else "")
    hook = getattr(type(x), "__small_repr__", None)
    if hook is not None:  # stand-ins render their arguments through this function, one level down
        return str(hook(x, (lambda y: _short(y, level - 1)) if level > 0 else (lambda y: "...")))
    if isinstance(x, dict):
        name = "" if type(x) is dict else type(x).__name__
        items = (f"{_short(k, level - 1)}: {_short(v, level - 1)}" for k, v in islice(x.items(), _ITEMS))
        body = "{" + _join(items, len(x), level) + "}"
        return f"{name}({body})" if name else body
    if isinstance(x, argparse.Namespace):
        fields = vars(x)
        items = (f"{k}={_short(v, level - 1)}" for k, v in islice(fields.items(), _ITEMS))
        return f"Namespace({_join(items, len(fields), level)})"
    if isinstance(x, list | tuple | set | frozenset):
        items = (_short(v, level - 1) for v in islice(x, _ITEMS))
        body = _join(items, len(x), level)
        if isinstance(x, list):
            return f"[{body}]"
        if isinstance(x, tuple):
            return f"({body},)" if len(x) == 1 else f"({body})"
        if not x:
            return f"{type(x).__name__}()"
        return f"{{{body}}}" if type(x) is set else f"{type(x).__name__}({{{body}}})"
    if isinstance(x, slice):
        return f"slice({_join((_short(v, level - 1) for v in (x.start, x.stop, x.step)), 3, level)})"
    return repr(x)  # dtypes, lazy tensors, storage references: their repr is bounded


def _join(items: Iterable[str], n: int, level: int) -> str:
    if n and level <= 0:
        return "..."
    shown = list(items)
    return ", ".join(shown + (["..."] if n > len(shown) else []))


def small_repr(value: Any, limit: int = 80) -> str:
    """``repr`` bounded in work and length (at most ~4**3 nodes visited), for messages about hostile data.

    Objects of other classes than containers, numbers and strings are shown by ``__small_repr__(self, short)``
    when their class has one (``short`` renders a part), else by their own ``repr``, which must be bounded."""
    text = _short(value, _LEVELS)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Keys whose hash costs at most their own length (most keys of a checkpoint): not worth a walk. Integer sizes
# are checked by the walk of the whole loaded object (:func:`check_tree`), which visits dict keys too.
_HASHED_IN_LINEAR_TIME = frozenset({str, bytes, int, float, bool, complex, type(None)})


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
                if type(value) not in _HASHED_IN_LINEAR_TIME:
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
