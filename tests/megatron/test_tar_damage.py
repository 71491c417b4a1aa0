"""A damaged tar header in the middle of a release is an error, not the end of the archive.

Python's ``tarfile`` stops listing silently at an invalid header after the first member. The release built
here holds iter_0001251, then iter_0002000 and last the tracker (which names 2000): damage at the first
iter_0002000 header used to hide the later iteration *and* the tracker, and iter_0001251 was converted
with exit 0. Each damage kind is applied to a fresh copy; the undamaged control must read iteration 2000.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools import open_release
from persimmon_tools.cli import main
from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.unpack import unpack
from persimmon_tools.synth.build import build_release, write_release_folder

DAMAGED = "are not a valid tar header: the archive is damaged"


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory) -> tuple[Path, int]:
    """``(tar, header offset of the first iter_0002000 member)``; the tracker is the last member."""
    base = tmp_path_factory.mktemp("tar_damage")
    folder = write_release_folder(build_release(seed=0), base / "src" / "8b_base_model_release")
    later = write_release_folder(build_release(seed=1, iteration=2000), base / "later")
    shutil.copytree(later / "iter_0002000", folder / "iter_0002000")
    (folder / "latest_checkpointed_iteration.txt").write_text("2000")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != "latest_checkpointed_iteration.txt"
    )
    tar = base / "8b_base_model_release.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
        for path in [*files, folder / "latest_checkpointed_iteration.txt"]:
            tf.add(path, arcname=str(path.relative_to(folder.parent)), recursive=False)
    with tarfile.open(tar) as tf:
        offset = next(m.offset for m in tf if "iter_0002000" in m.name)
    return tar, offset


def _damaged(two_iterations, tmp_path: Path, kind: str) -> tuple[Path, int]:
    tar, at = two_iterations
    data = bytearray(tar.read_bytes())
    if kind == "checksum":
        data[at + 148] = ord("7") if data[at + 148] != ord("7") else ord("1")  # header checksum field
    elif kind == "garbage":
        data[at : at + 512] = bytes((i * 37 + 11) % 251 + 1 for i in range(512))
    elif kind == "zero-block":
        data[at : at + 512] = bytes(512)
    elif kind == "truncated-header":
        del data[at + 100 :]
    elif kind == "cut-at-member":
        del data[at:]
    out = tmp_path / tar.name
    out.write_bytes(bytes(data))
    return out, at


def test_control_reads_the_later_iteration(two_iterations):
    tar, _ = two_iterations
    rel = open_release(tar)
    assert rel.iteration == 2000 and sorted(rel.shards) == [(0, 0)]


@pytest.mark.parametrize("kind", ["checksum", "garbage", "zero-block", "truncated-header"])
def test_damaged_header_in_the_middle_is_refused(two_iterations, tmp_path, kind):
    tar, at = _damaged(two_iterations, tmp_path, kind)
    with tarfile.open(tar) as tf:  # the trap: tarfile lists only what comes before the damage, silently
        assert not any("iter_0002000" in m.name or m.name.endswith(".txt") for m in tf)
    with pytest.raises(ReleaseError) as err:
        open_release(tar)
    assert DAMAGED in err.value.message and f"after offset {at}" in err.value.message
    assert "download it again" in err.value.hint


def test_archive_cut_at_a_member_boundary_is_refused(two_iterations, tmp_path):
    tar, at = _damaged(two_iterations, tmp_path, "cut-at-member")
    with pytest.raises(ReleaseError, match=f"ends 0 bytes after offset {at}, without the two zero blocks"):
        open_release(tar)


def test_zero_padding_is_accepted_but_data_after_the_end_is_not(two_iterations, tmp_path, monkeypatch):
    from persimmon_tools.megatron import tarlist

    tar, _ = two_iterations
    padded = tmp_path / "padded.tar"
    padded.write_bytes(tar.read_bytes() + bytes(20 * 1024))  # more record padding: still a valid end
    assert open_release(padded).iteration == 2000
    trailing = tmp_path / "trailing.tar"
    trailing.write_bytes(tar.read_bytes() + b"appended data")
    with pytest.raises(ReleaseError, match="follows a zero block"):
        open_release(trailing)
    huge = tmp_path / "huge.tar"
    shutil.copy(tar, huge)
    with open(huge, "r+b") as fh:  # a sparse zero tail: read in bounded chunks, and only up to a limit
        fh.truncate(huge.stat().st_size + (3 << 20))
    monkeypatch.setattr(tarlist, "MAX_TRAILER", 1 << 20)
    with pytest.raises(ReleaseError, match="zero bytes follow the last tar member"):
        open_release(huge)


def test_convert_cli_refuses_a_damaged_tar_and_writes_nothing(two_iterations, tmp_path):
    tar, _ = _damaged(two_iterations, tmp_path, "checksum")
    result = CliRunner().invoke(main, ["convert", str(tar), str(tmp_path / "out")])
    assert_clean_failure(result, 1)
    assert DAMAGED in result.stderr and "Hint: " in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compress", [False, True])
def test_unpack_refuses_a_damaged_tar_and_leaves_nothing(two_iterations, tmp_path, compress):
    tar, _ = two_iterations
    good = tmp_path / ("good.tar.gz" if compress else "good.tar")
    good.write_bytes(gzip.compress(tar.read_bytes()) if compress else tar.read_bytes())
    assert unpack(good, tmp_path / "ok").files == 5  # control: 2 vocab files, 2 shards, the tracker
    bad, _ = _damaged(two_iterations, tmp_path, "checksum")
    if compress:
        bad.write_bytes(gzip.compress(bad.read_bytes()))
    with pytest.raises(ReleaseError, match=DAMAGED):
        unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, "ok", bad.name])


def test_unpack_cli_refuses_a_tar_cut_at_a_member_boundary(two_iterations, tmp_path):
    bad, _ = _damaged(two_iterations, tmp_path, "cut-at-member")
    result = CliRunner().invoke(main, ["unpack", str(bad), str(tmp_path / "dest")])
    assert_clean_failure(result, 1)
    assert "without the two zero blocks" in result.stderr and "Hint: " in result.stderr
    assert not (tmp_path / "dest").exists()
