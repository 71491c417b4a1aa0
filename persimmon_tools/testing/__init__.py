"""Testing wing: pytest fixtures for users' own CI smoke tests (``persimmon_tools.testing.fixtures``).

Synthetic releases of a chosen preset / TP / PP / dtype / layout (built with the synth wing, cached per
session) and their converted Hugging Face folders (built with the conversion wing), plus a CPU ``verify``
helper, so a user's test suite can check the toolkit end to end after each fine-tune. Use it from a
``conftest.py`` with ``pytest_plugins = ["persimmon_tools.testing.fixtures"]``; see docs/ci.md.

pytest is imported only by ``fixtures``; the rest of the library never needs it.

May import: every other wing and root module (``hub``, ``workflow``, ``verification``, ``export``,
``conversion``, ``synth``, ``megatron``, ``tokenizer``, ``mapping``, ``ops``, ``staged_output``,
``staged_leftovers``, ``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``, ``errors``) and the
third-party ``pytest``. Never ``cli`` (its sibling).
"""
