"""The card's environment, per-check table, tokenizer fingerprint and re-check instructions (verification.json
and conversion.json as recorded since 2026-12-07, and older ones), and the upload of the reference record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer

from persimmon_tools.errors import HubError
from persimmon_tools.hub.model_card import build_model_card
from persimmon_tools.hub.push import PushOptions, push_folder
from persimmon_tools.tokenizer.fingerprint import record

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "alice/persimmon-8b-chat"
REFERENCE = "verification_reference.record"
VERIFY = "persimmon-tools verify ./out --reference /data/8b_chat_model_release.tar"
ENVIRONMENT = {
    "persimmon_tools": "0.2.0",
    "commit": "7f10d75222e3",
    "python": "3.11.9",
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "tokenizers": "0.23.3",
    "device": "cuda (NVIDIA H100 80GB HBM3)",
    "dtype": "bfloat16",
    "date": "2026-12-07T12:00:00+00:00",
}
FIGURES = {
    "logits": {"max_abs_diff": 0.0123, "mean_abs_diff": 0.0011},
    "generation": {"new_tokens": 32, "identical": 5},
    "kl": {"p99": 3.1e-5, "max": 2.2e-4},
    "tokenizer_fingerprint": {"ids": 282},
    "readers": {"tensors_compared": 388},
    "reference_record": {"logits": 5},
}


def recorded_keys(command: str = VERIFY, **changes: Any) -> dict[str, Any]:
    """The keys verify adds to verification.json since 2026-12-07 (``command``: the reference_record
    check's)."""
    checks = [
        {"name": name, "command": VERIFY, "status": "pass", "figures": figures}
        for name, figures in FIGURES.items()
    ]
    checks[-1]["command"] = command
    keys = {
        "environment": ENVIRONMENT,
        "checks": checks,
        "generation": {"new_tokens": 32, "prompts": [{}] * 5, "verdict": "pass", "rule": "the same tokens"},
        "kl": {
            "overall": {
                "p50": 1e-7,
                "p90": 4e-6,
                "p99": 3.1e-5,
                "max": 2.2e-4,
                "top1_agreement": 1.0,
                "same_top_p": 0.998,
            },
            "prompts": [{}] * 5,
        },
    }
    return {**keys, **changes}


def with_fingerprint(folder: Path) -> str:
    """Record a tokenizer fingerprint in the folder's conversion.json; returns its sha256."""
    conv = json.loads((folder / "conversion.json").read_text())
    conv["tokenizer_fingerprint"] = record([71013, 12, 7])
    (folder / "conversion.json").write_text(json.dumps(conv))
    return conv["tokenizer_fingerprint"]["sha256"]


def test_card_shows_environment_checks_fingerprint_and_how_to_recheck(converted) -> None:
    folder = converted()
    sha = with_fingerprint(folder)
    (folder / REFERENCE).write_bytes(b"reference record" * 64)
    converted.reverify(folder, **recorded_keys("persimmon-tools verify ./out"))
    text = build_model_card(folder, REPO).text
    for key, value in ENVIRONMENT.items():
        assert value in text, key
    assert "| persimmon-tools | 0.2.0 (commit `7f10d75222e3`) |" in text and "| torch | 2.13.0 |" in text
    assert "| check | verdict | key figures | command |" in text
    assert f"| logits | pass | max_abs_diff 0.0123, mean_abs_diff 0.0011 | `{VERIFY}` |" in text
    assert all(f"| {name} | pass |" in text for name in FIGURES)
    assert "| reference_record | pass | logits 5 | `persimmon-tools verify ./out` |" in text
    assert "Greedy generation: pass, 32 new tokens on each of 5 prompt(s); rule: the same tokens." in text
    assert "| 1e-07 | 4e-06 | 3.1e-05 | 0.00022 | 1 | 0.998 |" in text
    assert f"| Tokenizer fingerprint | `sha256:{sha}` (ids-v1) |" in text
    assert "## Re-check a downloaded copy" in text
    assert "hf download alice/persimmon-8b-chat --local-dir ./persimmon-8b-chat" in text
    assert (
        "`persimmon-tools verify ./persimmon-8b-chat` checks the downloaded copy against the reference"
        in text
    )
    assert "without ADEPT's source release" in text
    assert "`persimmon-tools verify ./persimmon-8b-chat --reference 8b_chat_model_release.tar`" in text
    assert "not recorded" not in text


def test_card_renders_older_records_and_says_what_is_not_recorded(converted) -> None:
    folder = converted()  # verification.json and conversion.json as written before 2026-12-07
    text = build_model_card(folder, REPO).text
    assert "| persimmon-tools | 0.1.0 (commit not recorded) |" in text and "| torch | not recorded |" in text
    assert "| Device | cpu |" in text and "| Date | 2024-05-01T12:00:00+00:00 |" in text
    assert "Per-check results: not recorded" in text and "Greedy generation: not recorded." in text
    assert "| Tokenizer fingerprint | not recorded |" in text
    assert "holds no stored reference record" in text
    assert "persimmon-tools verify ./persimmon-8b-chat --reference 8b_chat_model_release.tar" in text
    # a report with some of the checks: the others are rows saying so
    some = recorded_keys(checks=[{"name": "logits", "command": VERIFY, "status": "fail", "figures": None}])
    del some["kl"], some["environment"]
    converted.reverify(folder, **some)
    text = build_model_card(folder, REPO, verified=False).text
    assert "| logits | **fail** | — |" in text and "| readers | not recorded | — |" in text
    assert f"Every check ran with `{VERIFY}`." in text  # one command, shown once
    assert "KL divergence (reference ‖ converted, per position): not recorded." in text
    skipped = {"name": "tokenizer_fingerprint", "command": VERIFY, "status": "skipped"}
    skipped["figures"] = {"reason": "conversion.json records no tokenizer fingerprint", "sha256": "ab" * 32}
    converted.reverify(folder, **recorded_keys(checks=[skipped]))
    text = build_model_card(folder, REPO, verified=False).text
    reason = "reason conversion.json records no tokenizer fingerprint"
    assert f"| tokenizer_fingerprint | skipped | {reason}, sha256 abababababab… |" in text
    (folder / "verification.json").unlink()  # no report at all: the card still says how to re-check
    text = build_model_card(folder, REPO, verified=False).text
    assert "No verification report" in text and "## Re-check a downloaded copy" in text


def test_a_damaged_new_key_is_named(hub: HubServer, converted) -> None:
    folder = converted()
    converted.reverify(folder, **recorded_keys(environment={**ENVIRONMENT, "torch": ["2.13.0"]}))
    with pytest.raises(HubError, match="environment.torch"):
        push_folder(folder, REPO, PushOptions(dry_run=True, endpoint=hub.url))


def _push(folder: Path, hub: HubServer):
    return push_folder(folder, REPO, PushOptions(endpoint=hub.url, retry_base_delay=0.001))


def test_push_uploads_the_reference_record(hub: HubServer, converted) -> None:
    data = b"reference recor\x00" * 64  # binary, like the real record: the Hub stores it through LFS
    folder = converted()
    (folder / REFERENCE).write_bytes(data)
    converted.reverify(folder, **recorded_keys())  # verify fingerprints the record like the weights
    result = _push(folder, hub)
    assert REFERENCE in result.uploaded and hub.file(REPO, REFERENCE) == data
    [commit] = [c for c in hub.commits_of(REPO) if c.parent is not None]
    assert hub.repos[REPO].commits[commit.oid].tree[REFERENCE].lfs_oid is not None
    assert "`verification_reference.record`, 1.0 KiB, sha256" in hub.file(REPO, "README.md").decode()


def test_a_folder_without_the_reference_record_still_pushes(hub: HubServer, converted) -> None:
    folder = converted()
    converted.reverify(folder, **recorded_keys())
    result = _push(folder, hub)
    assert result.commit_url and REFERENCE not in result.uploaded
