"""SentencePiece BPE as a ``tokenizers`` ``BPE`` model (plus the pre-tokenizer user-defined symbols need).

SentencePiece's BPE splits user-defined symbols out of the normalized text (longest match), then merges any
adjacent pair whose concatenation is a piece, best score first, leftmost on ties. Here:

* merges: every split of every NORMAL piece into two mergeable pieces, in score order (:func:`bpe_merges`);
* user-defined symbols: isolated by a ``Split`` pre-tokenizer and emitted whole through ``ignore_merges``.
  ``ignore_merges`` returns *any* vocabulary entry that equals a whole chunk, so

  - every NORMAL piece must be one SentencePiece's own merges reach (checked with SentencePiece itself;
    otherwise the model is refused), and
  - a chunk equal to a reserved piece's name (``<unk>``, ``</s>``, ``<0x41>``: text between two user symbols,
    or the whole text) is split beforehand at the boundaries SentencePiece's merges give that text
    (:func:`reserved_chunk_splits`), so it is never looked up whole.
"""

from __future__ import annotations

from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.proto import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, SpmInfo
from persimmon_tools.tokenizer.trie import alternation, literal


def bpe_merges(info: SpmInfo) -> list[tuple[str, str]]:
    """Every split ``(a, b)`` of a NORMAL piece into two mergeable pieces, highest score first.

    SentencePiece's BPE merges any adjacent pair whose concatenation is a piece, best score first and the
    leftmost on ties; tokenizers ranks pairs, so each piece's splits get consecutive ranks in score order.
    """
    mergeable = {p for p, t in zip(info.pieces, info.types, strict=True) if t in (NORMAL, USER_DEFINED)}
    order = sorted(info.ids_of(NORMAL), key=lambda i: (-info.scores[i], i))
    merges = []
    for i in order:
        piece = info.pieces[i]
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in mergeable and b in mergeable:
                merges.append((a, b))
    return merges


def raw_processor(info: SpmInfo):
    """SentencePiece on ``info``'s model with normalization off: its BPE applied to text as it is."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from persimmon_tools.tokenizer.proto import read_proto

    raw = pb.ModelProto()
    raw.CopyFrom(read_proto(Path(info.path)))
    ns = raw.normalizer_spec
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(raw.SerializeToString())
    return sp


def unreached_pieces(info: SpmInfo, sp) -> list[str]:
    """NORMAL pieces that SentencePiece's own BPE does not encode as themselves (greedy merges miss them)."""
    normal = [info.pieces[i] for i in info.ids_of(NORMAL)]
    return [p for p, ids in zip(normal, sp.encode(normal), strict=True) if len(ids) != 1]


def reserved_chunk_splits(info: SpmInfo, sp, users: list[str]) -> str | None:
    """A ``Split`` (isolated) regex that cuts a chunk equal to a reserved name where SentencePiece's merges do.

    For ``<unk>`` merged as ``<|un|k|>`` the alternatives are ``\\A<(?=unk>\\z)``, ``(?<=\\A<)un(?=k>\\z)``, … .
    Leading guards limit the work to chunks no longer than the longest name. ``None`` when no reserved
    name can be a chunk.
    """
    names = [info.pieces[i] for i in info.ids_of(CONTROL, UNKNOWN, BYTE, UNUSED)]
    names = [n for n in names if len(n) > 1 and not any(u in n for u in users)]
    alternatives = []
    for name in names:
        cuts = _merge_boundaries(sp, name)
        parts = [name[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        for k, part in enumerate(parts):
            before, after = "".join(parts[:k]), "".join(parts[k + 1 :])
            behind = rf"(?<=\A{literal(before)})" if before else r"\A"
            alternatives.append(rf"{behind}{literal(part)}(?={literal(after)}\z)")
    if not alternatives:
        return None
    longest = max(len(n) for n in names)
    # Guards first (fewer than `longest` characters before, at most `longest` after): other positions fail fast
    # (the lookahead guard alone is far slower than both guards together; see docs/performance.md).
    return rf"(?<![\s\S]{{{longest}}})(?=[\s\S]{{1,{longest}}}\z)(?:{'|'.join(alternatives)})"


def _merge_boundaries(sp, text: str) -> list[int]:
    """Character offsets where SentencePiece's pieces of ``text`` start, plus ``len(text)``."""
    data = text.encode()
    to_char = {len(text[:i].encode()): i for i in range(len(text) + 1)}
    starts = {p.begin for p in sp.encode(text, return_type="proto").pieces if p.end > p.begin}
    return sorted({to_char[b] for b in starts if b < len(data)} | {len(text)})


def build_bpe(info: SpmInfo):
    """``(tokenizers.models.BPE, pre-tokenizer or None)`` for a SentencePiece BPE model."""
    from tokenizers import Regex, models, pre_tokenizers

    vocab = {p: i for i, p in enumerate(info.pieces)}
    users = [info.pieces[i] for i in info.ids_of(USER_DEFINED)]
    pre = None
    if users:
        sp = raw_processor(info)
        missed = unreached_pieces(info, sp)
        if missed:
            raise TokenizerError(
                f"{info.path}: BPE model with user-defined symbols, and {len(missed)} pieces that SentencePiece's "
                f"own merges do not reach (e.g. {missed[0]!r}); tokenizers can freeze user-defined symbols only "
                "with ignore_merges, which would encode those pieces differently",
                hint="use --allow-tokenizer-mismatch to write it anyway, then check your corpus with `persimmon-tools tokenizer --check`",
            )
        steps = [pre_tokenizers.Split(Regex(alternation(users)), behavior="isolated")]
        splits = reserved_chunk_splits(info, sp, users)
        if splits:
            steps.append(pre_tokenizers.Split(Regex(splits), behavior="isolated"))
        pre = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    model = models.BPE(
        vocab=vocab,
        merges=bpe_merges(info),
        unk_token=info.pieces[info.unk_id],
        fuse_unk=True,
        byte_fallback=info.byte_fallback,
        ignore_merges=bool(users),
    )
    return model, pre
