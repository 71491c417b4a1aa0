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
from dataclasses import dataclass
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.safe_write import refuse_file_in_path
from persimmon_tools.staged_output import created_folders, staged_files
from persimmon_tools.staged_record import OutputKind
from persimmon_tools.tokenizer.build import build_fast_tokenizer, build_from_info
from persimmon_tools.tokenizer.check import (
    ParityReport,
    check_parity,
    parity_report,
    require_parity,
    tie_judge,
)
from persimmon_tools.tokenizer.corpus import builtin_sample
from persimmon_tools.tokenizer.fingerprint import checked_fingerprint
from persimmon_tools.tokenizer.proto import read_spm
from persimmon_tools.tokenizer.reload import check_reload
from persimmon_tools.tokenizer.spm import eod_piece, load_sp, piece_text

__all__ = [
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_FILE",
    "ParityReport",
    "TokenizerOptions",
    "WrittenTokenizer",
    "build_fast_tokenizer",
    "builtin_sample",
    "chat_template",
    "check_parity",
    "special_tokens",
    "write_tokenizer",
    "write_tokenizer_files",
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
    """The ``chat_template`` written into ``tokenizer_config.json`` and, byte for byte, into
    ``chat_template.jinja`` (:data:`CHAT_TEMPLATE_FILE`): :data:`CHAT_TEMPLATE`, led by ``{{ bos_token }}``
    when the tokenizer prepends BOS.

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
    unk = (piece_text(sp, sp.unk_id(), origin), sp.unk_id())
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


@dataclass(frozen=True)
class TokenizerOptions:
    """Options of :func:`write_tokenizer` (the ``tokenizer`` command's flags when it writes).

    Attributes:
        add_bos_token: prepend ``|ENDOFTEXT|`` on encode (the published ``adept/persimmon-8b-*`` configs do;
            ADEPT's own inference code does not).
        chat: add a ``chat_template`` producing ADEPT's ``human: …\\n\\nadept:`` prompt format, led by
            ``bos_token`` when BOS is prepended (:func:`chat_template`).
        check: first compare with SentencePiece on :func:`builtin_sample` and raise
            :class:`TokenizerError` (writing nothing) on any mismatch. ``False`` also builds models whose
            options cannot be expressed exactly (with a logged warning).
        allow_ties: with ``check``, write anyway (with a logged warning) when every mismatch is a float32 tie
            (:attr:`ParityReport.only_ties`), the one difference no ``tokenizer.json`` can avoid.
        replace_existing: replace files of the same names whatever they are (``convert`` writes into its own
            private temporary folder). False (the default): only files the folder's ``conversion.json`` lists
            as written by the toolkit are replaced; anything else is refused before writing.
        model_max_length: ``model_max_length`` in ``tokenizer_config.json`` (``convert`` passes the
            checkpoint's ``max_position_embeddings``); ``None``: :data:`MODEL_MAX_LENGTH`, the 8B's.
        remove_created_out_dir: create ``out_dir`` (and the missing folders above it) first and remove
            them again, each if still empty, when the write is refused (the ``tokenizer`` command leaves
            nothing behind a refused model). False (the default): a missing ``out_dir`` is created when the
            files are staged (and removed again, with the folders made for it, if staging fails).
    """

    add_bos_token: bool = True
    chat: bool = False
    check: bool = True
    allow_ties: bool = False
    replace_existing: bool = False
    model_max_length: int | None = None
    remove_created_out_dir: bool = False


@dataclass(frozen=True)
class WrittenTokenizer:
    """What :func:`write_tokenizer_files` wrote: the paths, and the SentencePiece model's fingerprint
    (:mod:`persimmon_tools.tokenizer.fingerprint`), checked against the written ``tokenizer.json``."""

    files: list[Path]
    fingerprint: dict


def write_tokenizer(sp_model: Path, out_dir: Path, options: TokenizerOptions | None = None) -> list[Path]:
    """:func:`write_tokenizer_files`, returning the written paths."""
    return write_tokenizer_files(sp_model, out_dir, options).files


def write_tokenizer_files(
    sp_model: Path, out_dir: Path, options: TokenizerOptions | None = None
) -> WrittenTokenizer:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and ``tokenizer.model``
    (with ``chat``: also ``chat_template.jinja``).

    Args:
        sp_model: the release's ``adept_vocab.model`` (any SentencePiece model works).
        out_dir: a directory (not a symlink; an existing file is a :class:`TokenizerError`); files in it with
            the same names are replaced (a symlink of the same name is replaced by the file, its target is
            never written).
        options: :class:`TokenizerOptions` (default: all defaults).

    The files are written into a hidden staging folder inside ``out_dir``, re-loaded from there
    (:func:`~persimmon_tools.tokenizer.reload.check_reload`: ``tokenizers`` and, when installed,
    ``transformers.AutoTokenizer``), their ``tokenizer.json`` checked to give the fingerprint's probe text
    SentencePiece's ids (:func:`~persimmon_tools.tokenizer.fingerprint.checked_fingerprint`, the same gate as
    parity), and only then moved into ``out_dir``; a refusal leaves ``out_dir`` as it was.

    Returns:
        A :class:`WrittenTokenizer`: the written paths and the fingerprint (``convert`` records it in
        ``conversion.json``; the ``tokenizer`` command, which writes no record of its own, logs it).

    Raises:
        TokenizerError: a piece score that is NaN/Inf or too large (:func:`~persimmon_tools.tokenizer.proto.
            check_scores`), an inexpressible option, a parity mismatch, or written files that do not load.
    """
    options = options or TokenizerOptions()
    sp_model, out_dir = Path(sp_model), Path(out_dir)
    refuse_file_in_path(out_dir, "OUT_DIR", TokenizerError)  # notes.txt/out: name the file in the way
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"{out_dir} exists and is not a directory", hint="choose another OUT_DIR")
    if not options.remove_created_out_dir:
        return _write(sp_model, out_dir, options)
    with created_folders(out_dir, TOKENIZER_OUTPUT):  # removed again (if empty) when the model is refused
        return _write(sp_model, out_dir, options)


def _write(sp_model: Path, out_dir: Path, options: TokenizerOptions) -> WrittenTokenizer:
    """:func:`write_tokenizer_files` once ``out_dir`` is known to be no file."""
    add_bos_token, max_length = options.add_bos_token, options.model_max_length
    # The model and its proto are read once (0.27 s and 0.17 s for 262,144 pieces), the tokenizer built once:
    # the check encodes with the very object that is written. The proto first: it names a bad score.
    info = read_spm(sp_model)
    sp = load_sp(sp_model)
    tok = build_from_info(info, strict=options.check)
    if options.check:  # the one parity gate (tokenizer --check passes or fails by it too)
        require_parity(parity_report(sp, info, tok), allow_ties=options.allow_ties, before_writing=True)
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
        "model_max_length": MODEL_MAX_LENGTH if max_length is None else max_length,
    }
    template = chat_template(bool(add_bos_token and specials["bos"])) if options.chat else None
    if template is not None:  # in both places, byte for byte: readers of either one see the same template
        config["chat_template"] = template
    special_map: dict[str, object] = {f"{k}_token": v for k, v in names.items() if v is not None}
    if names["eos"] is not None:
        special_map["pad_token"] = names["eos"]
    # transformers 5 drops tokenizer_config's add_bos_token when tokenizer.json exists and leaves
    # `tok.add_bos_token` False while the post-processor adds BOS; anything that rebuilds the post-processor
    # from that flag (`tok.add_eos_token = True`) then silently drops BOS. special_tokens_map.json is merged
    # in after the drop (tokenization_utils_base._from_pretrained, "Legacy"), so the flag is stated here too;
    # encoding is the same without it, that state is not (docs/tokenizer.md).
    special_map["add_bos_token"] = add_bos_token
    # Never through a link: OUT_DIR itself must be a real folder; the files are made in a private staging
    # folder and renamed into place, which replaces a link of the same name instead of writing to its target.
    # Only files OUT_DIR's conversion.json lists are replaced (the shared staged output's rule).
    private = options.replace_existing
    files = TOKENIZER_FILES if template is not None else TOKENIZER_FILES[:-1]
    if not private:
        _refuse_stale_template(out_dir, template)
    with staged_files(out_dir, TOKENIZER_OUTPUT, files, private=private) as stage:
        (stage / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")  # tok.save() hides ENOSPC
        (stage / "tokenizer_config.json").write_text(_dumps(config), encoding="utf-8")
        (stage / "special_tokens_map.json").write_text(_dumps(special_map), encoding="utf-8")
        shutil.copyfile(sp_model, stage / "tokenizer.model")
        if template is not None:  # newline="" : the bytes of the template, as in tokenizer_config.json
            with open(stage / CHAT_TEMPLATE_FILE, "w", encoding="utf-8", newline="") as fh:
                fh.write(template)
        check_reload(stage, tok, builtin_sample(), origin=str(sp_model))
        fingerprint = checked_fingerprint(
            sp,
            stage,
            str(sp_model),
            enforce=options.check,
            allow_ties=options.allow_ties,
            is_tie=tie_judge(sp, info),
        )
    written = [out_dir / name for name in files]
    log.debug("wrote %s", ", ".join(p.name for p in written))
    return WrittenTokenizer(written, fingerprint)


#: The chat template as its own file, beside ``tokenizer_config.json``'s ``chat_template`` (the same text):
#: current transformers (5.x) saves only this file and prefers it when loading; older transformers and
#: other readers take only the key (docs/tokenizer.md).
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: Every file the tokenizer writes; the last, :data:`CHAT_TEMPLATE_FILE`, only with ``chat``.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    CHAT_TEMPLATE_FILE,
)
#: Files of these names already in OUT_DIR are replaced only when its ``conversion.json`` (the record
#: ``convert`` writes) lists them in ``output_files``; anything else is refused before writing.
TOKENIZER_OUTPUT = OutputKind(
    label="OUT_DIR", error=TokenizerError, run="tokenizer run", record="conversion.json"
)


def _refuse_stale_template(out_dir: Path, template: str | None) -> None:
    """Without ``chat``, a ``chat_template.jinja`` left in OUT_DIR would still be loaded as the template."""
    if template is None and out_dir.is_dir() and os.path.lexists(out_dir / CHAT_TEMPLATE_FILE):
        raise TokenizerError(
            f"{out_dir} holds {CHAT_TEMPLATE_FILE}, which transformers would still load as the chat template "
            "of a tokenizer written without --chat",
            hint=f"pass --chat to replace it, or remove {out_dir / CHAT_TEMPLATE_FILE} first",
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
