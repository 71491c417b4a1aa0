"""Library callers get the same typed errors as the CLI for malformed option values (no raw ValueError)."""

from __future__ import annotations

import pytest

from persimmon_tools import ConvertOptions, convert
from persimmon_tools.conversion.sizes import parse_size
from persimmon_tools.errors import UsageError
from persimmon_tools.synth.build import build_release


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("1.5GB", 1_500_000_000), (7, 7)],
)
def test_sizes_parse_exactly(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["abc", "5BC", "", "0", "-1", "1e3", 0, 2**63])
def test_convert_refuses_a_malformed_max_shard_size(releases, tmp_path, bad):
    with pytest.raises(UsageError, match="max shard size"):
        convert(releases["tar"], tmp_path / "out", ConvertOptions(max_shard_size=bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "flag"), [({"tp": 0}, "tp="), ({"pp": -1}, "pp="), ({"seed": 2**32}, "seed=")]
)
def test_build_release_refuses_impossible_layouts_and_seeds(kw, flag):
    with pytest.raises(UsageError, match=flag):
        build_release(**kw)
