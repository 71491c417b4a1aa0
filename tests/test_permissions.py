"""Outputs follow the umask, for every writer (issue 23, part F, item 1).

Temporary folders are private (``mkdtemp``: 0700) while they are written; once installed, an output folder,
the folders in it and the folders made above it are ``0o777 & ~umask`` and its files ``0o666 & ~umask``,
what ``mkdir`` and ``open()`` give. Each command runs in-process (``CliRunner``) under umask 022 and 027,
set with ``os.umask`` around the call and restored after it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.safe_write import atomic_file, current_umask, file_mode, publish_modes

VOCAB = Path(__file__).resolve().parents[1] / "persimmon_tools" / "data" / "tiny_vocab.model"
UMASKS = (0o022, 0o027)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def cli(mask: int, *args) -> None:
    with umask(mask):
        result = CliRunner().invoke(main, [str(a) for a in args] + ["-q"])
    assert result.exit_code == 0, result.output


def modes(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``root`` ("."), everything under it; links are left out."""
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for path in root.rglob("*"):
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode):
            found[path.relative_to(root).as_posix()] = stat.S_IMODE(st.st_mode)
    return found


def expected(root: Path, mask: int) -> dict[str, int]:
    want = {".": (0o777 if root.is_dir() else 0o666) & ~mask}
    for path in root.rglob("*"):
        want[path.relative_to(root).as_posix()] = (0o777 if path.is_dir() else 0o666) & ~mask
    return want


def check(root: Path, mask: int, *, nested: bool = False) -> None:
    got = modes(root)
    assert got == expected(root, mask), {k: oct(v) for k, v in got.items()}
    if nested:
        assert any(p.is_dir() for p in root.rglob("*")), f"{root} should hold folders"
    # nothing private was left beside the output either (no temp folder, no lock)
    assert not [p.name for p in root.parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, releases) -> Path:
    out = tmp_path_factory.mktemp("perm-src") / "hf"
    cli(0o022, "convert", releases["tar"], out, "--no-verify")
    return out


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask027"])
def test_convert(releases, tmp_path, mask):
    out = tmp_path / "made" / "above" / "hf"  # the two folders above OUT_DIR are made too
    cli(mask, "convert", releases["tar"], out, "--no-verify", "--chat")
    check(out, mask)
    assert {"model.safetensors", "chat_template.jinja", "conversion.json"} <= set(os.listdir(out))
    for folder in (tmp_path / "made", tmp_path / "made" / "above"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask027"])
def test_export_folder_and_tar(hf_folder, tmp_path, mask):
    cli(mask, "export", hf_folder, tmp_path / "exp", "--tp", "2")
    check(tmp_path / "exp", mask, nested=True)  # NAME/iter_*/mp_rank_*/model_optim_rng.pt
    cli(mask, "export", hf_folder, tmp_path / "exp.tar", "--tar")
    check(tmp_path / "exp.tar", mask)


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask027"])
def test_tokenizer_into_a_new_and_an_existing_folder(tmp_path, mask):
    cli(mask, "tokenizer", VOCAB, tmp_path / "tok", "--chat")
    check(tmp_path / "tok", mask)
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o700)  # the user's own folder keeps its mode; the files added follow the umask
    cli(mask, "tokenizer", VOCAB, existing)
    assert modes(existing) == {**expected(existing, mask), ".": 0o700}


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask027"])
def test_make_release_and_unpack(tmp_path, mask):
    cli(mask, "make-release", tmp_path / "r.tar", "--tp", "2", "--pp", "2")
    check(tmp_path / "r.tar", mask)
    cli(mask, "unpack", tmp_path / "r.tar", tmp_path / "new")  # a new DEST
    check(tmp_path / "new", mask, nested=True)
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o700)
    cli(mask, "unpack", tmp_path / "r.tar", parent)  # an existing DEST: the release goes into DEST/r
    check(parent / "r", mask, nested=True)
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700  # the user's folder is not changed


def test_a_file_replaced_atomically_follows_the_umask(tmp_path):
    """``atomic_file`` (verification.json, report files) writes through ``mkstemp`` (0600)."""
    for mask in UMASKS:
        with umask(mask), atomic_file(tmp_path / "report.json", "report", PersimmonToolsError) as fh:
            fh.write(b"{}")
        assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~mask


def test_the_umask_is_read_without_changing_it():
    for mask in (0o022, 0o027, 0o002, 0o077):
        with umask(mask):
            assert current_umask() == mask and file_mode() == 0o666 & ~mask
            assert os.umask(mask) == mask  # still what it was


def test_publish_modes_leaves_links_and_keeps_execute_bits(tmp_path):
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True, mode=0o700)
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o700)
    (root / "data").write_text("x")
    os.chmod(root / "data", 0o600)
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    (root / "link").symlink_to(outside)
    with umask(0o027):
        publish_modes(root)
    assert modes(root) == {".": 0o750, "sub": 0o750, "run.sh": 0o750, "data": 0o640}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # never followed
