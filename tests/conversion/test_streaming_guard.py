"""Guard: converting the mid-size preset (~1 GiB) in a subprocess keeps peak RSS far below the release size.

If someone makes conversion load whole tensors or shards into memory again, this fails in CI. Peak RSS is
the child's own ``ru_maxrss``, taken by a small launcher (page cache is not counted, so reading the tar
with pread does not inflate it; mmap would).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parents[2] / "benchmarks" / "peak_rss.py"


def _run_measured(args: list[str]) -> tuple[int, int]:
    """Exit code and the command's own peak RSS, measured by a small launcher process (see peak_rss.py)."""
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    result = json.loads(proc.stderr.rsplit("PEAK_RSS_JSON ", 1)[1])
    assert result["exit_code"] == 0, proc.stderr
    return result["exit_code"], result["peak_rss_bytes"]


@pytest.mark.slow
def test_mid_release_converts_in_bounded_memory(mid_release, tmp_path):
    tar = mid_release  # tests/conftest.py: built once per session, shared with test_interrupt.py
    size = tar.stat().st_size
    cli = [sys.executable, "-m", "persimmon_tools.cli"]
    _, peak = _run_measured(
        [*cli, "convert", str(tar), str(tmp_path / "hf"), "--no-verify", "-q", "--max-shard-size", "400MB"]
    )
    print(f"release {size / 2**20:.0f} MiB, convert peak RSS {peak / 2**20:.0f} MiB")
    assert size > 900 * 2**20
    assert peak < size / 2, f"peak RSS {peak} is not well below the release size {size}"
    assert peak < 600 * 2**20, "conversion working set grew beyond torch + a few chunks (~300 MiB measured)"
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 3
