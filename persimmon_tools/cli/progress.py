"""Progress bars (tqdm, stderr, off with --quiet or when stderr is not a terminal) and the summary line."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from persimmon_tools.cli import is_quiet


@contextmanager
def byte_progress(total: int | None, desc: str) -> Iterator[Callable[[int], None]]:
    """Yield a callback ``advance(n_bytes)`` driving a tqdm bar on stderr."""
    disable = is_quiet() or not sys.stderr.isatty()
    with tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    ) as bar:
        yield bar.update


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
