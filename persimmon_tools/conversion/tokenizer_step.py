"""``convert``'s tokenizer step: the tokenizer files written into the run's folder from the release's
SentencePiece model, and what ``conversion.json`` records of them.

The files come from :func:`persimmon_tools.tokenizer.write.write_tokenizer_files` (parity gate on the
built-in sample, re-load check, probe check). ``conversion.json`` records how parity was enforced and whether
the chat template was written (``tokenizer``) and, since 2026-12-07, the fingerprint of the SentencePiece
model the files were written from (``tokenizer_fingerprint``: :mod:`persimmon_tools.tokenizer.fingerprint`),
which ``verify`` re-checks against the folder's ``tokenizer.json`` and the model card shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from persimmon_tools.tokenizer.fingerprint import CONVERSION_KEY
from persimmon_tools.tokenizer.write import TokenizerOptions, write_tokenizer_files

if TYPE_CHECKING:  # convert.py imports this module
    from persimmon_tools.conversion.convert import ConversionPlan, ConvertOptions


def tokenizer_parity(options: ConvertOptions) -> str:
    """How the tokenizer's parity with SentencePiece was enforced (recorded; the model card shows it)."""
    if not options.tokenizer:
        return "not written (--no-tokenizer)"
    if options.force_tokenizer:
        return "not enforced (--allow-tokenizer-mismatch)"
    return (
        "float32 ties allowed (--allow-ties)"
        if options.allow_tokenizer_ties
        else "exact on the built-in sample"
    )


def chat_choice(plan: ConversionPlan, options: ConvertOptions) -> bool | None:
    """Whether the tokenizer gets the chat template: ``--chat``/``--no-chat``, else the release's own name
    (None: no tokenizer is written)."""
    if plan.vocab_bytes is None or not options.tokenizer:
        return None
    return options.chat if options.chat is not None else plan.release.variant == "chat"


def write_tokenizer_into(plan: ConversionPlan, folder: Path, options: ConvertOptions) -> dict[str, Any]:
    """Write the tokenizer files into the run's own temporary ``folder``; returns the fingerprint record of
    the SentencePiece model they were written from, checked against the written ``tokenizer.json``.

    Raises:
        TokenizerError: parity, the probe check or the re-load failed (unless ``--allow-tokenizer-mismatch``
            or, for float32 ties, ``--allow-ties``), or the model cannot be expressed.
    """
    sp_path = folder / "tokenizer.model"
    sp_path.write_bytes(plan.vocab_bytes or b"")
    tokenizer_options = TokenizerOptions(
        add_bos_token=options.add_bos_token,
        chat=bool(chat_choice(plan, options)),
        check=not options.force_tokenizer,
        allow_ties=options.allow_tokenizer_ties,
        replace_existing=True,  # the run's own temporary folder: tokenizer.model was just written there
        model_max_length=plan.dims.max_position_embeddings,
    )
    return write_tokenizer_files(sp_path, folder, tokenizer_options).fingerprint


def fingerprint_entry(fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """``conversion.json``'s ``tokenizer_fingerprint`` entry: the record, or nothing without a tokenizer."""
    return {} if fingerprint is None else {CONVERSION_KEY: fingerprint}
