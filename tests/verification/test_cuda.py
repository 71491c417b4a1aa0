"""`verify --device cuda` on real conversions: tiny fixture and mid preset, bf16 and fp32, both loaders.

Every test here is marked ``cuda`` and is skipped (with the reason printed by ``-ra``) when torch sees no CUDA
device, so the file is collected and skipped cleanly on CPU-only machines. Run only these on a GPU with
``pytest -m cuda tests/verification/test_cuda.py`` (add ``-m "cuda and not slow"`` to leave out mid).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
TINY_TAR = REPO / "fixtures" / "tiny_release.tar"

NO_CUDA_REASON = (
    f"needs a CUDA device: torch.cuda.is_available() is False "
    f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})"
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON),
]

LOADERS = ["transformers", "persimmon-tools"]
DTYPES = ["bf16", "fp32"]


def invoke(*args) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, (
        f"persimmon-tools {' '.join(map(str, args))} exited {result.exit_code}:\n" + (result.output)
    )
    return result


def convert_release(source: Path, out: Path) -> Path:
    invoke("convert", source, out, "--no-verify", "--quiet")
    assert (out / "config.json").is_file()
    return out


def verify_on_cuda(out: Path, source: Path, dtype: str, loader: str, *extra: str) -> dict:
    """Run `verify --device cuda` through the CLI; return the verification.json it wrote, checked."""
    report_file = out / VERIFICATION_FILE
    report_file.unlink(missing_ok=True)
    result = invoke(
        "verify", out, "--reference", source, "--device", "cuda", "--dtype", dtype, "--loader", loader, *extra
    )
    assert "verdict: PASS" in result.output, result.output
    report = json.loads(report_file.read_text())
    assert report["verdict"] == "pass", json.dumps(report.get("diagnosis"), indent=2)
    assert str(report["device"]).startswith("cuda"), report["device"]
    assert report["dtype"] == dtype and report["converted_loader"] == loader
    assert report["metrics"], "no prompts were compared"
    for m in report["metrics"]:
        assert m["passed"], m
    assert report["memory"].get("cuda_max_allocated_gib", 0) > 0, report["memory"]
    return report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(converted folder, source tar) for the checked-in tiny fixture."""
    return convert_release(TINY_TAR, tmp_path_factory.mktemp("cuda-tiny") / "tiny-hf"), TINY_TAR


@pytest.fixture(scope="module")
def mid(mid_release, tmp_path_factory) -> tuple[Path, Path]:
    """(converted folder, source tar) for the session's mid-preset release (~1 GB, tests/conftest.py)."""
    return convert_release(mid_release, tmp_path_factory.mktemp("cuda-mid") / "mid-hf"), mid_release


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_verifies_on_cuda(tiny, dtype, loader):
    out, source = tiny
    report = verify_on_cuda(out, source, dtype, loader)
    assert report["weights"]["differing"] == []


def test_tiny_adept_rotary_on_cuda(tiny):
    out, source = tiny
    report = verify_on_cuda(out, source, "bf16", "persimmon-tools", "--rotary", "adept")
    assert report["rotary"] == "adept" and report.get("adept_drift")


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mid_verifies_on_cuda(mid, dtype, loader):
    out, source = mid
    verify_on_cuda(out, source, dtype, loader)
