"""A correct conversion passes every check verify records (issue 24): greedy generation the same, the KL
distribution, the stored reference record (written, fingerprinted, within its size bound), the tokenizer
fingerprint, the pinned environment and one verdict per check, in verification.json and the table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from persimmon_tools.conversion.fingerprint import REFERENCE_RECORD_FILE, VERIFICATION_FILE
from persimmon_tools.errors import VerificationError
from persimmon_tools.tokenizer.fingerprint import sentencepiece_fingerprint
from persimmon_tools.tokenizer.spm import load_sp
from persimmon_tools.verification.checks import tokenizer_fingerprint
from persimmon_tools.verification.record import read_record, record_bytes
from persimmon_tools.verification.report import render_table
from persimmon_tools.verification.verify import VerifyOptions, check_passed, verify

pytest.importorskip("transformers")

CHECKS = [
    "logits",
    "generation",
    "kl",
    "tokenizer_fingerprint",
    "readers",
    "reference_record",
    "config",
    "weights",
]
ENVIRONMENT = {
    "persimmon_tools",
    "commit",
    "python",
    "torch",
    "transformers",
    "tokenizers",
    "device",
    "dtype",
    "date",
}
KL_FIGURES = {"positions", "p50", "p90", "p99", "max", "top1_agreement", "same_top_p"}


def with_fingerprint(converted_tiny: Path, folder: Path) -> Path:
    """A copy of the converted folder whose conversion.json records the SentencePiece fingerprint (written here,
    so the test does not depend on which version of convert made the folder)."""
    shutil.copytree(converted_tiny, folder)
    record = json.loads((folder / "conversion.json").read_text())
    record["tokenizer_fingerprint"] = sentencepiece_fingerprint(load_sp(folder / "tokenizer.model"))
    (folder / "conversion.json").write_text(json.dumps(record, indent=2))
    return folder


@pytest.fixture(scope="module")
def verified(converted_tiny, releases, tmp_path_factory):
    folder = with_fingerprint(converted_tiny, tmp_path_factory.mktemp("card") / "hf")
    report = verify(folder, releases["tar"], VerifyOptions(device="cpu"))
    return folder, report, json.loads((folder / VERIFICATION_FILE).read_text())


def test_every_check_passes_and_is_recorded(verified, releases) -> None:
    folder, report, data = verified
    assert report.passed and data["verdict"] == "pass" and data["checked_against"] == "source"
    assert [c["name"] for c in data["checks"]] == CHECKS
    for c in data["checks"]:
        assert set(c) == {"name", "command", "status", "figures"}
        assert c["status"] == "pass", c
        assert c["command"].startswith(f"persimmon-tools verify {folder} --reference {releases['tar']}")
    assert set(data["environment"]) == ENVIRONMENT
    assert data["environment"]["dtype"] == "fp32" and data["environment"]["device"].startswith("cpu")
    assert data["environment"]["date"].endswith("+00:00")
    table = render_table(report)
    assert "generation (16 greedy new tokens per prompt): PASS" in table
    assert "KL/position" in table and "checks: logits pass, generation pass, kl pass" in table
    assert "tokenizer fingerprint: tokenizer.json encodes the recorded probe" in table


def test_generation_is_the_same_for_every_prompt(verified) -> None:
    _, report, data = verified
    gen = data["generation"]
    assert gen["new_tokens"] == 16 and gen["verdict"] == "pass" and gen["rule"].startswith("fp32:")
    assert [p["name"] for p in gen["prompts"]] == [m.name for m in report.metrics]
    for p in gen["prompts"]:
        assert p["same"] and p["first_difference"] is None and p["passed"]
        assert p["reference"] == p["converted"] and len(p["converted"]) == 16


def test_kl_is_reported_as_a_distribution(verified) -> None:
    _, report, data = verified
    kl = data["kl"]
    assert kl["exact"] and kl["top_p"] == 0.9
    assert set(kl["overall"]) == KL_FIGURES
    assert kl["overall"]["positions"] == sum(m.tokens for m in report.metrics)
    for row, m in zip(kl["prompts"], report.metrics, strict=True):
        assert row["name"] == m.name and set(row) == KL_FIGURES | {"name"}
        assert 0 <= row["p50"] <= row["p90"] <= row["p99"] <= row["max"] <= kl["bound"]
        assert row["max"] == pytest.approx(m.kl_div_max, rel=1e-6, abs=1e-18)
        assert row["top1_agreement"] == 1.0 and row["same_top_p"] == 1.0


def test_the_reference_record_is_written_compact_and_fingerprinted(verified) -> None:
    folder, report, data = verified
    path = folder / REFERENCE_RECORD_FILE
    figures = next(c["figures"] for c in data["checks"] if c["name"] == "reference_record")
    assert data["files"][REFERENCE_RECORD_FILE] == {"sha256": figures["sha256"], "size": path.stat().st_size}
    record = read_record(folder)
    prompt_tokens = sum(len(p.ids) for p in record.prompts)
    new_tokens = sum(len(p.generated) for p in record.prompts)
    positions = prompt_tokens + new_tokens
    assert figures["positions"] == positions and figures["top_k"] == 32
    tensors = record_bytes(positions, prompt_tokens, new_tokens)
    assert tensors < record.size <= tensors + 600 * len(record.prompts) + 4096  # header and metadata
    assert record.size <= 5 << 20
    assert record.meta["source"]["files"] == data["source"]["files"]
    assert record.meta["tolerances"]["name"] == "fp32" and record.meta["new_tokens"] == 16
    for p, gen, m in zip(record.prompts, data["generation"]["prompts"], report.metrics, strict=True):
        T = len(p.ids)
        assert p.name == m.name and p.generated == gen["converted"] and p.logit_scale == m.logit_scale
        assert p.values.shape == (T + len(p.generated), 32) and p.lse.shape == (T + len(p.generated),)
        assert p.indices[T - 1 : T - 1 + len(p.generated), 0].tolist() == gen["reference"]
        assert bool((p.values[:, :-1] >= p.values[:, 1:]).all()) and bool((p.lse >= p.values[:, 0]).all())


def test_a_swapped_tokenizer_piece_fails_naming_the_tokenizer(converted_tiny, releases, tmp_path) -> None:
    folder = with_fingerprint(converted_tiny, tmp_path / "hf")
    probe_ids = json.loads((folder / "conversion.json").read_text())["tokenizer_fingerprint"]["ids"]
    a, b = probe_ids[0], next(i for i in probe_ids if i != probe_ids[0])
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]  # Unigram: [piece, score] by id
    vocab[a][0], vocab[b][0] = vocab[b][0], vocab[a][0]  # two pieces swapped, the scores left in place
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    options = VerifyOptions(device="cpu", default_prompts=False, ids=((5, 17, 250),), new_tokens=2)
    report = verify(folder, releases["tar"], options)
    assert all(m.passed for m in report.metrics)  # the weights are fine: only the tokenizer differs
    assert not report.passed
    [check] = [c for c in report.checks if c["name"] == "tokenizer_fingerprint"]
    assert check["status"] == "fail" and "first difference at position 0" in check["figures"]["problem"]
    with pytest.raises(VerificationError) as err:
        check_passed(report)
    assert err.value.exit_code == 3
    assert (
        "tokenizer.json does not encode the fingerprint probe as the source's SentencePiece model did: "
        "the probe text encodes to" in err.value.message
    )
    assert "tokenizer: tokenizer.json does not encode" in render_table(report)


def test_without_a_recorded_fingerprint_the_check_is_skipped_with_the_reason(
    converted_tiny, tmp_path
) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(converted_tiny, folder)
    record = json.loads((folder / "conversion.json").read_text())
    record.pop("tokenizer_fingerprint", None)
    (folder / "conversion.json").write_text(json.dumps(record))
    status, figures, finding = tokenizer_fingerprint(folder)
    assert status == "skipped" and finding is None
    assert figures["reason"].startswith("conversion.json records no tokenizer fingerprint")
