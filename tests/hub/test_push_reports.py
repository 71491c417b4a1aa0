"""``push --dry-run`` describes the remote as it is, and ``inspect`` and ``push`` judge staleness alike."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hub_server import HubServer

from persimmon_tools.conversion.inspect import inspect_converted
from persimmon_tools.errors import HubError
from persimmon_tools.hub.push import PushOptions, push_folder, verification_state

REPO = "alice/persimmon-8b-chat"


def run_cli(*args: str):
    from persimmon_tools.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize("flag", [[], ["--public"], ["--private"]], ids=["no-flag", "public", "private"])
def test_existing_private_repo_is_shown_private_whatever_the_flag(hub: HubServer, converted, flag) -> None:
    hub.create_repo_direct(REPO, private=True)
    result = run_cli("push", str(converted()), REPO, "--dry-run", *flag)
    assert result.exit_code == 0, result.stderr
    repo = _line(result.output, "Repository:")
    assert "exists, private" in repo and "public" not in repo.replace("--public applies", "")
    assert _line(result.output, "Revision:") == "Revision:   main (exists)"


def test_existing_public_repo_with_private_flag_says_it_stays_public(hub: HubServer, converted) -> None:
    hub.create_repo_direct(REPO, private=False)
    result = run_cli("push", str(converted()), REPO, "--dry-run", "--private")
    assert result.exit_code == 0, result.stderr
    repo = _line(result.output, "Repository:")
    assert "exists, public" in repo and "--private applies only when push creates the repo" in repo


@pytest.mark.parametrize("flag, vis", [(["--private"], "private"), (["--public"], "public")])
def test_missing_repo_would_be_created_with_main(hub: HubServer, converted, flag, vis) -> None:
    result = run_cli("push", str(converted()), REPO, "--dry-run", *flag)
    assert result.exit_code == 0, result.stderr
    assert f"would be created, {vis} (from --{vis})" in _line(result.output, "Repository:")
    revision = _line(result.output, "Revision:")
    assert revision == "Revision:   main (would be created with the repository)"
    assert "created from main" not in result.output
    assert hub.repos == {}


def test_missing_repo_without_flag_says_the_hub_default(hub: HubServer, converted) -> None:
    result = run_cli("push", str(converted()), REPO, "--dry-run")
    assert "would be created, with the Hub's default visibility" in _line(result.output, "Repository:")


def test_revision_main_never_created_from_main_but_a_branch_is(hub: HubServer, converted) -> None:
    hub.create_repo_direct(REPO)
    folder = converted()
    main = run_cli("push", str(folder), REPO, "--dry-run", "--revision", "main")
    assert main.exit_code == 0 and "created from main" not in main.output
    assert _line(main.output, "Revision:") == "Revision:   main (exists)"
    branch = run_cli("push", str(folder), REPO, "--dry-run", "--revision", "dev")
    assert _line(branch.output, "Revision:") == "Revision:   dev (would be created from main)"
    pr = run_cli("push", str(folder), REPO, "--dry-run", "--revision", "refs/pr/7")
    assert "not found: push would refuse it" in _line(pr.output, "Revision:")


def test_offline_dry_run_says_state_unknown(hub: HubServer, converted, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli("push", str(converted()), REPO, "--dry-run", "--private")
    assert result.exit_code == 0, result.stderr
    assert "state unknown (offline)" in _line(result.output, "Repository:")
    assert _line(result.output, "Revision:") == "Revision:   main (state unknown (offline))"
    assert "exists" not in _line(result.output, "Repository:") and hub.requests == []


def test_json_plan_has_the_remote_visibility(hub: HubServer, converted) -> None:
    import json

    hub.create_repo_direct(REPO, private=True)
    data = json.loads(run_cli("push", str(converted()), REPO, "--dry-run", "--json", "--public").stdout)
    assert data["plan"]["remote_private"] is True and data["plan"]["private"] is False


# ---- one staleness judgement -------------------------------------------------------------------------------


def _spoil_config(folder):
    (folder / "config.json").write_text('{"model_type": "persimmon", "edited": true}\n')


def _spoil_shard(folder):
    path = folder / "model-00002-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "spoil",
    [_spoil_config, _spoil_shard, lambda f: (f / "extra.bin").write_bytes(b"x"), lambda f: None],
    ids=["config", "same-size-shard", "added", "untouched"],
)
def test_inspect_and_push_agree_on_staleness(hub: HubServer, converted, spoil) -> None:
    folder = converted()
    spoil(folder)
    info = inspect_converted(folder)["verification"]
    state = verification_state(folder)
    assert info["state"] == state.state and info["problems"] == list(state.problems)
    if state.verified:
        assert info["status"].startswith("pass")
        push_folder(folder, REPO, PushOptions(dry_run=True))  # accepted
        return
    assert info["state"] == "stale"
    assert info["status"].startswith("stale (files changed after verification: ")
    with pytest.raises(HubError, match="refusing to publish") as err:
        push_folder(folder, REPO, PushOptions(dry_run=True))
    assert info["status"] in err.value.message
    # the CLI says the same
    out = run_cli("inspect", folder).output
    assert f"verification: {info['status']}" in out
