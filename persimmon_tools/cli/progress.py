"""Progress bars: tqdm on stderr, off with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from persimmon_tools.cli import is_quiet


class ByteBar:
    """A byte-counting bar: call it with the bytes just done; :meth:`set_total` once the size is known
    (``convert`` learns it from its plan)."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def __call__(self, n_bytes: int) -> None:
        self._bar.update(n_bytes)

    def set_total(self, total: int) -> None:
        self._bar.total = total
        self._bar.refresh()


@contextmanager
def byte_progress(total: int | None, desc: str) -> Iterator[ByteBar]:
    """Yield a :class:`ByteBar` drawn on stderr (``total`` None: unknown until :meth:`ByteBar.set_total`)."""
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
        yield ByteBar(bar)
