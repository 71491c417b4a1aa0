"""pytest fixtures for CI smoke tests of persimmon-tools: synthetic releases and their converted folders.

Load them as a plugin from your ``conftest.py``::

    pytest_plugins = ["persimmon_tools.testing.fixtures"]

(or import the fixture names from this module into the conftest). Then, in a test::

    def test_my_pipeline(persimmon_converted, persimmon_release, verify_persimmon):
        assert verify_persimmon(persimmon_converted, persimmon_release).passed

    def test_sharded(make_persimmon_release, convert_persimmon):
        release = make_persimmon_release(tp=2, pp=2, layout="folder")
        out = convert_persimmon(release)

Fixtures (all session-scoped; what they build is cached for the session, keyed by the arguments):

``make_persimmon_release(preset="tiny", tp=1, pp=1, dtype="bf16", seed=0, layout="tar", **overrides) -> Path``
    a random-weight release in ADEPT's exact layout: a ``.tar`` (``layout="tar"``) or an extracted
    release folder (``layout="folder"``). ``dtype``: ``"bf16" | "fp16" | "fp32"`` or a ``torch.dtype``;
    ``overrides``: preset fields (e.g. ``layers=4``), passed to :func:`persimmon_tools.synth.build.build_release`.
``convert_persimmon(source, *, dtype="auto", **options) -> Path``
    ``source`` converted into a fresh folder (``options``: fields of
    :class:`persimmon_tools.ConvertOptions`); no verify is run.
``verify_persimmon(out_dir, reference, **options) -> VerifyReport``
    a CPU ``verify`` (``options``: fields of :class:`persimmon_tools.VerifyOptions`); never cached. Check
    ``report.passed``, or call ``persimmon_tools.verification.verify.check_passed(report)`` to raise.
``persimmon_release -> Path``
    ``make_persimmon_release()`` with the defaults (tiny, TP1, PP1, bf16, seed 0, tar); parametrize it
    indirectly with a dict of the factory's arguments:
    ``@pytest.mark.parametrize("persimmon_release", [{"tp": 2}], indirect=True)``.
``persimmon_converted -> Path``
    ``persimmon_release`` converted with the default options.

Cached paths are shared by every test of the session: treat them as read-only, and copy a folder
(``shutil.copytree``) before breaking it on purpose.

This is the only module of persimmon-tools that imports pytest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ConvertFactory",
    "ReleaseFactory",
    "convert_persimmon",
    "make_persimmon_release",
    "persimmon_converted",
    "persimmon_release",
    "verify_persimmon",
]

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
LAYOUTS = ("tar", "folder")


def _torch_dtype(dtype: Any):
    """``"bf16" | "fp16" | "fp32"`` (or the torch names, or a ``torch.dtype``) → ``torch.dtype``."""
    import torch

    from persimmon_tools.errors import UsageError

    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_NAMES.get(dtype, dtype)
    if name not in DTYPE_NAMES.values():
        raise UsageError(
            f"dtype={dtype!r}: expected one of {', '.join(DTYPE_NAMES)} or a torch.dtype",
            hint='e.g. dtype="bf16"',
        )
    return getattr(torch, name)


def _key(**kwargs: Any) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


class ReleaseFactory:
    """``make_persimmon_release``: builds synthetic releases under ``base``, once per distinct argument set."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self._cache: dict[tuple, Path] = {}

    def __call__(
        self,
        preset: str = "tiny",
        tp: int = 1,
        pp: int = 1,
        dtype: Any = "bf16",
        seed: int = 0,
        layout: str = "tar",
        **overrides: Any,
    ) -> Path:
        """Path of a random-weight release (``.tar`` or extracted folder) of this shape and seed."""
        from persimmon_tools.errors import UsageError
        from persimmon_tools.synth.build import (
            ReleaseOptions,
            build_release,
            make_release,
            write_release_folder,
        )

        if layout not in LAYOUTS:
            raise UsageError(
                f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}", hint='e.g. layout="tar"'
            )
        torch_dtype = _torch_dtype(dtype)
        key = _key(preset=preset, tp=tp, pp=pp, dtype=torch_dtype, seed=seed, layout=layout, **overrides)
        if key in self._cache:
            return self._cache[key]
        short = next(
            (k for k, v in DTYPE_NAMES.items() if v == str(torch_dtype).removeprefix("torch.")), "dt"
        )
        name = f"{preset}_tp{tp}_pp{pp}_{short}_seed{seed}_{len(self._cache)}_release"
        if layout == "tar":
            options = ReleaseOptions(
                preset=preset, tp=tp, pp=pp, dtype=torch_dtype, seed=seed, overrides=overrides
            )
            path = make_release(self.base / f"{name}.tar", options)
        else:
            rel = build_release(preset=preset, tp=tp, pp=pp, dtype=torch_dtype, seed=seed, **overrides)
            path = write_release_folder(rel, self.base / name)
        self._cache[key] = path
        return path


