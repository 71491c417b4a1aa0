"""persimmon-tools: ADEPT Persimmon-8B Megatron releases → verified Hugging Face checkpoints.

The library never prints, exits or prompts; the `persimmon-tools` CLI (``persimmon_tools.cli``) is a thin
layer over it. Importing this package has no side effects and does not import torch: the public functions
below are loaded on first use.

    >>> from persimmon_tools import convert, ConvertOptions, verify, VerifyOptions  # doctest: +SKIP
    >>> convert("8b_chat_model_release.tar", "out", ConvertOptions(dtype="auto"))  # doctest: +SKIP
    >>> verify(Path("out"), Path("8b_chat_model_release.tar"), VerifyOptions(device="cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "convert": "persimmon_tools.convert",
    "prepare": "persimmon_tools.convert",
    "ConvertOptions": "persimmon_tools.convert",
    "verify": "persimmon_tools.verify",
    "VerifyOptions": "persimmon_tools.verify",
    "push_folder": "persimmon_tools.hub",
    "build_model_card": "persimmon_tools.model_card",
    "write_tokenizer": "persimmon_tools.tokenizer",
    "check_parity": "persimmon_tools.tokenizer",
    "inspect_source": "persimmon_tools.inspect",
    "unpack": "persimmon_tools.unpack",
    "open_release": "persimmon_tools.release",
    "load_release_checkpoint": "persimmon_tools.checkpoint",
    "make_release": "persimmon_tools.synth",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'persimmon_tools' has no attribute {name!r}")
