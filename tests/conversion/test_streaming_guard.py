"""Guard: converting the mid-size preset (~1 GiB) in a subprocess keeps peak RSS far below the release size.

If someone makes conversion load whole tensors or shards into memory again, this fails in CI. Peak RSS is
the child's own ``ru_maxrss``, taken by a small launcher (page cache is not counted, so reading the tar
with pread does not inflate it; mmap would).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "benchmarks" / "peak_rss.py"


def _measured_convert(background, mid_started, out: Path) -> dict:
    """A background job: convert the mid release in a child, its peak RSS measured by the launcher."""
    tar = mid_started.result()
    args = [sys.executable, str(LAUNCHER), sys.executable, "-m", "persimmon_tools.cli", "convert"]
    args += [str(tar), str(out), "--no-verify", "-q", "--max-shard-size", "400MB"]
    proc = background.run(args, cwd=REPO, env=background.environ, timeout=600)
    assert "PEAK_RSS_JSON " in proc.stderr, proc.stderr[-3000:]
    measured = json.loads(proc.stderr.rsplit("PEAK_RSS_JSON ", 1)[1])
    shards = len(list(out.glob("model-*.safetensors")))
    # Not needed once counted: removed now (the session's disk use stays ~1 GiB lower).
    shutil.rmtree(out, ignore_errors=True)
    return measured | {"stderr": proc.stderr[-3000:], "shards": shards}


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the measured conversion runs in
    a child beside the tests, once the session's mid release is built (peak RSS is the child's own)."""
    out = background.roomy_scratch("streaming-guard") / "hf"
    background.started[__name__] = background.submit(
        _measured_convert, background.started["mid_release"], out
    )


@pytest.mark.slow
def test_mid_release_converts_in_bounded_memory(mid_release, background):
    tar = mid_release  # tests/conftest.py: built once per session, shared with test_interrupt.py
    size = tar.stat().st_size
    result = background.add_workers(2).started[__name__].result()
    assert result["exit_code"] == 0, result["stderr"]
    peak = result["peak_rss_bytes"]
    print(f"release {size / 2**20:.0f} MiB, convert peak RSS {peak / 2**20:.0f} MiB")
    assert size > 900 * 2**20
    assert peak < size / 2, f"peak RSS {peak} is not well below the release size {size}"
    assert peak < 600 * 2**20, "conversion working set grew beyond torch + a few chunks (~300 MiB measured)"
    assert result["shards"] >= 3
