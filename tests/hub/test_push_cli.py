"""``persimmon-tools push`` end to end: CliRunner, and a real subprocess for SIGINT/SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_server import HubServer

# huggingface_hub passes file objects as `data=` to its HTTP client, which warns about it (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "alice/persimmon-8b-chat"


def run_cli(*args: str):
    from persimmon_tools.cli import main

    return CliRunner().invoke(main, ["push", *args], catch_exceptions=False)


def test_help_lists_the_options() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    for flag in (
        "--private / --public",
        "--revision",
        "--create-pr",
        "--commit-message",
        "--token",
        "--endpoint",
        "--dry-run",
        "--allow-unverified",
        "--license",
        "--card",
    ):
        assert flag in result.output


def test_push_prints_the_commit_url(hub: HubServer, converted) -> None:
    result = run_cli(str(converted()), REPO, "--endpoint", hub.url)
    assert result.exit_code == 0, result.output + result.stderr
    head = hub.repos[REPO].branches["main"]
    assert f"Commit: {hub.url}/{REPO}/commit/{head}" in result.output
    again = run_cli(str(converted("out")), REPO)  # same folder again; endpoint from HF_ENDPOINT
    assert again.exit_code == 0 and "Nothing to push" in again.output


def test_create_pr_prints_the_pr_url(hub: HubServer, converted) -> None:
    result = run_cli(str(converted()), REPO, "--create-pr", "--commit-message", "please merge")
    assert result.exit_code == 0, result.stderr
    assert f"Pull request: {hub.url}/{REPO}/discussions/1" in result.output
    assert hub.commits_of(REPO)[-1].message == "please merge"


def test_dry_run_prints_the_plan_and_uploads_nothing(hub: HubServer, converted) -> None:
    folder = converted()
    result = run_cli(str(folder), REPO, "--dry-run", "--private")
    assert result.exit_code == 0, result.stderr
    out = result.output
    assert (
        "Dry run" in out and f"Repository: {REPO}" in out and "would be created" in out and "private" in out
    )
    assert "Revision:   main" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("  upload ")}
    assert set(lines) == {p.name for p in folder.iterdir()} | {"README.md"}
    assert "LFS" in lines["model-00001-of-00002.safetensors"] and "regular" in lines["config.json"]
    size = (folder / "tokenizer.model").stat().st_size
    assert f"{size / 1024:.1f} KiB" in lines["tokenizer.model"]
    assert "license: cc-by-nc-4.0" in out and "pipeline_tag: text-generation" in out
    assert hub.repos == {} and hub.count("commit") == hub.count("preupload") == 0


def test_json_output(hub: HubServer, converted) -> None:
    result = run_cli(str(converted()), REPO, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["commit_url"].startswith(f"{hub.url}/{REPO}/commit/")
    assert "config.json" in data["uploaded"] and data["plan"]["verified"] is True


def test_bad_token_is_an_error_with_a_hint(hub: HubServer, converted) -> None:
    result = run_cli(str(converted()), REPO, "--token", "hf_nope")
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "401" in result.stderr
    assert "Hint: set HF_TOKEN or run `hf auth login`" in result.stderr
    assert "Traceback" not in result.stderr + result.output


def test_unverified_folder_is_refused(hub: HubServer, converted) -> None:
    folder = converted(verified=False)
    result = run_cli(str(folder), REPO)
    assert result.exit_code == 1
    assert "refusing to publish" in result.stderr and "--allow-unverified" in result.stderr
    assert hub.repos == {}
    result = run_cli(str(folder), REPO, "--allow-unverified")
    assert result.exit_code == 0, result.stderr
    assert b"unverified" in hub.file(REPO, "README.md")


def test_invalid_repo_id_is_a_usage_error(hub: HubServer, converted) -> None:
    result = run_cli(str(converted()), "datasets/alice/x")
    assert result.exit_code == 2 and "model repos" in result.stderr


# ---- signals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_upload_exits_cleanly_and_a_rerun_finishes(
    hub: HubServer, converted, tmp_path: Path, sig: signal.Signals
) -> None:
    folder = converted()
    hold = threading.Event()
    hub.hold_lfs_uploads = hold  # LFS PUTs wait until released: the push is caught mid-upload
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": hub.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    code = "from persimmon_tools.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "push", str(folder), REPO],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs inherit SIGINT ignored; Ctrl-C semantics need the default disposition
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert hub.lfs_upload_started.wait(timeout=30), "the push never reached the LFS upload"
        time.sleep(0.2)
        proc.send_signal(sig)
        time.sleep(0.5)
        hold.set()  # let uploads in flight finish so worker threads can end
        out, err = proc.communicate(timeout=30)
    finally:
        hold.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "interrupted" in err.lower()
    assert [c for c in hub.commits_of(REPO) if c.parent is not None] == []

    hub.hold_lfs_uploads = None
    puts_before = list(hub.lfs_puts)
    result = run_cli(str(folder), REPO)
    assert result.exit_code == 0, result.stderr
    assert not set(puts_before) & set(hub.lfs_puts[len(puts_before) :])  # finished objects not sent again
    assert len(hub.lfs_puts) == len(set(hub.lfs_puts)) == 3
    for path in folder.iterdir():
        assert hub.file(REPO, path.name) == path.read_bytes()
