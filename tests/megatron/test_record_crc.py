"""The CRC-32 of every torch-zip record a pass reads is checked in that pass (issue 24).

One byte flipped in the middle of a tensor record of ``model_optim_rng.pt`` (the zip directory still holds
the record's original CRC-32) must stop ``convert`` (tar and folder releases), ``export`` and ``verify``'s
reference side with a CheckpointError naming the file, the record and the tensor; a flip in ``data.pkl``
too. The record a byte lies in is found independently, with :mod:`zipfile`; a record that a pass reads
sparsely is completed by ``finish_records``.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import CheckpointError
from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.records import finish_records
from persimmon_tools.megatron.release import open_release
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.synth.build import build_release, write_release_folder

FIXTURE_TAR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"
PT = "iter_0001251/mp_rank_00/model_optim_rng.pt"
KEY = "language_model.encoder.layers.3.mlp.dense_h_to_4h.weight"
NO_TOKENIZER = ConvertOptions(tokenizer=False)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))


def pt_span(path: Path) -> tuple[int, bytes]:
    """(offset of the shard's bytes in ``path``, those bytes): a tar member or the file itself."""
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(PT))
            return member.offset_data, tf.extractfile(member).read()
    return 0, path.read_bytes()


def record_at(path: Path, offset: int) -> str:
    """The zip record whose data holds byte ``offset`` of ``path`` (found with zipfile, not the toolkit)."""
    base, pt = pt_span(path)
    with zipfile.ZipFile(io.BytesIO(pt)) as zf:
        for info in zf.infolist():
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            if start <= offset - base < start + info.file_size:
                return info.filename
    raise AssertionError(f"no record holds byte {offset}")


