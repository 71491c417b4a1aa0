"""SentencePiece ``adept_vocab.model`` → Hugging Face fast tokenizer files, gated by a parity check.

The pipeline itself is built in :mod:`persimmon_tools.tokenizer.build` from the model's own proto; the
parity check lives in :mod:`persimmon_tools.tokenizer.check`; the built-in sample in
:mod:`persimmon_tools.tokenizer.corpus`; the re-load of the written files in
:mod:`persimmon_tools.tokenizer.reload`. This module writes the files ``AutoTokenizer`` loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.safe_write import fsync_dir, recorded_outputs, refuse_symlink
from persimmon_tools.tokenizer.build import build_fast_tokenizer, build_from_info
from persimmon_tools.tokenizer.check import TIE_EXPLANATION, ParityReport, check_parity, parity_report
from persimmon_tools.tokenizer.corpus import builtin_sample
from persimmon_tools.tokenizer.proto import read_spm
from persimmon_tools.tokenizer.reload import check_reload
from persimmon_tools.tokenizer.spm import eod_piece, load_sp

__all__ = [
    "CHAT_TEMPLATE",
    "ParityReport",
    "build_fast_tokenizer",
    "builtin_sample",
    "chat_template",
    "check_parity",
    "special_tokens",
    "write_tokenizer",
]

log = logging.getLogger(__name__)

# ADEPT's README: `human: {prompt}\n\nadept:` and, multi-turn,
# `human: {prompt}\n\nadept: {output}\n\nhuman: {follow_up}\n\nadept:`. No system turn exists.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'human: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'adept: ' + message['content'] }}"
    "{%- else -%}{{ raise_exception('ADEPT chat has only user and assistant turns, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages -%}{{ '\\n\\n' }}{%- endif -%}{{ 'adept:' }}{%- endif -%}"
)


def chat_template(bos: bool) -> str:
    """The ``chat_template`` written into ``tokenizer_config.json``: :data:`CHAT_TEMPLATE`, led by
    ``{{ bos_token }}`` when the tokenizer prepends BOS.

    ``apply_chat_template(tokenize=True)`` (and ``pipeline("text-generation")(messages)``) encodes the
    rendered text with ``add_special_tokens=False``, so BOS must come from the template for chat ids to equal
    ``tok(prompt)``'s; with ``split_special_tokens`` false the rendered ``|ENDOFTEXT|`` is the BOS id. The
    choice is made when the files are written (``add_bos_token``), not passed to the template.
    """
    return ("{{ bos_token }}" + CHAT_TEMPLATE) if bos else CHAT_TEMPLATE


#: ``model_max_length`` when no checkpoint says otherwise (``tokenizer`` command): the 8B's max_position_embeddings.
MODEL_MAX_LENGTH = 16384


def special_tokens(sp_model: Path) -> dict[str, tuple[str, int] | None]:
    """``bos``/``eos``/``unk`` as ``(piece, id)``: ``|ENDOFTEXT|`` from the vocabulary, else the model's own.

    ADEPT's code finds the end-of-document id by scanning the vocabulary for ``|ENDOFTEXT|`` and falls back to
    ``eos_id()``, and uses it as BOS too; we do the same (:func:`persimmon_tools.tokenizer.spm.eod_piece`, with a logged
    warning) so that other SentencePiece models still convert, consistently with ``config.json``.
    """
    return _special_tokens(load_sp(Path(sp_model)), str(sp_model))


def _special_tokens(sp, origin: str) -> dict[str, tuple[str, int] | None]:
    unk = (sp.id_to_piece(sp.unk_id()), sp.unk_id())
    eod = eod_piece(sp, origin)  # the same piece config.json's bos/eos ids name
    return {"bos": eod, "eos": eod, "unk": unk}


def _post_processor(bos: tuple[str, int] | None, add_bos_token: bool):
    from tokenizers import processors

    if not (add_bos_token and bos):
        return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    name, pid = bos
    return processors.TemplateProcessing(
        single=[f"{name}:0", "$A:0"],
        pair=[f"{name}:0", "$A:0", f"{name}:1", "$B:1"],
        special_tokens=[(name, pid)],
    )


def _parity_error(report: ParityReport) -> TokenizerError:
    first = report.examples[0] if report.examples else "(no example recorded)"
    hint = "nothing was written; " + (
        f"all of them are float32 ties: {TIE_EXPLANATION} (docs/tokenizer.md); --allow-ties writes it with every other check kept"
        if report.only_ties
        else "--allow-tokenizer-mismatch writes it anyway (check your own corpus with `persimmon-tools tokenizer --check MODEL CORPUS`)"
    )
    return TokenizerError(
        f"the fast tokenizer disagrees with SentencePiece on the built-in sample: {report.encode_mismatches} "
        f"encode and {report.decode_mismatches} decode mismatches in {report.items} texts; first: {first}",
        hint=hint,
    )


def write_tokenizer(
    sp_model: Path,
    out_dir: Path,
    *,
    add_bos_token: bool = True,
    chat: bool = False,
    check: bool = True,
    allow_ties: bool = False,
    replace_existing: bool = False,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and ``tokenizer.model``.

    Args:
        sp_model: the release's ``adept_vocab.model`` (any SentencePiece model works).
        out_dir: a directory (not a symlink); files in it with the same names are replaced (a symlink of
            the same name is replaced by the file, its target is never written).
        add_bos_token: prepend ``|ENDOFTEXT|`` on encode (the published ``adept/persimmon-8b-*`` configs do;
            ADEPT's own inference code does not).
        chat: add a ``chat_template`` producing ADEPT's ``human: …\\n\\nadept:`` prompt format, led by
            ``bos_token`` when BOS is prepended (:func:`chat_template`).
        check: first compare with SentencePiece on :func:`builtin_sample` and raise
            :class:`TokenizerError` (writing nothing) on any mismatch. ``False`` also builds models whose
            options cannot be expressed exactly (with a logged warning).
        replace_existing: replace files of the same names whatever they are (``convert`` writes into its own
            private temporary folder). False (the default): only files the folder's ``conversion.json`` lists
            as written by the toolkit are replaced; anything else is refused before writing.
        allow_ties: with ``check``, write anyway (with a logged warning) when every mismatch is a float32 tie
            (:attr:`ParityReport.only_ties`), the one difference no ``tokenizer.json`` can avoid.
        model_max_length: the checkpoint's ``max_position_embeddings`` (``convert`` passes it).

    The files are written into a hidden staging folder inside ``out_dir``, re-loaded from there
    (:func:`~persimmon_tools.tokenizer.reload.check_reload`: ``tokenizers`` and, when installed,
    ``transformers.AutoTokenizer``) and only then moved into ``out_dir``; a refusal leaves ``out_dir`` as it was.

    Returns:
        The written paths.

    Raises:
        TokenizerError: a piece score that is NaN/Inf or too large (:func:`~persimmon_tools.tokenizer.proto.
            check_scores`), an inexpressible option, a parity mismatch, or written files that do not load.
    """
    sp_model, out_dir = Path(sp_model), Path(out_dir)
    # The model and its proto are read once (0.27 s and 0.17 s for 262,144 pieces), the tokenizer built once:
    # the check encodes with the very object that is written. The proto first: it names a bad score.
    info = read_spm(sp_model)
    sp = load_sp(sp_model)
    tok = build_from_info(info, strict=check)
    if check:
        report = parity_report(sp, info, tok)
        if report.only_ties and allow_ties:
            log.warning(
                "tokenizer parity: %d of %d texts differ from SentencePiece, all by float32 ties (allowed)",
                report.encode_mismatches,
                report.items,
            )
        elif not report.ok:
            raise _parity_error(report)
        else:
            log.info("tokenizer parity: %d texts, 0 mismatches", report.items)
    specials = _special_tokens(sp, str(sp_model))
    tok.post_processor = _post_processor(specials["bos"], add_bos_token)
    names = {k: (v[0] if v else None) for k, v in specials.items()}
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "unk_token": names["unk"],
        # ADEPT pads with EOD; left padding keeps every prompt's last token last for batched generate.
        "pad_token": names["eos"],
        "padding_side": "left",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        # The whole pipeline is in tokenizer.json; `legacy` only matters to Llama classes, which are not used.
        "legacy": False,
        # transformers' default: the chat template's rendered bos_token is the BOS id. Literal special-token
        # text ("|ENDOFTEXT|", "<unk>") is then that token in tok(text); split_special_tokens=True per call
        # encodes it as SentencePiece does (docs/tokenizer.md).
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if chat:
        config["chat_template"] = chat_template(bool(add_bos_token and specials["bos"]))
    special_map: dict[str, object] = {f"{k}_token": v for k, v in names.items() if v is not None}
    if names["eos"] is not None:
        special_map["pad_token"] = names["eos"]
    # transformers 5 drops tokenizer_config's add_bos_token when tokenizer.json exists (the post-processor
    # alone decides) and leaves `tok.add_bos_token` False; special_tokens_map.json is merged in after that
    # (tokenization_utils_base._from_pretrained, "Legacy"), so the flag is stated here too (docs/tokenizer.md).
    special_map["add_bos_token"] = add_bos_token
    # Never through a link: OUT_DIR itself must be a real folder; the files are made in a private staging
    # folder and renamed into place, which replaces a link of the same name instead of writing to its target.
    refuse_symlink(out_dir, "OUT_DIR", TokenizerError)
    if not replace_existing:
        _refuse_foreign_files(out_dir, TOKENIZER_FILES)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir))
    try:
        staged = [
            stage / "tokenizer.json",
            stage / "tokenizer_config.json",
            stage / "special_tokens_map.json",
            stage / "tokenizer.model",
        ]
        staged[0].write_text(tok.to_str(), encoding="utf-8")  # tok.save() hides ENOSPC in a bare Exception
        staged[1].write_text(_dumps(config), encoding="utf-8")
        staged[2].write_text(_dumps(special_map), encoding="utf-8")
        shutil.copyfile(sp_model, staged[3])
        check_reload(stage, tok, builtin_sample(), origin=str(sp_model))
        written = [out_dir / p.name for p in staged]
        for src, dst in zip(staged, written, strict=True):
            os.replace(src, dst)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.debug("wrote %s", ", ".join(p.name for p in written))
    return written


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
#: The record ``convert`` writes into a converted folder; its ``output_files`` names what the toolkit wrote.
_CONVERSION_RECORD = "conversion.json"


