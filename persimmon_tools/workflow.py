"""``convert`` as the CLI runs it: the conversion, then the automatic verify on CPU when the model is small.

The conversion step (:func:`persimmon_tools.conversion.convert.convert`) knows nothing of verify: the
import-linter layers keep ``conversion`` below ``verification``, so what runs one after the other sits above
both, beside ``hub`` (``pyproject.toml``). ``persimmon_tools.convert`` is :func:`convert` here;
``persimmon_tools.conversion.convert.convert`` stays the conversion alone.

    >>> from persimmon_tools import ConvertOptions, convert  # doctest: +SKIP
    >>> report = convert("8b_chat_model_release.tar", "out", ConvertOptions(), verify="auto")  # doctest: +SKIP
    >>> report.verify.result  # "pass", or why the automatic check was skipped  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persimmon_tools.conversion.convert import ConversionPlan, ConversionResult, ConvertOptions, prepare
from persimmon_tools.conversion.convert import convert as convert_only
from persimmon_tools.conversion.fingerprint import verify_command
from persimmon_tools.errors import Interrupted, UsageError, VerificationError
from persimmon_tools.safe_read import format_size
from persimmon_tools.verification.auto_check import estimate_auto_verify, should_auto_verify

log = logging.getLogger(__name__)

#: ``verify=`` of :func:`convert`: ``"auto"`` checks small models on CPU (the CLI's default), ``"off"`` never
#: (``convert --no-verify``).
VERIFY_MODES = ("auto", "off")
TOO_LARGE = "skipped (model too large for the automatic check)"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` only grows; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class AutoVerify:
    """What the automatic verify after :func:`convert` did.

    Attributes:
        result: ``"pass"``, or why it did not run (a failure raises :class:`VerificationError` instead).
        seconds: verify's own time, rounded to 0.01 s.
        peak_rss_bytes: the process's peak after verify (``ru_maxrss`` only grows, so it covers convert too).
        peak_rss_reached_in_verify: whether verify raised the peak above the one convert had reached.

    The last three are None when verify did not run.
    """

    result: str
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_rss_reached_in_verify: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConvertReport:
    """Outcome of :func:`convert`: the conversion, the process's peak RSS when it ended, and the automatic
    verify (None with ``verify="off"``)."""

    conversion: ConversionResult
    peak_rss_bytes: int
    verify: AutoVerify | None

    @property
    def out_dir(self) -> Path:
        return self.conversion.out_dir

    def summary(self) -> dict[str, Any]:
        """What ``convert --json`` prints: convert's figures at the top level and under ``convert``, the
        automatic verify under ``verify`` (and its result as ``verification``) when it was asked for."""
        res = self.conversion
        phase = {"seconds": round(res.seconds, 2), "peak_rss_bytes": self.peak_rss_bytes}
        summary: dict[str, Any] = {
            "out_dir": str(res.out_dir),
            "tensors": res.stats.tensors,
            "bytes": res.stats.bytes_written,
            **phase,
            "files": res.files,
            "convert": dict(phase),
        }
        if self.verify is not None:
            summary["verification"] = self.verify.result
            summary["verify"] = self.verify.to_dict()
        return summary


def _check_mode(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise UsageError(
            f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}",
            hint='verify="auto" checks models below 1.5B parameters on CPU; "off" skips the check',
        )


def convert(
    source: Path | str,
    out_dir: Path | str,
    options: ConvertOptions | None = None,
    *,
    verify: str = "auto",
    progress: Callable[[int], None] = lambda n: None,
    on_plan: Callable[[ConversionPlan], None] = lambda p: None,
    verify_progress: Callable[[str], None] = lambda s: None,
) -> ConvertReport:
    """Convert SOURCE into OUT_DIR (complete or not at all), then check it as ``persimmon-tools convert`` does.

    Args:
        source: a release tarball, extracted release folder, ``iter_XXXXXXX`` folder or ``model_optim_rng.pt``.
        out_dir: the Hugging Face folder to write.
        options: a :class:`~persimmon_tools.conversion.convert.ConvertOptions` (None: the defaults).
        verify: ``"auto"``: verify on CPU in fp32 when the model is below
            :data:`~persimmon_tools.verification.auto_check.AUTO_VERIFY_MAX_PARAMS` parameters (a larger
            one is skipped, with a logged hint to run ``persimmon-tools verify``); ``"off"``: no check.
        progress: called with the number of weight bytes written, as they are written.
        on_plan: called once with the plan (its ``shards.total_size`` is what ``progress`` adds up to).
        verify_progress: the automatic verify's steps (``readers: ...``, ``layer k/N``, ``head``, ...), as
            :func:`persimmon_tools.verification.verify.verify` reports them to its ``progress``.

    Returns:
        A :class:`ConvertReport`.

    Raises:
        The conversion's typed errors (nothing is left in OUT_DIR), :class:`VerificationError` when the
        automatic verify fails (OUT_DIR is complete then, with its ``verification.json``), ``KeyboardInterrupt``
        when interrupted during the conversion (OUT_DIR is as it was), and
        :class:`~persimmon_tools.errors.Interrupted` when interrupted once OUT_DIR is complete (during the
        automatic verify: OUT_DIR is kept, without ``verification.json``; its hint is the ``verify`` command).
    """
    _check_mode(verify)

    def planned(plan: ConversionPlan) -> None:
        log.info(
            "converting %s: %d tensors, %s, TP=%d PP=%d, iteration %s",
            plan.release.source,
            len(plan.tensors),
            format_size(plan.shards.total_size, digits=2),
            plan.release.tp,
            plan.release.pp,
            plan.checkpoint.iteration,
        )
        on_plan(plan)

    options = options or ConvertOptions()
    result = convert_only(Path(source), Path(out_dir), options, progress=progress, on_plan=planned)
    if verify == "off":
        return ConvertReport(result, peak_rss_bytes(), None)
    command = verify_command(result.out_dir, source, iteration=options.iteration, vocab=options.vocab)
    try:
        rss = peak_rss_bytes()  # before verify: ru_maxrss only grows, so this is convert's own peak
        checked = _auto_verify(result, Path(source), options, rss, command, verify_progress)
    except KeyboardInterrupt as err:  # OUT_DIR is complete: say so, and how to check it
        raise Interrupted(
            f"interrupted during the automatic verify; OUT_DIR {result.out_dir} is complete but not verified "
            "(it has no verification.json)",
            hint=command,
        ) from err
    return ConvertReport(result, rss, checked)


def _auto_verify(
    result: ConversionResult,
    source: Path,
    options: ConvertOptions,
    convert_rss: int,
    command: str,
    progress: Callable[[str], None],
) -> AutoVerify:
    """Verify ``result`` against ``source`` on CPU when the model is small enough (the iteration and the
    vocabulary that the conversion read)."""
    if not should_auto_verify(result.plan.dims, "cpu"):
        log.info("model too large for the automatic CPU check; run `%s`", command)
        return AutoVerify(TOO_LARGE)
    log.info(
        "verifying %s against %s on CPU (the automatic check; --no-verify skips it)", result.out_dir, source
    )
    # Imported here: the verifier (and transformers) load only when a check runs, not for a dry run.
    from persimmon_tools.verification.verify import VerifyOptions
    from persimmon_tools.verification.verify import verify as run_verify

    start = time.perf_counter()
    checks = VerifyOptions(device="cpu", iteration=options.iteration, vocab=options.vocab)
    report = run_verify(result.out_dir, source, checks, progress=progress)
    seconds, peak = time.perf_counter() - start, peak_rss_bytes()
    if not report.passed:
        raise VerificationError(
            f"the converted model in {result.out_dir} does not match the original: {report.summary_line()}",
            hint=f"see verification.json in OUT_DIR; `{command}` prints the full report",
        )
    log.info("verify: %s", report.summary_line())
    return AutoVerify("pass", round(seconds, 2), peak, peak > convert_rss)


def plan_summary(
    source: Path | str, options: ConvertOptions | None = None, *, verify: str = "auto"
) -> dict[str, Any]:
    """What :func:`convert` would do, writing nothing (``convert --dry-run``): the plan's summary
    (:meth:`~persimmon_tools.conversion.convert.ConversionPlan.summary`) plus, under ``verify``, whether the
    automatic verify would run, and its estimated peak memory and time
    (:func:`~persimmon_tools.verification.auto_check.estimate_auto_verify`)."""
    _check_mode(verify)
    plan = prepare(Path(source), options or ConvertOptions())
    summary = plan.summary()
    if verify == "off":
        summary["verify"] = {"runs": False, "why": "--no-verify"}
    else:
        summary["verify"] = estimate_auto_verify(plan.dims, plan.shards.total_size, "cpu").to_dict()
    return summary
