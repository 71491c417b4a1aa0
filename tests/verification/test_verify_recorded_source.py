"""``verify OUT_DIR`` without ``--reference`` uses the source conversion.json records while it is that source,
says so (stderr and verification.json), and refuses with exit 2 naming what differs when it is gone or changed
(issue 23, part G). Also: the readers line is printed once, on stdout, and says what the extra tensors are."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.conversion.fingerprint import REFERENCE_RECORD_FILE
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.build import ReleaseOptions, make_release

pytest.importorskip("transformers")

FIXTURE_TAR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"
FAST = ("--no-default-prompts", "--ids", "1,2,3", "--loader", "persimmon-tools")


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tiny release, copied, converted once (convert's own verify records its sha256)."""
    root = tmp_path_factory.mktemp("recorded_source")
    (root / "src").mkdir()
    source = shutil.copy(FIXTURE_TAR, root / "src" / "tiny_release.tar")
    done = cli("convert", source, root / "hf")
    assert done.exit_code == 0, done.stderr
    return root / "hf"


def copy_of(converted: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(converted, folder)
    return folder


def without_stored_record(folder: Path) -> Path:
    """The folder without the stored reference record convert's verify wrote: with one, a source that is gone or
    changed is replaced by the record (tests/verification/test_reference_record.py); these tests pin what
    happens without one."""
    (folder / REFERENCE_RECORD_FILE).unlink()
    return folder


def relocated(converted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the folder whose records name a source of its own (a copy of the tar in ``tmp_path``), as
    if it had been converted from there: the tests may then move or replace that source. Without the stored
    reference record."""
    folder = without_stored_record(copy_of(converted, tmp_path))
    old = json.loads((folder / "conversion.json").read_text())["source"]["path"]
    source = Path(shutil.copy(old, tmp_path / "tiny_release.tar"))
    for name in ("conversion.json", "verification.json"):
        record = json.loads((folder / name).read_text())
        assert record["source"]["path"] == old
        record["source"]["path"] = str(source)
        (folder / name).write_text(json.dumps(record, indent=2))
    return folder, source


def test_without_reference_the_recorded_source_is_used_and_named(converted, tmp_path) -> None:
    folder = copy_of(converted, tmp_path)
    recorded = json.loads((folder / "conversion.json").read_text())["source"]["path"]
    result = cli("verify", folder, *FAST)
    assert result.exit_code == 0, result.stderr
    info = f"no --reference given; comparing with the source recorded in {folder / 'conversion.json'}: {recorded}"
    assert info in result.stderr
    assert "their sha256 is compared with verification.json as they are read" in result.stderr
    assert f"(reference: {recorded}, recorded in conversion.json)" in result.stdout
    report = json.loads((folder / "verification.json").read_text())
    assert report["verdict"] == "pass" and report["source"]["path"] == recorded
    assert report["source"]["reference_from"] == "conversion.json (no --reference given)"
    given = cli("verify", folder, "--reference", recorded, *FAST, "--json")
    assert given.exit_code == 0, given.stderr
    assert json.loads(given.stdout)["source"]["reference_from"] == "--reference"
    assert "no --reference given" not in given.stderr


def test_the_readers_line_is_printed_once_and_says_what_the_extra_tensors_are(converted, tmp_path) -> None:
    result = cli("verify", copy_of(converted, tmp_path), *FAST)
    assert result.exit_code == 0, result.stderr
    assert "readers:" not in result.stderr  # stdout is the report, stderr progress and info
    [line] = [x for x in result.stdout.splitlines() if x.startswith("readers:")]
    assert line.startswith("readers: agree: 106 checkpoint tensors")
    assert "100 weights (what the HF model holds) + 6 rotary inv_freq buffers, not in the HF model" in line
    report = json.loads((tmp_path / "hf" / "verification.json").read_text())
    assert report["readers"]["tensors_compared"] == 106
    assert report["readers"]["source_tensors"] == {"weights": 100, "inv_freq_buffers": 6, "other": 0}


def test_a_recorded_source_that_is_gone_is_a_usage_error_naming_it(converted, tmp_path) -> None:
    folder, source = relocated(converted, tmp_path)
    before = (folder / "verification.json").read_bytes()
    source.rename(tmp_path / "moved.tar")
    result = cli("verify", folder, *FAST)
    assert result.exit_code == 2, result.stderr
    assert f"the source recorded in {folder / 'conversion.json'}, {source}, no longer exists" in result.stderr
    assert "Hint: pass --reference SOURCE" in result.stderr and "Traceback" not in result.output
    assert (folder / "verification.json").read_bytes() == before
    moved = cli("verify", folder, "--reference", tmp_path / "moved.tar", *FAST)
    assert moved.exit_code == 0, moved.stderr


def test_a_recorded_source_with_other_files_is_refused_before_reading(converted, tmp_path) -> None:
    folder, source = relocated(converted, tmp_path)
    make_release(tmp_path / "other.tar", ReleaseOptions(seed=3, overrides={"layers": 4}))
    (tmp_path / "other.tar").replace(source)  # another release at the recorded path: other sizes
    result = cli("verify", folder, *FAST)
    assert result.exit_code == 2, result.stderr
    assert f"{source}, is not the recorded source any more:" in result.stderr
    assert "model_optim_rng.pt is " in result.stderr and "bytes, the record says 921,967" in result.stderr
    assert "Hint: pass --reference" in result.stderr


def negate_final_layernorm_bias(tar: Path) -> None:
    """Flip the sign bits of one tensor's bf16 values inside the tar, in place: same size, other content, and
    a consistent file (the record's CRC-32 in the zip's local header and central directory rewritten too, as
    a checkpoint saved again with other values would have it)."""
    ckpt = load_release_checkpoint(open_release(tar))
    [(path, offset, nbytes)] = ckpt.tensors["language_model.encoder.final_layernorm.bias"].byte_ranges()
    with tarfile.open(tar) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("model_optim_rng.pt"))
    start = member.offset_data
    with open(path, "r+b") as fh:
        fh.seek(start)
        pt = bytearray(fh.read(member.size))
        at = offset - start
        with zipfile.ZipFile(io.BytesIO(bytes(pt))) as zf:
            [(info, data_at)] = [
                (i, d) for i in zf.infolist() if (d := _data_start(pt, i)) <= at < d + i.file_size
            ]
        pt[at + 1 : at + nbytes : 2] = bytes(b ^ 0x80 for b in pt[at + 1 : at + nbytes : 2])  # bf16 sign bits
        old_crc = info.CRC.to_bytes(4, "little")
        new_crc = zlib.crc32(pt[data_at : data_at + info.file_size]).to_bytes(4, "little")
        patched = 0
        for where in _all(pt, old_crc):
            if not data_at <= where < data_at + info.file_size:  # headers and descriptors, not the data
                pt[where : where + 4] = new_crc
                patched += 1
        assert patched >= 2, patched  # the local header (or data descriptor) and the central directory
        fh.seek(start)
        fh.write(pt)


def _data_start(pt: bytearray, info: zipfile.ZipInfo) -> int:
    """Where a zip record's data begins: after its 30-byte local header, file name and extra field."""
    local = info.header_offset
    return (
        local
        + 30
        + int.from_bytes(pt[local + 26 : local + 28], "little")
        + int.from_bytes(pt[local + 28 : local + 30], "little")
    )


def _all(data: bytearray, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def test_a_recorded_source_rewritten_with_the_same_sizes_is_caught_by_its_sha256(converted, tmp_path) -> None:
    folder, source = relocated(converted, tmp_path)
    before = (folder / "verification.json").read_bytes()
    size = source.stat().st_size
    negate_final_layernorm_bias(source)
    assert source.stat().st_size == size
    result = cli("verify", folder, *FAST)
    assert result.exit_code == 2, result.stderr
    assert "has changed since verification.json recorded it" in result.stderr
    assert "has the recorded size but sha256" in result.stderr and "no report was written" in result.stderr
    assert (folder / "verification.json").read_bytes() == before


def test_no_record_or_another_iteration_needs_reference(converted, tmp_path) -> None:
    folder = copy_of(converted, tmp_path)
    other = cli("verify", folder, "--iteration", "7", *FAST)  # the stored record cannot stand in for it
    assert other.exit_code == 2 and "--iteration 7 asks for another checkpoint" in other.stderr
    without_stored_record(folder)
    other = cli("verify", folder, "--iteration", "7", *FAST)
    assert other.exit_code == 2 and "--iteration 7 asks for another checkpoint" in other.stderr
    (folder / "conversion.json").unlink()
    result = cli("verify", folder, *FAST, "--json")
    assert result.exit_code == 2
    assert f"no --reference given, and {folder / 'conversion.json'} does not exist" in result.stderr
    assert json.loads(result.stdout)["error"]["exit_code"] == 2
