"""Parity check: encode and decode with SentencePiece and with the fast tokenizer, report every difference.

:func:`require_parity` is the one gate over a :class:`ParityReport`: ``tokenizer --check``
(:func:`check_tokenizer`) and every write of tokenizer files (``tokenizer``, ``convert``) pass or fail by it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from persimmon_tools.errors import TokenizerError, UsageError
from persimmon_tools.tokenizer.spm import load_sp

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ParityReport:
    """Result of :func:`check_parity`.

    Attributes:
        items: texts compared.
        encode_mismatches: texts whose fast ids differ from ``sentencepiece.encode``.
        decode_mismatches: texts whose SentencePiece ids decode differently (fast ``decode`` vs ``decode_ids``).
        tie_mismatches: encode mismatches (counted in ``encode_mismatches`` too) where both segmentations have
            the same Unigram score up to float32 rounding: SentencePiece accumulates path scores in float32 and
            tokenizers in float64, so such near-ties can be broken differently (see docs/tokenizer.md).
        examples: the first differences, piece by piece, as readable lines.
    """

    sp_model: str
    items: int
    encode_mismatches: int
    decode_mismatches: int
    examples: list[str] = field(default_factory=list)
    tie_mismatches: int = 0

    @property
    def ok(self) -> bool:
        return self.encode_mismatches == 0 and self.decode_mismatches == 0

    @property
    def only_ties(self) -> bool:
        """Mismatches, all of them float32 ties (what ``--allow-ties`` accepts)."""
        return not self.ok and self.decode_mismatches == 0 and self.encode_mismatches == self.tie_mismatches

    def to_dict(self) -> dict[str, object]:
        return {
            "sp_model": self.sp_model,
            "items": self.items,
            "encode_mismatches": self.encode_mismatches,
            "decode_mismatches": self.decode_mismatches,
            "tie_mismatches": self.tie_mismatches,
            "ok": self.ok,
            "examples": list(self.examples),
        }


#: What a float32 tie is, for messages (docs/tokenizer.md explains it in full).
TIE_EXPLANATION = (
    "two segmentations with the same exact score, which SentencePiece orders by the float32 rounding of the "
    "text before them and tokenizers (float64) cannot"
)


def _describe_encode(text: str, expected: list[int], got: list[int], piece) -> str:
    first = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    lo = max(0, first - 2)

    def show(ids: list[int]) -> str:
        window = ids[lo : first + 4]
        body = " ".join(f"{piece(i)!r}({i})" for i in window)
        return ("… " if lo else "") + body + (" …" if first + 4 < len(ids) else "")

    return (
        f"encode {text[:80]!r}: first difference at piece {first} "
        f"(sentencepiece {len(expected)} pieces, fast {len(got)})\n"
        f"    sentencepiece: {show(expected)}\n    fast:          {show(got)}"
    )


def _tie_scorer(sp, scores: list[float]):
    """``ids -> exact path score`` with SentencePiece's effective Unigram ``scores`` (user-defined bonus
    included); ``None`` when the ids hold a control piece."""

    def score(ids: list[int]) -> float | None:
        # Unknown characters cost the same in both paths (same text): leave their byte/<unk> pieces out.
        if any(sp.is_control(i) for i in ids):
            return None
        return math.fsum(scores[i] for i in ids if not (sp.is_unknown(i) or sp.is_byte(i)))

    return score


def _within_float32_rounding(a: float, b: float, steps: int) -> bool:
    """Whether two exact path scores differ by less than SentencePiece's float32 accumulation can resolve.

    ``EncodeOptimized`` rounds every partial path score to float32, so paths closer than about one float32
    ulp of the running total per step are ordered by rounding noise rather than by their true scores.
    """
    import numpy as np

    return abs(a - b) <= steps * float(np.spacing(np.float32(max(abs(a), abs(b)))))


def is_float32_tie(sp, scores: list[float], expected: list[int], got: list[int]) -> bool:
    """Whether ``got`` spells the same text as SentencePiece's ``expected`` with a path score within float32
    rounding of it (a Unigram model's effective piece ``scores``): a tie no ``tokenizer.json`` can break
    as SentencePiece does (:attr:`ParityReport.tie_mismatches`)."""
    if sp.decode_ids(got) != sp.decode_ids(expected):
        return False
    scorer = _tie_scorer(sp, scores)
    a, b = scorer(expected), scorer(got)
    return a is not None and b is not None and _within_float32_rounding(a, b, len(expected) + len(got))


def tie_judge(sp, info) -> Callable[[list[int], list[int]], bool] | None:
    """``(sentencepiece_ids, fast_ids) -> is_float32_tie`` for the model of ``sp`` and its proto ``info``
    (the scores are read on the first call); ``None`` when the model is not Unigram."""
    from persimmon_tools.tokenizer.proto import UNIGRAM

    if info.model_type != UNIGRAM:
        return None
    return lambda expected, got: is_float32_tie(sp, unigram_scores(info) or [], expected, got)


def unigram_scores(info) -> list[float] | None:
    """SentencePiece's effective piece scores of a Unigram model's proto ``info`` (what
    :func:`is_float32_tie` weighs); ``None`` for other models, where no mismatch is a tie."""
    from persimmon_tools.tokenizer.proto import UNIGRAM
    from persimmon_tools.tokenizer.unigram import unigram_vocab

    return [s for _, s in unigram_vocab(info, hide_reserved=False)] if info.model_type == UNIGRAM else None


def compare(
    sp, fast, texts: Iterable[str], origin: str, *, unigram_scores: list[float] | None = None
) -> ParityReport:
    """Compare a loaded ``SentencePieceProcessor`` and a ``tokenizers.Tokenizer`` on ``texts``.

    ``unigram_scores`` (a Unigram model's effective piece scores) lets encode mismatches be classified as
    float32 ties (:attr:`ParityReport.tie_mismatches`)."""
    items = enc_bad = dec_bad = ties = 0
    examples: list[str] = []
    for text in texts:
        items += 1
        expected = sp.encode_as_ids(text)
        got = fast.encode(text, add_special_tokens=False).ids
        if expected != got:
            enc_bad += 1
            ties += unigram_scores is not None and is_float32_tie(sp, unigram_scores, expected, got)
            if len(examples) < MAX_EXAMPLES:
                examples.append(_describe_encode(text, expected, got, sp.id_to_piece))
        want, have = sp.decode_ids(expected), fast.decode(expected, skip_special_tokens=False)
        if want != have:
            dec_bad += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(
                    f"decode {text[:80]!r}:\n    sentencepiece: {want[:120]!r}\n    fast:          {have[:120]!r}"
                )
    log.debug("parity on %d items: %d encode, %d decode mismatches", items, enc_bad, dec_bad)
    return ParityReport(origin, items, enc_bad, dec_bad, examples, ties)


def parity_report(sp, info, fast, texts: Iterable[str] | None = None) -> ParityReport:
    """:func:`compare` a loaded ``SentencePieceProcessor`` ``sp``, its proto ``info`` (:class:`SpmInfo`) and the
    fast tokenizer built from it (no post-processor tokens) on ``texts`` (default: :func:`builtin_sample`),
    with Unigram encode mismatches classified as float32 ties."""
    from persimmon_tools.tokenizer.corpus import builtin_sample

    texts = builtin_sample() if texts is None else texts
    return compare(sp, fast, texts, str(info.path), unigram_scores=unigram_scores(info))


def check_parity(sp_model: Path, texts: Iterable[str] | None = None, *, strict: bool = True) -> ParityReport:
    """Encode ``texts`` (default: :func:`builtin_sample`) with SentencePiece and with the fast tokenizer.

    Args:
        sp_model: SentencePiece ``.model`` file.
        texts: the corpus, one item per text; ``None`` uses the built-in multi-script sample.
        strict: passed to :func:`build_from_info` (``False`` checks an approximate conversion).

    Returns:
        A :class:`ParityReport`; ``report.ok`` is True only with zero encode and zero decode mismatches.
    """
    from persimmon_tools.tokenizer.build import build_from_info
    from persimmon_tools.tokenizer.proto import read_spm

    info = read_spm(Path(sp_model))
    return parity_report(load_sp(Path(sp_model)), info, build_from_info(info, strict=strict), texts)


def require_parity(report: ParityReport, *, allow_ties: bool = False, before_writing: bool = False) -> None:
    """The parity gate: pass when ``report.ok``, or when ``allow_ties`` and every mismatch is a float32 tie
    (:attr:`ParityReport.only_ties`); raise :class:`TokenizerError` otherwise.

    ``before_writing``: the gate of a write on the built-in sample (the outcome is logged; a refusal says
    that nothing was written and shows the first difference). Otherwise the verdict of ``tokenizer --check``,
    whose report (examples included) has been shown already.
    """
    if report.ok or (allow_ties and report.only_ties):
        if before_writing and report.ok:
            log.info("tokenizer parity: %d texts, 0 mismatches", report.items)
        elif before_writing:
            log.warning(
                "tokenizer parity: %d of %d texts differ from SentencePiece, all by float32 ties (allowed)",
                report.encode_mismatches,
                report.items,
            )
        return
    if before_writing:
        first = report.examples[0] if report.examples else "(no example recorded)"
        hint = "nothing was written; " + (
            f"all of them are float32 ties: {TIE_EXPLANATION} (docs/tokenizer.md); --allow-ties writes it with "
            "every other check kept"
            if report.only_ties
            else "--allow-tokenizer-mismatch writes it anyway (check your own corpus with `persimmon-tools "
            "tokenizer --check MODEL CORPUS`)"
        )
        raise TokenizerError(
            f"the fast tokenizer disagrees with SentencePiece on the built-in sample: {report.encode_mismatches} "
            f"encode and {report.decode_mismatches} decode mismatches in {report.items} texts; first: {first}",
            hint=hint,
        )
    ties = report.tie_mismatches
    raise TokenizerError(
        f"{report.encode_mismatches + report.decode_mismatches} mismatches between the fast tokenizer and "
        "SentencePiece" + (f" ({ties} of them float32 ties)" if ties else ""),
        hint="see the differences above; docs/tokenizer.md lists what cannot be expressed exactly"
        + (f" (a float32 tie: {TIE_EXPLANATION})" if ties else ""),
    )


@dataclass(frozen=True)
class ParityOptions:
    """Options of :func:`check_tokenizer` (the ``tokenizer --check`` command's flags).

    Attributes:
        strict: build the fast tokenizer exactly or refuse (``build_from_info``); ``False`` checks the
            approximation ``--allow-tokenizer-mismatch`` would write.
        allow_ties: pass when every mismatch is a float32 tie (:attr:`ParityReport.only_ties`).
    """

    strict: bool = True
    allow_ties: bool = False


def check_tokenizer(
    sp_model: Path,
    corpus: Sequence[Path] = (),
    options: ParityOptions = ParityOptions(),
    *,
    on_report: Callable[[ParityReport], None] = lambda report: None,
) -> ParityReport:
    """``tokenizer --check``: :func:`check_parity` on the corpus files (:func:`read_corpus`; none: the
    built-in sample), then ``on_report`` (the report is shown before the verdict), then the gate
    (:func:`require_parity`).

    Returns:
        The report, when it passes.

    Raises:
        TokenizerError: a mismatch (not all float32 ties with ``allow_ties``), a model that cannot be
            converted, a corpus file that is not UTF-8.
        UsageError: a corpus path that is not a file.
    """
    report = check_parity(sp_model, read_corpus(corpus) if corpus else None, strict=options.strict)
    on_report(report)
    require_parity(report, allow_ties=options.allow_ties)
    return report


def read_corpus(paths: Iterable[Path]) -> list[str]:
    """The texts of corpus files for :func:`check_parity`: UTF-8, one text per line (a file's final newline
    ends its last line). Raises :class:`UsageError` for a path that is no file, :class:`TokenizerError` for
    a file that is not UTF-8."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise UsageError(
                f"corpus file {path} {what}; expected a text file",
                hint="pass UTF-8 text files, one item per line",
            )
    texts: list[str] = []
    for path in paths:
        try:
            texts.extend(path.read_text(encoding="utf-8").split("\n"))
        except UnicodeDecodeError as err:
            raise TokenizerError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start})",
                hint="pass UTF-8 files, one text per line",
            ) from err
        if texts and texts[-1] == "":
            texts.pop()  # the file's final newline ends the last line, it is not an empty item
    return texts