def _refuse_foreign_files(out_dir: Path, names: tuple[str, ...]) -> None:
    """Replace only tokenizer files this toolkit wrote: files of these names already in ``out_dir`` must be
    regular files that the folder's ``conversion.json`` lists in ``output_files`` (like ``git``, which
    refuses to clobber files it does not track). Anything else is listed and refused before writing."""
    present = [n for n in names if os.path.lexists(out_dir / n)]
    if not present:
        return
    recorded = recorded_outputs(out_dir, _CONVERSION_RECORD) or set()
    foreign = [
        n for n in present if n not in recorded or (out_dir / n).is_symlink() or not (out_dir / n).is_file()
    ]
    if foreign:
        raise TokenizerError(
            f"{out_dir} already holds {', '.join(foreign)}, which no conversion recorded as its own "
            f"({_CONVERSION_RECORD} output_files); refusing to replace {'it' if len(foreign) == 1 else 'them'}",
            hint="choose another OUT_DIR, or move those files away first",
        )


def _dumps(obj: object) -> str:
    """JSON text; ``allow_nan=False``: a NaN/Inf is refused here rather than written as an invalid token."""
    try:
        return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as err:
        raise TokenizerError(
            f"a tokenizer setting is not representable in JSON ({err})",
            hint="this is a bug in persimmon-tools; please report it with the model file",
        ) from err
