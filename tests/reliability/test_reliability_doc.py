"""docs/reliability.md lists exactly the cases the reliability tests run, with the outcomes they assert."""

from __future__ import annotations

import re
from pathlib import Path

from reliability_cases import CASES, DOC, doc_section, error_type, render

TESTS = Path(__file__).resolve().parent.parent


def test_case_table_in_the_doc_is_current():
    assert doc_section(DOC.read_text()) == render(), "run `python tests/reliability_cases.py`"


def test_every_case_names_a_test_that_checks_it():
    assert len({c.id for c in CASES}) == len(CASES)
    for case in CASES:
        file, name = case.test.split("::")
        source = (TESTS / file).read_text()
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{case.id}: no {case.test}"
        assert re.search(rf"(?<![\w-]){re.escape(case.id)}(?![\w-])", source) or (
            case.message and case.message in source
        ), f"{case.id}: {file} neither names the case nor asserts {case.message!r}"
        if case.outcome.split()[0].endswith("Error") and "KNOWN BUG" not in case.outcome:
            error_type(case)  # a real class of persimmon_tools.errors
