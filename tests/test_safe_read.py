"""persimmon_tools.safe_read: regular files only, bounded sizes, typed JSON errors, bounded object graphs."""

from __future__ import annotations

import os
import time

import pytest

from persimmon_tools.errors import ConversionError, HubError, ReleaseError, UsageError
from persimmon_tools.safe_graph import check_tree, small_repr
from persimmon_tools.safe_read import (
    open_regular,
    read_json,
    read_small,
    read_text,
    scan_folder,
)


def test_regular_file_is_read(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"1251\n")
    assert read_small(tmp_path / "a.txt", what="tracker", max_bytes=64) == b"1251\n"


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ReleaseError) as err:
        read_small(fifo, what="the vocabulary", max_bytes=64, error=ReleaseError)
    assert time.monotonic() - start < 2
    assert "FIFO" in err.value.message and str(fifo) in err.value.message and err.value.hint


def test_device_and_folder_are_refused(tmp_path):
    with pytest.raises(UsageError, match="character device"):
        read_small("/dev/zero", what="--prompts-file", max_bytes=64, error=UsageError)
    with pytest.raises(UsageError, match="a folder"):
        read_small(tmp_path, what="--prompts-file", max_bytes=64, error=UsageError)


def test_size_limit_comes_from_fstat_not_reading(tmp_path):
    big = tmp_path / "latest_checkpointed_iteration.txt"
    with open(big, "wb") as fh:
        fh.truncate(6 << 30)  # sparse: 6 GiB claimed, nothing on disk
    start = time.monotonic()
    with pytest.raises(ReleaseError) as err:
        read_small(big, what="the iteration tracker", max_bytes=1024, error=ReleaseError)
    assert time.monotonic() - start < 1
    assert "6.0 GiB" in err.value.message and "1.0 KiB" in err.value.message


def test_symlink_followed_only_when_asked(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert read_json(tmp_path / "link.json", what="config", error=HubError) == {}
    with pytest.raises(HubError, match="symbolic link"):
        read_json(tmp_path / "link.json", what="config", error=HubError, follow_symlinks=False)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConversionError, match="No such file"):
        open_regular(tmp_path / "nope", what="x", max_bytes=None, error=ConversionError)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"[1, 2]", "should hold a JSON object, found a array"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "cannot be parsed as JSON"),
    ],
)
def test_malformed_json_raises_the_callers_type(tmp_path, content, fragment):
    path = tmp_path / "conversion.json"
    path.write_bytes(content)
    with pytest.raises(ConversionError) as err:
        read_json(path, what="conversion record", error=ConversionError)
    assert fragment in err.value.message and str(path) in err.value.message


def test_read_text_rejects_non_utf8(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(UsageError, match="not UTF-8 text"):
        read_text(tmp_path / "p.txt", what="--prompts-file", max_bytes=100, error=UsageError)


def test_scan_folder_reports_links_and_fifos_without_following(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    (tmp_path / "link").symlink_to("/etc/passwd")
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub")
    os.mkfifo(tmp_path / "pipe")
    scan = scan_folder(tmp_path)
    assert scan.files == ["sub/f"]
    assert scan.irregular == {
        "dirlink": "a symbolic link",
        "link": "a symbolic link",
        "pipe": "a FIFO (named pipe)",
    }


def _bomb(levels: int) -> list:
    node: list = []
    for _ in range(levels):
        node = [node, node]
    return node


def test_check_tree_counts_unfolded_nodes_in_linear_time():
    start = time.monotonic()
    with pytest.raises(ReleaseError, match="is not a tree: it holds more than 1,000 values"):
        check_tree(_bomb(60), what="x", error=ReleaseError, limit=1000)
    assert time.monotonic() - start < 1
    assert check_tree(_bomb(3), what="x", error=ReleaseError) == 15


def test_check_tree_refuses_cycles_and_depth():
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(ReleaseError, match="is not a tree: it contains itself"):
        check_tree(cyc, what="x", error=ReleaseError)
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ReleaseError, match="nests deeper"):
        check_tree(deep, what="x", error=ReleaseError)


def test_small_repr_is_bounded_on_a_bomb():
    start = time.monotonic()
    text = small_repr(_bomb(60), 80)
    assert len(text) <= 80 and time.monotonic() - start < 1
