"""persimmon_tools.testing: the pytest fixtures users load in their own CI, and docs/ci.md's shell recipe.

The fixtures are used here the way a user would: loaded as a plugin through ``pytest_plugins`` (and, in a
pytester run, from a user's conftest.py). The recipe's bash block is extracted from docs/ci.md and run as is
(the install step excepted) against fixtures/tiny_release.tar.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
from forkserver_clients import cli_path
from safetensors.torch import load_file, save_file

pytest_plugins = ["persimmon_tools.testing.fixtures", "pytester"]

REPO = Path(__file__).resolve().parent.parent
FIXTURE_TAR = REPO / "fixtures" / "tiny_release.tar"
CI_DOC = REPO / "docs" / "ci.md"


def _tensors(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_the_default_release_converts_and_verifies(persimmon_release, persimmon_converted, verify_persimmon):
    assert persimmon_release.suffix == ".tar" and persimmon_release.is_file()
    config = json.loads((persimmon_converted / "config.json").read_text())
    assert config["model_type"] == "persimmon" and config["num_hidden_layers"] == 6
    report = verify_persimmon(persimmon_converted, persimmon_release, write=False)
    assert report.passed, report.summary_line()
    assert report.device == "cpu"


def test_factories_cache_and_build_any_layout(make_persimmon_release, convert_persimmon, persimmon_converted):
    """Same seed, TP2 x PP2 as an extracted folder: a different layout of the same weights, cached per args."""
    sharded = make_persimmon_release(tp=2, pp=2, layout="folder", seed=0)
    assert sharded.is_dir() and (sharded / "iter_0001251" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    assert make_persimmon_release(tp=2, pp=2, layout="folder", seed=0) == sharded
    assert make_persimmon_release(tp=2, pp=2, layout="folder", seed=1) != sharded
    out = convert_persimmon(sharded)
    assert convert_persimmon(sharded) == out
    merged, single = _tensors(out), _tensors(persimmon_converted)
    assert merged.keys() == single.keys()
    assert all(merged[k].equal(single[k]) for k in single)
    fp32 = convert_persimmon(make_persimmon_release(dtype="fp32"))
    assert json.loads((fp32 / "config.json").read_text())["torch_dtype"] == "float32"


def test_factories_refuse_unknown_layouts_and_dtypes(make_persimmon_release):
    from persimmon_tools.errors import UsageError

    with pytest.raises(UsageError, match="layout="):
        make_persimmon_release(layout="zip")
    with pytest.raises(UsageError, match="dtype="):
        make_persimmon_release(dtype="int8")


def test_a_users_conftest_gets_the_fixtures(pytester):
    """A user's suite: conftest.py loads the plugin, a test parametrizes the release indirectly."""
    pytester.makeconftest('pytest_plugins = ["persimmon_tools.testing.fixtures"]\n')
    pytester.makepyfile(
        test_user="""
        import json
        import pytest

        @pytest.mark.parametrize("persimmon_release", [{"tp": 2, "layout": "folder"}], indirect=True)
        def test_converted(persimmon_release, persimmon_converted):
            assert persimmon_release.is_dir() and persimmon_release.name.startswith("tiny_tp2_pp1_bf16")
            assert json.loads((persimmon_converted / "config.json").read_text())["hidden_size"] == 64

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def _imports_without_pytest(background) -> subprocess.CompletedProcess:
    code = (
        "import sys, persimmon_tools.testing, persimmon_tools.conversion.convert, "
        "persimmon_tools.verification.verify, persimmon_tools.synth.build; "
        "print('pytest' in sys.modules)"
    )
    return background.run([sys.executable, "-c", code], cwd=REPO, env=background.environ, timeout=120)


def test_the_library_never_imports_pytest(started):
    """pytest stays optional: convert, verify, synth and the testing wing's __init__ import without it."""
    done = started["imports"].result()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _recipe(*, skip_convert: bool = False) -> str:
    """docs/ci.md's ``<!-- ci-recipe -->`` bash block, its install step (and optionally convert) made a no-op."""
    found = re.findall(r"<!-- ci-recipe -->\s*```bash\n(.*?)```", CI_DOC.read_text(), flags=re.S)
    assert len(found) == 1, "docs/ci.md: exactly one ```bash block marked <!-- ci-recipe -->"
    lines = found[0].splitlines()
    skip = ("pip install", *(("persimmon-tools convert",) if skip_convert else ()))
    for prefix in skip:
        hits = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert len(hits) == 1, f"the recipe has one {prefix!r} step"
        lines[hits[0]] = f": skipped in the test: {prefix}"
    return "\n".join(lines) + "\n"


def _run_recipe(background, scratch: Path, script: str, out: Path) -> subprocess.CompletedProcess:
    """The recipe, with ``scratch`` as its working directory, CHECKPOINT the fixture tar and OUT ``out``."""
    (scratch / "recipe.sh").write_text(script)
    env = dict(
        background.environ,
        CHECKPOINT=str(FIXTURE_TAR),
        OUT=str(out),
        PATH=cli_path(background, scratch.parent),  # persimmon-tools through tests/cli_forkserver.py
    )
    try:
        return background.run(["bash", str(scratch / "recipe.sh")], cwd=scratch, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the recipe in {scratch} ran past 300 s")


def _edit_rope_theta(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _swap_two_layers(folder: Path) -> None:
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    a, b = (f"model.layers.{i}.mlp.dense_h_to_4h.weight" for i in (0, 1))
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, shard, metadata={"format": "pt"})


BREAKAGES = {"rope_theta": _edit_rope_theta, "swapped": _swap_two_layers}


# convert_persimmon's conversion (the library's convert, default options), in a child process
def _recipe_on_the_fixture(background, scratch: Path) -> tuple[Path, subprocess.CompletedProcess]:
    return scratch, _run_recipe(background, scratch, _recipe(), scratch / "converted-hf")


def _recipe_on_a_broken_folder(
    background, scratch: Path, converted: Future, breakage: str
) -> tuple[Path, subprocess.CompletedProcess]:
    """The recipe without its convert step, on a copy of the converted fixture broken by ``breakage``."""
    broken = shutil.copytree(converted.result(), scratch / "converted-hf")  # submitted before this job
    BREAKAGES[breakage](broken)
    return scratch, _run_recipe(background, scratch, _recipe(skip_convert=True), broken)


def _start(background, tmp_path_factory) -> dict[str, Future]:
    key = f"{__name__}: the recipe and imports"
    if key not in background.started:
        started = {
            "imports": background.submit(_imports_without_pytest),
            "converts": background.submit(_recipe_on_the_fixture, tmp_path_factory.mktemp("recipe")),
        }
        converted = background.converted_tiny(tmp_path_factory)
        for name in BREAKAGES:
            scratch = tmp_path_factory.mktemp(f"recipe-{name}")
            started[name] = background.submit(_recipe_on_a_broken_folder, scratch, converted, name)
        background.started[key] = started
    return background.started[key]


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the recipe's three runs and the
    import check are all child processes, which run beside the tests that come before them."""
    if any("ci_recipe" in item.name or "never_imports" in item.name for item in items):
        _start(background, tmp_path_factory)


@pytest.fixture(scope="module")
def started(background, tmp_path_factory) -> dict[str, Future]:
    """The futures of this module's child-process work (started with the session, or now); pytest's own process
    waits for them from here on, so two may run at a time."""
    futures = _start(background, tmp_path_factory)
    background.add_workers(2)
    return futures


def test_the_ci_recipe_converts_and_verifies_the_fixture(started):
    tmp_path, done = started["converts"].result()
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "convert-summary.json").read_text())
    assert "config.json" in summary["files"] and "verification" not in summary  # verify is its own step
    report = json.loads((tmp_path / "verification-report.json").read_text())
    assert report["verdict"] == "pass"
    assert "::error::" not in done.stdout


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_ci_recipe_exits_3_on_a_broken_folder(started, breakage):
    tmp_path, done = started[breakage].result()
    assert done.returncode == 3, done.stdout + done.stderr
    assert "::error::verification failed" in done.stdout
    assert json.loads((tmp_path / "verification-report.json").read_text())["verdict"] == "fail"
