"""Unigram vocabulary for ``tokenizers``: SentencePiece's scores, and its reserved pieces kept out of the lattice.

SentencePiece's Unigram lattice holds NORMAL and USER_DEFINED pieces only; CONTROL, UNKNOWN, BYTE and UNUSED
pieces never match text, so literal ``<unk>`` in the input is encoded as ``<``, ``unk``, ``>``. An unknown
character scores ``min_score - 10``, ``min_score`` taken over NORMAL pieces. tokenizers' ``Unigram`` matches
*every* vocabulary entry and takes ``min_score`` over all of them. Each reserved piece is therefore kept out
in one of three ways (:func:`reserved_plan`):

* **never produced**: it is spelled with a character the normalizer never outputs: a one-character charsmap
  key (always rewritten: SentencePiece's longest match either takes that key or a longer one covering it)
  that no charsmap value and no user-defined piece contains, e.g. ``A`` under case folding (``nmt_nfkc_cf``),
  so ``<0x41>`` never matches. Nothing to do; byte fallback or not.
* **blocked**: it is spelled with a character that no NORMAL/USER_DEFINED piece contains. Without byte
  fallback such a character always encodes as ``<unk>``, whatever it is, so the normalizer's last step maps
  it to a stand-in (a Unicode noncharacter no piece contains). The reserved piece can then never occur in
  the normalized text, and it keeps SentencePiece's ``min_score``, so the unknown-character score is exact.
  Only the surface of ``<unk>`` tokens in ``Encoding.tokens`` shows the stand-in; ids, offsets and decoding
  are unchanged.
* **hidden**: a score so low that no path through it can win. That lowers tokenizers' unknown-character score,
  which is harmless only when every path has the same number of unknown characters: no trie piece may
  contain a character lacking its own piece, and the hidden piece must be spelled with known characters.

When none applies, :attr:`ReservedPlan.problem` says why and the model cannot be converted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.proto import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SpmInfo,
    known_chars,
    unknown_char_pieces,
)

RESERVED = (CONTROL, UNKNOWN, BYTE, UNUSED)
_STAND_INS = [chr(cp) for cp in range(0xFDD0, 0xFDF0)]  # Unicode noncharacters: never assigned


@dataclass(frozen=True)
class ReservedPlan:
    """How the reserved pieces of a Unigram model are kept out of tokenizers' lattice."""

    unproduced: frozenset[str]  # characters the normalizer never outputs
    remapped: tuple[str, ...]  # characters the normalizer maps to ``stand_in`` as its last step
    stand_in: str
    hide: bool  # give matchable reserved pieces a prohibitive score (else SentencePiece's min_score)
    problem: str  # why this is not exact ("" when it is)


def reserved_plan(info: SpmInfo) -> ReservedPlan:
    """Block what can be blocked, hide the rest, and say whether the result is exact (module docstring)."""
    in_trie = {
        c for p, t in zip(info.pieces, info.types, strict=True) if t in (NORMAL, USER_DEFINED) for c in p
    }
    reserved = [info.pieces[i] for i in info.ids_of(*RESERVED)]
    every = {c for p in info.pieces for c in p}
    stand_in = next((c for c in _STAND_INS if c not in every), "")
    unproduced = never_output(info)
    reserved = [p for p in reserved if not any(c in unproduced for c in p)]
    remapped: tuple[str, ...] = ()
    if not info.byte_fallback and stand_in:  # with byte fallback the unknown character's bytes are the ids
        remapped = tuple(sorted({c for p in reserved for c in p if c not in in_trie}))
    matchable = [p for p in reserved if not any(c in remapped for c in p)]
    known = known_chars(info)
    problem = ""
    unknown = unknown_char_pieces(info)
    spelled = [p for p in matchable if any(c not in known for c in p)]
    if spelled:
        missing = sorted({c for p in spelled for c in p if c not in known})
        why = f"they are spelled with characters that have no piece of their own ({', '.join(map(repr, missing[:5]))})"
        if info.byte_fallback:
            why += " and byte fallback needs those characters' bytes, so they cannot be mapped away"
        problem = _problem(why, spelled[0])
    elif matchable and unknown:
        why = (
            f"pieces such as {unknown[0]!r} contain characters that have no piece of their own, "
            "so the unknown-character score matters, and hiding reserved pieces would change it"
        )
        problem = _problem(why, matchable[0])
    elif unknown and min(s for _, s in unigram_vocab(info, hide_reserved=False)) < info.min_score:
        problem = (
            "user-defined pieces score below the lowest NORMAL piece (the model's scores are all above -0.1), "
            "which changes tokenizers' unknown-character score"
        )
    return ReservedPlan(
        unproduced=unproduced, remapped=remapped, stand_in=stand_in, hide=bool(matchable), problem=problem
    )


def never_output(info: SpmInfo) -> frozenset[str]:
    """Characters that never occur in normalized text (the "never produced" case of the module docstring)."""
    if not info.charsmap:
        return frozenset()
    from persimmon_tools.tokenizer.trie import charsmap_entries

    try:
        rules = charsmap_entries(info.charsmap)
    except TokenizerError:  # a corrupt charsmap: the normalizer step reports it, with its hint
        return frozenset()
    users = [info.pieces[i] for i in info.ids_of(USER_DEFINED)]
    produced = set("".join(rules.values())) | set("".join(users)) | {" ", "\u2581"}
    return frozenset(k for k, v in rules.items() if len(k) == 1 and v != k and k not in produced)


def _problem(why: str, example: str) -> str:
    return (
        "reserved pieces (CONTROL/UNKNOWN/BYTE/UNUSED) cannot be kept out of tokenizers' Unigram lattice because "
        f"{why}: literal text {example!r} would encode as that one piece, SentencePiece never does"
    )


def unigram_vocab(info: SpmInfo, *, hide_reserved: bool) -> list[tuple[str, float]]:
    """``(piece, score)`` for ``tokenizers.models.Unigram``, with the scores SentencePiece really uses.

    NORMAL pieces keep their score, USER_DEFINED ones get SentencePiece's bonus. Reserved pieces get
    SentencePiece's ``min_score`` (so tokenizers' unknown-character score is exact; they must be blocked) or,
    with ``hide_reserved``, a score lower than any path of known characters over the same span.
    """
    m = info.min_score
    if hide_reserved:
        longest = max((len(info.pieces[i]) for i in info.ids_of(*RESERVED)), default=1)
        spread = abs(m) + abs(info.max_score) + 10.0
        reserved = -spread * (longest + 2)
    else:
        reserved = m
    # unigram_model.cc: `length * max_score_ - 0.1`, length in bytes, float times float, minus a double.
    user_score = np.float32(info.max_score)
    out = []
    for piece, kind, score in zip(info.pieces, info.types, info.scores, strict=True):
        if kind == NORMAL:
            out.append((piece, score))
        elif kind == USER_DEFINED:
            out.append((piece, float(np.float32(len(piece.encode())) * user_score) - 0.1))
        else:
            out.append((piece, reserved))
    return out


def remap_step(plan: ReservedPlan):
    """The normalizer's last step for a plan with remapped characters (``None`` when there are none)."""
    if not plan.remapped:
        return None
    from tokenizers import Regex, normalizers

    from persimmon_tools.tokenizer.trie import char_class

    return normalizers.Replace(Regex(char_class(list(plan.remapped))), plan.stand_in)
