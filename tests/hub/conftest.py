"""The push tests' fixtures (:mod:`hub_fixtures`), for every test module in this folder."""

from hub_fixtures import converted, hub  # noqa: F401
