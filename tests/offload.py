"""Some test modules run in child pytests beside the session; their results are reported here, test by test.

The suite runs in one pytest process on one core, with child processes (``background`` in tests/conftest.py)
on the other. The modules of :data:`GROUPS` are in-process work (forward passes, tokenizers) or waiting (the
Hub tests' deadlines) that the session otherwise did on one core while the other had no work left. Here, when
a session selects them together with other tests, one child pytest per group, started with the session and
forked by the session's fork server (tests/cli_forkserver.py), runs them (the same files, the same node ids;
each in a thread of its own beside the ``background`` queue, which it does not delay) and each of their
tests, when its turn comes, is reported from what the child reported (pytest's own report serialization, as
pytest-xdist does), instead of being run again. A test its child did not report (the child crashed, or was
killed) runs here as usual.

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
from forkserver_clients import SHARED_ENV

REPO = Path(__file__).resolve().parent.parent
#: Modules run in child pytests (paths relative to the repository), one child per group, in the session's
#: order. "forward-passes": in-process computation late in the session (modules the session reaches early,
#: conversion's, were tried here and made it slower: the session then waited for the child).
#: "hub-and-tail": the hub's tests, which spend their time waiting for the local Hub server's deadlines and
#: retries rather than on a core, then the small in-process modules that the session ran last on one core
#: after everything beside it had ended.
GROUPS = {
    "forward-passes": (
        "tests/verification/test_verify.py",
        "tests/tokenizer/test_tokenizer.py",
        "tests/verification/test_independent_reader.py",
        "tests/verification/test_single_pass_hash.py",
        "tests/megatron/test_checkpoint_version.py",
        "tests/megatron/test_consistency.py",
        "tests/tokenizer/test_tokenizer_charsmap.py",
        "tests/verification/test_wrong_reference.py",
        "tests/verification/test_reference_record.py",
    ),
    "hub-and-tail": (
        "tests/hub/test_push_hostile.py",
        "tests/hub/test_push.py",
        "tests/hub/test_push_cli.py",
        "tests/hub/test_push_safety.py",
        "tests/hub/test_push_reports.py",
        "tests/hub/test_push_recorded_facts.py",
        "tests/hub/test_push_card.py",
        "tests/hub/test_push_card_checks.py",
        "tests/reliability/test_broken.py",
        "tests/reliability/test_fuzz.py",
        "tests/reliability/test_special_files.py",
        "tests/tokenizer/test_bad_scores.py",
        "tests/tokenizer/test_folder_conventions.py",
        "tests/tokenizer/test_tokenizer_cli.py",
        "tests/verification/test_verify_recorded_source.py",
        "tests/verification/test_verify_torch_dist.py",
    ),
}
GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}
#: Set in the child: where it writes its reports (and that it must not offload again).
REPORTS_ENV = "PERSIMMON_TESTS_OFFLOAD_REPORTS"
KEY = "offloaded modules"  # background.started[f"{KEY}: {group}"]: the group's child's reports
#: In the child: the reports file (taken out of the environment, so that its own children never see it).
child_reports: str | None = None


def configure() -> None:
    """At pytest_configure: is this the child?"""
    global child_reports
    child_reports = os.environ.pop(REPORTS_ENV, None)


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def offloaded(items: list[pytest.Item]) -> dict[str, list[pytest.Item]]:
    """The selected items to run in children, by group: none in a child itself, and a group only when the
    session also runs other tests (something to overlap with)."""
    if child_reports:
        return {}
    chosen: dict[str, list[pytest.Item]] = {}
    for item in items:
        if _module(item) in GROUP_OF:
            chosen.setdefault(GROUP_OF[_module(item)], []).append(item)
    return {group: its for group, its in chosen.items() if len(its) < len(items)}


def _run_child(background, items_ids: list[str], folder: Path) -> dict[str, list[dict]]:
    """The child pytest, forked by the session's fork server (tests/cli_forkserver.py), which it shares."""
    reports = folder / "reports.jsonl"
    env = dict(background.environ, **{REPORTS_ENV: str(reports)})
    python = background.python()
    if python != sys.executable:
        env[SHARED_ENV] = str(Path(python).parent)
    args = [
        python,
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


def start(background, tmp_path_factory, groups: dict[str, list[pytest.Item]]) -> set[str]:
    """Start each group's child run now, each in a thread of its own beside ``background``'s queue (a queued
    job would hold up the jobs behind it). Returns the modules they run. (Run at a lower priority, ``nice
    -n 10``, the computation group was no faster: 147.3 s against 139.8–146.8 s.)"""
    for group, items in groups.items():
        ids = [item.nodeid for item in items]
        future: Future = Future()
        folder = tmp_path_factory.mktemp(f"offloaded-{group}")

        def work(future: Future = future, ids: list[str] = ids, folder: Path = folder) -> None:
            try:
                future.set_result(_run_child(background, ids, folder))
            except BaseException as err:  # the tests that wait for it run in process instead
                future.set_exception(err)

        threading.Thread(target=work, name=f"tests-offload-{group}", daemon=True).start()
        background.started[f"{KEY}: {group}"] = future
        background.offloaded |= set(ids)
    return {_module(item) for items in groups.values() for item in items}


def write_report(config: pytest.Config, report: pytest.TestReport) -> None:
    """In the child: append ``report`` (serialized by pytest) to the reports file."""
    if child_reports:
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        with open(child_reports, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(data) + "\n")


def replay(item: pytest.Item, nextitem: pytest.Item | None, background) -> bool:
    """In the session: report ``item`` from the child's reports; False when the child has none for it."""
    try:
        by_test = background.result(f"{KEY}: {GROUP_OF[_module(item)]}")
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
