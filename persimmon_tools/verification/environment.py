"""What ``verify`` ran in, pinned in ``verification.json``'s ``environment``, and the command that reproduces it.

``environment``: ``persimmon_tools`` (version), ``commit`` (the checkout's HEAD when the package is installed
from a git checkout, read from ``.git`` without running git; else null), ``python``, ``torch``,
``transformers`` and ``tokenizers`` (null when not installed), ``device`` (the GPU's name, or ``cpu`` and
the processor), ``dtype``, ``date`` (ISO-8601, UTC).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from persimmon_tools import __version__
from persimmon_tools.verification.generation import DEFAULT_NEW_TOKENS

if TYPE_CHECKING:
    from persimmon_tools.verification.verify import VerifyOptions

_HEX = frozenset("0123456789abcdef")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _sha(text: str | None) -> str | None:
    return text if text is not None and len(text) == 40 and set(text) <= _HEX else None


def git_commit(root: Path | None = None) -> str | None:
    """HEAD of the git checkout the package was imported from (a worktree's ``.git`` file, a detached HEAD, a
    loose or packed branch ref); None when the package does not live in a checkout."""
    root = Path(__file__).resolve().parents[2] if root is None else root
    git = root / ".git"
    if git.is_file():  # a worktree or submodule: "gitdir: PATH"
        line = _read(git) or ""
        if not line.startswith("gitdir:"):
            return None
        git = (root / line.removeprefix("gitdir:").strip()).resolve()
    head = _read(git / "HEAD")
    if head is None:
        return None
    if not head.startswith("ref:"):
        return _sha(head)
    ref = head.removeprefix("ref:").strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (_read(git / "commondir") or ".")).resolve()
    for base in (git, common):
        found = _sha(_read(base / ref))
        if found:
            return found
    for line in (_read(common / "packed-refs") or "").splitlines():
        sha, _, name = line.partition(" ")
        if name.strip() == ref:
            return _sha(sha)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine() or 'unknown processor'})"


def environment(device: torch.device, dtype: str) -> dict[str, str | None]:
    """``verification.json``'s ``environment`` (keys in the module docstring)."""
    return {
        "persimmon_tools": __version__,
        "commit": git_commit(),
        "python": platform.python_version() or sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "device": device_name(device),
        "dtype": dtype,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def rerun_command(
    out_dir: Path, reference: Path | None, options: VerifyOptions, *, device: str, dtype: str
) -> str:
    """The ``persimmon-tools verify`` command line that runs this verification again (quoted for a shell):
    ``--reference`` when one was used, the device and dtype that ran, and the options that were not the
    defaults (``--new-tokens`` only when it is not :data:`DEFAULT_NEW_TOKENS`). Not
    :func:`persimmon_tools.conversion.fingerprint.verify_command`, which names only what convert knows."""
    words = ["persimmon-tools", "verify", str(out_dir)]
    if reference is not None:
        words += ["--reference", str(reference)]
    words += ["--device", device, "--dtype", dtype]
    if options.rotary != "hf":
        words += ["--rotary", options.rotary]
    if options.loader != "auto":
        words += ["--loader", options.loader]
    for text in options.prompts:
        words += ["--prompt", text]
    for ids in options.ids:
        words += ["--ids", ",".join(map(str, ids))]
    if not options.default_prompts:
        words.append("--no-default-prompts")
    if options.iteration is not None:
        words += ["--iteration", str(options.iteration)]
    if options.vocab is not None:
        words += ["--vocab", str(options.vocab)]
    if options.check_weights is not None:
        words.append("--check-weights" if options.check_weights else "--no-check-weights")
    if not options.hash_source:
        words.append("--no-source-hash")
    if options.new_tokens != DEFAULT_NEW_TOKENS:
        words += ["--new-tokens", str(options.new_tokens)]
    return shlex.join(words)
