"""SentencePiece's charsmap trie, read; and word sets written as compact Oniguruma regexes.

``precompiled_charsmap`` is ``u32 trie_size | trie | values``: the trie is a Darts-clone double array of
``u32`` units (label, leaf flag, offset to the children), keyed by the UTF-8 bytes of a rule's source; a
leaf's value is the byte offset of the rule's NUL-terminated replacement in the value area.
"""

from __future__ import annotations

import functools

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.proto import charsmap_parts


@functools.lru_cache(maxsize=4)
def charsmap_entries(blob: bytes) -> dict[str, str]:
    """Every ``key → value`` rule of a SentencePiece ``precompiled_charsmap`` (cached: do not modify).

    The blob is ``u32 trie_size | trie (u32 units, Darts-clone double array) | values (NUL-terminated
    UTF-8)``; a leaf unit's value is the byte offset of its replacement in the value area. Rules come in the
    trie's breadth-first order.
    """
    if not blob:
        return {}
    import numpy as np

    trie, values = charsmap_parts(blob)  # checks the header
    units = np.array(trie, dtype=np.int64)
    try:
        keys, starts = _walk(units)
        return dict(zip(keys, _value_texts(values, starts), strict=True))
    except UnicodeDecodeError as err:
        raise TokenizerError(
            "precompiled_charsmap has a rule that is not UTF-8",
            hint="re-extract adept_vocab.model from the release",
        ) from err


def _offset(unit):
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


def _value_texts(values: bytes, starts: list[int]) -> list[str]:
    """The NUL-terminated UTF-8 replacement at each byte offset of ``starts`` in the value area.

    Each distinct offset is decoded once: where a replacement begins (every offset, in charsmaps that
    SentencePiece builds) from one split of the area, any other offset (inside a replacement) on its own.
    """
    raw: dict[int, bytes] = {}
    at = 0
    for piece in values.split(b"\0"):
        raw[at] = piece
        at += len(piece) + 1
    texts: dict[int, str] = {}
    out = []
    for start in starts:
        text = texts.get(start)
        if text is None:
            piece = raw.get(start)
            if piece is None:
                end = values.find(b"\0", start)
                piece = values[start : end if end >= 0 else len(values)]
            text = texts[start] = piece.decode()
        out.append(text)
    return out


# Bytes that may follow a complete UTF-8 character (a new one starts) or sit inside one.
_LEAD_BYTES = (*range(0x01, 0x80), *range(0xC2, 0xF5))
_CONT_BYTES = tuple(range(0x80, 0xC0))


def _child_index(units):
    """``(base, label, position)`` of every unit that can be a child, sorted by base then label.

    In a Darts-clone double array the child of the node with base ``b`` via ``label`` sits at ``b ^ label``
    and is real when its unit's label is ``label`` (and it is no value unit, bit 31); so every unit ``c``
    names the one base it can be the child of, ``c ^ label(c)``, and one sort answers every probe.
    """
    import numpy as np

    position = np.nonzero((units & (1 << 31)) == 0)[0]
    label = units[position] & 0xFF
    base = position ^ label
    order = np.lexsort((label, base))
    return base[order], label[order], position[order]


def _children(index, pos, allowed):
    """``(row, label, child position)`` for every child of the nodes at ``pos`` via an ``allowed`` label,
    ordered by row, then label (``allowed``: a boolean array over the 256 byte values)."""
    import numpy as np

    base, label, position = index
    lo, hi = np.searchsorted(base, pos, "left"), np.searchsorted(base, pos, "right")
    counts = hi - lo
    row = np.repeat(np.arange(len(pos)), counts)
    at = lo[row] + np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = allowed[label[at]]
    return row[keep], label[at][keep], position[at][keep]


