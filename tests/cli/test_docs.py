"""Docs stay true: the CLI reference matches --help, README links resolve, the quick start names real files.

The package's import check runs in a fresh interpreter beside the tests (``start_in_background``, see
tests/conftest.py's ``background``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from persimmon_tools.cli.docs import cli_reference_markdown

REPO = Path(__file__).resolve().parents[2]


def test_cli_reference_is_up_to_date():
    committed = (REPO / "docs" / "cli.md").read_text()
    assert committed == cli_reference_markdown(), "run: python -m persimmon_tools.cli.docs > docs/cli.md"


def test_readme_and_docs_links_resolve():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if target.startswith("http"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_quick_start_uses_the_committed_fixture_and_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "persimmon-tools convert fixtures/tiny_release.tar" in readme
    assert (REPO / "fixtures" / "tiny_release.tar").is_file()
    test_cmd = "pip install -c constraints.txt -e '.[test]' && python -m pytest -q"
    assert test_cmd in readme
    assert test_cmd in (REPO / ".ci" / "run").read_text()


#: A fresh interpreter imports the package: no torch yet, every name of ``__all__`` resolves.
IMPORT_CHECK = (
    "import sys, persimmon_tools as p; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
    "[getattr(p, n) for n in p.__all__]; print('ok')"
)


def _import_check(background) -> subprocess.CompletedProcess:
    """A ``background`` job: :data:`IMPORT_CHECK` in a child."""
    return background.run([sys.executable, "-c", IMPORT_CHECK], cwd=REPO, env=background.environ, timeout=120)


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the import check's child runs
    beside the tests."""
    if any(item.originalname == "test_package_import_is_light_and_exposes_the_public_api" for item in items):
        background.started[__name__] = background.submit(_import_check)


def test_package_import_is_light_and_exposes_the_public_api(background):
    out = background.result(__name__)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
