"""Bounded time on any network: the Hub URL checked before any call, and timeouts on every request.

``huggingface_hub`` (2.x) sends every request through one shared ``httpx`` client made by a factory
(``set_client_factory`` / ``get_session``), and its default client has no timeout at all, so a server that
accepts the connection and never answers hangs a push forever. :func:`hub_timeouts` installs, for the
duration of a push, a factory that wraps the current one and sets connect / read / write timeouts on the
client (the library's own mechanism; the previous factory is put back afterwards).

Idle timeouts do not bound a server that trickles its answer (one byte every few seconds never leaves the
socket idle for long). So every read and write of the client's connections also goes through
:class:`_DeadlineBackend`, which shortens each socket wait to what is left of two wall-clock limits and fails
the request (``ReadTimeout``) once one is spent:

* the answer deadline: an answer (status, headers, body) must be complete within ``deadline`` seconds of
  its request being sent (every request of a push, the upload's included);
* the step deadline (:func:`step_deadline`, set by :class:`~persimmon_tools.hub.errors.Retry` for every step
  but the upload): a step, its retries and the request in flight included, ends ``deadline`` seconds after it
  started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from persimmon_tools.errors import UsageError

logger = logging.getLogger("persimmon_tools.hub.push")

CONNECT_TIMEOUT = 10.0  # seconds to open a connection (DNS failures and refused connections fail at once)
READ_TIMEOUT = 60.0  # seconds a request may wait for the next bytes of an answer (or to send the next block)
#: seconds a whole answer may take once its request is sent, and one step (look-up, create, listing) with its
#: retries and the request in flight (not the upload, whose length grows with the data)
DEADLINE = 120.0


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


# Per thread (huggingface_hub uploads from worker threads; a sync request does its I/O in its own thread):
# ``step_end``/``answer_end`` are time.monotonic() values (None: no limit); ``answer_limit`` is the seconds an
# answer may take, set by the request hook of the running push's client for each request.
_clock = threading.local()


@contextlib.contextmanager
def step_deadline(seconds: float | None) -> Iterator[None]:
    """While inside, every request of this thread ends (``ReadTimeout``) ``seconds`` after entering at the
    latest, however its server trickles (None: no step deadline)."""
    previous = getattr(_clock, "step_end", None)
    _clock.step_end = None if seconds is None else time.monotonic() + seconds
    try:
        yield
    finally:
        _clock.step_end = previous


def _start_answer_clock() -> None:
    limit = getattr(_clock, "answer_limit", None)
    _clock.answer_end = None if limit is None else time.monotonic() + limit


_SPENT = "the deadline ran out before the answer was complete"


def _left(timeout: float | None, *, answer: bool) -> tuple[float | None, bool]:
    """``timeout`` shortened to what is left of the step deadline (and, ``answer``: of the answer
    deadline), and whether a deadline is what bounds it; raises the timeout httpcore raises for a spent one."""
    import httpcore2

    ends = [getattr(_clock, "step_end", None)] + ([getattr(_clock, "answer_end", None)] if answer else [])
    ends = [e for e in ends if e is not None]
    if not ends:
        return timeout, False
    left = min(ends) - time.monotonic()
    if left <= 0:
        raise httpcore2.ReadTimeout(_SPENT)
    return (left, True) if timeout is None or left < timeout else (timeout, False)


def _bounded(call: Any, timeout: float | None, *, answer: bool) -> Any:
    """``call(timeout)`` with the timeout shortened by :func:`_left`; a wait the deadline cut says so."""
    import httpcore2

    limit, by_deadline = _left(timeout, answer=answer)
    try:
        return call(limit)
    except (httpcore2.ReadTimeout, httpcore2.WriteTimeout, httpcore2.ConnectTimeout) as err:
        if by_deadline:
            raise type(err)(_SPENT) from err
        raise


class _DeadlineStream:
    """A connection whose every socket wait is bounded by the deadlines (see the module docstring)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _bounded(lambda t: self._stream.read(max_bytes, t), timeout, answer=True)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _bounded(lambda t: self._stream.write(buffer, t), timeout, answer=False)
        _start_answer_clock()  # the answer is due within the deadline of the request's last byte

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        tls = _bounded(
            lambda t: self._stream.start_tls(ssl_context, server_hostname, t), timeout, answer=True
        )
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend:
    """httpcore's network backend, its connections wrapped in :class:`_DeadlineStream`."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any) -> Any:
        connect = self._backend.connect_tcp
        return _DeadlineStream(_bounded(lambda t: connect(host, port, t, **kwargs), timeout, answer=True))

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kwargs: Any) -> Any:
        connect = self._backend.connect_unix_socket
        return _DeadlineStream(_bounded(lambda t: connect(path, t, **kwargs), timeout, answer=True))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _bound_connections(client: Any) -> bool:
    """Route the connections of ``client``'s transports through :class:`_DeadlineBackend` (httpx's
    ``HTTPTransport`` keeps an httpcore pool whose backend makes every connection). False when no transport
    has such a pool (another client library): then only the idle timeouts apply."""
    bound = False
    for transport in [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None:
            if not isinstance(backend, _DeadlineBackend):
                pool._network_backend = _DeadlineBackend(backend)
            bound = True
    return bound


@contextlib.contextmanager
def hub_timeouts(timeouts: Timeouts) -> Iterator[None]:
    """While inside, every ``huggingface_hub`` request waits at most ``timeouts.connect`` / ``timeouts.read``
    for each connection / block, and its answer must be complete within ``timeouts.deadline`` of the request
    being sent (a trickling server cannot hold it longer; see the module docstring).

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
        _clock.answer_limit = timeouts.deadline  # this thread's request: its answer is due in time
        _start_answer_clock()

    def bounded_client() -> httpx2.Client:
        client = previous()
        client.timeout = httpx2.Timeout(**limits)
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), cap]}
        if not _bound_connections(client):
            logger.debug("unknown HTTP transport: only the idle timeouts bound Hub requests")
        return client

    set_client_factory(bounded_client)  # also closes the current shared client, made by `previous`
    try:
        yield
    finally:
        set_client_factory(previous)
