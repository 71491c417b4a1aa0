"""persimmon-tools: ADEPT Persimmon-8B Megatron releases → verified Hugging Face checkpoints.

The library never prints, exits or prompts; the `persimmon-tools` CLI (``persimmon_tools.cli``) is a thin
layer over it. Importing this package has no side effects and does not import torch: the public functions
below are loaded on first use.

    >>> from persimmon_tools import convert, ConvertOptions, verify, VerifyOptions  # doctest: +SKIP
    >>> convert("8b_chat_model_release.tar", "out", ConvertOptions(dtype="auto"))  # doctest: +SKIP
    >>> verify(Path("out"), Path("8b_chat_model_release.tar"), VerifyOptions(device="cpu"))  # doctest: +SKIP

``convert`` is :func:`persimmon_tools.workflow.convert`, what the ``convert`` command runs: the conversion, then
(``verify="auto"``, the default) the automatic verify on CPU for models below 1.5B parameters;
``verify="off"`` converts only, like :func:`persimmon_tools.conversion.convert.convert`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "convert": "persimmon_tools.workflow",
    "prepare": "persimmon_tools.conversion.convert",
    "ConvertOptions": "persimmon_tools.conversion.convert",
    "verify": "persimmon_tools.verification.verify",
    "VerifyOptions": "persimmon_tools.verification.verify",
    "push_folder": "persimmon_tools.hub.push",
    "PushOptions": "persimmon_tools.hub.push",
    "build_model_card": "persimmon_tools.hub.model_card",
    "write_tokenizer": "persimmon_tools.tokenizer.write",
    "TokenizerOptions": "persimmon_tools.tokenizer.write",
    "check_parity": "persimmon_tools.tokenizer.write",
    "check_tokenizer": "persimmon_tools.tokenizer.check",
    "ParityOptions": "persimmon_tools.tokenizer.check",
    "inspect_source": "persimmon_tools.conversion.inspect",
    "InspectOptions": "persimmon_tools.conversion.inspect",
    "unpack": "persimmon_tools.megatron.unpack",
    "UnpackOptions": "persimmon_tools.megatron.unpack",
    "open_release": "persimmon_tools.megatron.release",
    "load_release_checkpoint": "persimmon_tools.megatron.checkpoint",
    "make_release": "persimmon_tools.synth.build",
    "ReleaseOptions": "persimmon_tools.synth.build",
    "export_release": "persimmon_tools.export.export",
    "ExportOptions": "persimmon_tools.export.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'persimmon_tools' has no attribute {name!r}")
