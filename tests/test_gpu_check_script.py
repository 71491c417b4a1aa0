"""benchmarks/gpu_check.sh without a GPU: its --dry-run plan, argument checks, and failure bookkeeping.

The failure bookkeeping's run (the script's whole tiny pass, a few seconds) goes on beside the tests
(``start_in_background``, see tests/conftest.py's ``background``); the quick --dry-run runs stay in the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _script_env(base: dict[str, str], work: Path, env: dict[str, str]) -> dict[str, str]:
    full_env = {k: v for k, v in base.items() if k not in ("OUT", "WORK", "GPU_CHECK_DEVICE")}
    full_env.update({"WORK": str(work), "PYTHON": sys.executable, **env})
    return full_env


def run_script(*args: str, work: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = _script_env(dict(os.environ), work, env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=120, cwd=REPO
    )


def plan_commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_tiny_prints_the_plan_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    result = run_script("--dry-run", "--presets", "tiny", work=work)
    assert result.returncode == 0, result.stderr
    cmds = plan_commands(result.stdout)
    cli = [c for c in cmds if "-m persimmon_tools.cli" in c]
    tar = f"{work}/tiny/tiny_release.tar"
    assert cli[0].endswith(f"make-release {tar} --preset tiny --quiet"), cli[0]
    assert cli[1].endswith(f"convert {tar} {work}/tiny/hf --no-verify --quiet"), cli[1]
    verifies = cli[2:]
    assert all(" verify " in c and "--device cuda" in c and f"--reference {tar}" in c for c in verifies)
    combos = {
        (dtype, loader, rotary)
        for c in verifies
        for dtype in ("bf16", "fp32")
        for loader in ("transformers", "persimmon-tools")
        for rotary in ("hf", "adept")
        if f"--dtype {dtype} " in c and f"--loader {loader} " in c and f"--rotary {rotary} " in c
    }
    expected = {(d, loader, "hf") for d in ("bf16", "fp32") for loader in ("transformers", "persimmon-tools")}
    assert combos == expected | {("bf16", "transformers", "adept")}
    assert len(verifies) == 5
    assert all(c.startswith("timeout --kill-after=30 ") for c in cli)
    assert "nvidia-smi" in cmds
    assert "--preset mid" not in result.stdout and "--preset 8b" not in result.stdout
    assert not any("/mid/" in c or "/8b/" in c for c in cmds)
    assert not work.exists() and not (tmp_path / "out").exists()


def test_dry_run_8b_is_bf16_only_unless_fp32_8b(tmp_path):
    plain = plan_commands(run_script("--dry-run", "--presets", "8b", work=tmp_path).stdout)
    verifies = [c for c in plain if " verify " in c]
    assert verifies and all("--dtype bf16" in c for c in verifies)
    assert any(c.startswith("df -Pk") for c in plain), "8b must check free disk space first"
    with_fp32 = plan_commands(run_script("--dry-run", "--presets", "8b", "--fp32-8b", work=tmp_path).stdout)
    assert any("--dtype fp32" in c for c in with_fp32 if " verify " in c)
    skipped = run_script("--dry-run", "--skip-8b", work=tmp_path)
    assert (
        skipped.returncode == 0 and "--preset 8b" not in skipped.stdout and "--preset mid" in skipped.stdout
    )


@pytest.mark.parametrize(
    "args", [["--presets", "tiny,huge"], ["--bogus"], ["--presets"], ["--presets", "8b", "--skip-8b"]]
)
def test_bad_arguments_exit_2(tmp_path, args):
    result = run_script("--dry-run", *args, work=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Usage:" in result.stderr


def _failing_steps(background, tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A ``background`` job: the script on tiny with a fake interpreter whose CLI verify fails, every other CLI
    command succeeds without doing anything; (its OUT, how the script ended)."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = persimmon_tools.cli ]; then\n'
        '  if [ "$3" = verify ]; then echo "boom: verify failed" >&2; exit 3; fi\n'
        "  exit 0\n"
        "fi\n"
        f'exec "{background.python()}" "$@"\n'  # tests/cli_forkserver.py: the rest from the fork server
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = _script_env(
        background.environ,
        tmp_path / "work",
        {"PYTHON": str(fake), "GPU_CHECK_DEVICE": "cpu", "OUT": str(out)},
    )
    result = background.run(["bash", str(SCRIPT), "--presets", "tiny"], cwd=REPO, env=env, timeout=120)
    return out, result


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the failure bookkeeping's run
    goes on beside the tests, in a scratch folder of its own."""
    if any(item.originalname == "test_failing_steps_are_recorded_and_the_script_goes_on" for item in items):
        background.started[f"{__name__}: failing steps"] = background.submit(
            _failing_steps, tmp_path_factory.mktemp("gpu-check-failing")
        )


def test_failing_steps_are_recorded_and_the_script_goes_on(background):
    """A fake interpreter: the CLI's verify fails, every other CLI command succeeds without doing anything."""
    out, result = background.result(f"{__name__}: failing steps")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "5 step(s) failed" in result.stderr
    assert "boom: verify failed" in result.stdout
    data = json.loads((out / "results.json").read_text())
    status = [(s["step"], s["status"], s["rc"]) for s in data["steps"]]
    assert status[:2] == [("make-release", "ok", 0), ("convert", "ok", 0)]
    assert status[2:] == [("verify", "failed", 3)] * 5 and data["failed"] == 5
    assert "| tiny | verify | bf16 | transformers | hf | failed |" in (out / "results.md").read_text()
    assert (out / "logs" / "tiny-verify-fp32-persimmon-tools-hf.log").read_text().startswith("boom")
