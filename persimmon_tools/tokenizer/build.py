"""Build a ``tokenizers.Tokenizer`` that encodes and decodes like a SentencePiece model.

Pipeline (no pre-tokenizer for Unigram: SentencePiece runs one lattice over the whole normalized string):

normalizer
  1. ``Prepend("▁")`` for ``add_dummy_prefix`` (before the charsmap, so that text which normalizes to nothing
     still gets the dummy prefix, as in SentencePiece; when the charsmap rewrites ``▁`` the charsmap steps
     carry it past themselves);
  2. the charsmap, exactly as SentencePiece applies it (longest match), when the model has one
     (``nmt_nfkc``, ``nfkc``, custom rules): :mod:`persimmon_tools.tokenizer.charsmap`;
  3. ``remove_extra_whitespaces``: drop spaces after the dummy prefix / at the start, collapse runs of ``' '``;
  4. ``escape_whitespaces``: ``' '`` → ``▁``;
  5. ``remove_extra_whitespaces``: drop trailing ``▁`` (SentencePiece strips them after escaping, literal ``▁``
     and the dummy prefix included);
  6. ``treat_whitespace_as_suffix``: append ``▁`` instead of step 1.
model
  ``Unigram`` with SentencePiece's effective scores and its reserved pieces kept out of the lattice
  (:mod:`persimmon_tools.tokenizer.unigram`, which may add a last normalizer step) or ``BPE`` with merges
  derived from the piece scores; ``byte_fallback`` and ``unk_id`` from the proto.
decoder
  CONTROL → ``""``, UNKNOWN → ``unk_surface`` (``" ⁇ "``), ``▁`` → ``' '`` except a piece's leading ``▁``
  (kept as a marker), byte pieces → UTF-8, fuse, strip the leading marker(s) the way
  ``SentencePieceProcessor::Decode`` does, remaining markers → ``' '``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.bpe import build_bpe
from persimmon_tools.tokenizer.charsmap import SUFFIX_MARK, exact_charsmap_steps
from persimmon_tools.tokenizer.proto import (
    BPE,
    CONTROL,
    SPACE,
    UNIGRAM,
    USER_DEFINED,
    SpmInfo,
    charsmap_has_prefix,
    inexpressible,
    read_spm,
)
from persimmon_tools.tokenizer.trie import alternation, escape, literal
from persimmon_tools.tokenizer.unigram import ReservedPlan, remap_step, reserved_plan, unigram_vocab

log = logging.getLogger(__name__)

_BYTE_TOKEN = "<0x[0-9A-Fa-f]{2}>"


def _rx(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def build_normalizer(info: SpmInfo, *, strict: bool = True):
    """The normalizer sequence described in the module docstring."""
    from tokenizers import normalizers as n

    space = SPACE if info.escape_whitespaces else " "
    dummy = info.add_dummy_prefix and not info.treat_whitespace_as_suffix
    # nmt_nfkc maps "▁" itself to " ": then the exact charsmap steps carry the dummy prefix past the
    # charsmap themselves; only the approximate fallback prepends it afterwards (then a non-empty text
    # that normalizes to nothing gets no "▁" when remove_extra_whitespaces is off).
    mapped = charsmap_has_prefix(info.charsmap, space.encode())
    early = dummy and not mapped
    steps = []
    if early:
        steps.append(n.Prepend(space))
    suffix = info.add_dummy_prefix and info.treat_whitespace_as_suffix
    marked = False  # whether the charsmap steps put SUFFIX_MARK where the suffix goes
    if info.charsmap:
        charsmap, carried = _charsmap_steps(
            info,
            strict=strict,
            dummy=space if dummy and mapped else "",
            suffix=("strip" if info.remove_extra_whitespaces else "keep") if suffix else "",
        )
        steps.extend(charsmap)
        early, marked = early or (carried and dummy), carried and suffix
    if info.remove_extra_whitespaces:
        lead = rf"(?<=\A{literal(space)}) +" if early else r"\A +"
        steps.append(n.Replace(_rx(lead), ""))
        steps.append(n.Replace(_rx(" {2,}"), " "))
    if info.escape_whitespaces:
        steps.append(n.Replace(" ", SPACE))
    if dummy and not early:
        steps.append(n.Prepend(space))
    if info.remove_extra_whitespaces:
        end = f"(?={escape(ord(SUFFIX_MARK))})" if marked else r"\z"
        steps.append(n.Replace(_rx(literal(space) + "+" + end), ""))
    if marked:
        steps.append(n.Replace(SUFFIX_MARK, space))
    elif suffix:
        steps.append(n.Replace(_rx(r"\z"), space))
    return n.Sequence(steps)


def _charsmap_steps(info: SpmInfo, *, strict: bool, dummy: str, suffix: str) -> tuple[list, bool]:
    """SentencePiece's longest-match charsmap (:mod:`persimmon_tools.tokenizer.charsmap`), or with
    ``strict=False`` tokenizers' approximate grapheme-wise ``Precompiled`` when that cannot be exact.

    Returns the steps and whether they are the exact ones, which carry ``dummy`` past the charsmap and mark
    where the whitespace ``suffix`` goes (see :func:`~persimmon_tools.tokenizer.charsmap.exact_charsmap_steps`)."""
    from tokenizers import normalizers as n

    try:
        n.Precompiled(info.charsmap)
    except Exception as err:  # tokenizers raises a bare Exception("Cannot parse precompiled_charsmap")
        raise TokenizerError(
            f"the model's normalizer charsmap cannot be loaded by tokenizers ({err})",
            hint="the model file is corrupt (SentencePiece tolerates a charsmap with non-UTF-8 strings, "
            "tokenizers does not); re-extract adept_vocab.model from the release",
        ) from err
    users = tuple(info.pieces[i] for i in info.ids_of(USER_DEFINED))
    try:
        return list(exact_charsmap_steps(info.charsmap, users, dummy, suffix)), True
    except TokenizerError as err:
        if strict:
            raise TokenizerError(f"{info.path}: {err.message}", hint=err.hint) from err
        log.warning(
            "%s: %s; writing the approximate grapheme-wise Precompiled normalizer", info.path, err.message
        )
        return [n.Precompiled(info.charsmap)], False


def build_decoder(info: SpmInfo):
    """Decoder chain reproducing ``SentencePieceProcessor::Decode`` for ids that encoding produces."""
    from tokenizers import decoders as d

    marker = SPACE
    steps = []
    controls = [info.pieces[i] for i in info.ids_of(CONTROL)]
    if controls:
        steps.append(d.Replace(_rx(rf"\A(?:{alternation(controls)})\z"), ""))
    steps.append(d.Replace(_rx(rf"\A{literal(info.pieces[info.unk_id])}\z"), info.unk_surface))
    # Every ▁ but a piece's leading one becomes a space now; the leading one stays as a marker until fused.
    steps.append(d.Replace(_rx(rf"(?!\A){marker}"), " "))
    if info.byte_fallback:
        steps.append(d.ByteFallback())
    steps.append(d.Fuse())
    if info.remove_extra_whitespaces:
        steps.append(d.Replace(_rx(rf"\A{marker}+"), ""))  # strips one ▁ per piece while the text is empty
    elif info.add_dummy_prefix:
        steps.append(d.Replace(_rx(rf"\A{marker}"), ""))
    steps.append(d.Replace(marker, " "))
    return d.Sequence(steps)


def build_model(info: SpmInfo, plan: ReservedPlan | None = None):
    """``Unigram`` or ``BPE`` model plus the pre-tokenizer it needs (``None`` for Unigram); ``plan`` is the
    Unigram model's :func:`reserved_plan` when the caller already has it."""
    from tokenizers import models

    if info.model_type == BPE:
        return build_bpe(info)
    vocab = unigram_vocab(info, hide_reserved=(plan or reserved_plan(info)).hide)
    return models.Unigram(vocab, unk_id=info.unk_id, byte_fallback=info.byte_fallback), None


