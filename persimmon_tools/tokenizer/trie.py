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
    UTF-8)``; a leaf unit's value is the byte offset of its replacement in the value area.
    """
    if not blob:
        return {}
    import numpy as np

    trie, values = charsmap_parts(blob)
    units = np.array(trie, dtype=np.int64)
    rules: dict[str, str] = {}
    try:
        for key, start in _walk(units):
            rules[key.decode()] = _value_at(values, start).decode()
    except UnicodeDecodeError as err:
        raise TokenizerError(
            "precompiled_charsmap has a rule that is not UTF-8",
            hint="re-extract adept_vocab.model from the release",
        ) from err
    return rules


def _offset(unit):
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


def _value_at(values: bytes, start: int) -> bytes:
    end = values.find(b"\0", start)
    return values[start : end if end >= 0 else len(values)]


# Bytes that may follow a complete UTF-8 character (a new one starts) or sit inside one.
_LEAD_BYTES = (*range(0x01, 0x80), *range(0xC2, 0xF5))
_CONT_BYTES = tuple(range(0x80, 0xC0))


def _children(units, pos, labels):
    """``(row, label index, child position)`` arrays for every existing child of the nodes at ``pos``.

    A child of the node at ``p`` via ``label`` sits at ``p ^ label`` and is real when its unit's label is
    ``label``; all nodes are probed at once, in chunks of 4096 to bound memory.
    """
    import numpy as np

    rows, cols, kids = [], [], []
    for chunk in np.array_split(np.arange(len(pos)), max(1, len(pos) // 4096)):
        child = pos[chunk, None] ^ labels[None, :]
        inside = child < len(units)
        hit = np.zeros_like(inside)
        hit[inside] = (units[child[inside]] & ((1 << 31) | 0xFF)) == np.broadcast_to(labels, child.shape)[
            inside
        ]
        r, c = np.nonzero(hit)
        rows.append(chunk[r])
        cols.append(c)
        kids.append(child[r, c])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(kids)


def _walk(units):
    """``(key bytes, value offset)`` for every leaf of a Darts-clone double array, level by level.

    Only labels that can continue valid UTF-8 are probed (a lead byte after a complete character, a
    continuation byte inside one); positions and flags are numpy arrays, only the keys are Python bytes.
    """
    import numpy as np

    lead, cont = np.array(_LEAD_BYTES, dtype=np.int64), np.array(_CONT_BYTES, dtype=np.int64)
    # The frontier: node positions, continuation bytes still due, keys so far.
    pos, due, keys = np.array([_offset(int(units[0]))], dtype=np.int64), np.zeros(1, dtype=np.int64), [b""]
    while len(pos):
        nxt_pos, nxt_due, nxt_keys = [], [], []
        for inside_char, labels in ((False, lead), (True, cont)):
            rows = np.nonzero((due > 0) == inside_char)[0]
            if not len(rows):
                continue
            r, c, child = _children(units, pos[rows], labels)
            row, label = rows[r], labels[c]
            unit = units[child]
            node = child ^ _offset(unit)
            if inside_char:
                left = due[row] - 1
            else:
                left = (label >= 0x80).astype(np.int64) + (label >= 0xE0) + (label >= 0xF0)
            leaf = (((unit >> 8) & 1) == 1) & (left == 0) & (node < len(units))
            new_keys = [keys[i] + bytes((b,)) for i, b in zip(row.tolist(), label.tolist(), strict=True)]
            values = units[node[leaf]] & ((1 << 31) - 1)
            for i, value in zip(np.nonzero(leaf)[0].tolist(), values.tolist(), strict=True):
                yield new_keys[i], value
            nxt_pos.append(node)
            nxt_due.append(left)
            nxt_keys.extend(new_keys)
        pos, due, keys = np.concatenate(nxt_pos), np.concatenate(nxt_due), nxt_keys


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
