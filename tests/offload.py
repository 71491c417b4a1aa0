"""A few test modules run in a child pytest beside the session; their results are reported here, test by test.

The suite runs in one pytest process on one core, with child processes (``background`` in tests/conftest.py)
on the other. The modules below are pure in-process computation (forward passes, tokenizers) at the end of
the session, where the other core has no work left, so the session waited for them on one core. Here, when
a session selects them together with other tests, a child pytest started with the session runs them (the
same files, the same node ids; in a thread of its own beside the ``background`` queue, which it does not
delay) and each of their tests, when its turn comes, is reported from what the child
reported (pytest's own report serialization, as pytest-xdist does), instead of being run again.
A test the child did not report (the child crashed, or was killed) runs here as usual.

Running ``pytest tests/verification/test_verify.py`` alone runs it in process: there is nothing to overlap.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Modules run in the child (paths relative to the repository): in-process work late in the session. Modules
#: the session reaches early (the hub's, conversion's) were tried and made it slower: the session then waits
#: for the child.
MODULES = (
    "tests/verification/test_verify.py",
    "tests/tokenizer/test_tokenizer.py",
    "tests/verification/test_independent_reader.py",
    "tests/verification/test_single_pass_hash.py",
    "tests/megatron/test_checkpoint_version.py",
    "tests/megatron/test_consistency.py",
    "tests/tokenizer/test_tokenizer_charsmap.py",
    "tests/verification/test_wrong_reference.py",
    "tests/verification/test_reference_record.py",
)
#: Set in the child: where it writes its reports (and that it must not offload again).
REPORTS_ENV = "PERSIMMON_TESTS_OFFLOAD_REPORTS"
KEY = "offloaded modules"
#: In the child: the reports file (taken out of the environment, so that its own children never see it).
child_reports: str | None = None


def configure() -> None:
    """At pytest_configure: is this the child?"""
    global child_reports
    child_reports = os.environ.pop(REPORTS_ENV, None)


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def offloaded(items: list[pytest.Item]) -> list[pytest.Item]:
    """The selected items to run in the child: none in the child itself, and none unless the session also
    runs other tests (something to overlap with)."""
    if child_reports:
        return []
    chosen = [item for item in items if _module(item) in MODULES]
    return chosen if len(chosen) < len(items) else []


def _run_child(background, items_ids: list[str], folder: Path) -> dict[str, list[dict]]:
    reports = folder / "reports.jsonl"
    env = dict(background.environ, **{REPORTS_ENV: str(reports)})
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(REPO),
        *items_ids,
    ]
    done = background.run(args, cwd=REPO, env=env, timeout=900)
    by_test: dict[str, list[dict]] = {}
    if reports.exists():
        for line in reports.read_text().splitlines():
            data = json.loads(line)
            by_test.setdefault(data["nodeid"], []).append(data)
    if not by_test:
        raise RuntimeError(
            f"the offloaded tests reported nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return by_test


def start(background, tmp_path_factory, items: list[pytest.Item]) -> set[str]:
    """Start the child run of ``items`` now, in a thread of its own beside ``background``'s queue (a queued job
    would hold up the jobs behind it). Returns the modules it runs. (Run at a lower priority, ``nice -n
    10``, it was no faster: 147.3 s against 139.8–146.8 s for this.)"""
    ids = [item.nodeid for item in items]
    future: Future = Future()
    folder = tmp_path_factory.mktemp("offloaded")

    def work() -> None:
        try:
            future.set_result(_run_child(background, ids, folder))
        except BaseException as err:  # the test that waits for it runs in process instead
            future.set_exception(err)

    threading.Thread(target=work, name="tests-offload", daemon=True).start()
    background.started[KEY] = future
    background.offloaded = set(ids)
    return {_module(item) for item in items}


def write_report(config: pytest.Config, report: pytest.TestReport) -> None:
    """In the child: append ``report`` (serialized by pytest) to the reports file."""
    if child_reports:
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        with open(child_reports, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(data) + "\n")


def replay(item: pytest.Item, nextitem: pytest.Item | None, background) -> bool:
    """In the session: report ``item`` from the child's reports; False when the child has none for it."""
    try:
        by_test = background.result(KEY)
    except Exception:  # the child did not run or reported nothing (a crash, a kill): run it in process
        return False
    reports = by_test.get(item.nodeid)
    if not reports:
        return False
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for data in reports:
        report = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        item.ihook.pytest_runtest_logreport(report=report)
    item.session._setupstate.teardown_exact(nextitem)  # what the skipped protocol would have torn down
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
