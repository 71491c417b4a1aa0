"""Small SentencePiece helpers shared by config (special ids) and tokenizer conversion.

The model file's bytes (and, for a precise error, its scores) are read by :mod:`persimmon_tools.tokenizer.proto`;
this module loads them into a ``SentencePieceProcessor``. The import goes one way: proto never imports spm.
"""

from __future__ import annotations

import logging
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.proto import diagnose_scores, read_model_bytes

log = logging.getLogger(__name__)

ENDOFTEXT = "|ENDOFTEXT|"


def load_sp_bytes(data: bytes, origin: str):
    """Load a SentencePiece model from bytes; ``origin`` names the file in errors."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ messages
        diagnose_scores(data, origin)  # "score is NaN or Inf": name the piece instead
        raise TokenizerError(
            f"{origin} is not a valid SentencePiece model ({err})",
            hint="the release's adept_vocab.model may be truncated; re-download or pass --vocab",
        ) from err
    return sp


def load_sp(path: Path, *, follow_symlinks: bool = True):
    """Load a SentencePiece model file (see :func:`load_sp_bytes` and :func:`read_model_bytes`)."""
    return load_sp_bytes(read_model_bytes(Path(path), follow_symlinks=follow_symlinks), str(path))


def eod_piece(sp, origin: str) -> tuple[str, int] | None:
    """ADEPT's end-of-document piece ``(piece, id)``, used as BOS and EOS: ``|ENDOFTEXT|`` when the vocabulary
    has it, else the model's own EOS (ADEPT's ``_SentencePieceTokenizer`` falls back to ``eos_id()``, spec §G);
    None when the model has neither."""
    pid = sp.piece_to_id(ENDOFTEXT)
    if sp.id_to_piece(pid) == ENDOFTEXT:
        return ENDOFTEXT, pid
    if sp.eos_id() >= 0:
        log.warning(
            "%s has no piece %r; using its EOS piece %r (id %d) as BOS/EOS, as ADEPT's code does",
            origin,
            ENDOFTEXT,
            sp.id_to_piece(sp.eos_id()),
            sp.eos_id(),
        )
        return sp.id_to_piece(sp.eos_id()), sp.eos_id()
    log.warning("%s has neither %r nor an EOS piece; bos/eos ids are left unset", origin, ENDOFTEXT)
    return None


def vocab_text(data: bytes) -> bytes:
    """The release's plain-text ``adept_vocab.vocab`` for a SentencePiece model: ``piece<TAB>score`` per line,
    in id order (what ``spm_train`` writes beside the model; ADEPT ships it "so you can browse the vocabulary")."""
    sp = load_sp_bytes(data, "vocabulary model")
    lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
    return ("\n".join(lines) + "\n").encode()
