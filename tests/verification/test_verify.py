"""`verify` on correct conversions: tiny, TP/PP-sharded, both loaders, dtypes, report and CLI behaviour."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE, fingerprint_folder
from persimmon_tools.verification.auto_check import should_auto_verify
from persimmon_tools.verification.verify import VerifyOptions, verify

pytest.importorskip("transformers")


def convert_for_test(source: Path, out: Path) -> Path:
    """Convert with the real converter and its default options."""
    convert(source, out, ConvertOptions())
    return out


@pytest.fixture(scope="session")
def converted(releases, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("verify-converted")
    return {name: convert_for_test(releases[name], base / name) for name in ("tar", "tp2", "pp2", "tp2pp3")}


def run_cli(*args: str):
    return CliRunner().invoke(main, ["verify", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("loader", ["transformers", "persimmon-tools"])
def test_tiny_passes_with_both_loaders(converted, releases, loader):
    result = run_cli(converted["tar"], "--reference", releases["tar"], "--loader", loader)
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in result.output
    report = json.loads((converted["tar"] / VERIFICATION_FILE).read_text())
    assert report["verdict"] == "pass" and report["converted_loader"] == loader
    assert report["dtype"] == "fp32" and report["device"] == "cpu" and report["rotary"] == "hf"
    names = [m["name"] for m in report["metrics"]]
    assert names == ["plain", "chat", "code", "long"]
    long = report["metrics"][3]
    assert long["tokens"] > 256
    chat = report["metrics"][1]
    assert chat["prompt"].startswith("human: ") and chat["prompt"].endswith("\n\nadept:")
    for m in report["metrics"]:
        assert m["passed"] and m["max_abs_diff"] <= m["max_abs_tolerance"] and m["top1_agreement"] == 1.0
    assert report["weights"]["compared"] == 6 * 16 + 4 and report["weights"]["differing"] == []


def test_report_schema_and_fingerprints(converted, releases):
    report = verify(converted["tar"], releases["tar"], VerifyOptions(loader="persimmon-tools"))
    data = json.loads((converted["tar"] / VERIFICATION_FILE).read_text())
    assert data == json.loads(report.to_json())
    for key in (
        "tool",
        "tool_version",
        "created",
        "verdict",
        "device",
        "dtype",
        "rotary",
        "converted_loader",
        "source",
        "tolerances",
        "metrics",
        "diagnosis",
        "files",
    ):
        assert key in data, key
    assert data["tool"] == "persimmon-tools" and data["diagnosis"] is None
    assert data["files"] == fingerprint_folder(converted["tar"])
    assert VERIFICATION_FILE not in data["files"] and "model.safetensors" in data["files"]
    src = data["source"]
    assert (src["tp"], src["pp"], src["iteration"], src["kind"]) == (1, 1, 1251, "tar")
    # sha256 of a tar member's byte range == sha256 of that member's content
    with tarfile.open(releases["tar"]) as tf:
        for entry in src["files"]:
            blob = tf.extractfile(entry["name"]).read()
            assert entry["size"] == len(blob) and entry["sha256"] == hashlib.sha256(blob).hexdigest()
    assert any(e["name"].endswith("model_optim_rng.pt") for e in src["files"])
    for m in data["metrics"]:
        for key in (
            "prompt",
            "tokens",
            "max_abs_diff",
            "mean_abs_diff",
            "kl_div",
            "top1_agreement",
            "top5_agreement",
            "passed",
        ):
            assert key in m


@pytest.mark.parametrize("name", ["tp2", "pp2", "tp2pp3"])
def test_sharded_releases_pass(converted, releases, name):
    result = run_cli(converted[name], "-r", releases[name], "--no-source-hash", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    tp, pp = {"tp2": (2, 1), "pp2": (1, 2), "tp2pp3": (2, 3)}[name]
    assert (data["source"]["tp"], data["source"]["pp"]) == (tp, pp)
    assert len(data["source"]["files"]) == tp * pp + 1  # shards + vocabulary
    assert data["verdict"] == "pass" and all(m["passed"] for m in data["metrics"])


def test_sharded_reference_against_unsharded_conversion(converted, releases):
    """The TP=2 x PP=3 release and the TP=1 conversion hold the same model: verify agrees."""
    report = verify(converted["tar"], releases["tp2pp3"], VerifyOptions(write=False, hash_source=False))
    assert report.passed


@pytest.mark.parametrize("loader", ["transformers", "persimmon-tools"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_on_cpu_passes(converted, releases, dtype, loader):
    report = verify(
        converted["tar"],
        releases["tar"],
        VerifyOptions(dtype=dtype, loader=loader, write=False, hash_source=False),
    )
    assert report.passed, report.summary_line()
    assert report.dtype == dtype and report.tolerances["name"] == dtype


def test_adept_rotary_reports_drift_by_position(converted, releases, tmp_path):
    out = tmp_path / "report.json"
    result = run_cli(converted["tar"], "-r", releases["tar"], "--rotary", "adept", "--json-file", out)
    assert result.exit_code == 0, result.output
    assert "ADEPT's bf16 rotary" in result.output
    drift = json.loads(out.read_text())["adept_drift"]
    assert [r["positions"] for r in drift] == ["0-7", "8-63", "64-255", "256+"]
    assert all(r["max_abs_diff"] >= r["mean_abs_diff"] >= 0 for r in drift)
    assert drift[-1]["max_abs_diff"] > drift[0]["max_abs_diff"] > 0  # bf16 positions drift more far out


def test_user_prompts_and_ids(converted, releases, tmp_path):
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("human: one\\n\\nadept:\nsecond prompt\n")
    result = run_cli(
        converted["tar"],
        "-r",
        releases["tar"],
        "--no-default-prompts",
        "--prompt",
        "hello world",
        "--prompts-file",
        pfile,
        "--ids",
        "3,5,7,1023",
        "--json",
        "--no-source-hash",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert [m["name"] for m in metrics] == ["prompt1", "prompt2", "prompt3", "ids1"]
    assert metrics[1]["prompt"] == "human: one\n\nadept:"
    assert metrics[3]["prompt"] == "ids:3,5,7,1023" and metrics[3]["tokens"] == 4


def test_ids_beyond_vocabulary_are_refused(converted, releases):
    result = run_cli(converted["tar"], "-r", releases["tar"], "--ids", "1,1024")
    assert result.exit_code == 2
    assert "outside the model's 1024 rows" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_device_cuda_without_cuda_is_a_usage_error(converted, releases):
    result = run_cli(converted["tar"], "-r", releases["tar"], "--device", "cuda")
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output and "--device cpu" in result.output


def test_structural_mismatch_fails_without_running(converted, releases, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted["tar"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    result = run_cli(bad, "-r", releases["tar"], "--no-source-hash")
    assert result.exit_code == 3
    data = json.loads((bad / VERIFICATION_FILE).read_text())
    assert data["verdict"] == "fail" and data["metrics"] == []
    assert data["diagnosis"]["most_likely"]["where"] == "config.json num_hidden_layers"


def test_should_auto_verify():
    class Dims:
        def __init__(self, n):
            self.n = n

        def num_parameters(self):
            return self.n

    assert should_auto_verify(Dims(431_488)) and should_auto_verify(Dims(1_000_000_000))
    assert not should_auto_verify(Dims(9_397_175_296))
    assert should_auto_verify(Dims(9_397_175_296), device="cuda")


def test_folder_and_single_file_sources(converted, releases):
    folder = releases["folder"]
    report = verify(converted["tar"], folder, VerifyOptions(write=False, loader="persimmon-tools"))
    assert report.passed and report.source["kind"] == "folder"
    names = [f["name"] for f in report.source["files"]]
    assert any(n.endswith("mp_rank_00/model_optim_rng.pt") and not n.startswith("/") for n in names)
    pt = next(folder.rglob("model_optim_rng.pt"))
    report = verify(converted["tar"], pt, VerifyOptions(write=False, loader="persimmon-tools"))
    assert report.passed and report.source["files"][0]["name"] == "model_optim_rng.pt"
