"""Read a SentencePiece ``ModelProto`` and say what an exact ``tokenizers`` pipeline needs to know.

Everything here is pure analysis of the proto: which pieces SentencePiece puts in its lattice/merge table,
which it keeps out, the scores it really uses, and which combinations ``tokenizers`` cannot reproduce.
:mod:`persimmon_tools.tokenizer.build` turns the result into a ``tokenizers.Tokenizer``.

SentencePiece facts used below (sentencepiece ``model_interface.cc``, ``unigram_model.cc``, ``normalizer.cc``):

* NORMAL, USER_DEFINED and UNUSED pieces are in the model's trie; CONTROL, UNKNOWN and BYTE pieces are not, so
  the literal text ``<s>`` or ``<0x41>`` is never encoded as those pieces. UNUSED pieces are skipped in the lattice.
* Unigram ``min_score``/``max_score`` are taken over NORMAL pieces only; an unknown character costs
  ``min_score - 10``; a USER_DEFINED piece scores ``len_bytes * max(FLT_MIN, max_score) - 0.1``.
* User-defined symbols are matched in the raw text before the charsmap and are never normalized.
* Scores are float32; the Unigram lattice adds them up along a path in float32 (``Lattice::Viterbi``),
  and SentencePiece itself refuses a model whose scores are NaN or Inf. :func:`check_scores` bounds them.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.safe_read import MAX_VOCAB_BYTES, read_small

log = logging.getLogger(__name__)

# sentencepiece_model.proto enums
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE, UNUSED = 1, 2, 3, 4, 6, 5
TYPE_NAMES = {
    NORMAL: "NORMAL",
    UNKNOWN: "UNKNOWN",
    CONTROL: "CONTROL",
    USER_DEFINED: "USER_DEFINED",
    BYTE: "BYTE",
    UNUSED: "UNUSED",
}
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
SPACE = "\u2581"  # SentencePiece's kSpaceSymbol
FLT_MIN = 1.1754943508222875e-38  # C's FLT_MIN, SentencePiece's initial max_score_
UNK_PENALTY = 10.0
#: Largest |score| accepted. SentencePiece sums scores along a lattice path in float32 (FLT_MAX ~ 3.4e38);
#: a path has at most one piece per byte of normalized text, so with |score| <= 1e30 no input shorter than
#: ~340 MB can overflow the sum, and the derived scores (user-defined bonus ``len * max_score``, the
#: hidden reserved-piece score, the unknown-character score) stay finite in tokenizers' JSON. Real
#: models are nowhere near: Unigram scores are log-probabilities (about -2 to -30), BPE scores piece ranks
#: (at most -vocab size).
MAX_ABS_SCORE = 1e30


@dataclass(frozen=True)
class SpmInfo:
    """What the proto says, flattened: pieces, types, scores and the normalizer/trainer options."""

    path: str
    model_type: int
    pieces: list[str]
    types: list[int]
    scores: list[float]
    unk_id: int
    byte_fallback: bool
    charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    treat_whitespace_as_suffix: bool
    denormalizer_charsmap: bytes
    unk_surface: str
    trainer_options: dict[str, object] = field(default_factory=dict)

    def ids_of(self, *kinds: int) -> list[int]:
        return [i for i, t in enumerate(self.types) if t in kinds]

    @property
    def in_trie(self) -> list[bool]:
        """Whether SentencePiece's model trie holds the piece (NORMAL, USER_DEFINED, UNUSED)."""
        return [t in (NORMAL, USER_DEFINED, UNUSED) for t in self.types]

    @property
    def min_score(self) -> float:
        normal = [s for s, t in zip(self.scores, self.types, strict=True) if t == NORMAL]
        return min(normal) if normal else 0.0

    @property
    def max_score(self) -> float:
        return max([FLT_MIN] + [s for s, t in zip(self.scores, self.types, strict=True) if t == NORMAL])


