"""Byte sizes as people write them: ``5GB``, ``2GiB``, ``500MB``, ``1.5GB`` or plain bytes.

KB/MB/GB/TB are powers of 1000 (as huggingface_hub's ``max_shard_size``), KiB/MiB/GiB/TiB powers of 1024.
The arithmetic is exact: ``1.5GB`` is 1,500,000,000 bytes, not a float rounding of it.
"""

from __future__ import annotations

import re

MAX_SIZE = 2**63 - 1  # what safetensors offsets and torch can hold
SIZE_HINT = (
    "e.g. 5GB, 2GiB, 500MB, 1.5GB or 1048576 (bytes); KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024"
)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", re.ASCII)


def parse_size(value: int | str) -> int:
    """Bytes in ``value`` (an int, or text with an optional unit); ValueError saying what is wrong."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE_RE.fullmatch(str(value).strip())
        unit = m.group(2).upper() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError("expected a size with an optional unit")
        whole, _, frac = m.group(1).partition(".")
        size = (int(whole or "0") * 10 ** len(frac) + int(frac or "0")) * _UNITS[unit] // 10 ** len(frac)
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"expected between 1 byte and {MAX_SIZE} bytes")
    return size