def _walk(units) -> tuple[list[str], list[int]]:
    """``(keys, value offsets)`` of every leaf of a Darts-clone double array, level by level.

    Only labels that can continue valid UTF-8 are probed (a lead byte after a complete character, a
    continuation byte inside one). Each level keeps numpy arrays only (node positions, continuation bytes
    still due, each node's parent in the level above and its label); a leaf's key is read back along its
    parents, for all leaves of a level at once, and decoded as UTF-8 (``UnicodeDecodeError`` if it is not).
    """
    import numpy as np

    lead, cont = np.zeros(256, dtype=bool), np.zeros(256, dtype=bool)
    lead[list(_LEAD_BYTES)], cont[list(_CONT_BYTES)] = True, True
    index = _child_index(units)
    pos, due = np.array([_offset(int(units[0]))], dtype=np.int64), np.zeros(1, dtype=np.int64)
    parents: list = []  # per level: index of each node's parent in the level above
    labels_of: list = []  # per level: the byte that leads to each node
    keys: list[str] = []
    starts: list[int] = []
    while len(pos):
        parent, label, nxt_pos, nxt_due, leaves, offsets, width = [], [], [], [], [], [], 0
        for inside_char, allowed in ((False, lead), (True, cont)):
            rows = np.nonzero((due > 0) == inside_char)[0]
            if not len(rows):
                continue
            r, lab, child = _children(index, pos[rows], allowed)
            row = rows[r]
            unit = units[child]
            node = child ^ _offset(unit)
            if inside_char:
                left = due[row] - 1
            else:
                left = (lab >= 0x80).astype(np.int64) + (lab >= 0xE0) + (lab >= 0xF0)
            leaf = (((unit >> 8) & 1) == 1) & (left == 0) & (node < len(units))
            leaves.append(width + np.nonzero(leaf)[0])
            offsets.append(units[node[leaf]] & ((1 << 31) - 1))
            parent.append(row)
            label.append(lab)
            nxt_pos.append(node)
            nxt_due.append(left)
            width += len(node)
        parents.append(np.concatenate(parent))
        labels_of.append(np.concatenate(label))
        found = np.concatenate(leaves)
        if len(found):
            keys.extend(_keys_along(parents, labels_of, found))
            starts.extend(np.concatenate(offsets).tolist())
        pos, due = np.concatenate(nxt_pos), np.concatenate(nxt_due)
    return keys, starts


def _keys_along(parents: list, labels_of: list, nodes) -> list[str]:
    """The keys of ``nodes`` of the deepest level: their labels read upwards along ``parents``."""
    import numpy as np

    depth = len(parents)
    matrix = np.zeros((len(nodes), depth + 1), dtype=np.uint8)  # the last column: a NUL after each key
    index = nodes
    for level in range(depth - 1, -1, -1):
        matrix[:, level] = labels_of[level][index]
        index = parents[level][index]
    return matrix.tobytes().decode().split("\0")[:-1]


def trie_regex(words: list[str]) -> str:
    """An Oniguruma regex matching the longest of ``words`` at a position (a minimized trie, greedy).

    Equivalent suffix sub-tries are shared, and characters leading to the same sub-trie form one class, so
    the 220,000 multi-character keys of ``nmt_nfkc`` become ~16 kB of regex.
    """
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = True
    signatures: dict[tuple, int] = {}

    def canon(node: dict) -> int:
        edges = tuple(sorted((ch, canon(child)) for ch, child in node.items() if ch))
        return signatures.setdefault(("" in node, edges), len(signatures))

    root = canon(trie)
    states = {number: sig for sig, number in signatures.items()}

    @functools.cache
    def emit(state: int) -> str:
        accepting, edges = states[state]
        by_target: dict[int, list[str]] = {}
        for ch, target in edges:
            by_target.setdefault(target, []).append(ch)
        alternatives = [char_class(chars) + emit(target) for target, chars in by_target.items()]
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        return f"(?:{body})?" if accepting else body

    return emit(root)


def escape(cp: int) -> str:
    ch = chr(cp)
    return ch if ch.isascii() and ch.isalnum() else f"\\x{{{cp:X}}}"


def literal(text: str) -> str:
    """``text`` as an Oniguruma regex matching exactly it."""
    return "".join(escape(ord(c)) for c in text)


def alternation(strings: list[str]) -> str:
    """Alternation of literal strings, longest first (leftmost-longest, like a prefix matcher)."""
    return "|".join(literal(s) for s in sorted(set(strings), key=lambda s: (-len(s), s)))


def char_class(chars: list[str]) -> str:
    """A regex matching one of ``chars`` (never empty: an impossible class for no characters)."""
    if len(chars) == 1:
        return escape(ord(chars[0]))
    return f"[{class_body(chars)}]" if chars else r"(?!)"


def class_body(chars: list[str]) -> str:
    """The inside of a character class for ``chars``, with ranges for consecutive code points."""
    cps = sorted(ord(c) for c in chars)
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(
            escape(cps[i]) if i == j else escape(cps[i]) + ("-" if j > i + 1 else "") + escape(cps[j])
        )
        i = j + 1
    return "".join(parts)
