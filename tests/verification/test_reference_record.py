"""``verify OUT_DIR`` with no usable source checks the folder against its stored reference record (issue 24):
a folder as converted passes, saying so; a weight changed after conversion fails (exit 3); the record is one
of the folder's own files for ``convert --force``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from persimmon_tools.conversion.fingerprint import CONVERSION_FILE, REFERENCE_RECORD_FILE, VERIFICATION_FILE
from persimmon_tools.conversion.output_dir import CONVERT_OUTPUT
from persimmon_tools.errors import UsageError, VerificationError
from persimmon_tools.staged_record import foreign_entries
from persimmon_tools.verification.report import render_table
from persimmon_tools.verification.stored import AGAINST
from persimmon_tools.verification.verify import VerifyOptions, check_passed, verify

pytest.importorskip("transformers")

FAST = VerifyOptions(device="cpu", default_prompts=False, ids=((5, 17, 250, 3, 99, 7),), prompts=("a b c",))


@pytest.fixture(scope="module")
def recorded(converted_tiny, releases, tmp_path_factory) -> Path:
    """A converted folder verified against its source (which writes the record); then its recorded source is
    made to be gone: conversion.json names a path that no longer exists."""
    folder = tmp_path_factory.mktemp("record") / "hf"
    shutil.copytree(converted_tiny, folder)
    assert verify(folder, releases["tar"], FAST).passed
    conv = json.loads((folder / CONVERSION_FILE).read_text())
    conv["source"]["path"] = str(folder.parent / "gone" / "tiny_release.tar")
    (folder / CONVERSION_FILE).write_text(json.dumps(conv, indent=2))
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "hf")
    return tmp_path / "hf"


def test_without_a_source_the_folder_is_checked_against_the_record(recorded, tmp_path) -> None:
    folder = copy_of(recorded, tmp_path)
    record_bytes = (folder / REFERENCE_RECORD_FILE).read_bytes()
    report = verify(folder, None, VerifyOptions(device="cpu"))
    check_passed(report)
    assert report.checked_against == "stored reference record"
    assert AGAINST == "checked against the stored reference record, not the source"
    assert AGAINST in report.summary_line() and AGAINST in render_table(report)
    data = json.loads((folder / VERIFICATION_FILE).read_text())
    assert data["source"]["reference_from"].startswith(f"{REFERENCE_RECORD_FILE} (no usable source: ")
    assert "no longer exists" in data["source"]["reference_from"]
    statuses = {c["name"]: c["status"] for c in data["checks"]}
    assert statuses == {
        "logits": "pass", "generation": "pass", "kl": "pass", "tokenizer_fingerprint": statuses["tokenizer_fingerprint"],
        "readers": "skipped", "reference_record": "pass", "config": "pass", "weights": "skipped",
    }  # fmt: skip
    assert [m.name for m in report.metrics] == ["prompt1", "ids1"]  # the recorded prompts
    assert not data["kl"]["exact"] and data["kl"]["overall"]["max"] <= data["kl"]["bound"]
    assert all(p["same"] for p in data["generation"]["prompts"])
    assert (folder / REFERENCE_RECORD_FILE).read_bytes() == record_bytes  # the record is not rewritten
    assert data["files"][REFERENCE_RECORD_FILE]["size"] == len(record_bytes)


def test_a_weight_changed_after_conversion_fails_against_the_record(recorded, tmp_path) -> None:
    folder = copy_of(recorded, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.2.mlp.dense_4h_to_h.weight"
    tensors[key] = tensors[key] * 1.01  # 1 % on one tensor: the folder stays otherwise as it was
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    report = verify(folder, None, VerifyOptions(device="cpu"))
    assert not report.passed and report.checked_against == "stored reference record"
    assert not any(m.passed for m in report.metrics)
    with pytest.raises(VerificationError) as err:
        check_passed(report)
    assert err.value.exit_code == 3
    assert AGAINST in err.value.message and "over the stored top-32" in err.value.message
    assert "does not compute what its stored reference record holds" in err.value.message
    changed = err.value.message.split("files changed since the last verification.json: ")[1]
    assert "model.safetensors" in changed.split(", ")  # (and conversion.json, edited by the fixture)
    assert json.loads((folder / VERIFICATION_FILE).read_text())["verdict"] == "fail"


def test_without_a_record_and_without_a_source_verify_needs_reference(recorded, tmp_path) -> None:
    folder = copy_of(recorded, tmp_path)
    (folder / REFERENCE_RECORD_FILE).unlink()
    with pytest.raises(UsageError, match="no longer exists"):
        verify(folder, None, VerifyOptions(device="cpu"))


def test_the_record_is_the_folders_own_file_for_force(recorded) -> None:
    assert REFERENCE_RECORD_FILE in CONVERT_OUTPUT.also_own
    assert foreign_entries(recorded, CONVERT_OUTPUT.record, CONVERT_OUTPUT.also_own) == []


@pytest.mark.parametrize(
    "content, words",
    [(b"", "shorter than a safetensors header"), (b"\x08" + bytes(7) + b"not json", "no safetensors header")],
)
def test_a_damaged_record_is_named_not_a_traceback(recorded, tmp_path, content, words) -> None:
    folder = copy_of(recorded, tmp_path)
    (folder / REFERENCE_RECORD_FILE).write_bytes(content)
    with pytest.raises(
        VerificationError,
        match=f"{REFERENCE_RECORD_FILE} \\(the stored reference record\\) is damaged: {words}",
    ) as err:
        verify(folder, None, VerifyOptions(device="cpu"))
    assert err.value.hint == "run verify with --reference SOURCE, which writes the record again"


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("tokenizer_config.json", lambda d: {**d, "add_bos_token": not d.get("add_bos_token")}),
        ("special_tokens_map.json", lambda d: {**d, "bos_token": "<unk>"}),
        ("generation_config.json", lambda d: {**d, "eos_token_id": 0}),
    ],
)
def test_a_file_edited_after_verification_fails_against_the_record_every_time(recorded, tmp_path, name, edit):
    """Files that change what users get without changing a logit (tokenizer settings, generation defaults)
    are held to the folder the record was made for; a failing run does not make the edit the new baseline."""
    folder = copy_of(recorded, tmp_path)
    path = folder / name
    path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=2))
    for _ in range(2):
        report = verify(folder, None, VerifyOptions(device="cpu"))
        assert not report.passed
        with pytest.raises(
            VerificationError, match=rf"differ from the folder the record was made for \({name}: changed\)"
        ):
            check_passed(report)
    (folder / "notes.txt").write_text("mine")
    report = verify(folder, None, VerifyOptions(device="cpu", write=False))
    assert "notes.txt: not in the verified folder" in (report.diagnosis or {}).get("summary", "")
