"""`unpack` refuses sparse members, members larger than the free space and a symlinked DEST; `make-release`
never writes through a symlinked OUT.tar or a planted temp name (issue 15, item 4)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import persimmon_tools.safe_write as safe_write
from persimmon_tools.cli import main
from persimmon_tools.errors import PersimmonToolsError, ReleaseError, UsageError
from persimmon_tools.megatron.unpack import UnpackOptions, unpack
from persimmon_tools.synth.build import ReleaseOptions, make_release


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_member_is_refused_before_expanding(tmp_path, fmt):
    """A ~10 KB tar whose member expands to 2 GiB of zeros (GNU `S` type, or PAX GNU.sparse 1.0)."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to build a sparse archive")
    src = tmp_path / "src" / "rel"
    src.mkdir(parents=True)
    with open(src / "model_optim_rng.pt", "wb") as fh:
        fh.truncate(2 << 30)
        fh.seek(1000)
        fh.write(b"x")
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-S", f"--format={fmt}", "-cf", tar, "-C", src.parent, "rel"], check=True)
    assert tar.stat().st_size < 64 << 10
    result = cli("unpack", tar, tmp_path / "dest")
    assert result.exit_code == 1 and "is a sparse file (2,147,483,648 bytes once expanded)" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["sparse.tar", "src"]


def test_member_larger_than_free_space_is_refused(releases, tmp_path, monkeypatch):
    class Small:
        f_frsize, f_bavail = 4096, 10  # ten blocks left

    monkeypatch.setattr(safe_write.os, "statvfs", lambda p: Small())
    with pytest.raises(
        ReleaseError, match="adept_vocab.model' needs 248,956 bytes but .* has only 40,960 bytes free"
    ):
        unpack(releases["tar"], tmp_path / "dest", UnpackOptions(check_md5=False))
    assert os.listdir(tmp_path) == []


def test_symlinked_dest_is_refused(releases, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dest").symlink_to(outside)
    result = cli("unpack", releases["tar"], tmp_path / "dest")
    assert result.exit_code == 1 and "DEST" in result.stderr and "is a symbolic link" in result.stderr
    assert os.listdir(outside) == [] and sorted(os.listdir(tmp_path)) == ["dest", "outside"]


def test_make_release_refuses_a_symlinked_out_tar(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (tmp_path / "out.tar").symlink_to(victim)
    result = cli("make-release", tmp_path / "out.tar", "--force")
    assert result.exit_code == 2 and "is a symbolic link" in result.stderr
    assert victim.read_bytes() == b"precious" and (tmp_path / "out.tar").is_symlink()
    (tmp_path / "dangling.tar").symlink_to(tmp_path / "created-outside.tar")
    with pytest.raises(UsageError, match="symbolic link"):
        make_release(tmp_path / "dangling.tar")
    assert not (tmp_path / "created-outside.tar").exists()


def test_make_release_ignores_a_planted_partial_link(tmp_path):
    """The old fixed temp name `OUT.tar.partial` was opened through whatever link sat there."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (tmp_path / "out.tar.partial").symlink_to(victim)
    make_release(tmp_path / "out.tar")
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out.tar", "out.tar.partial", "victim.bin"]


def test_make_release_failure_leaves_nothing(tmp_path, monkeypatch):
    import persimmon_tools.synth.build as build

    (tmp_path / "out.tar").write_bytes(b"old")
    with pytest.raises(PersimmonToolsError, match="exists"):  # not a tarball the toolkit wrote: kept
        make_release(tmp_path / "out.tar", ReleaseOptions(force=True))
    assert os.listdir(tmp_path) == ["out.tar"] and Path(tmp_path / "out.tar").read_bytes() == b"old"
    (tmp_path / "out.tar").unlink()
    old = make_release(tmp_path / "out.tar", ReleaseOptions(seed=3)).read_bytes()
    monkeypatch.setattr(build, "_vocab_text", lambda b: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        make_release(tmp_path / "out.tar", ReleaseOptions(force=True))
    assert os.listdir(tmp_path) == ["out.tar"] and Path(tmp_path / "out.tar").read_bytes() == old
