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


def piece_text(sp, pid: int, origin: str) -> str:
    """``sp.id_to_piece(pid)``; a piece that is not valid UTF-8 (which SentencePiece loads, but cannot
    return as text) is a TokenizerError naming the model and the piece id."""
    try:
        return sp.id_to_piece(pid)
    except UnicodeDecodeError as err:
        raise TokenizerError(
            f"{origin}: piece {pid} is not valid UTF-8 (byte {err.object[err.start : err.start + 1]!r} at "
            f"offset {err.start})",
            hint="the model file is corrupt or was edited; re-extract adept_vocab.model from the release",
        ) from None


def eod_piece(sp, origin: str) -> tuple[str, int] | None:
    """ADEPT's end-of-document piece ``(piece, id)``, used as BOS and EOS: ``|ENDOFTEXT|`` when the vocabulary
    has it, else the model's own EOS (ADEPT's ``_SentencePieceTokenizer`` falls back to ``eos_id()``, spec §G);
    None when the model has neither."""
    pid = sp.piece_to_id(ENDOFTEXT)
    if piece_text(sp, pid, origin) == ENDOFTEXT:
        return ENDOFTEXT, pid
    if sp.eos_id() >= 0:
        eos = piece_text(sp, sp.eos_id(), origin)
        log.warning(
            "%s has no piece %r; using its EOS piece %r (id %d) as BOS/EOS, as ADEPT's code does",
            origin,
            ENDOFTEXT,
            eos,
            sp.eos_id(),
        )
        return eos, sp.eos_id()
    log.warning("%s has neither %r nor an EOS piece; bos/eos ids are left unset", origin, ENDOFTEXT)
    return None


def vocab_text(data: bytes, origin: str = "vocabulary model") -> bytes:
    """The release's plain-text ``adept_vocab.vocab`` for a SentencePiece model: ``piece<TAB>score`` per line,
    in id order (what ``spm_train`` writes beside the model; ADEPT ships it "so you can browse the vocabulary").
    A piece that is not valid UTF-8 is a TokenizerError naming ``origin`` and the piece id."""
    sp = load_sp_bytes(data, origin)
    lines = (f"{piece_text(sp, i, origin)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
    return ("\n".join(lines) + "\n").encode()