def build_from_info(info: SpmInfo, *, strict: bool = True):
    """Build the tokenizer for ``info``; with ``strict`` an inexpressible option raises TokenizerError."""
    from tokenizers import Tokenizer

    problems = inexpressible(info)
    plan = reserved_plan(info) if info.model_type == UNIGRAM else None
    if plan and plan.problem:
        problems.append(plan.problem)
    if problems:
        message = f"{info.path} cannot be converted exactly: " + "; ".join(problems)
        if strict or info.model_type not in (UNIGRAM, BPE):
            raise TokenizerError(
                message,
                hint="use --allow-tokenizer-mismatch to write an approximate tokenizer and check it with `persimmon-tools tokenizer --check`",
            )
        log.warning("%s (writing an approximation because strict=False)", message)
    model, pre = build_model(info, plan)
    tok = Tokenizer(model)
    tok.normalizer = build_normalizer(info, strict=strict)
    if plan and plan.remapped:
        from tokenizers import normalizers

        tok.normalizer = normalizers.Sequence([tok.normalizer, remap_step(plan)])
    if pre is not None:
        tok.pre_tokenizer = pre
    tok.decoder = build_decoder(info)
    return tok


def build_fast_tokenizer(sp_model: Path, *, strict: bool = True):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the SentencePiece model ``sp_model``.

    Args:
        sp_model: a SentencePiece ``.model`` file (e.g. the release's ``adept_vocab.model``).
        strict: raise :class:`TokenizerError` when an option cannot be expressed exactly (default); with
            ``False`` such models are built anyway and a warning is logged.

    Returns:
        The tokenizer, without special-token post-processing (``encode`` gives SentencePiece's ids).

    Example:
        >>> tok = build_fast_tokenizer(Path("adept_vocab.model"))  # doctest: +SKIP
        >>> tok.encode("human: hi").ids  # == sentencepiece's encode_as_ids  # doctest: +SKIP
    """
    info = read_spm(Path(sp_model))
    tok = build_from_info(info, strict=strict)
    log.debug("built %s tokenizer from %s (%d pieces)", type(tok.model).__name__, sp_model, len(info.pieces))
    return tok