def damage_tensor(release: Path, key: str = KEY) -> str:
    """Flip a byte in the middle of ``key``'s bytes (in the tar or the .pt); returns the record it lies in."""
    [(path, offset, nbytes)] = load_release_checkpoint(open_release(release)).tensors[key].byte_ranges()
    flip(path, offset + nbytes // 2)
    return record_at(path, offset + nbytes // 2)


def assert_names(err: CheckpointError | str, record: str, key: str = KEY) -> None:
    text = str(err)
    assert f"model_optim_rng.pt: record {record} (tensor model.{key}) is damaged" in text, text
    assert "the zip directory records" in text and "download it again" in text, text


@pytest.fixture
def tar(tmp_path) -> Path:
    return Path(shutil.copy(FIXTURE_TAR, tmp_path / "tiny_release.tar"))


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_release_folder(build_release(seed=0), tmp_path / "tiny_release")


def test_convert_refuses_a_damaged_tensor_record_in_a_tar(tar, tmp_path):
    record = damage_tensor(tar)
    assert record.startswith("archive/data/")
    result = CliRunner().invoke(
        main, ["convert", str(tar), str(tmp_path / "out"), "--no-verify", "--no-tokenizer"]
    )
    assert_clean_failure(result, exit_code=CheckpointError.exit_code)
    assert_names(result.stderr, record)
    assert f"{tar}:tiny_release/{PT}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_damaged_tensor_record_in_a_folder(folder, tmp_path):
    record = damage_tensor(folder)
    with pytest.raises(CheckpointError) as err:
        convert(folder, tmp_path / "out", NO_TOKENIZER)
    assert_names(err.value, record)
    assert str(err.value).startswith(f"{folder / PT}: ")


def test_export_refuses_a_damaged_tensor_record(tar, tmp_path):
    record = damage_tensor(tar)
    with pytest.raises(CheckpointError) as err:
        export_release(tar, tmp_path / "exported", ExportOptions(tp=2))
    assert_names(err.value, record)
    assert not (tmp_path / "exported").exists()


def test_verify_refuses_a_reference_with_a_damaged_record(tar, tmp_path):
    from persimmon_tools.verification.verify import VerifyOptions, verify

    out = tmp_path / "hf"
    convert(tar, out, NO_TOKENIZER)
    record = damage_tensor(tar, "language_model.encoder.layers.1.self_attention.dense.weight")
    options = VerifyOptions(write=False, loader="persimmon-tools", default_prompts=False, ids=((5, 6, 7),))
    with pytest.raises(CheckpointError) as err:
        verify(out, tar, options)
    assert_names(err.value, record, "language_model.encoder.layers.1.self_attention.dense.weight")


def test_a_damaged_pickle_is_refused_before_it_is_unpickled(folder, tmp_path):
    base, pt = pt_span(folder / PT)
    with zipfile.ZipFile(io.BytesIO(pt)) as zf:
        info = zf.getinfo("archive/data.pkl")
    flip(
        folder / PT,
        base + info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2,
    )
    with pytest.raises(
        CheckpointError, match=r"record archive/data\.pkl \(the pickled checkpoint object\) is damaged"
    ):
        convert(folder, tmp_path / "out", NO_TOKENIZER)


def _pt(tmp_path: Path, obj: object) -> ByteSource:
    buf = io.BytesIO()
    torch.save(obj, buf)  # torch's own writer: data descriptors, CRCs in the directory
    (tmp_path / "m.pt").write_bytes(buf.getvalue())
    return ByteSource.whole_file(tmp_path / "m.pt")


def test_a_record_read_far_apart_is_completed_by_finish_records(tmp_path):
    """Rows 0 and 1023 of a 4 MiB tensor: the gap is too far ahead to read at once, so the record stays open
    (the damage between is not seen) until finish_records reads and checks the rest."""
    src = _pt(tmp_path, {"model": {"w": torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)}})
    w = load_checkpoint(src).obj["model"]["w"]
    flip(src.path, w.byte_offset + 512 * 4096 + 7)
    loaded = load_checkpoint(src)
    w = loaded.obj["model"]["w"]
    assert w.read_rows(0, 1)[0, 1] == 1 and w.read_rows(1023, 1024)[0, 0] == 1023 * 1024
    with pytest.raises(CheckpointError) as err:
        finish_records(open_release(src.path))  # release-level: every table loaded from its shards
    assert "record archive/data/0 (tensor model.w) is damaged" in str(err.value)
    with pytest.raises(CheckpointError):  # and every later read of the record fails too
        w.read_rows(0, 1)


def test_an_intact_record_read_in_any_order_is_accepted(tmp_path):
    """Ahead (the gap is read first), behind (not CRC'd again), two views of one storage: no false alarm."""
    base = torch.arange(3000, dtype=torch.float32)
    src = _pt(tmp_path, {"model": {"v": base[:1000], "w": base.reshape(30, 100)}})
    loaded = load_checkpoint(src)
    v, w = loaded.obj["model"]["v"], loaded.obj["model"]["w"]
    record = w.storage.record
    assert v.storage.record is record and record.tensors == ["model.v", "model.w"]
    assert torch.equal(w.read_rows(5, 6)[0], base[500:600]) and record.pos == record.start + 600 * 4
    assert torch.equal(w.read_rows(1, 2)[0], base[100:200]) and record.pos == record.start + 600 * 4
    assert torch.equal(w.read_rows(29, 30)[0], base[2900:]) and record.done
    assert torch.equal(v.materialize(), base[:1000]) and loaded.finish_records() == 0


def test_a_view_over_part_of_its_storage_completes_its_record(tmp_path):
    """torch.save keeps a view's whole storage: once the view is read, the rest of the record is read too."""
    src = _pt(tmp_path, {"model": {"v": torch.arange(3000, dtype=torch.float32)[:1000]}})
    flip(src.path, load_checkpoint(src).obj["model"]["v"].byte_offset + 2500 * 4)  # beyond the view
    v = load_checkpoint(src).obj["model"]["v"]
    with pytest.raises(CheckpointError, match=r"record archive/data/0 \(tensor model\.v\) is damaged"):
        v.materialize()


def test_a_file_written_without_crcs_is_read_unchecked(tmp_path, caplog):
    torch.serialization.set_crc32_options(False)
    try:
        src = _pt(tmp_path, {"model": {"w": torch.ones(8)}})
    finally:
        torch.serialization.set_crc32_options(True)
    with caplog.at_level("INFO"):
        loaded = load_checkpoint(src)
    assert loaded.table is None and "records no CRC-32" in caplog.text
    assert torch.equal(loaded.obj["model"]["w"].materialize(), torch.ones(8))
