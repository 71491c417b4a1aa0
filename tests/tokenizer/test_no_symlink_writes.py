"""The `tokenizer` command never writes through a symlink and never clobbers files it did not write: links
and unrecorded files of the same names in OUT_DIR are refused, their targets untouched; a symlinked OUT_DIR
is refused."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.write import write_tokenizer

NAMES = ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


@pytest.fixture
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.model"
    path.write_bytes(resources.files("persimmon_tools").joinpath("data/tiny_vocab.model").read_bytes())
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_links_inside_out_dir_are_refused_never_written_through(vocab, tmp_path):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir(), out.mkdir()
    for name in NAMES:
        (outside / name).write_text("victim")
        (out / name).symlink_to(outside / name)
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(outside / "created.json")  # dangling: would create a file outside
    result = cli("tokenizer", vocab, out)
    assert result.exit_code == 1 and "refusing to replace them" in result.stderr and "Hint:" in result.stderr
    assert {p.name: p.read_text() for p in outside.iterdir()} == dict.fromkeys(NAMES, "victim")
    assert all((out / n).is_symlink() for n in NAMES) and sorted(os.listdir(out)) == NAMES


def test_user_files_are_not_clobbered_but_a_conversion_s_own_are_replaced(vocab, tmp_path, converted_tiny):
    """Like git with untracked files: a tokenizer.json nobody recorded is the user's."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"mine": 1}')
    result = cli("tokenizer", vocab, out)
    assert result.exit_code == 1 and "tokenizer.json" in result.stderr
    assert (out / "tokenizer.json").read_text() == '{"mine": 1}' and sorted(os.listdir(out)) == [
        "tokenizer.json"
    ]
    import shutil

    folder = tmp_path / "converted"
    shutil.copytree(converted_tiny, folder)
    result = cli("tokenizer", vocab, folder, "--chat")  # files conversion.json lists: replaced
    assert result.exit_code == 0, result.stderr
    assert "chat_template" in (folder / "tokenizer_config.json").read_text()


def test_symlinked_out_dir_is_refused(vocab, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").symlink_to(outside)
    result = cli("tokenizer", vocab, tmp_path / "out")
    assert result.exit_code != 0 and "is a symbolic link" in result.stderr
    assert os.listdir(outside) == []
    with pytest.raises(TokenizerError, match="refusing to write through it"):
        write_tokenizer(vocab, tmp_path / "out")
    assert os.listdir(outside) == []
