"""What the commands print reads right: one summary line per result (not a log line and a summary saying the
same), and counts that agree with their noun ("1 file", "1 tensor", "1 entry")."""

from __future__ import annotations

import tarfile

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main, plural


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_plural():
    assert plural(1, "tensor") == "1 tensor" and plural(0, "tensor") == "0 tensors"
    assert plural(1, "entry", "entries") == "1 entry" and plural(12, "entry", "entries") == "12 entries"


def test_make_release_says_what_it_wrote_once(tmp_path):
    out = tmp_path / "r.tar"
    result = run("make-release", out, "--tp", "2", "--dtype", "float32", "--seed", "7")
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.splitlines()  # the library's own "wrote ..." is a debug message now
    assert line.startswith(f"Wrote {out} (") and line.endswith(" MiB; preset tiny, TP=2 PP=1, fp32, seed 7).")


@pytest.mark.parametrize("command", ["convert", "export", "unpack", "make-release"])
def test_no_line_is_printed_twice(releases, converted_tiny, tmp_path, command):
    args = {
        "convert": ["convert", releases["tar"], tmp_path / "out", "--no-verify"],
        "export": ["export", converted_tiny, tmp_path / "out", "--tp", "2"],
        "unpack": ["unpack", releases["tar"], tmp_path / "out"],
        "make-release": ["make-release", tmp_path / "out.tar"],
    }[command]
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = [line.lower() for line in result.output.splitlines() if line.strip()]
    assert lines and len(set(lines)) == len(lines), result.output
    assert not any(line.startswith("wrote ") for line in lines[:-1]), (
        result.output
    )  # one "Wrote", the summary


def test_unpack_counts_one_file(tmp_path):
    (tmp_path / "c.txt").write_text("hello\n")
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        tar.add(tmp_path / "c.txt", arcname="c.txt")
    result = run("unpack", tmp_path / "one.tar", tmp_path / "d")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"Extracted 1 file (6 B) into {tmp_path / 'd'}; ")


def test_a_shard_of_one_tensor(releases, tmp_path):
    result = run("convert", releases["tar"], tmp_path / "o", "--dry-run", "--max-shard-size", "1")
    assert result.exit_code == 0, result.output
    assert "  model-00001-of-00100.safetensors: 1 tensor, 128.00 KiB" in result.stdout.splitlines()
    assert " 1 tensors" not in result.stdout


def test_tokenizer_check_of_one_text(tmp_path):
    from persimmon_tools.synth.build import bundled_vocab

    sp, corpus = tmp_path / "v.model", tmp_path / "c.txt"
    sp.write_bytes(bundled_vocab())
    corpus.write_text("one line\n", encoding="utf-8")
    result = run("tokenizer", "--check", sp, corpus)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"compared 1 text ({corpus}): 0 encode, 0 decode mismatches")


def test_one_foreign_entry(releases, tmp_path):
    from persimmon_tools import ConvertOptions
    from persimmon_tools.workflow import convert

    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions(), verify="off")
    (out / "notes.txt").write_text("mine")
    result = run("convert", releases["tar"], out, "--force", "--no-verify")
    assert result.exit_code == 1, result.output
    assert "holds 1 entry that persimmon-tools did not write: notes.txt" in result.stderr
