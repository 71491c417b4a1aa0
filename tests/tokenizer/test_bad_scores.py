"""Piece scores that are NaN/Inf or too large are refused, and written tokenizer files are re-loaded
(tokenizers, transformers) before they are accepted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import TokenizerError
from persimmon_tools.synth.build import build_release, bundled_vocab, write_release_folder
from persimmon_tools.tokenizer.proto import MAX_ABS_SCORE, read_spm
from persimmon_tools.tokenizer.write import TokenizerOptions, build_fast_tokenizer, write_tokenizer

pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

NORMAL, CONTROL, BYTE = 1, 3, 6


def _proto():
    proto = pb.ModelProto()
    proto.ParseFromString(bundled_vocab())
    return proto


def _edited(tmp_path: Path, edits: dict[int, float], name: str = "bad.model") -> Path:
    proto = _proto()
    for i, score in edits.items():
        proto.pieces[i].score = score
    path = tmp_path / name
    path.write_bytes(proto.SerializeToString())
    return path


def _ids_of(kind: int) -> list[int]:
    return [i for i, p in enumerate(_proto().pieces) if p.type == kind]


def _f32(x: float) -> float:
    """What a proto float field stores."""
    import struct

    return struct.unpack("<f", struct.pack("<f", x))[0]


# Scores SentencePiece itself refuses (NaN/Inf) and finite ones it accepts but that overflow float32 path
# sums or turned into `null` in tokenizer.json (3e38 on a NORMAL piece: the user-defined bonus overflowed).
BAD = [float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e31, -2e30, _f32(-1e36)]


@pytest.mark.parametrize("score", BAD)
@pytest.mark.parametrize("kind", [NORMAL, CONTROL, BYTE])
def test_bad_scores_are_refused_naming_piece_and_score(tmp_path, score, kind):
    ids = _ids_of(kind)
    pid = ids[len(ids) // 2]
    model = _edited(tmp_path, {pid: score})
    piece = _proto().pieces[pid].piece
    for attempt in (lambda: write_tokenizer(model, tmp_path / "out"), lambda: build_fast_tokenizer(model)):
        with pytest.raises(TokenizerError) as err:
            attempt()
        msg = err.value.message
        assert f"piece {pid} {piece!r} has score " in msg and "must be finite" in msg, msg
        shown = float(msg.split("has score ")[1].split(";")[0].split(" ")[0])
        assert (math.isnan(shown) and math.isnan(score)) or shown == _f32(score)
        assert err.value.hint
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_several_bad_scores_are_counted_and_the_bound_is_inclusive(tmp_path):
    normal = _ids_of(NORMAL)
    model = _edited(tmp_path, {normal[3]: float("nan"), normal[9]: 5e35, normal[20]: float("-inf")})
    with pytest.raises(TokenizerError) as err:
        read_spm(model)
    assert f"piece {normal[3]} " in err.value.message and "(and 2 more piece(s))" in err.value.message
    # the bound itself: the largest float32 not above it passes the score check, the next one up does not
    below = np.float32(MAX_ABS_SCORE)
    if float(below) > MAX_ABS_SCORE:
        below = np.nextafter(below, np.float32(0))
    below, above = float(below), float(np.nextafter(below, np.float32(np.inf)))
    read_spm(_edited(tmp_path, {normal[5]: -below}, "ok.model"))
    with pytest.raises(TokenizerError):
        read_spm(_edited(tmp_path, {normal[5]: -above}, "over.model"))


def test_convert_refuses_a_vocabulary_with_a_bad_score_and_writes_nothing(tmp_path):
    pid = _ids_of(NORMAL)[7]
    model = _edited(tmp_path, {pid: float("nan")})
    folder = write_release_folder(build_release(seed=0), tmp_path / "rel")
    (folder / "adept_vocab.model").write_bytes(model.read_bytes())
    with pytest.raises(TokenizerError) as err:
        convert(folder, tmp_path / "out", ConvertOptions())
    assert f"piece {pid} " in err.value.message and "has score nan" in err.value.message
    assert not (tmp_path / "out").exists()
    (folder / "adept_vocab.model").write_bytes(_edited(tmp_path, {pid: 3e38}).read_bytes())  # SP loads it
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out"), "--no-verify", "-q"])
    assert_clean_failure(result, 1)
    assert f"piece {pid} " in result.stderr and "Hint: " in result.stderr
    assert not (tmp_path / "out").exists()


# ---- re-load of the written files --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("with_transformers", [True, False])
def test_a_tokenizer_json_that_does_not_load_is_refused(tmp_path, monkeypatch, with_transformers):
    """With the score check disabled, a 3e38 score reaches tokenizer.json as `null` (the reported bug):
    the re-load must refuse it, saying what tokenizers said, and leave nothing behind; with and without
    transformers installed."""
    import persimmon_tools.tokenizer.proto as proto
    import persimmon_tools.tokenizer.reload as reload

    monkeypatch.setattr(proto, "check_scores", lambda *a, **k: None)
    if not with_transformers:
        monkeypatch.setattr(reload, "_have_transformers", lambda: False)
        monkeypatch.setattr(reload, "_load_auto", None)  # would fail loudly if called
    model = _edited(tmp_path, {_ids_of(NORMAL)[7]: 3e38})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TokenizerError) as err:
        write_tokenizer(model, out, TokenizerOptions(check=False))
    assert "does not load back with tokenizers.Tokenizer.from_file" in err.value.message
    assert "null" in err.value.message  # what the loader said
    assert list(out.iterdir()) == []


def test_files_transformers_cannot_load_are_refused(tmp_path, monkeypatch):
    """A tokenizer_config.json that tokenizers never reads but transformers rejects."""
    pytest.importorskip("transformers")
    import persimmon_tools.tokenizer.write as write

    original = write._dumps

    def bad_class(obj):
        return original({**obj, "extra_special_tokens": 5} if "add_bos_token" in obj else obj)

    monkeypatch.setattr(write, "_dumps", bad_class)
    model = tmp_path / "tiny.model"
    model.write_bytes(bundled_vocab())
    out = tmp_path / "out"
    with pytest.raises(TokenizerError) as err:
        write_tokenizer(model, out)
    assert "do not load with transformers.AutoTokenizer" in err.value.message
    assert "TypeError: extra_special_tokens must be" in err.value.message  # what transformers said
    assert not out.exists()  # the OUT_DIR this run created is removed again


def test_files_that_load_but_encode_differently_are_refused(tmp_path, monkeypatch):
    """A tokenizer_config that makes transformers add an EOS the written tokenizer does not add."""
    pytest.importorskip("transformers")
    import persimmon_tools.tokenizer.reload as reload

    calls = []
    original = reload._load_auto

    def eos_adding(folder):
        auto = original(folder)
        calls.append(auto)
        return lambda texts, **kw: {"input_ids": [[*ids, 7] for ids in auto(texts, **kw)["input_ids"]]}

    monkeypatch.setattr(reload, "_load_auto", eos_adding)
    model = tmp_path / "tiny.model"
    model.write_bytes(bundled_vocab())
    with pytest.raises(TokenizerError) as err:
        write_tokenizer(model, tmp_path / "out")
    assert "load with transformers.AutoTokenizer but encode" in err.value.message and calls
    assert not (tmp_path / "out").exists()  # the OUT_DIR this run created is removed again


@pytest.mark.parametrize("with_transformers", [True, False])
def test_good_files_are_written_after_the_reload(tmp_path, monkeypatch, with_transformers):
    import persimmon_tools.tokenizer.reload as reload

    if not with_transformers:
        monkeypatch.setattr(reload, "_have_transformers", lambda: False)
        monkeypatch.setattr(reload, "_load_auto", None)
    model = tmp_path / "tiny.model"
    model.write_bytes(bundled_vocab())
    out = tmp_path / "out"
    written = write_tokenizer(model, out)
    names = sorted(p.name for p in out.iterdir())
    assert (
        names
        == sorted(p.name for p in written)
        == [
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )  # no staging folder left behind
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    assert (out / "tokenizer.model").read_bytes() == bundled_vocab()
    write_tokenizer(
        out / "tokenizer.model", out, TokenizerOptions(replace_existing=True)
    )  # the convert case: the model already lies in out_dir
    assert (out / "tokenizer.model").read_bytes() == bundled_vocab()
