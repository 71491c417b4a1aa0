"""The model card and the verification check, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persimmon_tools.conversion.fingerprint import fingerprint_folder
from persimmon_tools.errors import UsageError
from persimmon_tools.hub.model_card import build_model_card, detect_variant, folder_digest
from persimmon_tools.hub.push import check_verification
from persimmon_tools.safe_read import format_size


def test_card_is_deterministic(converted) -> None:
    folder = converted()
    assert str(build_model_card(folder, "a/b")) == str(build_model_card(folder, "a/b"))


def test_card_tolerates_minimal_records(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "verification.json").write_text(
        json.dumps({"verdict": "pass", "files": fingerprint_folder(folder)})
    )
    with pytest.raises(UsageError, match="licence is unknown"):
        build_model_card(folder, "a/b")
    card = build_model_card(folder, "a/b", license="apache-2.0")
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert "| Iteration | unknown |" in card.text and "Verdict: **pass**" in card.text
    assert "## Known caveats" in card.text


def test_card_states_the_bos_convention_only_when_known(converted) -> None:
    folder = converted()
    assert "BOS" not in build_model_card(folder, "a/b").text
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({"add_bos_token": True}))
    assert "prepends `|ENDOFTEXT|` as BOS" in build_model_card(folder, "a/b").text
    config.write_text(json.dumps({"add_bos_token": False}))
    assert "adds no BOS" in build_model_card(folder, "a/b").text


def test_unverified_card_says_why(converted) -> None:
    card = build_model_card(converted(), "a/b", verified=False, unverified_reason="x.bin: sha256 differs")
    assert "unverified" in card.data.tags and "x.bin: sha256 differs" in card.text


def test_detect_variant_falls_back_to_the_release_name() -> None:
    assert detect_variant({"source": {"variant": "base"}}, None) == "base"
    assert (
        detect_variant({"source": {"variant": "unknown", "name": "8b_chat_model_release.tar"}}, None)
        == "chat"
    )
    assert detect_variant(None, {"source": {"path": "/x/8b_base_model_release"}}) == "base"
    assert detect_variant(None, None) == "unknown"
    # only the release's own name counts, never other words of its path
    assert detect_variant(None, {"source": {"path": "/chat_experiments/persimmon.tar"}}) == "unknown"
    # a record that says why the variant is unknown is final
    unknown = {
        "source": {"variant": "unknown", "variant_from": "unknown: conflicting names", "name": "chat.tar"}
    }
    assert detect_variant(unknown, None) == "unknown"


def test_folder_digest_depends_on_every_file() -> None:
    a = {"x": {"sha256": "0" * 64, "size": 1}, "y": {"sha256": "1" * 64, "size": 2}}
    b = {"y": {"sha256": "1" * 64, "size": 2}, "x": {"sha256": "0" * 64, "size": 1}}
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(a) != folder_digest({**a, "y": {"sha256": "2" * 64, "size": 2}})
    assert folder_digest(a) != folder_digest({"x": a["x"]})


def test_format_size() -> None:
    assert format_size(0) == "0 B" and format_size(1536) == "1.5 KiB"
    assert format_size(5 * 1024**3) == "5.0 GiB" and format_size(None) == "unknown"
    # the one formatter: the CLI's summaries ask for two digits, messages about files keep one
    assert format_size(862976, digits=2) == "842.75 KiB" and format_size(1023, digits=2) == "1023 B"
    assert format_size(6 << 30) == "6.0 GiB" and format_size(3 << 40) == "3.0 TiB"


def test_check_verification_ignores_readme_but_not_other_new_files(converted) -> None:
    folder = converted()
    (folder / "README.md").write_text("# mine\n")  # the card is not fingerprinted
    assert check_verification(folder)[0] == []
    (folder / "notes.txt").write_text("hi")
    assert check_verification(folder)[0] == ["notes.txt: present but not recorded"]
