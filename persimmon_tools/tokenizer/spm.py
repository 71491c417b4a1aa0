"""Small SentencePiece helpers shared by config (special ids) and tokenizer conversion."""

from __future__ import annotations

import logging
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.safe_read import MAX_VOCAB_BYTES, read_small

log = logging.getLogger(__name__)

ENDOFTEXT = "|ENDOFTEXT|"


def load_sp_bytes(data: bytes, origin: str):
    """Load a SentencePiece model from bytes; ``origin`` names the file in errors."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ messages
        _diagnose_scores(data, origin)  # "score is NaN or Inf": name the piece instead
        raise TokenizerError(
            f"{origin} is not a valid SentencePiece model ({err})",
            hint="the release's adept_vocab.model may be truncated; re-download or pass --vocab",
        ) from err
    return sp


def _diagnose_scores(data: bytes, origin: str) -> None:
    """Raise the precise :func:`~persimmon_tools.tokenizer.proto.check_scores` error when a score is why
    SentencePiece refused ``data``; return quietly otherwise (also when ``data`` is no proto at all)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from persimmon_tools.tokenizer.proto import check_scores

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: the caller reports the load failure itself
        return
    check_scores([str(p.piece) for p in proto.pieces], [float(p.score) for p in proto.pieces], origin)


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
