"""``unpack`` into a parent folder (issue 23, part F, item 3).

DEST that exists (or a path ending in ``/``) is a parent: the release goes into ``DEST/NAME/`` (NAME: the
archive's top folder, else its file name without ``.tar``) and only that subfolder must be new or empty, so a
second release unpacks beside the first; nothing else in DEST is touched. A DEST that does not exist yet is
made and the archive extracted into it as it is.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.unpack import UnpackOptions, unpack
from persimmon_tools.synth.build import ReleaseOptions, make_release

NO_MD5 = UnpackOptions(check_md5=False)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("parent-tars")
    return {
        "first": make_release(base / "first.tar", ReleaseOptions(seed=0)),
        "second": make_release(base / "second.tar", ReleaseOptions(seed=1, tp=2)),
    }


def members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def files_below(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry below ``folder``: (mode, mtime_ns, bytes of a file)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        out[p.relative_to(folder).as_posix()] = (
            st.st_mode,
            st.st_mtime_ns,
            p.read_bytes() if p.is_file() else None,
        )
    return out


@pytest.fixture()
def parent(tmp_path) -> Path:
    """A folder already in use: the user's own files, which unpack must leave exactly as they are."""
    folder = tmp_path / "releases"
    (folder / "mine").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "mine" / "data.bin").write_bytes(b"\x00\x01")
    return folder


def test_two_releases_unpack_side_by_side_into_the_same_parent(tars, parent):
    before = snapshot(parent)
    for name in ("first", "second"):
        result = cli("unpack", tars[name], parent, "--json", "-q")
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir(parent)) == ["first", "mine", "notes.txt", "second"]  # no lock, no temp folder
    for name in ("first", "second"):
        assert {f"{name}/{k}": v for k, v in files_below(parent / name).items()} == members(tars[name])
    after = snapshot(parent)
    assert {k: v for k, v in after.items() if k.split("/")[0] not in ("first", "second")} == before


def test_the_same_release_again_is_refused_and_nothing_changes(tars, parent):
    assert cli("unpack", tars["first"], parent, "-q").exit_code == 0
    before = snapshot(parent)
    result = cli("unpack", tars["first"], parent)
    assert result.exit_code == 1 and f"DEST {parent / 'first'} is not empty" in result.stderr
    assert snapshot(parent) == before


def test_an_empty_release_folder_is_filled_and_a_file_in_the_way_is_refused(tars, parent):
    (parent / "first").mkdir()
    assert unpack(tars["first"], parent, NO_MD5).dest == parent / "first"
    assert files_below(parent / "first")
    (parent / "second").write_text("in the way")
    with pytest.raises(ReleaseError, match="exists and is not a folder"):
        unpack(tars["second"], parent, NO_MD5)
    assert (parent / "second").read_text() == "in the way"


def test_a_new_dest_keeps_the_archive_as_it_is_and_a_trailing_slash_makes_a_parent(tars, tmp_path):
    new = unpack(tars["first"], tmp_path / "new", NO_MD5)
    assert new.dest == tmp_path / "new" and files_below(tmp_path / "new") == members(tars["first"])
    slash = unpack(tars["first"], f"{tmp_path / 'made'}/", NO_MD5)  # DEST made, the release inside it
    assert slash.dest == tmp_path / "made" / "first"
    assert {f"first/{k}": v for k, v in files_below(slash.dest).items()} == members(tars["first"])


def _flat_tar(tmp_path: Path, source: Path, *, stray: bool = False) -> Path:
    """The members of ``source`` without their top folder (or, ``stray``, with one extra root file)."""
    out = tmp_path / ("stray.tar" if stray else "flat_release.tar")
    with tarfile.open(out, "w") as tf:
        for name, data in members(source).items():
            info = tarfile.TarInfo(name if stray else name.split("/", 1)[1])
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if stray:
            info = tarfile.TarInfo("README")
            tf.addfile(info, io.BytesIO(b""))
    return out


def test_an_archive_without_a_top_folder_goes_into_a_folder_named_after_it(tars, parent):
    flat = _flat_tar(parent.parent, tars["first"])
    result = unpack(flat, parent, NO_MD5)
    assert result.dest == parent / "flat_release"
    assert files_below(result.dest) == {k.split("/", 1)[1]: v for k, v in members(tars["first"]).items()}


def test_a_member_outside_the_release_folder_is_refused_in_a_parent(tars, parent):
    stray = _flat_tar(parent.parent, tars["first"], stray=True)
    before = snapshot(parent)
    with pytest.raises(ReleaseError, match="lies outside first/") as err:
        unpack(stray, parent, NO_MD5)
    assert "does not exist yet" in err.value.hint
    assert snapshot(parent) == before
    assert unpack(stray, parent / "whole", NO_MD5).files == len(members(stray))  # a new DEST: as it is


def test_a_bad_checksum_into_a_parent_leaves_the_parent_as_it_was(tars, parent):
    fake = parent.parent / "8b_chat_model_release.tar"
    fake.write_bytes(tars["first"].read_bytes())
    before = snapshot(parent)
    result = cli("unpack", fake, parent)
    assert result.exit_code == 1 and "does not match the published" in result.stderr
    assert snapshot(parent) == before
