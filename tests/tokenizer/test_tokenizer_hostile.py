"""Hostile SentencePiece models and OUT_DIRs for ``tokenizer`` (issue 22, part D): a model whose
unknown-piece surface or a piece is not UTF-8 is a TokenizerError naming the model and the piece id (no
traceback), and a refused model leaves none of the folders the run made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.spm import vocab_text

pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
spm = pytest.importorskip("sentencepiece")

MODEL = Path(__file__).resolve().parents[1] / "data" / "sentencepiece_test_model.model"
UNK_SURFACE_FIELD = 44  # TrainerSpec.unk_surface in sentencepiece_model.proto


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@pytest.fixture(scope="module")
def bad_unk_surface(tmp_path_factory) -> Path:
    """The test model with ``trainer_spec.unk_surface`` = b"\\xff\\xfe?" (written as raw protobuf bytes:
    protobuf's Python API refuses to set a str field that is not UTF-8)."""
    proto = pb.ModelProto()
    proto.ParseFromString(MODEL.read_bytes())
    trainer = proto.trainer_spec.SerializeToString() + _field(UNK_SURFACE_FIELD, b"\xff\xfe?")
    proto.ClearField("trainer_spec")
    path = tmp_path_factory.mktemp("hostile") / "bad_unk_surface.model"
    path.write_bytes(proto.SerializeToString() + _field(2, trainer))  # ModelProto.trainer_spec = 2
    return path


@pytest.fixture(scope="module")
def bad_piece(tmp_path_factory) -> tuple[Path, int]:
    """The test model with piece 100's first byte replaced by 0xff (not UTF-8)."""
    proto = pb.ModelProto()
    proto.ParseFromString(MODEL.read_bytes())
    text = proto.pieces[100].piece.encode()
    raw = proto.SerializeToString()
    needle = _field(1, text)  # SentencePiece.piece = 1, inside the pieces' submessages
    assert raw.count(needle) >= 1
    path = tmp_path_factory.mktemp("hostile") / "bad_piece.model"
    path.write_bytes(raw.replace(needle, _field(1, b"\xff" + text[1:]), 1))
    return path, 100


def test_the_models_really_are_not_utf8(bad_unk_surface, bad_piece):
    """Outside oracle: protobuf keeps the field as bytes, and SentencePiece loads both models."""
    proto = pb.ModelProto()
    proto.ParseFromString(bad_unk_surface.read_bytes())
    assert proto.trainer_spec.unk_surface == b"\xff\xfe?"
    for path in (bad_unk_surface, bad_piece[0]):
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(path.read_bytes())
        assert sp.get_piece_size() > 100


@pytest.mark.parametrize("as_json", [False, True])
def test_bad_unk_surface_is_a_tokenizer_error_and_leaves_nothing(bad_unk_surface, tmp_path, as_json):
    result = cli("tokenizer", bad_unk_surface, tmp_path / "a" / "b" / "out", *(["--json"] * as_json))
    assert result.exit_code == 1, result.output
    assert f"Error: {bad_unk_surface}: the surface of the unknown piece (id 0, '<unk>')" in result.stderr
    assert "is not valid UTF-8" in result.stderr and "Hint:" in result.stderr
    assert "Traceback" not in result.output
    if as_json:
        assert json.loads(result.stdout)["error"]["type"] == "TokenizerError"
    assert list(tmp_path.iterdir()) == []  # OUT_DIR and the parents it made are gone


def test_bad_unk_surface_with_check(bad_unk_surface):
    result = cli("tokenizer", "--check", bad_unk_surface, "--json")
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "TokenizerError" and "unknown piece (id 0" in error["message"]


def test_bad_piece_is_named_by_id(bad_piece, tmp_path):
    path, pid = bad_piece
    result = cli("tokenizer", path, tmp_path / "x" / "out")
    assert result.exit_code == 1 and f"piece {pid}" in result.stderr and "not valid UTF-8" in result.stderr
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []
    with pytest.raises(TokenizerError, match=rf"my\.model: piece {pid} is not valid UTF-8"):
        vocab_text(path.read_bytes(), "my.model")  # the release's adept_vocab.vocab (export)


def test_export_with_a_bad_vocab_fails_cleanly(bad_piece, releases, tmp_path):
    result = cli("export", releases["tar"], tmp_path / "e" / "out", "--vocab", bad_piece[0])
    assert result.exit_code == 1, result.output
    assert "not valid UTF-8" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_model_leaves_no_parents_but_keeps_existing_ones(tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model" * 10)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = cli("tokenizer", garbage, tmp_path / "mine" / "deep" / "er" / "out")
    assert result.exit_code == 1 and "Error:" in result.stderr and "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "garbage.model",
        "mine",
        "mine/notes.txt",
    ]


def test_a_valid_model_into_new_parents_keeps_them(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    result = cli("tokenizer", MODEL, out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
