"""The package's layout stays true: wings by stage of the data, import directions checked by import-linter."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import persimmon_tools

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "persimmon_tools"
WINGS = ("megatron", "conversion", "tokenizer", "verification", "export", "hub", "synth", "cli", "testing")
ROOT_MODULES = {
    "__init__.py",
    "errors.py",
    "mapping.py",
    "ops.py",
    "safe_read.py",
    "safe_write.py",
    "safe_graph.py",
    "staged_output.py",
    "staged_leftovers.py",
    "staged_record.py",
    "workflow.py",  # convert, then the automatic verify: above conversion and verification, beside hub
}


def test_the_package_root_shows_the_wings():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert {p for p in entries if p.endswith(".py")} == ROOT_MODULES
    assert entries - ROOT_MODULES == {*WINGS, "data"}


@pytest.mark.parametrize("wing", [w for w in WINGS if w != "cli"])
def test_each_wing_says_what_it_does_and_what_it_may_import(wing):
    init = PACKAGE / wing / "__init__.py"
    tree = ast.parse(init.read_text())
    doc = ast.get_docstring(tree) or ""
    assert "May import:" in doc, f"{init}: say which wings it may import"
    assert len(tree.body) == 1, f"{init}: a docstring only (importing a wing must stay cheap)"


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: layers (nothing imports upward) and no click/tqdm below cli."""
    import logging

    from importlinter.cli import lint_imports

    # import-linter configures logging with dictConfig, which disables every logger that exists already: the
    # toolkit's loggers would then stay silent in the tests that run after this one.
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    enabled = [lg for lg in loggers if not lg.disabled]
    try:
        assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0
    finally:
        for lg in enabled:
            lg.disabled = False


def test_a_broken_direction_is_caught(tmp_path):
    """The contract is not vacuous: a copy of the package where megatron imports hub breaks it."""
    import shutil

    copy = tmp_path / "persimmon_tools"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    lazy = copy / "megatron" / "lazy.py"
    lazy.write_text(lazy.read_text() + "\nfrom persimmon_tools.hub import push  # noqa: E402,F401\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True, no_logo=True))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "pyproject.toml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "persimmon_tools.megatron is not allowed to import persimmon_tools.hub" in done.stdout


def test_public_api_names_stay_functions_after_every_module_is_imported():
    """A wing named like a public function (``convert``, ``verify``, ``unpack``) would be bound onto the
    package on import and shadow the function; the wings' names avoid that."""
    for info in pkgutil.walk_packages(persimmon_tools.__path__, "persimmon_tools."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in persimmon_tools.__all__:
        value = getattr(persimmon_tools, name)
        assert not isinstance(value, type(persimmon_tools)), f"persimmon_tools.{name} is a module"
    assert callable(persimmon_tools.convert) and callable(persimmon_tools.verify)


def test_ruff_is_clean():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "persimmon_tools",
            "tests",
            "benchmarks",
            "fixtures",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
