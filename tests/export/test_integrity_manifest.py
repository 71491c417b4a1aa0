"""``export`` writes ``NAME/integrity.json`` (sha256 and size of every file, Megatron-Core's form plus sizes),
and ``convert``, ``inspect`` and ``unpack`` refuse a release whose files no longer match it (issue 24).

The digests are checked against :mod:`hashlib` over the files as they lie on disk (folder) or in the tarball;
a damaged, resized or missing file is refused naming the file; a release without a manifest still converts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.conversion.inspect import inspect_source
from persimmon_tools.errors import CheckpointError
from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.megatron.unpack import UnpackOptions, unpack

FIXTURE_TAR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"
NAME = "tiny_release"
PT = "iter_0001251/mp_rank_01/model_optim_rng.pt"
NO_TOKENIZER = ConvertOptions(tokenizer=False)
FILES = {
    "adept_vocab.model",
    "adept_vocab.vocab",
    "latest_checkpointed_iteration.txt",
    "iter_0001251/mp_rank_00/model_optim_rng.pt",
    PT,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The tiny fixture exported at TP=2, as a folder and as a tarball."""
    base = tmp_path_factory.mktemp("integrity")
    source = Path(shutil.copy(FIXTURE_TAR, base / "tiny_release.tar"))
    export_release(source, base / "folder", ExportOptions(tp=2))
    export_release(source, base / "release.tar", ExportOptions(tp=2, tar=True))
    return {"folder": base / "folder" / NAME, "tar": base / "release.tar"}


def _tar_files(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def _check(manifest: dict, read) -> None:
    assert manifest["algorithm"] == "sha256" and set(manifest["files"]) == set(manifest["sizes"]) == FILES
    for name, digest in manifest["files"].items():
        data = read(name)
        assert hashlib.sha256(data).hexdigest() == digest and len(data) == manifest["sizes"][name], name


def test_a_folder_export_carries_a_manifest_of_every_file(exported):
    folder = exported["folder"]
    manifest = json.loads((folder / "integrity.json").read_text())
    _check(manifest, lambda name: (folder / name).read_bytes())
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == FILES | {
        "integrity.json"
    }
    record = json.loads((folder.parent / "export.json").read_text())
    assert f"{NAME}/integrity.json" in record["output_files"]


def test_a_tar_export_carries_the_manifest_as_its_last_member(exported):
    files = _tar_files(exported["tar"])
    assert list(files)[-1] == f"{NAME}/integrity.json"
    _check(json.loads(files[f"{NAME}/integrity.json"]), lambda name: files[f"{NAME}/{name}"])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported["folder"], tmp_path / NAME))


def test_a_damaged_file_in_a_folder_is_refused_by_convert_and_inspect(folder, tmp_path):
    _flip(folder / PT, (folder / PT).stat().st_size // 2)
    want = f"{folder / PT} does not match the release's integrity.json: its sha256 is "
    with pytest.raises(CheckpointError, match="the manifest lists") as err:
        convert(folder, tmp_path / "out", NO_TOKENIZER)
    assert str(err.value).startswith(want) and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError) as err:
        inspect_source(folder)
    assert str(err.value).startswith(want)


def test_a_resized_or_missing_file_is_refused(folder, tmp_path):
    with open(folder / "adept_vocab.vocab", "ab") as fh:
        fh.write(b"x")
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert_clean_failure(result, exit_code=CheckpointError.exit_code)
    assert (
        f"{folder / 'adept_vocab.vocab'} does not match the release's integrity.json: it is " in result.stderr
    )
    (folder / "adept_vocab.vocab").unlink()
    with pytest.raises(
        CheckpointError, match="adept_vocab.vocab is missing; the release's integrity.json lists it"
    ):
        convert(folder, tmp_path / "out", NO_TOKENIZER)


def test_a_damaged_tarball_is_refused_by_convert_inspect_and_unpack(exported, tmp_path):
    tar = Path(shutil.copy(exported["tar"], tmp_path / "release.tar"))
    with tarfile.open(tar) as tf:
        vocab = tf.getmember(f"{NAME}/adept_vocab.model")
    _flip(tar, vocab.offset_data + 100)
    named = f"{tar}:{NAME}/adept_vocab.model does not match the release's integrity.json: its sha256 is "
    result = CliRunner().invoke(main, ["convert", str(tar), str(tmp_path / "out"), "--no-verify"])
    assert_clean_failure(result, exit_code=CheckpointError.exit_code)
    assert named in result.stderr and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError) as err:
        inspect_source(tar)
    assert str(err.value).startswith(named)
    with pytest.raises(CheckpointError) as err:
        unpack(tar, tmp_path / "dest", UnpackOptions())
    assert str(err.value).startswith(named) and not (tmp_path / "dest").exists()


def test_an_intact_tarball_unpacks_and_the_manifest_comes_along(exported, tmp_path):
    unpack(exported["tar"], tmp_path / "dest", UnpackOptions())
    assert (tmp_path / "dest" / NAME / "integrity.json").is_file()
    convert(tmp_path / "dest" / NAME, tmp_path / "out", NO_TOKENIZER)  # the unpacked folder checks too


def test_a_release_without_a_manifest_still_converts(folder, tmp_path):
    (folder / "integrity.json").unlink()
    _flip(folder / "adept_vocab.vocab", 5)  # nothing lists it any more; convert does not read it
    convert(folder, tmp_path / "out", NO_TOKENIZER)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_compressed_tarball_is_checked_by_the_manifest_it_extracts(exported, tmp_path):
    """A .tar.gz cannot be listed ahead: every member is hashed and the extracted manifest is read."""
    import gzip

    data = bytearray(exported["tar"].read_bytes())
    with tarfile.open(exported["tar"]) as tf:
        shard = tf.getmember(f"{NAME}/{PT}")
    good = tmp_path / "good.tar.gz"
    good.write_bytes(gzip.compress(bytes(data)))
    unpack(good, tmp_path / "dest", UnpackOptions())
    assert (tmp_path / "dest" / NAME / PT).is_file()
    data[shard.offset_data + shard.size // 2] ^= 0x01
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(
        CheckpointError, match=f"bad.tar.gz:{NAME}/{PT} does not match the release's integrity"
    ):
        unpack(bad, tmp_path / "dest2", UnpackOptions())
