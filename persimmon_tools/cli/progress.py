"""What a command shows on stderr while it works: one convention for every command with long work.

- **Only in a terminal.** Bars and step lines are drawn when stderr is a terminal and ``-q`` was not given;
  on a pipe or a file stderr carries log messages and errors only (:func:`progress_enabled`).
- **Binary units.** Byte bars count in KiB, MiB and GiB like every message of the toolkit
  (:func:`~persimmon_tools.safe_read.format_size`), not tqdm's decimal kB/MB. With a known total (``convert``
  learns it from its plan, ``unpack`` from the tarball's size) a bar shows the percentage and the time left;
  without one, the bytes so far and the rate.
- **Messages above the bar.** Log records (:class:`BarSafeHandler`, which ``common_options`` installs) and the
  lines of :func:`echo_above` never land on a bar's line: the bar is cleared, the line written, the bar drawn
  again below it. A bar closes itself once its total is reached, so what follows (the automatic verify) starts
  on a line of its own.
- **Steps** of work without a byte count (verify's ``readers``, ``layer k/N``, ``head``) are indented lines
  (:func:`step_progress`), the same in ``verify`` and in ``convert``'s automatic verify.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from persimmon_tools.cli import is_quiet
from persimmon_tools.safe_read import format_size

#: A byte bar whose total is known, and one whose total is not (yet).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_iec}/{total_iec} [{elapsed}<{remaining}, {rate_iec}]"
BAR_FORMAT_NO_TOTAL = "{desc}: {n_iec} [{elapsed}, {rate_iec}]"


def progress_enabled() -> bool:
    """Whether the running command draws progress: stderr is a terminal and ``-q`` was not given."""
    return not is_quiet() and sys.stderr.isatty()


class _BinaryBar(tqdm):
    """tqdm with sizes in binary units (``842.8 KiB/1.1 MiB``, ``3.2 MiB/s``) instead of tqdm's ``843k``/``kB``."""

    @property
    def format_dict(self) -> dict[str, Any]:
        fields = super().format_dict
        rate, elapsed = fields.get("rate"), fields.get("elapsed")
        if rate is None and elapsed:  # no smoothed rate yet (few updates): the average, as tqdm shows it
            rate = ((fields.get("n") or 0) - (fields.get("initial") or 0)) / elapsed
        fields.update(
            rate=rate,  # the time left ({remaining}) follows the same rate
            bar_format=BAR_FORMAT if fields.get("total") else BAR_FORMAT_NO_TOTAL,
            unit_scale=False,
            n_iec=format_size(fields.get("n") or 0),
            total_iec=format_size(fields.get("total")),
            rate_iec=f"{format_size(rate)}/s" if rate else "? B/s",
        )
        return fields


class ByteBar:
    """A byte-counting bar: call it with the bytes just done; :meth:`set_total` once the size is known
    (``convert`` learns it from its plan). It closes itself when the total is reached."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def __call__(self, n_bytes: int) -> None:
        bar = self._bar
        bar.update(n_bytes)
        if bar.total and bar.n >= bar.total:
            self.close()

    def set_total(self, total: int) -> None:
        self._bar.total = total
        self._bar.refresh()
        if total and self._bar.n >= total:
            self.close()

    def close(self) -> None:
        """Draw the bar one last time and end its line (again: nothing)."""
        self._bar.close()


@contextmanager
def byte_progress(total: int | None, desc: str) -> Iterator[ByteBar]:
    """Yield a :class:`ByteBar` drawn on stderr (``total`` None: unknown until :meth:`ByteBar.set_total`)."""
    with _BinaryBar(
        total=total,
        desc=desc,
        unit="B",
        disable=not progress_enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    ) as bar:
        yield ByteBar(bar)


def echo_above(line: str) -> None:
    """Write ``line`` on stderr above any bar being drawn (never onto the bar's line)."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def step_progress() -> Callable[[str], None]:
    """The ``progress`` callback of a phase that reports named steps (verify: ``readers: ...``,
    ``layer k/N``, ``head``, ``fingerprints``): one indented line a step where progress is drawn
    (:func:`progress_enabled`), nothing elsewhere."""
    if not progress_enabled():
        return lambda step: None
    return lambda step: echo_above(f"  {step}")


class BarSafeHandler(logging.StreamHandler):
    """A log handler for the command line: each record is written above the bars being drawn
    (``tqdm.write`` clears them, writes the line, draws them again), never glued onto a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # what logging.StreamHandler does: report on stderr, never raise
            self.handleError(record)
