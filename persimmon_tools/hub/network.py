"""Bounded time on any network: the Hub URL checked before any call, and timeouts on every request.

``huggingface_hub`` (2.x) sends every request through one shared ``httpx`` client made by a factory
(``set_client_factory`` / ``get_session``), and its default client has no timeout at all, so a server that
accepts the connection and never answers hangs a push forever. :func:`hub_timeouts` installs, for the
duration of a push, a factory that wraps the current one and sets connect / read / write timeouts on the
client (the library's own mechanism; the previous factory is put back afterwards). The retry loop of
:class:`~persimmon_tools.hub.errors.Retry` adds a total deadline per step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from persimmon_tools.errors import UsageError

CONNECT_TIMEOUT = 10.0  # seconds to open a connection (DNS failures and refused connections fail at once)
READ_TIMEOUT = 60.0  # seconds a request may wait for the next bytes of an answer (or to send the next block)
DEADLINE = 120.0  # seconds one step (look-up, create, listing) may take with its retries (not the upload)


@dataclass(frozen=True)
class Timeouts:
    """Per request: ``connect`` and ``read`` (also used for writes) seconds; per step: ``deadline`` seconds."""

    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT
    deadline: float | None = DEADLINE

    def __post_init__(self) -> None:
        for name in ("connect", "read", "deadline"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"the {name} timeout must be > 0 seconds, not {value}")


def resolve_endpoint(endpoint: str | None, default: str) -> str:
    """The Hub URL to use (``endpoint``, else ``HF_ENDPOINT``, else ``default``), checked before any call.

    Raises:
        UsageError: not ``http(s)://host[:port][/path]`` (naming ``--endpoint`` or ``HF_ENDPOINT``).
    """
    source, value = ("--endpoint", endpoint) if endpoint is not None else ("HF_ENDPOINT", None)
    if value is None:
        value = os.environ.get("HF_ENDPOINT") or default
        source = "HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else "the default endpoint"
    problem = _endpoint_problem(value)
    if problem:
        raise UsageError(
            f"{source} {value!r} is not a Hub URL: {problem}",
            hint="write it as https://huggingface.co or http://HOST:PORT (a mirror or a local test server)",
        )
    return value.rstrip("/")


def _endpoint_problem(value: str) -> str | None:
    if not value or value != value.strip() or any(c.isspace() for c in value):
        return "it is empty or contains spaces"
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as err:
        return f"it cannot be parsed ({err})"
    if parts.scheme not in ("http", "https"):
        found = f"'{parts.scheme}:'" if parts.scheme else "none"
        return f"the scheme must be http:// or https:// (found {found})"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "port 0 is not a port a server listens on"
    if parts.query or parts.fragment:
        return "it has a query or fragment"
    return None


@contextlib.contextmanager
def hub_timeouts(timeouts: Timeouts) -> Iterator[None]:
    """While inside, every ``huggingface_hub`` request waits at most ``timeouts.connect`` / ``timeouts.read``.

    The client's default timeout is not enough: many ``HfApi`` calls pass ``timeout=None`` explicitly (no
    limit), so a request hook also caps the timeouts of each request (a smaller one asked by the call stays).
    """
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
    limits = {
        "connect": timeouts.connect,
        "read": timeouts.read,
        "write": timeouts.read,
        "pool": timeouts.connect,
    }

    def cap(request: httpx2.Request) -> None:
        asked = request.extensions.get("timeout") or {}
        capped = {k: v if asked.get(k) is None else min(v, asked[k]) for k, v in limits.items()}
        request.extensions = {**request.extensions, "timeout": capped}

    def bounded_client() -> httpx2.Client:
        client = previous()
        client.timeout = httpx2.Timeout(**limits)
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), cap]}
        return client

    set_client_factory(bounded_client)  # also closes the current shared client, made by `previous`
    try:
        yield
    finally:
        set_client_factory(previous)
