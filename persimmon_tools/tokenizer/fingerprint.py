"""A tokenizer's fingerprint: the ids it gives one fixed probe text, and their hash.

``convert`` records what SentencePiece gives the probe (``conversion.json``'s ``tokenizer_fingerprint``),
after :func:`checked_fingerprint` has found the same ids in the ``tokenizer.json`` just written (the
``tokenizer`` command applies the same check and logs the fingerprint); ``verify`` re-encodes the recorded
probe with the folder's ``tokenizer.json`` and fails when the ids differ (two pieces swapped, a different
vocabulary, an edited normalizer). The probe exercises what a converter gets wrong: byte fallback
(characters no piece spells), runs of spaces, tabs and newlines, leading spaces, digits, CJK, emoji with
modifiers, and the special pieces' names as literal text. It encodes alike with SentencePiece and the
written ``tokenizer.json`` for the bundled tiny vocabulary and the real model of ``../shared/data`` (no
float32 tie in it; tests/conversion/test_tokenizer_fingerprint.py).

Record layout (JSON)::

    {"probe": PROBE_TEXT, "ids": [int, ...], "sha256": hex, "scheme": "ids-v1"}

``sha256`` is the SHA-256 of the ids written as decimal numbers joined by ``,`` (ASCII), so anyone can
recompute it from ``ids``. The probe text is stored with the ids: a later version with another probe still
re-checks an older folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from persimmon_tools.errors import TokenizerError

log = logging.getLogger(__name__)

SCHEME = "ids-v1"
#: ``conversion.json``'s key for the record (``convert`` writes it; ``verify`` and the model card read it).
CONVERSION_KEY = "tokenizer_fingerprint"

#: The fixed probe text (never change it in place: a new probe gets a new ``SCHEME``).
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog 1234567890 3.14159 -42\n"
    "  two leading spaces,\tone tab,   three spaces\n\n"
    "human: What is relativity?\n\nadept:"
    " 東京は日本の首都です。 서울 한국어 "
    "emoji 😀🫶🏽 👩‍👩‍👧 rare ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﬁ ① Ⅻ ½ é é "
    "|ENDOFTEXT| <unk> <s> </s> <0x41> ▁ ~`!@#$%^&*()_+{}[]|\\;:'\",.<>/? \x01"
)


def ids_sha256(ids: list[int]) -> str:
    """SHA-256 of ``ids`` written as decimal numbers joined by ``,`` (ASCII)."""
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode("ascii")).hexdigest()


def record(ids: list[int], probe: str = PROBE_TEXT) -> dict:
    """The fingerprint record of ``ids`` (the ids of ``probe``)."""
    ids = [int(i) for i in ids]
    return {"probe": probe, "ids": ids, "sha256": ids_sha256(ids), "scheme": SCHEME}


def sentencepiece_fingerprint(sp, probe: str = PROBE_TEXT) -> dict:
    """The record of what a loaded ``SentencePieceProcessor`` gives ``probe`` (no BOS/EOS)."""
    return record(list(sp.encode(probe)), probe)


def tokenizer_json_ids(folder: Path, probe: str = PROBE_TEXT) -> list[int]:
    """The ids ``folder/tokenizer.json`` gives ``probe`` with ``tokenizers`` alone, without the post-processor's
    BOS (special pieces' names are text there, as in SentencePiece)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception with serde's message
        raise TokenizerError(
            f"{path} does not load with tokenizers.Tokenizer.from_file: {str(err).splitlines()[0] if str(err) else err!r}",
            hint="convert the release again (the folder's tokenizer files are damaged)",
        ) from err
    # Added tokens (a tokenizer.json re-saved by transformers lists its special tokens) would otherwise be
    # cut out of the text before the model sees it: "<unk>" would become the unknown id, not its pieces.
    tok.encode_special_tokens = True
    return list(tok.encode(probe, add_special_tokens=False).ids)


def compare(recorded: dict, got: list[int]) -> str | None:
    """None when ``got`` are the recorded ids; else a sentence naming the first differing position."""
    want = [int(i) for i in recorded.get("ids", [])]
    if got == want:
        return None
    at = next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
    )
    shown = lambda ids: ids[at : at + 4]  # noqa: E731 (a local one-liner)
    return (
        f"the probe text encodes to {len(got)} ids instead of the recorded {len(want)}, first difference at "
        f"position {at}: {shown(got)} instead of {shown(want)} (fingerprint {ids_sha256(got)[:16]} instead of "
        f"{str(recorded.get('sha256', ''))[:16]})"
    )


def checked_fingerprint(
    sp,
    folder: Path,
    origin: str,
    *,
    enforce: bool = True,
    allow_ties: bool = False,
    is_tie: Callable[[list[int], list[int]], bool] | None = None,
) -> dict:
    """The fingerprint of ``sp`` (:func:`sentencepiece_fingerprint`), once ``folder/tokenizer.json`` is known
    to give the probe the same ids (:func:`tokenizer_json_ids`): what a write records, so that ``verify``'s
    re-check of a fresh folder agrees.

    A difference follows the parity gate's rule (:func:`persimmon_tools.tokenizer.check.require_parity`):
    :class:`TokenizerError` (the caller writes nothing), unless ``enforce`` is off
    (``--allow-tokenizer-mismatch``) or ``allow_ties`` and ``is_tie(sentencepiece_ids, fast_ids)`` says the
    difference is a float32 tie (``--allow-ties``); those write with a logged warning, and the record
    keeps SentencePiece's ids, so ``verify`` reports the difference.
    """
    recorded = sentencepiece_fingerprint(sp)
    got = tokenizer_json_ids(folder)
    problem = compare(recorded, got)
    if problem is None:
        log.info("tokenizer fingerprint (%s): sha256 %s", SCHEME, recorded["sha256"])
        return recorded
    tie = is_tie is not None and is_tie(recorded["ids"], got)
    if not enforce or (allow_ties and tie):
        allowed = "--allow-tokenizer-mismatch" if not enforce else "a float32 tie, --allow-ties"
        log.warning(
            "tokenizer.json written for %s differs from SentencePiece (%s): %s", origin, allowed, problem
        )
        return recorded
    raise TokenizerError(
        f"the tokenizer.json written for {origin} does not encode the fingerprint's probe text as "
        f"SentencePiece does: {problem}",
        hint="nothing was written; "
        + (
            "the difference is a float32 tie (docs/tokenizer.md); --allow-ties writes it"
            if tie
            else "--allow-tokenizer-mismatch writes it anyway (verify then reports the tokenizer fingerprint "
            "as different)"
        ),
    )
