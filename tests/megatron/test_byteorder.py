"""The torch zip's ``byteorder`` record: bytes are read as they were written, or the file is refused.

``torch.save`` writes ``archive/byteorder`` = ``little`` (the writer's ``sys.byteorder``); ``torch.load``
treats a missing record as little-endian, byteswaps for ``big`` and refuses anything else. This reader
reads raw little-endian bytes, so ``big`` and unknown contents are refused; each test rewrites the record
of a real file and compares with what torch itself does.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools import ConvertOptions, convert, load_release_checkpoint, open_release
from persimmon_tools.cli import main
from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.synth.build import build_release, write_release_folder

_KEEP = object()


def _rewrite_byteorder(path: Path, content: bytes | None | object) -> Path:
    """Rewrite ``path`` with its ``*/byteorder`` record replaced by ``content`` (None: removed)."""
    with zipfile.ZipFile(path) as zf:
        records = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            if name.endswith("/byteorder") and content is not _KEEP:
                if content is None:
                    continue
                data = content
            zf.writestr(name, data)
    return path


def _saved(tmp_path: Path, content) -> Path:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    return _rewrite_byteorder(path, content)


def _read_w(path: Path) -> torch.Tensor:
    return load_checkpoint(ByteSource.whole_file(path)).obj["w"].materialize()


@pytest.mark.parametrize("content", [_KEEP, b"little", None])
def test_little_or_missing_record_reads_like_torch(tmp_path, content):
    path = _saved(tmp_path, content)
    expected = torch.load(path, weights_only=True)["w"]
    assert torch.equal(_read_w(path), expected) and torch.equal(expected, torch.arange(6.0))


def test_big_endian_record_is_refused(tmp_path):
    path = _saved(tmp_path, b"big")
    swapped = torch.load(path, weights_only=True)["w"]  # torch byteswaps: raw reading would be garbage
    assert not torch.equal(swapped, torch.arange(6.0))
    with pytest.raises(CheckpointError) as err:
        _read_w(path)
    assert "t/byteorder says the tensors are stored big-endian" in err.value.message
    assert "torch.save" in err.value.hint


@pytest.mark.parametrize("content", [b"LITTLE", b"little\n", b"", b"middle", b"x" * 100])
def test_unknown_byteorder_record_is_refused(tmp_path, content):
    path = _saved(tmp_path, content)
    with pytest.raises(ValueError):  # torch refuses these too ("Unknown endianness type")
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="byteorder"):
        _read_w(path)


def test_release_with_a_big_endian_shard_is_refused_by_convert_and_cli(tmp_path):
    folder = write_release_folder(build_release(seed=0, pp=2), tmp_path / "rel")
    assert load_release_checkpoint(open_release(folder)).tensors  # control: reads before the rewrite
    _rewrite_byteorder(folder / "iter_0001251" / "mp_rank_00_001" / "model_optim_rng.pt", b"big")
    with pytest.raises(CheckpointError, match="mp_rank_00_001/model_optim_rng.pt: record archive/byteorder"):
        convert(folder, tmp_path / "out", ConvertOptions())
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out2")])
    assert_clean_failure(result, 1)
    assert "big-endian" in result.stderr and "Hint: " in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
