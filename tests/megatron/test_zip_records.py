"""Torch zips whose directory names one record twice, or whose local header names another record than the
directory: one file, two checkpoints. ``torch.load`` (the outside oracle) silently reads the *last* of two
records of one name (``zipfile`` warns when writing them and reads the last one too; other zip tools may
take the first), so what ``convert`` would write depends on the reader. The byte layer refuses both, naming
the shard and the record, and ``convert`` / ``inspect`` fail with exit 1 and no traceback."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.synth.build import bundled_vocab

FIRST = torch.tensor([1.0, 2.0, 3.0, 4.0])
SECOND = torch.tensor([7.0, 8.0, 9.0, 10.0])


def _saved() -> dict[str, bytes]:
    """The records of ``torch.save({"model": {"w": FIRST}, "iteration": 1})``, in order."""
    buf = io.BytesIO()
    torch.save({"model": {"w": FIRST}, "iteration": 1}, buf)
    with zipfile.ZipFile(buf) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _rezip(path: Path, records: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name: ..."
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in records:
                zf.writestr(name, data)
    (path.parent / "adept_vocab.model").write_bytes(bundled_vocab())
    return path


def _with_twin(path: Path, suffix: str, twin: bytes) -> Path:
    """The saved zip with a second record of the name ending in ``suffix`` (``twin``) right after it."""
    records: list[tuple[str, bytes]] = []
    for name, data in _saved().items():
        records.append((name, data))
        if name.endswith(suffix):
            records.append((name, twin))
    return _rezip(path, records)


def _twin_pickle() -> bytes:
    """A ``data.pkl`` of the same layout that names the tensor ``v`` instead of ``w``."""
    pkl = next(data for name, data in _saved().items() if name.endswith("data.pkl"))
    w = b"X\x01\x00\x00\x00w"  # BINUNICODE 'w' (torch.save pickles with protocol 2)
    assert pkl.count(w) == 1
    return pkl.replace(w, w[:-1] + b"v")


def _refused(path: Path, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(ByteSource.whole_file(path))
    assert str(path) in err.value.message and err.value.hint
    return err.value


def test_a_storage_record_named_twice_is_refused_though_torch_load_reads_the_last(tmp_path):
    path = _with_twin(tmp_path / "model_optim_rng.pt", "data/0", SECOND.numpy().tobytes())
    # The oracle: torch.load silently takes the second record's bytes.
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], SECOND)
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in zf.infolist()].count("archive/data/0") == 2
    _refused(path, r"two records named 'archive/data/0' \(torch.load would silently read the last one\)")


def test_a_pickle_record_named_twice_is_refused_though_torch_load_reads_the_last(tmp_path):
    path = _with_twin(tmp_path / "model_optim_rng.pt", "data.pkl", _twin_pickle())
    assert list(torch.load(path, weights_only=True)["model"]) == ["v"]  # the oracle: the second pickle
    _refused(path, "two records named 'archive/data.pkl'")


def test_the_same_records_once_each_still_load(tmp_path):
    """Control: the rezipped file without a twin is read, and agrees with torch.load."""
    path = _rezip(tmp_path / "model_optim_rng.pt", list(_saved().items()))
    loaded = load_checkpoint(ByteSource.whole_file(path))
    assert torch.equal(
        loaded.obj["model"]["w"].materialize(), torch.load(path, weights_only=True)["model"]["w"]
    )


def test_a_local_header_that_names_another_record_is_refused(tmp_path):
    """The directory says ``archive/data/0``; the local header it points at says ``archive/data/9``."""
    path = _rezip(tmp_path / "model_optim_rng.pt", list(_saved().items()))
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x03\x04")
    while data[at + 30 : at + 30 + 14] != b"archive/data/0":
        at = data.find(b"PK\x03\x04", at + 4)
        assert at >= 0
    data[at + 30 : at + 44] = b"archive/data/9"
    path.write_bytes(bytes(data))
    # torch.load does not compare the names: it reads the bytes the directory points at.
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], FIRST)
    _refused(path, "record 'archive/data/0' points at a local header that names another record")


@pytest.mark.parametrize("command", ["convert", "inspect"])
@pytest.mark.parametrize("suffix", ["data/0", "data.pkl"])
def test_commands_refuse_a_record_named_twice(tmp_path, command, suffix):
    twin = SECOND.numpy().tobytes() if suffix == "data/0" else _twin_pickle()
    path = _with_twin(tmp_path / "model_optim_rng.pt", suffix, twin)
    argv = [command, str(path)] + ([str(tmp_path / "out")] if command == "convert" else [])
    result = CliRunner().invoke(main, argv)
    assert_clean_failure(result, 1)
    assert f"{path}: the zip holds two records named 'archive/{suffix}'" in result.stderr, result.stderr
    assert "Hint: the file is damaged or was tampered with; download it again" in result.stderr
    assert not (tmp_path / "out").exists()
