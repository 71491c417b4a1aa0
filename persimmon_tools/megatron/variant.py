"""Base or chat: decided by the release's own name, never by any word elsewhere in the path.

Witnesses, in order: the release folder's name (the tar's top folder; the folder itself for a folder
source; the release root, i.e. the parent of ``iter_*``, for ``iter_*`` / ``.pt`` sources when it holds the
tracker or the vocabulary), and the tarball's own file name. A name says ``chat`` or ``base`` when that is
one of its words (split on ``_ - . space``), e.g. ``8b_chat_model_release``; a name holding both words says
nothing reliable. Witnesses that disagree, or no witness at all, give ``unknown``.
"""

from __future__ import annotations

import re

VARIANTS = ("base", "chat")
_WORD_SPLIT = re.compile(r"[_\-. ]+")


def name_says(name: str) -> str | None:
    """``base`` / ``chat`` when ``name`` has exactly one of those words, ``both`` when it has both, else None."""
    words = set(_WORD_SPLIT.split(name.lower()))
    hits = [v for v in VARIANTS if v in words]
    if len(hits) > 1:
        return "both"
    return hits[0] if hits else None


def decide_variant(witnesses: list[tuple[str, str]]) -> tuple[str, str]:
    """``(variant, explanation)`` from ``[(description, name)]`` witnesses (description e.g. ``release folder
    8b_chat_model_release inside tp1.tar``)."""
    if not witnesses:
        return "unknown", "unknown: no release folder or tarball name to read it from"
    said = [(desc, name, name_says(name)) for desc, name in witnesses]
    both = [desc for desc, _, says in said if says == "both"]
    if both:
        return "unknown", f"unknown: {both[0]} names both base and chat"
    votes = [(desc, says) for desc, _, says in said if says is not None]
    if not votes:
        if len(said) > 1:
            return "unknown", "unknown: neither " + " nor ".join(
                d for d, _, _ in said
            ) + " names base or chat"
        return "unknown", f"unknown: {said[0][0]} names neither base nor chat"
    decided = {says for _, says in votes}
    if len(decided) > 1:
        return "unknown", "unknown: conflicting names: " + ", ".join(f"{d} says {s}" for d, s in votes)
    variant = votes[0][1]
    if len(votes) > 1:
        return variant, " and ".join(d for d, _ in votes) + " agree"
    return variant, votes[0][0]
