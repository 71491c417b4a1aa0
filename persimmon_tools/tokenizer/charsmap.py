"""SentencePiece's charsmap normalization, exactly, from ``tokenizers`` building blocks.

SentencePiece (``normalizer.cc``) scans the text left to right; at each position it copies a user-defined
symbol verbatim if one starts there, otherwise replaces the *longest* charsmap key starting there by its
value, otherwise copies one character. ``tokenizers``' only charsmap normalizer, ``Precompiled``, works
grapheme by grapheme instead: a grapheme under 6 bytes is replaced whole by the value of its *shortest*
matching key (``"a\u0323\u0301"`` loses the acute) and longer graphemes go character by character (so
half-width ``ﾃﾞ`` is never composed into ``デ``). :func:`exact_charsmap_steps` rebuilds SentencePiece's scan:

1. ``Replace(SEGMENT\\K, END)``: ``SEGMENT`` is a regex of the user-defined symbols, the multi-character
   keys (a minimized trie, longest match first), a run of untouched printable ASCII, or any one character;
   ``END`` (an unassigned code point with Grapheme_Cluster_Break=Control) lands after every segment of
   SentencePiece's scan.
2. ``Replace(KEY(?=END), VALUE)`` for the multi-character keys step 5 cannot produce.
3. ``Replace(..\\K.., ISO)`` inside multi-character segments: ``ISO`` (preferably a control character the
   charsmap deletes, ``\x01`` for ``nmt_nfkc``) between their characters, so every character is a grapheme
   of its own.
4. ``Precompiled(charsmap)``: on one-character graphemes this is exactly the per-character rules.
5. ``NFC``: a multi-character key's value is the canonical composition of its characters' values (for
   ``nfkc``/``nmt_nfkc``: ``"a\u0323\u0302"`` → ``ậ``, jamo → syllable); ``END`` blocks composition and
   reordering between segments, as SentencePiece never looks across them. Custom rule sets whose values
   are not compositions skip NFC and rewrite every multi-character key in step 2 instead.
6. Remove the markers.

Steps 2, 3 and 5 only exist when there are multi-character keys or user symbols. The result is *checked*
with the installed ``tokenizers`` (:func:`verify`: every key, user symbol and NFC-unstable character), and
anything that still differs raises :class:`TokenizerError` instead of writing a tokenizer that silently
differs. The one input this cannot follow is text containing the marker code points themselves (U+E0080 to
U+E00FF: unassigned, reserved by Unicode).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.trie import char_class, charsmap_entries, class_body, escape, trie_regex

log = logging.getLogger(__name__)

# Grapheme_Cluster_Break=Control characters (a grapheme of their own, ccc 0, no composition). The segment
# marker END must survive the charsmap: unassigned default-ignorables. The isolating ISO is preferably a
# control character the charsmap deletes (then even text containing it is exact).
END_CANDIDATES = tuple(chr(c) for c in range(0xE0080, 0xE00FF))
# Stands in for the whitespace suffix (treat_whitespace_as_suffix) until the whitespace steps have run.
SUFFIX_MARK = "\U000e00ff"
ISO_CANDIDATES = (*(chr(c) for c in (*range(0x01, 0x09), 0x0E, 0x0F, *range(0x10, 0x20))), *END_CANDIDATES)
# Printable ASCII: two in a row are always two graphemes, and NFC never touches or composes them.
ASCII_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
# More distinct multi-character values than this that NFC gets wrong: refuse rather than chain Replaces.
MAX_EXPLICIT_VALUES = 256


def spm_normalize(rules: dict[str, str], text: str, users: tuple[str, ...] = (), longest: int = 0) -> str:
    """SentencePiece's charsmap scan in Python (reference for tests and :func:`verify`).

    ``longest`` is the longest key/symbol length in characters (computed when 0).
    """
    longest = longest or max(map(len, [*rules, *users]), default=1)
    out, i = [], 0
    while i < len(text):
        user = max((u for u in users if text.startswith(u, i)), key=len, default=None)
        if user:
            out.append(user)
            i += len(user)
            continue
        for size in range(min(longest, len(text) - i), 0, -1):
            if text[i : i + size] in rules:
                out.append(rules[text[i : i + size]])
                i += size
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _rx(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


@dataclass(frozen=True)
class _Plan:
    """What the steps are made of: the rules, the markers and the segmenting regexes."""

    rules: dict[str, str]
    users: tuple[str, ...]
    multi: list[str]
    end: str  # after every segment (a grapheme-breaking control character)
    iso: str  # between the characters of a multi-character segment
    spare: str  # stands in for the dummy prefix while the charsmap runs
    segment: str
    isolate: str

    @property
    def compose(self) -> bool:
        """Whether there are multi-character segments (keys or user symbols) at all."""
        return bool(self.multi or [u for u in self.users if len(u) > 1])


@functools.lru_cache(maxsize=4)
def _multi_keys(blob: bytes) -> tuple[list[str], str]:
    """The charsmap's multi-character keys and :func:`trie_regex` of them (shared by a model's variants:
    the regex is the costly part of a variant; cached, do not modify)."""
    multi = [k for k in charsmap_entries(blob) if len(k) > 1]
    return multi, trie_regex(multi) if multi else ""


def _plan(blob: bytes, users: tuple[str, ...], *, keep_end: bool = False) -> _Plan:
    rules = charsmap_entries(blob)
    multi, multi_regex = _multi_keys(blob)
    seen = set("".join(rules)) | set("".join(rules.values())) | set("".join(users))
    starts = {k[0] for k in multi} | {u[0] for u in users}
    deleted = [
        c for c in ISO_CANDIDATES if rules.get(c) == "" and c not in starts and c not in "".join(users)
    ]
    unused = [c for c in END_CANDIDATES if c not in seen]
    if len(unused) < 3 or SUFFIX_MARK in seen:
        raise TokenizerError(
            "the charsmap rewrites the marker characters persimmon-tools inserts (U+E0080..U+E00FF)",
            hint="this model cannot be converted exactly; use --allow-tokenizer-mismatch to write an approximation",
        )
    compose = bool(multi or [u for u in users if len(u) > 1])
    end = unused[0] if compose or keep_end else (deleted or unused)[0]
    iso = [*deleted, *unused[1:]][0]
    # Runs of printable ASCII that no rule touches and where no user symbol starts are one segment (a
    # character followed by a key's second character ends the run: a key may start there).
    plain = [c for c in ASCII_PRINTABLE if c not in rules and c not in {u[0] for u in users}]
    second = sorted({k[1] for k in multi})
    keys = rf"(?=[\s\S]{char_class(second)}){multi_regex}" if multi else ""
    runs = f"(?:{char_class(plain)}{f'(?!{char_class(second)})' if second else ''})+" if plain else ""
    segment = "|".join(p for p in (trie_regex(list(users)), keys, runs, r"[\s\S]") if p)
    # Inside multi-character segments (two non-END characters in a row, not both plain): ISO between them.
    inner, not_plain = f"[^{escape(ord(end))}]", f"[^{class_body(plain)}{escape(ord(end))}]"
    isolate = rf"{not_plain}\K(?={inner})|{inner}\K(?={not_plain})"
    return _Plan(rules, users, multi, end, iso, unused[2], segment, isolate)


def _assemble(
    plan: _Plan, blob: bytes, explicit: dict[str, list[str]], *, nfc: bool, suffix: str = ""
) -> list:
    """Steps 1–6 of the module docstring; ``explicit`` maps values to the keys rewritten in step 2.

    ``suffix`` (``"keep"``/``"strip"``, for ``treat_whitespace_as_suffix``) appends :data:`SUFFIX_MARK`
    while END still marks every segment: SentencePiece adds its suffix to any non-empty text, and with
    ``remove_extra_whitespaces`` (``"strip"``) only when some segment is not a single space (it skips those
    first), even if the text then normalizes to nothing.
    """
    from tokenizers import normalizers as n

    end, iso = plan.end, plan.iso
    steps = [n.Replace(_rx(rf"(?:{plan.segment})\K"), end)]
    for value, keys in explicit.items():
        steps.append(
            n.Replace(
                _rx(rf"(?:\A|(?<={escape(ord(end))}))(?:{trie_regex(keys)})(?={escape(ord(end))})"), value
            )
        )
    if plan.compose:
        steps.append(n.Replace(_rx(plan.isolate), iso))
    steps.append(n.Precompiled(blob))
    if plan.compose:
        if plan.rules.get(iso) != "":
            steps.append(n.Replace(iso, ""))
        if nfc:
            steps.append(n.NFC())
    if suffix:
        steps.append(n.Replace(_rx(r"\z"), SUFFIX_MARK))
        if suffix == "strip":
            steps.append(n.Replace(_rx(rf"\A(?: +{escape(ord(end))})*{escape(ord(SUFFIX_MARK))}\z"), ""))
    if plan.compose or plan.rules.get(end) != "":
        steps.append(n.Replace(end, ""))
    return steps


def _by_value(rules: dict[str, str], keys: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in keys:
        out.setdefault(rules[key], []).append(key)
    return out


@functools.lru_cache(maxsize=16)  # small (regex strings): a model's variants (users, dummy, suffix) all fit
def exact_charsmap_steps(
    blob: bytes, users: tuple[str, ...] = (), dummy: str = "", suffix: str = ""
) -> tuple:
    """The normalizer steps of the module docstring for charsmap ``blob``, verified with :func:`verify`.

    Tried in order: NFC composes the multi-character keys (``nfkc``/``nmt_nfkc``), with the few it gets wrong
    rewritten explicitly; else every multi-character key rewritten explicitly (custom rule sets, up to
    ``MAX_EXPLICIT_VALUES`` distinct values); else :class:`TokenizerError`. Cached per (charsmap, user
    symbols, dummy): building and verifying ``nmt_nfkc`` is the costly part.

    ``dummy``: SentencePiece's dummy prefix, for charsmaps that rewrite it (``nmt_nfkc`` maps ``▁`` to a
    space): a marker no rule touches is prepended instead and becomes ``dummy`` after the charsmap, so any
    non-empty text gets it, even one that normalizes to nothing (as in SentencePiece). ``suffix``: see
    :func:`_assemble`.
    """
    from tokenizers import normalizers as n

    plan = _plan(blob, tuple(sorted(set(users))), keep_end=bool(suffix))
    rules, users = plan.rules, plan.users
    attempts = []  # (steps, inputs they get wrong, explicit rewrites, nfc)
    if plan.compose:
        explicit: dict[str, list[str]] = {}
        steps = _assemble(plan, blob, explicit, nfc=True)
        bad = verify(steps, plan, nfc=True)
        wrong = _by_value(rules, [k for k in bad if k in rules and len(k) > 1])
        if bad and len(wrong) <= MAX_EXPLICIT_VALUES and all(k in rules and len(k) > 1 for k in bad):
            explicit = wrong
            steps = _assemble(plan, blob, explicit, nfc=True)
            # The rewrites only match a whole segment equal to one of those keys, so every other verified
            # input is unaffected; re-verify the ones that were wrong.
            bad = verify(steps, plan, nfc=True, items=bad)
        attempts.append((steps, bad, explicit, True))
        every = _by_value(rules, plan.multi)
        if bad and len(every) <= MAX_EXPLICIT_VALUES:
            steps = _assemble(plan, blob, every, nfc=False)
            attempts.append((steps, verify(steps, plan, nfc=False), every, False))
    else:
        steps = _assemble(plan, blob, {}, nfc=False)
        attempts.append((steps, verify(steps, plan, nfc=False), {}, False))
    for steps, bad, explicit, nfc in attempts:
        if not bad:
            log.debug("exact charsmap normalizer: %d steps, %d rules", len(steps), len(rules))
            if suffix:  # verified without it (it is not part of the charsmap); the same steps plus the mark
                steps = _assemble(plan, blob, explicit, nfc=nfc, suffix=suffix)
            if dummy:
                steps = [
                    n.Prepend(plan.spare),
                    *steps,
                    n.Replace(_rx(rf"\A{escape(ord(plan.spare))}"), dummy),
                ]
            return tuple(steps)
    steps, bad, _, _ = attempts[-1]
    got = n.Sequence(steps)
    shown = ", ".join(
        f"{k!r} → {got.normalize_str(k)!r} instead of {spm_normalize(rules, k, users)!r}" for k in bad[:3]
    )
    raise TokenizerError(
        f"tokenizers cannot reproduce this model's charsmap normalization for {len(bad)} inputs ({shown})",
        hint="use --allow-tokenizer-mismatch to write an approximation, then check your corpus with "
        "`persimmon-tools tokenizer --check MODEL CORPUS`",
    )


@functools.cache
def _nfc_unstable() -> frozenset[str]:
    """Characters that the installed tokenizers' NFC changes on their own (singletons, exclusions).

    Every code point from U+0020 (no surrogates) is normalized alone, NUL-separated, in chunks of 32,768 (~10 MB
    at a time instead of ~300 MB); a chunk that comes back unchanged is skipped whole.
    """
    import numpy as np
    from tokenizers import normalizers as n

    nfc, out = n.NFC(), set()
    points = np.arange(0x20, 0x110000, dtype="<u4")
    points = points[(points < 0xD800) | (points >= 0xE000)]
    for start in range(0, len(points), 0x8000):
        chunk = np.zeros(2 * len(points[start : start + 0x8000]), dtype="<u4")
        chunk[0::2] = points[start : start + 0x8000]
        text = chunk.tobytes().decode("utf-32-le")  # c \0 c \0 ...
        got = nfc.normalize_str(text)
        if got != text:
            out.update(c for c, g in zip(text[0::2], got.split("\0")[:-1], strict=True) if g != c)
    return frozenset(out)


def _separator(plan: _Plan, texts: list[str]) -> str:
    """A character in no text and no rule: one segment of its own, copied by SentencePiece and every step."""
    seen = set("".join(texts)) | set("".join(plan.rules.values()))
    return next(
        c
        for c in ("|", "#", "~", *reversed(END_CANDIDATES))
        if c not in seen and c not in (plan.end, plan.iso, plan.spare)
    )


def _normalize_all(normalizer, texts: list[str], sep: str) -> list[str]:
    out: list[str] = []
    for start in range(0, len(texts), 4096):  # in chunks: tokenizers keeps two offsets per byte
        chunk = texts[start : start + 4096]
        got = normalizer.normalize_str(sep.join(chunk)).split(sep)
        if len(got) != len(chunk):  # cannot happen with sep outside every rule; be safe, one by one
            got = [normalizer.normalize_str(text) for text in chunk]
        out.extend(got)
    return out


def verify(steps: list, plan: _Plan, *, nfc: bool, items: list[str] | None = None) -> list[str]:
    """Inputs on which ``steps`` differ from SentencePiece: every key, user symbol and NFC-unstable character.

    A character that is neither a key nor NFC-unstable passes every step unchanged, so these inputs cover
    the rules; a text is normalized segment by segment, and END keeps segments apart. By default the whole
    pipeline runs on the one-character keys, user symbols, NFC-unstable characters and every 16th
    multi-character key, and the multi-character keys are all checked by what the pipeline does with a
    lone key (NFC of its characters' values), which is ~5x faster; ``items`` runs the pipeline on those.
    """
    from tokenizers import normalizers as n

    rules, users = plan.rules, plan.users
    user_starts = {u[0] for u in users}
    # Keys a user symbol may start are not one segment when alone: the pipeline checks those.
    direct = [k for k in plan.multi if k[0] not in user_starts] if items is None and nfc else []
    if items is None:
        sample = [*direct[::16], *(k for k in plan.multi if k[0] in user_starts)] if direct else plan.multi
        items = sorted(
            {*(k for k in rules if len(k) == 1), *sample, *users, *(_nfc_unstable() if nfc else ())}
        )
    sep = _separator(plan, items)
    got = _normalize_all(n.Sequence(steps), items, sep)
    longest = max(map(len, [*rules, *users]), default=1)

    def expected(item: str) -> str:
        if item in rules and item[0] not in user_starts:  # a key alone is one segment: its own value
            return rules[item]
        return spm_normalize(rules, item, users, longest)

    bad = [item for item, out in zip(items, got, strict=True) if out != expected(item)]
    if direct:
        table = str.maketrans({k: v for k, v in rules.items() if len(k) == 1})
        composed = [key.translate(table) for key in direct]  # each character through its own rule
        nfc_out = _normalize_all(n.NFC(), composed, _separator(plan, composed))
        bad += [k for k, out in zip(direct, nfc_out, strict=True) if out != rules[k] and k not in bad]
    return bad
