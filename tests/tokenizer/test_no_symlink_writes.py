"""The `tokenizer` command never writes through a symlink: links in OUT_DIR are replaced, their targets
untouched; a symlinked OUT_DIR is refused (issue 15, item 4)."""

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


def test_links_inside_out_dir_are_replaced_not_written_through(vocab, tmp_path):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir(), out.mkdir()
    for name in NAMES:
        (outside / name).write_text("victim")
        (out / name).symlink_to(outside / name)
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(outside / "created.json")  # dangling: would create a file outside
    result = cli("tokenizer", vocab, out)
    assert result.exit_code == 0, result.stderr
    assert {p.name: p.read_text() for p in outside.iterdir()} == dict.fromkeys(NAMES, "victim")
    assert all((out / n).is_file() and not (out / n).is_symlink() for n in NAMES)


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
