"""Shared by the tokenizer tests that load converted folders with transformers: Python warnings as errors, and
the ``transformers`` logger's WARNING records collected."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class Records(logging.Handler):
    """Keeps every record of level WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def warnings_as_errors() -> Iterator[Records]:
    """Python warnings raise; WARNING records of the ``transformers`` logger are collected."""
    handler = Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield handler
    finally:
        logger.removeHandler(handler)
