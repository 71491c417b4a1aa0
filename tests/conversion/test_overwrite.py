"""`convert --force` replaces only what persimmon-tools wrote, never SOURCE or a user's files, never writes
through a symlinked OUT_DIR, and never leaves OUT_DIR missing (issue 15, items 1-2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import persimmon_tools.conversion.output_dir as output_dir
import persimmon_tools.staged_output as staged_output
from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import ConversionError
from persimmon_tools.safe_write import exchange


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_force_into_the_folder_holding_the_release_deletes_nothing(releases, tmp_path, monkeypatch):
    """The reported incident: `convert ./release.tar . --force` deleted the tarball and every other file."""
    here = tmp_path / "work"
    here.mkdir()
    shutil.copy(releases["tar"], here / "8b_chat_model_release.tar")
    (here / "notes.txt").write_text("mine")
    before = tree(here)
    monkeypatch.chdir(here)
    result = cli("convert", "8b_chat_model_release.tar", ".", "--force", "--no-verify")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "contains SOURCE" in result.stderr and "would delete it" in result.stderr
    assert tree(here) == before and sorted(os.listdir(tmp_path)) == ["work"]  # no lock, no temp folder


@pytest.mark.parametrize("what", ["source-equal", "vocab", "cwd", "home"])
def test_protected_paths_inside_out_dir_are_refused_before_reading(releases, tmp_path, monkeypatch, what):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    source, vocab = releases["tar"], None
    if what == "source-equal":
        source = out
    elif what == "vocab":
        vocab = out / "precious.txt"
    elif what == "cwd":
        monkeypatch.chdir(out)
    else:
        (out / "home").mkdir()
        monkeypatch.setenv("HOME", str(out / "home"))
    label = {"source-equal": "is SOURCE", "vocab": "the --vocab file", "cwd": "the current folder"}
    with pytest.raises(ConversionError, match=label.get(what, "your home folder")):
        convert(source, out, ConvertOptions(force=True, vocab=vocab))
    assert (out / "precious.txt").read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["out"]


def test_force_refuses_a_folder_of_foreign_files_and_lists_them(releases, tmp_path):
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    for i in range(12):
        (out / f"user-{i:02d}.txt").write_text(str(i))
    before = tree(out)
    result = cli("convert", releases["tar"], out, "--force", "--no-verify")
    assert result.exit_code == 1, result.output
    assert "holds 12 entries that persimmon-tools did not write: user-00.txt" in result.stderr
    assert "and 2 more" in result.stderr and "user-11.txt" not in result.stderr
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("record", ["missing", "garbled", "no file list", "a symlink"])
def test_a_folder_without_a_valid_record_is_not_ours(releases, tmp_path, record):
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    conv = out / "conversion.json"
    if record == "missing":
        conv.unlink()
    elif record == "garbled":
        conv.write_text("{not json")
    elif record == "no file list":
        conv.write_text(
            json.dumps({k: v for k, v in json.loads(conv.read_text()).items() if k != "output_files"})
        )
    else:
        real = tmp_path / "elsewhere.json"
        conv.rename(real)
        conv.symlink_to(real)
    before = sorted(os.listdir(out))
    with pytest.raises(ConversionError, match="did not write: config.json"):
        convert(releases["tar"], out, ConvertOptions(force=True))
    assert sorted(os.listdir(out)) == before


def test_force_replaces_an_earlier_conversion_and_its_verification(releases, tmp_path):
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    (out / "verification.json").write_text("{}")  # what `verify` adds later
    result = cli("convert", releases["tar"], out, "--force", "--dtype", "fp32", "--no-verify")
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "conversion.json").read_text())
    assert record["dtype"] == "float32" and sorted(os.listdir(out)) == record["output_files"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_symlinked_out_dir_is_refused(releases, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "theirs.txt").write_text("x")
    (tmp_path / "out").symlink_to(outside)
    for extra in ([], ["--force"]):
        result = cli("convert", releases["tar"], tmp_path / "out", "--no-verify", *extra)
        assert result.exit_code == 1 and "is a symbolic link" in result.stderr
    assert tree(outside) == {"theirs.txt": b"x"} and (tmp_path / "out").is_symlink()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert cli("convert", releases["tar"], tmp_path / "dangling", "--no-verify").exit_code == 1
    assert not (tmp_path / "nowhere").exists()


def test_files_appearing_in_out_dir_during_the_run_are_kept(releases, tmp_path):
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    before = tree(out)
    with pytest.raises(ConversionError, match="changed during the conversion") as err:
        convert(
            releases["tar"],
            out,
            ConvertOptions(force=True),
            on_plan=lambda plan: (out / "dropped-in.txt").write_text("new user file"),
        )
    kept = next(tmp_path.glob("out.new-*"))
    assert str(kept) in err.value.hint and (kept / "model.safetensors").is_file()
    assert tree(out) == {**before, "dropped-in.txt": b"new user file"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_out_dir_created_by_someone_else_during_the_run_is_kept(releases, tmp_path):
    out = tmp_path / "out"

    def meanwhile(plan):
        out.mkdir()
        (out / "theirs.txt").write_text("x")

    with pytest.raises(ConversionError, match="theirs.txt"):
        convert(releases["tar"], out, ConvertOptions(), on_plan=meanwhile)
    assert tree(out) == {"theirs.txt": b"x"} and len(list(tmp_path.glob("out.new-*"))) == 1


def test_the_swap_is_atomic_and_its_fallback_never_leaves_out_dir_missing(releases, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()

    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    before = tree(out)
    monkeypatch.setattr(staged_output, "exchange", lambda x, y: False)  # an old kernel: two renames
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2 and Path(dst) == out:
            raise KeyboardInterrupt  # Ctrl-C between the two renames
        return real_rename(src, dst)

    monkeypatch.setattr(staged_output.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        convert(releases["tar"], out, ConvertOptions(force=True, dtype="fp32"))
    assert calls[0][0] == "out" and calls[0][1].startswith(".out.old-")
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["a", "b", "out"]
    monkeypatch.undo()
    monkeypatch.setattr(staged_output, "exchange", lambda x, y: False)
    convert(releases["tar"], out, ConvertOptions(force=True, dtype="fp32"))
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "out"]


def test_a_half_done_swap_is_restored_by_the_next_run(releases, tmp_path, caplog):
    """SIGKILL between the two renames of the fallback: OUT_DIR missing, the old one in `.out.old-TOKEN`."""
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    before = tree(out)
    token = "0123456789abcdef"
    marker = {"tool": "persimmon-tools", "pid": dead_pid(), "token": token, "role": "old"}
    (out / staged_output.RUN_MARKER).write_text(json.dumps(marker))
    out.rename(tmp_path / f".out.old-{token}")
    with pytest.raises(ConversionError, match="not empty"):  # restored first, then checked as usual
        convert(releases["tar"], out, ConvertOptions())
    assert "restored" in caplog.text and tree(out) == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_force_follows_a_nested_record(releases, tmp_path):
    """conversion.json may list nested paths (as export.json does): --force replaces them and their folders,
    and still refuses an unrecorded file beside them or a recorded path reached through a link."""
    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions())
    (out / "extra" / "deeper").mkdir(parents=True)
    (out / "extra" / "deeper" / "w.bin").write_bytes(b"recorded")
    conv = out / "conversion.json"
    record = json.loads(conv.read_text())
    record["output_files"] = sorted([*record["output_files"], "extra/deeper/w.bin"])
    conv.write_text(json.dumps(record))
    assert output_dir.recorded_files(out) == record["output_files"]  # how convert lists what it wrote

    (out / "extra" / "mine.txt").write_text("mine")
    with pytest.raises(ConversionError, match="did not write: extra/mine.txt;"):
        convert(releases["tar"], out, ConvertOptions(force=True))
    (out / "extra" / "mine.txt").unlink()

    outside = tmp_path / "outside"
    (out / "extra" / "deeper").rename(outside)
    (out / "extra" / "deeper").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConversionError, match="did not write: extra/deeper;"):
        convert(releases["tar"], out, ConvertOptions(force=True))
    (out / "extra" / "deeper").unlink()
    (outside).rename(out / "extra" / "deeper")

    convert(releases["tar"], out, ConvertOptions(force=True, dtype="fp32"))
    assert not (out / "extra").exists() and json.loads(conv.read_text())["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["out"]
