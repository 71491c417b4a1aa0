"""Broken inputs: truncated downloads, zero-byte files, bad checksums, missing pieces, damaged weights and
checkpoints of other architectures. Each gives a typed error through the library, and ``Error:`` with exit
code 1 and no traceback through the CLI, and leaves no output folder behind.
"""

from __future__ import annotations

import os
import shutil
import struct
import tarfile

import pytest
import torch
from click.testing import CliRunner
from hostile_inputs import fixture_members, gpt2_megatron_checkpoint, tar_with, write_pt_obj
from reliability_cases import assert_clean_failure, expect, expect_cli

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert, prepare
from persimmon_tools.errors import CheckpointError, PersimmonToolsError, ReleaseError
from persimmon_tools.synth.build import build_release, bundled_vocab, write_release_folder


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder_release(tmp_path_factory):
    return write_release_folder(build_release(seed=0), tmp_path_factory.mktemp("broken") / "rel")


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "rel")


PT = "iter_0001251/mp_rank_00/model_optim_rng.pt"


@pytest.mark.parametrize("percent", range(0, 100, 10))
@pytest.mark.parametrize("what", ["tar", "pt"])
def test_truncated_inputs(releases, folder_release, tmp_path, what, percent):
    """Cases truncated-tar and truncated-pt."""
    if what == "tar":
        data = releases["tar"].read_bytes()
        source = tmp_path / "tiny_release.tar"
        source.write_bytes(data[: len(data) * percent // 100])
        expected = ReleaseError
    else:
        source = _copy(folder_release, tmp_path)
        data = (source / PT).read_bytes()
        (source / PT).write_bytes(data[: len(data) * percent // 100])
        expected = CheckpointError
    with pytest.raises(PersimmonToolsError) as err:
        convert(source, tmp_path / "out", ConvertOptions())
    assert isinstance(err.value, expected), err.value
    if percent:
        expect(f"truncated-{what}", err.value)
        assert "truncated" in err.value.message + (err.value.hint or "")
        expect_cli(f"truncated-{what}", cli("convert", source, tmp_path / "out"))
    else:
        assert_clean_failure(cli("convert", source, tmp_path / "out"))
    assert_clean_failure(cli("inspect", source))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_zero_byte_and_damaged_files(folder_release, tmp_path):
    empty_tar = tmp_path / "empty.tar"
    empty_tar.touch()
    empty_pt = tmp_path / "model_optim_rng.pt"
    empty_pt.touch()
    for case, source in (("zero-tar", empty_tar), ("zero-pt", empty_pt)):
        with pytest.raises(PersimmonToolsError) as err:
            convert(source, tmp_path / "out", ConvertOptions())
        expect(case, err.value)
        expect_cli(case, cli("convert", source, tmp_path / "out"))

    def damaged(name: str, data: bytes):
        folder = tmp_path / name
        if not folder.exists():
            shutil.copytree(folder_release, folder)
        target = {
            "zero-pt": PT,
            "zero-vocab": "adept_vocab.model",
            "truncated-vocab": "adept_vocab.model",
            "zero-tracker": "latest_checkpointed_iteration.txt",
        }[name]
        (folder / target).write_bytes(data)
        return folder

    vocab = bundled_vocab()
    for case, folder in (
        ("zero-pt", damaged("zero-pt", b"")),
        ("zero-vocab", damaged("zero-vocab", b"")),
        ("truncated-vocab", damaged("truncated-vocab", vocab[: len(vocab) // 2])),
        ("zero-tracker", damaged("zero-tracker", b"")),
    ):
        with pytest.raises(PersimmonToolsError) as err:
            convert(folder, tmp_path / "out", ConvertOptions())
        expect(case, err.value)
        expect_cli(case, cli("convert", folder, tmp_path / "out"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 100)
    expect_cli("not-a-release", cli("convert", other, tmp_path / "out"))
    fifo = tmp_path / "release.tar"
    os.mkfifo(fifo)
    with pytest.raises(PersimmonToolsError) as err:
        convert(fifo, tmp_path / "out", ConvertOptions())
    expect("fifo-source", err.value)
    expect_cli("fifo-source", cli("convert", fifo, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_md5_for_the_base_release_name(releases, tmp_path):
    fake = tmp_path / "8b_base_model_release.tar"
    shutil.copy(releases["tar"], fake)
    expect_cli("md5-base", cli("unpack", fake, tmp_path / "dest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["8b_base_model_release.tar"]
    # a truncated known release fails on its structure before its checksum, and leaves nothing either
    data = fake.read_bytes()
    fake.write_bytes(data[: len(data) // 2])
    assert_clean_failure(cli("unpack", fake, tmp_path / "dest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["8b_base_model_release.tar"]


def test_missing_vocab(folder_release, tmp_path):
    folder = _copy(folder_release, tmp_path)
    vocab = tmp_path / "adept_vocab.model"
    shutil.move(folder / "adept_vocab.model", vocab)
    with pytest.raises(PersimmonToolsError) as err:
        prepare(folder, ConvertOptions())
    expect("missing-vocab", err.value)
    assert "--vocab" in err.value.hint and "--no-tokenizer" in err.value.hint
    expect_cli("missing-vocab", cli("convert", folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    ok = cli("convert", folder, tmp_path / "weights-only", "--no-tokenizer", "--no-verify", "-q")
    assert ok.exit_code == 0, ok.stderr
    assert not (tmp_path / "weights-only" / "tokenizer.json").exists()
    ok = cli("convert", folder, tmp_path / "with-vocab", "--vocab", vocab, "--no-verify", "-q")
    assert ok.exit_code == 0, ok.stderr
    assert (tmp_path / "with-vocab" / "tokenizer.json").is_file()


def test_vocab_with_a_corrupt_charsmap(folder_release, tmp_path):
    """Case corrupt-charsmap: SentencePiece accepts a charsmap whose normalized strings are not UTF-8;
    `tokenizers` does not."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(bundled_vocab())
    charsmap = bytearray(proto.normalizer_spec.precompiled_charsmap)
    trie_size = struct.unpack("<I", charsmap[:4])[0]
    charsmap[4 + trie_size + 1] = 0xFF
    proto.normalizer_spec.precompiled_charsmap = bytes(charsmap)
    folder = _copy(folder_release, tmp_path)
    (folder / "adept_vocab.model").write_bytes(proto.SerializeToString())
    with pytest.raises(PersimmonToolsError) as err:
        convert(folder, tmp_path / "out", ConvertOptions())
    expect("corrupt-charsmap", err.value)
    assert not (tmp_path / "out").exists()


def test_vocab_with_a_non_utf8_piece(folder_release, tmp_path):
    """Case non-utf8-piece: SentencePiece loads a model whose piece `int` has a 0xFF byte; found by fuzzing."""
    data = bytearray(bundled_vocab())
    at = data.find(b"\x0a\x03int")  # field 1 (piece), length 3, "int"
    assert at > 0
    data[at + 2] = 0xFF
    folder = _copy(folder_release, tmp_path)
    (folder / "adept_vocab.model").write_bytes(bytes(data))
    with pytest.raises(PersimmonToolsError) as err:
        convert(folder, tmp_path / "out", ConvertOptions())
    expect("non-utf8-piece", err.value)
    assert not (tmp_path / "out").exists()


def test_release_structure_problems(releases, tmp_path):
    folder = write_release_folder(build_release(seed=0), tmp_path / "no-iter")
    shutil.rmtree(folder / "iter_0001251")
    expect_cli("no-iteration", cli("convert", folder, tmp_path / "out"))

    folder = write_release_folder(build_release(seed=0), tmp_path / "empty-rank")
    (folder / PT).unlink()
    expect_cli("empty-rank-folder", cli("convert", folder, tmp_path / "out"))

    for case, rank in (("missing-shard-tar", "mp_rank_00"), ("missing-last-shard", "mp_rank_01")):
        members = [(m, d) for m, d in fixture_members(releases["tp2"]) if rank not in m.name]
        tar = tar_with(tmp_path / f"tp2_without_{rank}.tar", members)
        with pytest.raises(PersimmonToolsError) as err:
            convert(tar, tmp_path / "out", ConvertOptions())
        expect(case, err.value)
        expect_cli(case, cli("convert", tar, tmp_path / "out"))

    folder = write_release_folder(build_release(seed=0, tp=2), tmp_path / "extra")
    shutil.copytree(folder / "iter_0001251" / "mp_rank_00", folder / "iter_0001251" / "mp_rank_02")
    with pytest.raises(PersimmonToolsError) as err:
        convert(folder, tmp_path / "out", ConvertOptions())
    expect("extra-shard", err.value)
    assert "args.tensor_model_parallel_size = 2 but 3" in err.value.message
    expect_cli("extra-shard", cli("convert", folder, tmp_path / "out"))

    folder = write_release_folder(build_release(seed=0), tmp_path / "mixed")
    shutil.copytree(folder / "iter_0001251" / "mp_rank_00", folder / "iter_0001251" / "mp_rank_00_001")
    expect_cli("mixed-shard-naming", cli("convert", folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_nonfinite_weights_via_cli(tmp_path):
    """Cases nonfinite and nonfinite-allowed."""
    rel = build_release(seed=0, tp=2)
    for rank in (0, 1):
        enc = rel.objects[(rank, 0)]["model"]["language_model"]["encoder"]
        col = enc["layers.1.mlp.dense_h_to_4h.weight"]  # column-parallel: dim-0 concat (copy path)
        row = enc["layers.3.self_attention.dense.weight"]  # row-parallel: dim-1 concat (interleave path)
        col_t = torch.cat(list(col.blocks())).reshape(col.shape)
        row_t = torch.cat(list(row.blocks())).reshape(row.shape)
        if rank == 1:
            col_t[5, :3] = float("nan")
            row_t[0, 0] = float("inf")
            row_t[7, 2] = float("-inf")
        enc["layers.1.mlp.dense_h_to_4h.weight"] = col_t
        enc["layers.3.self_attention.dense.weight"] = row_t
    folder = write_release_folder(rel, tmp_path / "nan_release")
    result = cli("convert", folder, tmp_path / "out", "--no-verify")
    expect_cli("nonfinite", result)
    assert "model.layers.1.mlp.dense_h_to_4h.weight: 3" in result.stderr
    assert "model.layers.3.self_attn.dense.weight: 2" in result.stderr
    assert "--allow-nonfinite" in result.stderr
    assert not (tmp_path / "out").exists()
    ok = cli("convert", folder, tmp_path / "out", "--no-verify", "--allow-nonfinite", "-q")
    assert ok.exit_code == 0, ok.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert int(f.get_tensor("model.layers.1.mlp.dense_h_to_4h.weight").isnan().sum()) == 3
        assert int(f.get_tensor("model.layers.3.self_attn.dense.weight").isinf().sum()) == 2


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=str)
def test_weights_of_a_non_float_dtype(folder_release, tmp_path, dtype):
    from persimmon_tools.synth.shard import with_adept_module

    folder = _copy(folder_release, tmp_path)
    ckpt = {}
    with_adept_module(lambda: ckpt.update(torch.load(folder / PT, weights_only=False)))
    ckpt["model"]["language_model"]["encoder"]["layers.0.mlp.dense_4h_to_h.bias"] = torch.ones(
        64, dtype=dtype
    )
    with_adept_module(lambda: torch.save(ckpt, folder / PT))
    with pytest.raises(PersimmonToolsError) as err:
        convert(folder, tmp_path / "out", ConvertOptions())
    expect("integer-weights", err.value)
    assert "layers.0.mlp.dense_4h_to_h.bias: dtype" in err.value.message
    expect_cli("integer-weights", cli("convert", folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_other_architectures(tmp_path):
    gpt2 = tmp_path / "gpt2" / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt"
    gpt2.parent.mkdir(parents=True)
    write_pt_obj(gpt2, gpt2_megatron_checkpoint())
    (tmp_path / "gpt2" / "latest_checkpointed_iteration.txt").write_text("1000")
    with pytest.raises(PersimmonToolsError) as err:
        prepare(tmp_path / "gpt2", ConvertOptions(tokenizer=False))
    expect("gpt2-megatron", err.value)
    for found in (
        "language_model.embedding.position_embeddings",
        "layers.N.mlp.dense_h_to_4h",
        "Found 28 tensors",
    ):
        assert found in err.value.message, err.value.message
    expect_cli("gpt2-megatron", cli("convert", tmp_path / "gpt2", tmp_path / "out", "--no-tokenizer"))
    inspect = cli("inspect", tmp_path / "gpt2", "--json")  # inspect still lists what is there
    assert inspect.exit_code == 0 and "not a Persimmon checkpoint" in inspect.stdout

    no_qk = gpt2_megatron_checkpoint()
    del no_qk["model"]["language_model"]["embedding"]["position_embeddings"]
    no_qk["args"].position_embedding_type = "rope"
    write_pt_obj(gpt2, no_qk)
    with pytest.raises(PersimmonToolsError) as err:
        prepare(tmp_path / "gpt2", ConvertOptions(tokenizer=False))
    expect("no-qk-layernorm", err.value)

    hf = write_pt_obj(tmp_path / "pytorch_model.pt", {"model.embed_tokens.weight": torch.zeros(4, 4)})
    with pytest.raises(PersimmonToolsError) as err:
        prepare(hf, ConvertOptions(tokenizer=False))
    expect("hf-state-dict", err.value)
    assert "model.embed_tokens.weight" in err.value.message
    expect_cli("hf-state-dict", cli("convert", hf, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_inspect_and_unpack_of_a_truncated_tar_are_clean(releases, tmp_path):
    data = releases["tar"].read_bytes()
    with tarfile.open(releases["tar"]) as tf:
        pt = next(m for m in tf if m.name.endswith(".pt"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: pt.offset_data + 1000])
    assert_clean_failure(cli("inspect", cut))
    assert_clean_failure(cli("unpack", cut, tmp_path / "dest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar"]
