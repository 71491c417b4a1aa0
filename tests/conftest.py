"""Shared fixtures: synthetic releases built once per session with the toolkit's own generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from persimmon_tools.synth.build import build_release, make_release, write_release_folder

REPO = Path(__file__).resolve().parent.parent
FIXTURE_TAR = REPO / "fixtures" / "tiny_release.tar"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def releases(tmp_path_factory) -> dict[str, Path]:
    """Tiny releases (seed 0) in several layouts: tar TP1, TP2, PP2, TP2xPP3, and an extracted folder."""
    base = tmp_path_factory.mktemp("releases")
    out = {"tar": base / "tiny_release.tar"}
    shutil.copy(FIXTURE_TAR, out["tar"])
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("tp2pp3", 2, 3)):
        out[name] = make_release(base / f"{name}_release.tar", tp=tp, pp=pp, seed=0)
    out["folder"] = write_release_folder(build_release(seed=0), base / "tiny_folder_release")
    return out


@pytest.fixture(scope="session")
def converted_tiny(releases, tmp_path_factory) -> Path:
    """The tiny fixture converted once with default options (no verify)."""
    from persimmon_tools.conversion.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("converted") / "tiny-hf"
    convert(releases["tar"], out, ConvertOptions())
    return out


@pytest.fixture
def approximate_charsmap(monkeypatch):
    """Make the tokenizer builder use tokenizers' own grapheme-wise Precompiled normalizer (the pipeline
    before the exact charsmap: dummy prefix after the charsmap), which is wrong on stacked marks and CR LF.
    Call it after building whatever should stay exact."""
    from tokenizers import normalizers

    import persimmon_tools.tokenizer.build as build

    def precompiled_only(blob, users, dummy="", suffix=""):
        return (normalizers.Precompiled(blob), *([normalizers.Prepend(dummy)] if dummy else []))

    return lambda: monkeypatch.setattr(build, "exact_charsmap_steps", precompiled_only)