class ConvertFactory:
    """``convert_persimmon``: converts a source into a fresh folder under ``base``, once per source + options."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self._cache: dict[tuple, Path] = {}

    def __call__(self, source: Path | str, *, dtype: str = "auto", **options: Any) -> Path:
        """The converted Hugging Face folder of ``source`` (no verify; see ``verify_persimmon``)."""
        from persimmon_tools.conversion.convert import ConvertOptions, convert

        source = Path(source).resolve()
        key = (str(source), *_key(dtype=dtype, **options))
        if key in self._cache:
            return self._cache[key]
        out = self.base / f"{source.name.removesuffix('.tar')}-hf-{len(self._cache)}"
        convert(source, out, ConvertOptions(dtype=dtype, **options))
        self._cache[key] = out
        return out


def _verify_on_cpu(out_dir: Path | str, reference: Path | str, **options: Any):
    """``verify`` on CPU by default; returns the :class:`VerifyReport` (``.passed``, ``.to_json()``)."""
    from persimmon_tools.verification.verify import VerifyOptions, verify

    options.setdefault("device", "cpu")
    return verify(Path(out_dir), Path(reference), VerifyOptions(**options))


@pytest.fixture(scope="session")
def make_persimmon_release(tmp_path_factory: pytest.TempPathFactory) -> ReleaseFactory:
    """Factory: ``make_persimmon_release(preset="tiny", tp=1, pp=1, dtype="bf16", seed=0, layout="tar")``."""
    return ReleaseFactory(tmp_path_factory.mktemp("persimmon-releases"))


@pytest.fixture(scope="session")
def convert_persimmon(tmp_path_factory: pytest.TempPathFactory) -> ConvertFactory:
    """Factory: ``convert_persimmon(source, *, dtype="auto", **ConvertOptions fields) -> Path``."""
    return ConvertFactory(tmp_path_factory.mktemp("persimmon-converted"))


@pytest.fixture(scope="session")
def verify_persimmon() -> Callable[..., Any]:
    """Function: ``verify_persimmon(out_dir, reference, **VerifyOptions fields) -> VerifyReport`` (CPU)."""
    return _verify_on_cpu


@pytest.fixture(scope="session")
def persimmon_release(request: pytest.FixtureRequest, make_persimmon_release: ReleaseFactory) -> Path:
    """A synthetic release; defaults: tiny, TP1, PP1, bf16, seed 0, tar (indirect parametrization: a dict)."""
    params = getattr(request, "param", None) or {}
    if not isinstance(params, dict):
        raise TypeError(
            f"persimmon_release: parametrize it with a dict of make_persimmon_release's arguments, not {params!r}"
        )
    return make_persimmon_release(**params)


@pytest.fixture(scope="session")
def persimmon_converted(persimmon_release: Path, convert_persimmon: ConvertFactory) -> Path:
    """``persimmon_release`` converted with the default options (read-only: copy it before changing it)."""
    return convert_persimmon(persimmon_release)
