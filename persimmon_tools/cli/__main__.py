"""``python -m persimmon_tools.cli`` = the ``persimmon-tools`` console script."""

from persimmon_tools.cli import run

run()
