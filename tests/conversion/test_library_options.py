"""Library callers get the same typed errors as the CLI for malformed option values (no raw ValueError)."""

from __future__ import annotations

import pytest

import persimmon_tools
from persimmon_tools import ConvertOptions, convert
from persimmon_tools.conversion.sizes import parse_size
from persimmon_tools.errors import UsageError
from persimmon_tools.synth.build import build_release


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("1.5GB", 1_500_000_000), (7, 7)],
)
def test_sizes_parse_exactly(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["abc", "5BC", "", "0", "-1", "1e3", 0, 2**63])
def test_convert_refuses_a_malformed_max_shard_size(releases, tmp_path, bad):
    with pytest.raises(UsageError, match="max shard size"):
        convert(releases["tar"], tmp_path / "out", ConvertOptions(max_shard_size=bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "flag"), [({"tp": 0}, "tp="), ({"pp": -1}, "pp="), ({"seed": 2**32}, "seed=")]
)
def test_build_release_refuses_impossible_layouts_and_seeds(kw, flag):
    with pytest.raises(UsageError, match=flag):
        build_release(**kw)


def test_the_public_convert_is_the_workflow_and_the_conversion_step_stays_apart():
    from persimmon_tools import conversion, workflow

    assert persimmon_tools.convert is workflow.convert
    assert workflow.convert is not conversion.convert.convert  # the conversion alone, without verify


@pytest.mark.parametrize("bad", ["on", "", "cuda", None])
def test_an_unknown_verify_mode_is_a_usage_error(releases, tmp_path, bad):
    from persimmon_tools.workflow import plan_summary

    with pytest.raises(UsageError, match="verify must be one of auto, off"):
        convert(releases["tar"], tmp_path / "out", verify=bad)
    with pytest.raises(UsageError, match="verify must be one of auto, off"):
        plan_summary(releases["tar"], verify=bad)
    assert not (tmp_path / "out").exists()


def test_plan_summary_says_whether_the_automatic_verify_would_run(releases):
    from persimmon_tools.workflow import plan_summary

    auto = plan_summary(releases["tar"])
    assert auto["verify"]["runs"] is True and auto["verify"]["estimated_seconds"] > 0
    assert plan_summary(releases["tar"], verify="off")["verify"] == {"runs": False, "why": "--no-verify"}


def test_convert_without_verify_reports_progress_up_to_the_planned_total(releases, tmp_path):
    """``on_plan`` gives the total that ``progress`` adds up to (the CLI's bar gets its size from it)."""
    done, totals = [], []
    report = convert(
        releases["tar"],
        tmp_path / "out",
        ConvertOptions(tokenizer=False),
        verify="off",
        progress=done.append,
        on_plan=lambda plan: totals.append(plan.shards.total_size),
    )
    assert report.verify is None and len(totals) == 1 and sum(done) == totals[0] > 0
    summary = report.summary()
    assert "verify" not in summary and "verification" not in summary
    assert summary["convert"] == {"seconds": summary["seconds"], "peak_rss_bytes": summary["peak_rss_bytes"]}
    assert summary["bytes"] == report.conversion.stats.bytes_written and summary["out_dir"] == str(
        report.out_dir
    )


def test_a_model_too_large_for_the_automatic_check_is_skipped_with_its_reason(
    releases, tmp_path, monkeypatch
):
    import persimmon_tools.workflow as workflow

    monkeypatch.setattr(workflow, "should_auto_verify", lambda dims, device: False)
    report = convert(releases["tar"], tmp_path / "out", ConvertOptions(tokenizer=False))
    assert report.verify is not None and report.verify.result == workflow.TOO_LARGE
    assert report.summary()["verify"] == {
        "result": "skipped (model too large for the automatic check)",
        "seconds": None,
        "peak_rss_bytes": None,
        "peak_rss_reached_in_verify": None,
    }