def read_model_bytes(path: Path, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a SentencePiece model file: a regular file (never a FIFO or device) of at most
    :data:`~persimmon_tools.safe_read.MAX_VOCAB_BYTES`; TokenizerError otherwise. ``follow_symlinks=False``
    for a file found inside a folder (a link there is refused)."""
    return read_small(
        path,
        what="SentencePiece model",
        max_bytes=MAX_VOCAB_BYTES,
        follow_symlinks=follow_symlinks,
        error=TokenizerError,
        hint="pass the release's adept_vocab.model (or any SentencePiece .model file)",
    )


def read_proto(sp_model: Path):
    """Parse ``sp_model`` into a ``ModelProto`` (TokenizerError when it is not one)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(sp_model)
    data = read_model_bytes(path)  # regular files only, size-bounded (TokenizerError)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError
        raise TokenizerError(
            f"{path} is not a SentencePiece model ({err})",
            hint="the file may be truncated; re-extract adept_vocab.model from the release",
        ) from err
    if not proto.pieces:
        raise TokenizerError(f"{path} has no pieces", hint="pass a trained SentencePiece .model file")
    return proto


def check_scores(pieces: list[str], scores: list[float], origin: str) -> None:
    """Raise :class:`TokenizerError` naming the first piece whose score is NaN, ±inf or beyond
    ±:data:`MAX_ABS_SCORE` (any piece type: a model carrying such a score is damaged or edited)."""
    bad = [i for i, s in enumerate(scores) if not (math.isfinite(s) and abs(s) <= MAX_ABS_SCORE)]
    if not bad:
        return
    i = bad[0]
    more = f" (and {len(bad) - 1} more piece(s))" if len(bad) > 1 else ""
    raise TokenizerError(
        f"{origin}: piece {i} {pieces[i]!r} has score {scores[i]!r}{more}; piece scores must be finite and "
        f"within ±{MAX_ABS_SCORE:g} (SentencePiece adds them up in float32, and tokenizer.json cannot hold NaN "
        "or Inf)",
        hint="the model file is damaged or was edited; re-extract adept_vocab.model from the release "
        "(real scores are log-probabilities, about -2 to -30)",
    )


def diagnose_scores(data: bytes, origin: str) -> None:
    """Raise the precise :func:`check_scores` error when a score is why SentencePiece refused the model
    ``data``; return quietly otherwise (also when ``data`` is no proto at all)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: the caller reports the load failure itself
        return
    check_scores([str(p.piece) for p in proto.pieces], [float(p.score) for p in proto.pieces], origin)


def read_spm(sp_model: Path) -> SpmInfo:
    """Flatten the proto of ``sp_model`` into :class:`SpmInfo` (scores checked by :func:`check_scores`)."""
    proto = read_proto(sp_model)
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    bad = [i for i, p in enumerate(pieces) if not isinstance(p, str)]  # protobuf keeps non-UTF-8 as bytes
    if bad:
        raise TokenizerError(
            f"{sp_model}: piece {bad[0]} ({pieces[bad[0]]!r}) is not valid UTF-8"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
            hint="the model file is corrupt; re-extract adept_vocab.model from the release",
        )
    types = [p.type for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    check_scores(pieces, scores, str(sp_model))
    unk = [i for i, t in enumerate(types) if t == UNKNOWN]
    if len(unk) != 1:
        raise TokenizerError(
            f"{sp_model} has {len(unk)} pieces of type UNKNOWN; SentencePiece requires exactly one",
            hint="the model is corrupt; SentencePiece itself refuses to load it",
        )
    unk_surface = ts.unk_surface if ts.HasField("unk_surface") else " \u2047 "
    if not isinstance(unk_surface, str):  # protobuf keeps a string field that is not UTF-8 as bytes
        raise TokenizerError(
            f"{sp_model}: the surface of the unknown piece (id {unk[0]}, {pieces[unk[0]]!r}), "
            f"trainer_spec.unk_surface {bytes(unk_surface)!r}, is not valid UTF-8; decoding <unk> would "
            "need it",
            hint="the model file is corrupt or was edited; re-extract adept_vocab.model from the release",
        )
    options = {
        name: getattr(ts, name)
        for name in (
            "split_by_whitespace",
            "split_digits",
            "split_by_number",
            "split_by_unicode_script",
            "treat_whitespace_as_suffix",
            "allow_whitespace_only_pieces",
            "max_sentencepiece_length",
        )
    }
    return SpmInfo(
        path=str(sp_model),
        model_type=ts.model_type or UNIGRAM,
        pieces=pieces,
        types=types,
        scores=scores,
        unk_id=unk[0],
        byte_fallback=bool(ts.byte_fallback),
        charsmap=bytes(ns.precompiled_charsmap),
        add_dummy_prefix=ns.add_dummy_prefix,
        remove_extra_whitespaces=ns.remove_extra_whitespaces,
        escape_whitespaces=ns.escape_whitespaces,
        treat_whitespace_as_suffix=ts.treat_whitespace_as_suffix,
        denormalizer_charsmap=bytes(proto.denormalizer_spec.precompiled_charsmap),
        unk_surface=unk_surface,
        trainer_options=options,
    )


def charsmap_parts(blob: bytes) -> tuple[tuple[int, ...], bytes]:
    """``(trie units, value area)`` of a ``precompiled_charsmap``: ``u32 trie_size | u32 units | values``."""
    if len(blob) < 4:
        raise TokenizerError(
            "precompiled_charsmap is broken (shorter than its header)", hint="re-train the model"
        )
    (size,) = struct.unpack_from("<I", blob, 0)
    if size + 4 > len(blob) or size % 4:
        raise TokenizerError("precompiled_charsmap is broken (trie size)", hint="re-train the model")
    return struct.unpack_from(f"<{size // 4}I", blob, 4), blob[4 + size :]


def charsmap_has_prefix(blob: bytes, prefix: bytes) -> bool:
    """Whether some charsmap key starts with ``prefix`` (walks the double array along ``prefix`` only)."""
    if not blob:
        return False
    units, _ = charsmap_parts(blob)
    pos = (units[0] >> 10) << ((units[0] & (1 << 9)) >> 6)
    for c in prefix:
        child = pos ^ c
        if child >= len(units) or (units[child] & ((1 << 31) | 0xFF)) != c:
            return False
        pos = child ^ ((units[child] >> 10) << ((units[child] & (1 << 9)) >> 6))
    return True


def charsmap_values(blob: bytes) -> list[bytes]:
    """The replacement strings of a charsmap (its NUL-separated value area)."""
    return charsmap_parts(blob)[1].split(b"\0") if blob else []


def inexpressible(info: SpmInfo) -> list[str]:
    """Reasons why ``tokenizers`` cannot reproduce ``info`` exactly (empty list: it can)."""
    problems: list[str] = []
    if info.model_type not in (UNIGRAM, BPE):
        kind = {WORD: "WORD", CHAR: "CHAR"}.get(info.model_type, str(info.model_type))
        problems.append(f"model_type {kind}: only UNIGRAM and BPE models are converted")
    if info.denormalizer_charsmap:
        problems.append(
            "denormalizer_spec has a precompiled_charsmap: tokenizers decoders cannot apply a charsmap"
        )
    single = [
        i
        for i, (p, t) in enumerate(zip(info.pieces, info.types, strict=True))
        if t in (CONTROL, UNUSED, UNKNOWN) and len(p) == 1 and info.model_type != UNIGRAM
    ]  # Unigram: tokenizer_unigram.reserved_plan decides whether they can be kept out
    if single:
        problems.append(
            "one-character pieces of type CONTROL/UNUSED/UNKNOWN "
            f"({', '.join(repr(info.pieces[i]) for i in single[:5])}): SentencePiece encodes that character as "
            "<unk>, tokenizers would emit the piece"
        )
    if info.model_type == BPE and info.ids_of(UNUSED):
        problems.append(
            f"{len(info.ids_of(UNUSED))} UNUSED pieces in a BPE model: SentencePiece re-segments merges that produce "
            "them, tokenizers' BPE cannot"
        )
    if info.escape_whitespaces and any(" " in info.pieces[i] for i in info.ids_of(NORMAL)):
        problems.append("NORMAL pieces contain ' ' although escape_whitespaces is on")
    for i in info.ids_of(USER_DEFINED):
        if info.remove_extra_whitespaces and "  " in info.pieces[i]:
            problems.append(f"user-defined piece {info.pieces[i]!r} contains two spaces in a row")
    values = charsmap_values(info.charsmap)
    if info.remove_extra_whitespaces and any(b"  " in v for v in values):
        problems.append(
            "the charsmap maps a character to two spaces in a row (remove_extra_whitespaces differs)"
        )
    return problems


def known_chars(info: SpmInfo) -> set[str]:
    """Characters that are NORMAL/USER_DEFINED pieces of their own (never ``<unk>`` in SentencePiece)."""
    return {
        p for p, t in zip(info.pieces, info.types, strict=True) if t in (NORMAL, USER_DEFINED) and len(p) == 1
    }


def unknown_char_pieces(info: SpmInfo) -> list[str]:
    """NORMAL/USER_DEFINED pieces containing a character that is not itself a one-character trie piece.

    Only for those does SentencePiece's ``<unk>`` score compete with a real piece in the lattice.
    """
    known = known_chars(info)
    return [
        p
        for p, t in zip(info.pieces, info.types, strict=True)
        if t in (NORMAL, USER_DEFINED) and len(p) > 1 and any(c not in known for c in p)
    ]
