"""The one staged-output mechanism (persimmon_tools/staged_*.py): the tarball's own
record, the --force rule for tarballs (make-release, export --tar) and for nested folder records, and the
recovery of leftovers for every command that writes through it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.conversion.output_dir import CONVERT_OUTPUT
from persimmon_tools.errors import ConversionError
from persimmon_tools.megatron.release import open_release
from persimmon_tools.megatron.unpack import UnpackOptions, unpack
from persimmon_tools.staged_output import RUN_MARKER
from persimmon_tools.staged_record import TAR_RECORD_KEY, check_output, foreign_entries, tar_is_ours
from persimmon_tools.synth.build import ReleaseOptions, make_release

REPO = Path(__file__).resolve().parent.parent


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("rec") / "rec_release.tar", ReleaseOptions(tp=2, seed=0))


def test_the_record_lists_every_member_and_readers_skip_it(tarball, tmp_path):
    with tarfile.open(tarball) as tf:
        names = tf.getnames()
        record = json.loads(tf.pax_headers[TAR_RECORD_KEY])
    assert record == {"tool": "persimmon-tools", "members": names}
    assert names[0] == "rec_release" and len(names) == 6  # the folder, 3 small files, 2 shards
    assert tar_is_ours(tarball)
    release = open_release(tarball)
    assert (release.tp, release.pp, release.iteration) == (2, 1, 1251)
    result = unpack(tarball, tmp_path / "dest", UnpackOptions(check_md5=False))
    extracted = sorted(
        p.relative_to(tmp_path / "dest").as_posix() for p in result.dest.rglob("*") if p.is_file()
    )
    assert extracted == sorted(n for n in names[1:])  # no extra file from the record
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "-tf", tarball], capture_output=True, text=True, check=True)
        assert [n.rstrip("/") for n in listed.stdout.split()] == names


def test_the_record_keeps_releases_deterministic(tarball, tmp_path):
    again = make_release(tmp_path / "rec_release.tar", ReleaseOptions(tp=2, seed=0))
    assert again.read_bytes() == tarball.read_bytes()


def test_a_changed_or_foreign_tarball_is_not_ours(tarball, tmp_path):
    def variant(name: str, edit) -> Path:
        path = tmp_path / name
        shutil.copy(tarball, path)
        edit(path)
        return path

    def append_member(path: Path) -> None:
        with tarfile.open(path, "a") as tf:
            info = tarfile.TarInfo("rec_release/notes.txt")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"mine"))

    def concatenate(path: Path) -> None:
        with open(path, "ab") as fh:
            fh.write(tarball.read_bytes())

    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    assert not tar_is_ours(variant("appended.tar", append_member))
    assert not tar_is_ours(variant("concatenated.tar", concatenate))
    assert not tar_is_ours(variant("truncated.tar", truncate))
    assert not tar_is_ours(REPO / "fixtures" / "tiny_release.tar")  # written before tarballs had a record
    (tmp_path / "plain.bin").write_bytes(b"not a tar at all")
    assert not tar_is_ours(tmp_path / "plain.bin")
    (tmp_path / "link.tar").symlink_to(tarball)
    assert not tar_is_ours(tmp_path / "link.tar")


def test_make_release_force_replaces_only_a_tarball_it_wrote(tmp_path):
    out = tmp_path / "out.tar"
    out.write_bytes(b"precious")
    result = cli("make-release", out, "--force")
    assert result.exit_code == 1
    assert f"OUT_TAR {out} exists and is not a tarball persimmon-tools wrote" in result.stderr
    assert f"remove {out} yourself or choose another name" in result.stderr
    assert out.read_bytes() == b"precious" and os.listdir(tmp_path) == ["out.tar"]

    out.unlink()
    assert cli("make-release", out, "--seed", "1", "-q").exit_code == 0
    first = out.read_bytes()
    result = cli("make-release", out, "-q")
    assert result.exit_code == 1 and "--force" in result.stderr and out.read_bytes() == first
    result = cli("make-release", out, "--force", "--seed", "2", "-q")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != first and tar_is_ours(out) and os.listdir(tmp_path) == ["out.tar"]

    with tarfile.open(out, "a") as tf:  # a member of someone else's added to it: no longer ours
        info = tarfile.TarInfo("out/notes.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"mine"))
    changed = out.read_bytes()
    result = cli("make-release", out, "--force", "-q")
    assert result.exit_code == 1 and "is not a tarball persimmon-tools wrote" in result.stderr
    assert out.read_bytes() == changed


def test_make_release_force_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "out.tar").mkdir()
    result = cli("make-release", tmp_path / "out.tar", "--force")
    assert result.exit_code == 1 and "exists and is a directory" in result.stderr
    assert os.listdir(tmp_path) == ["out.tar"]


def test_nested_records_in_foreign_entries(tmp_path):
    folder = tmp_path / "out"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "w.bin").write_bytes(b"ours")
    (folder / "a" / "mine.txt").write_text("theirs")
    (folder / "other").mkdir()
    (folder / "other" / "x").write_text("theirs")
    (folder / "a" / "link").symlink_to(tmp_path)
    record = {"tool": "persimmon-tools", "output_files": ["a/b/w.bin", "conversion.json"]}
    (folder / "conversion.json").write_text(json.dumps(record))
    assert foreign_entries(folder, "conversion.json") == ["a/link", "a/mine.txt", "other/"]
    for bad in (
        ["../x", "conversion.json"],
        ["/etc/passwd", "conversion.json"],
        ["a/./b", "conversion.json"],
    ):
        (folder / "conversion.json").write_text(json.dumps({**record, "output_files": bad}))
        assert foreign_entries(folder, "conversion.json") == ["a", "conversion.json", "other"]
    with pytest.raises(ConversionError, match="holds 3 entries that persimmon-tools did not write"):
        check_output(folder, CONVERT_OUTPUT, force=True)


def test_leftovers_of_killed_unpack_and_tokenizer_runs_are_removed(releases, tmp_path):
    """A marked temp folder whose process is gone: beside DEST (unpack) or inside OUT_DIR (tokenizer)."""
    marker = {"tool": "persimmon-tools", "pid": dead_pid(), "token": "00112233aabbccdd", "role": "new"}
    stale = tmp_path / f".dest.tmp-{marker['token']}-x1"
    stale.mkdir()
    (stale / RUN_MARKER).write_text(json.dumps(marker))
    (stale / "half.pt").write_bytes(b"partial")
    result = cli("unpack", releases["tar"], tmp_path / "dest")
    assert result.exit_code == 0, result.output
    assert f"removed {stale}" in result.stderr and sorted(os.listdir(tmp_path)) == ["dest"]

    out = tmp_path / "tok"
    inner = out / f".persimmon-tools-tmp-{marker['token']}-y2"
    inner.mkdir(parents=True)
    (inner / RUN_MARKER).write_text(json.dumps(marker))
    (inner / "tokenizer.json").write_text("{}")
    vocab = tmp_path / "dest" / "tiny_release" / "adept_vocab.model"
    result = cli("tokenizer", vocab, out)
    assert result.exit_code == 0, result.output
    assert f"removed {inner}" in result.stderr
    assert sorted(os.listdir(out)) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert sorted(os.listdir(tmp_path)) == ["dest", "tok"]  # no lock file left beside OUT_DIR


def test_removing_a_replaced_folder_never_follows_a_link(tmp_path):
    """A link planted where a recorded folder was (after the check): the files it points to are kept."""
    from persimmon_tools.staged_leftovers import remove_replaced

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"precious")
    old = tmp_path / ".out.tmp-0011223344556677-z"
    old.mkdir()
    (old / "d").symlink_to(outside, target_is_directory=True)
    (old / "top.bin").write_bytes(b"ours")
    record = {"tool": "persimmon-tools", "output_files": ["conversion.json", "d/w.bin", "top.bin"]}
    (old / "conversion.json").write_text(json.dumps(record))
    remove_replaced(old, tmp_path / "out", CONVERT_OUTPUT, "0011223344556677")
    assert (outside / "w.bin").read_bytes() == b"precious"
    kept = tmp_path / "out.previous-0011223344556677"  # the link is not ours: kept, visibly
    assert sorted(os.listdir(kept)) == ["d"] and not old.exists()
