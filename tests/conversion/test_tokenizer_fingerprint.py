"""convert records the SentencePiece model's tokenizer fingerprint in conversion.json, and refuses a
tokenizer.json that encodes the fingerprint's probe text differently (unless --allow-tokenizer-mismatch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import persimmon_tools.tokenizer.write as write
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.fingerprint import (
    PROBE_TEXT,
    compare,
    sentencepiece_fingerprint,
    tokenizer_json_ids,
)
from persimmon_tools.tokenizer.write import TokenizerOptions, write_tokenizer_files

spm = pytest.importorskip("sentencepiece")

REPO = Path(__file__).resolve().parents[2]
TINY_VOCAB = REPO / "persimmon_tools" / "data" / "tiny_vocab.model"  # the synthetic releases' vocabulary
REAL_MODEL = REPO.parent / "shared" / "data" / "cc100_ja40K_en10K.symbolRemoved.vocab.reestimated.model"
# Pieces of the tiny vocabulary that the probe text uses and the built-in parity sample does not: swapping
# them passes the parity gate and changes only the probe's ids.
SWAPPED = ("q", "`")


def _sentencepiece_ids(model: Path) -> list[int]:
    return list(spm.SentencePieceProcessor(model_file=str(model)).encode(PROBE_TEXT))


def test_conversion_json_records_the_sentencepiece_fingerprint(converted_tiny) -> None:
    record = json.loads((converted_tiny / "conversion.json").read_text())["tokenizer_fingerprint"]
    ids = _sentencepiece_ids(converted_tiny / "tokenizer.model")  # the model the files were written from
    assert (converted_tiny / "tokenizer.model").read_bytes() == TINY_VOCAB.read_bytes()
    assert record["probe"] == PROBE_TEXT and record["scheme"] == "ids-v1"
    assert record["ids"] == ids and len(ids) > 100
    # anyone can recompute the hash from the ids: decimal numbers joined by "," (ASCII)
    assert record["sha256"] == hashlib.sha256(",".join(map(str, ids)).encode("ascii")).hexdigest()
    assert tokenizer_json_ids(converted_tiny) == ids  # the written tokenizer.json agrees


def test_special_names_in_the_probe_stay_text_when_tokenizer_json_lists_added_tokens(
    converted_tiny, tmp_path
) -> None:
    """transformers' save_pretrained adds the special tokens to tokenizer.json; the probe's literal
    ``|ENDOFTEXT|`` and ``<unk>`` must still encode as SentencePiece encodes them."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(converted_tiny / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("|ENDOFTEXT|", special=True), AddedToken("<unk>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_json_ids(tmp_path) == _sentencepiece_ids(TINY_VOCAB)


@pytest.fixture
def swapped_pieces(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Make the tokenizer builder swap two pieces' ids (each keeps its score, so only those ids change)."""
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TINY_VOCAB))
    a, b = (sp.piece_to_id(p) for p in SWAPPED)
    assert a in _sentencepiece_ids(TINY_VOCAB)
    real = write.build_from_info

    def swapping(info, *args, **kwargs):
        data = json.loads(real(info, *args, **kwargs).to_str())
        vocab = data["model"]["vocab"]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        return Tokenizer.from_str(json.dumps(data))

    monkeypatch.setattr(write, "build_from_info", swapping)
    return a, b


def test_convert_refuses_a_tokenizer_that_encodes_the_probe_differently(
    releases, tmp_path, swapped_pieces
) -> None:
    a, b = swapped_pieces
    out = tmp_path / "out"
    for options in (ConvertOptions(), ConvertOptions(allow_tokenizer_ties=True)):  # a swap is no tie
        with pytest.raises(TokenizerError, match="probe text") as err:
            convert(releases["tar"], out, options)
        assert f"[{b}" in err.value.message and "--allow-tokenizer-mismatch" in err.value.hint
        assert not out.exists()  # nothing was written
    convert(releases["tar"], out, ConvertOptions(force_tokenizer=True))  # the escape writes it anyway
    record = json.loads((out / "conversion.json").read_text())
    assert record["tokenizer"]["parity"] == "not enforced (--allow-tokenizer-mismatch)"
    # the record stays SentencePiece's, so verify reports the written tokenizer.json as different
    assert record["tokenizer_fingerprint"]["ids"] == _sentencepiece_ids(TINY_VOCAB)
    assert compare(record["tokenizer_fingerprint"], tokenizer_json_ids(out)) is not None


def test_the_tokenizer_command_applies_the_same_probe_check(tmp_path, swapped_pieces) -> None:
    with pytest.raises(TokenizerError, match="probe text"):
        write_tokenizer_files(TINY_VOCAB, tmp_path / "tok", TokenizerOptions(remove_created_out_dir=True))
    assert not (tmp_path / "tok").exists()


@pytest.mark.skipif(
    not REAL_MODEL.is_file(),
    reason=f"the real SentencePiece model is not at {REAL_MODEL} (../shared/data is absent on this machine)",
)
def test_the_probe_encodes_alike_with_the_real_model(tmp_path) -> None:
    written = write_tokenizer_files(REAL_MODEL, tmp_path / "tok", TokenizerOptions())
    ids = _sentencepiece_ids(REAL_MODEL)
    assert written.fingerprint == sentencepiece_fingerprint(
        spm.SentencePieceProcessor(model_file=str(REAL_MODEL))
    )
    assert written.fingerprint["ids"] == ids and tokenizer_json_ids(tmp_path / "tok") == ids
    # the probe reaches byte fallback on this model (characters no piece spells)
    sp = spm.SentencePieceProcessor(model_file=str(REAL_MODEL))
    assert any(sp.is_byte(i) for i in ids)
