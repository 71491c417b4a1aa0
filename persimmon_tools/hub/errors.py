"""Hub failures: which are transient (retried with backoff) and which are permanent (a HubError with a hint).

``_as_hub_error`` is the one table that turns ``huggingface_hub`` exceptions into messages and hints;
``Retry`` runs one Hub call with bounded exponential backoff and a total deadline; ``signals_raise_interrupt``
makes SIGTERM behave like Ctrl-C while pushing.

An unreachable Hub is not transient: offline mode (``HF_HUB_OFFLINE``), a name that does not resolve and a
refused connection fail at once as :class:`HubUnreachable` (no backoff for minutes), as do timeouts and
connection drops once the retries or the deadline are spent. ``push --dry-run`` then shows the local plan.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from persimmon_tools.errors import HubError, PersimmonToolsError
from persimmon_tools.hub.credentials import HOW_TO_LOG_IN
from persimmon_tools.hub.network import step_deadline

logger = logging.getLogger("persimmon_tools.hub.push")
T = TypeVar("T")

try:  # the HTTP client of huggingface_hub >= 1.0
    import httpx2

    _NETWORK_ERRORS: tuple[type[BaseException], ...] = (
        httpx2.TimeoutException,
        httpx2.NetworkError,
        httpx2.RemoteProtocolError,
    )
    _CONNECT_ERRORS: tuple[type[BaseException], ...] = (httpx2.ConnectError,)
except ImportError:  # pragma: no cover - other huggingface_hub versions
    _NETWORK_ERRORS, _CONNECT_ERRORS = (), ()
_NETWORK_ERRORS += (TimeoutError, ConnectionError)
_CONNECT_ERRORS += (ConnectionRefusedError, socket.gaierror)
_REACH_HINT = (
    "check --endpoint / HF_ENDPOINT, the network and any proxy; `push --dry-run` shows the local plan "
    "without the Hub"
)


class HubUnreachable(HubError):
    """No answer from the Hub at all: offline mode, DNS failure, refused connection, or timeouts."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The error and its causes / contexts (huggingface_hub wraps upload errors in RuntimeError)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            yield e
            todo += [e.__cause__, e.__context__]


def _status(err: BaseException) -> int | None:
    for e in _chain(err):
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            return e.response.status_code
    return None


def unreachable_reason(err: BaseException) -> str | None:
    """Why the Hub cannot be reached at all (offline mode, DNS, refused connection); ``None`` otherwise."""
    for e in _chain(err):
        if isinstance(e, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set"
        if isinstance(e, _CONNECT_ERRORS):
            return f"cannot connect ({e or type(e).__name__})"
    return None


def _is_transient(err: BaseException) -> bool:
    if unreachable_reason(err) is not None:
        return False
    status = _status(err)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return any(isinstance(e, _NETWORK_ERRORS) for e in _chain(err))


def _as_hub_error(err: BaseException, what: str, token: str | None = "a token") -> HubError | None:
    """The HubError (message + hint) for a permanent failure; ``None`` if it is not a Hub error (stays loud).
    ``token``: where the token sent came from (``None``: no token was sent, which a 401 then says)."""
    status, chain = _status(err), list(_chain(err))
    said = next((f": {e.server_message.strip()}" for e in chain if getattr(e, "server_message", None)), "")
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return HubUnreachable(
            f"cannot {what}: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE to push; `push --dry-run` works offline",
        )
    if status == 401 and token is None:
        return HubError(
            "no Hub token was sent (none found: no --token, no HF_TOKEN, no stored login), and the Hub asks "
            f"for one to {what} (401 Unauthorized){said}",
            hint=HOW_TO_LOG_IN,
        )
    if status == 401:
        return HubError(
            f"the Hub refused the token from {token} when trying to {what} (401 Unauthorized){said}",
            hint="set HF_TOKEN or run `hf auth login` (or pass --token); the token needs write access",
        )
    if status == 403:
        return HubError(
            f"not allowed to {what} (403 Forbidden){said}",
            hint="use a token with write access to this namespace, or --create-pr to propose the "
            "change as a pull request",
        )
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return HubError(
            f"revision not found when trying to {what}{said}",
            hint="--revision names a branch (created from main when missing) or an existing refs/pr/N",
        )
    if status == 404 or any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return HubError(
            f"not found when trying to {what} ({status}){said}",
            hint="check the repo id and that it is a model repo your token can see",
        )
    if status in (409, 412):
        return HubError(
            f"conflict when trying to {what} ({status}){said}",
            hint="the branch changed during the push; re-run the command",
        )
    if status is not None:
        return HubError(
            f"the Hub rejected the request to {what} ({status}){said}",
            hint="check the repo id (letters, digits, '-', '_', '.'), --revision and the card metadata",
        )
    for e in chain:
        if isinstance(e, ValueError) and "README.md" in str(e):
            return HubError(
                f"the Hub rejected the model card: {e}",
                hint="fix the metadata block of README.md in the folder, or pass --card replace",
            )
        if isinstance(e, ValueError) and ("LFS" in str(e) or "improperly formatted" in str(e)):
            return HubError(f"the Hub sent an unusable answer when trying to {what}: {e}")
    return None


class Retry:
    """Run one step, retrying transient failures with bounded exponential backoff (with jitter).

    ``deadline``: seconds after which a step ends, the request in flight included however its server
    trickles (:func:`~persimmon_tools.hub.network.step_deadline`), and no further attempt starts (``None``:
    only ``max_retries`` bounds it). ``endpoint`` names the Hub in messages; ``token`` where the token sent
    comes from (``None``: none is sent, and a 401 says so).
    """

    def __init__(
        self,
        max_retries: int,
        base_delay: float,
        max_delay: float = 30.0,
        *,
        deadline: float | None = None,
        endpoint: str = "the Hub",
        token: str | None = "a token",
    ) -> None:
        self.max_retries, self.base_delay, self.max_delay = max_retries, base_delay, max_delay
        self.deadline, self.endpoint, self.token = deadline, endpoint, token

    def __call__(self, what: str, fn: Callable[[], T], *, deadline: bool = True) -> T:
        """Run ``fn``; ``deadline=False`` for a step whose length grows with the data (the upload)."""
        with step_deadline(self.deadline if deadline else None):  # also cuts the request in flight
            return self._attempts(what, fn, deadline)

    def _attempts(self, what: str, fn: Callable[[], T], deadline: bool) -> T:
        attempt, start = 0, time.monotonic()
        while True:
            try:
                return fn()
            except (KeyboardInterrupt, PersimmonToolsError):
                raise
            except Exception as err:
                reason = unreachable_reason(err)
                if reason is not None and "HF_HUB_OFFLINE" not in reason:
                    raise HubUnreachable(
                        f"cannot reach {self.endpoint} to {what}: {reason}", hint=_REACH_HINT
                    ) from err
                if not _is_transient(err):
                    mapped = _as_hub_error(err, what, self.token)
                    if mapped is None:
                        raise
                    raise mapped from err
                attempt += 1
                cause = f"HTTP {_status(err)}" if _status(err) else type(err).__name__
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                elapsed = time.monotonic() - start
                late = deadline and self.deadline is not None and elapsed + delay >= self.deadline
                if attempt > self.max_retries or late:
                    took = f"{elapsed:.1f}" if elapsed < 10 else f"{elapsed:.0f}"
                    tried = f"{attempt} attempt" + ("s" * (attempt > 1)) + f" in {took} s"
                    if _status(err) is not None:
                        raise HubError(
                            f"could not {what}: the Hub kept failing ({cause}) after {tried}",
                            hint="the Hub is having trouble; re-run the same command later "
                            "(files already uploaded are not sent again)",
                        ) from err
                    limit = f"the {self.deadline:g} s deadline" if late else "the retries"
                    raise HubUnreachable(
                        f"could not {what}: no usable answer from {self.endpoint} ({cause}) after {tried}; "
                        f"{limit} ran out",
                        hint="the Hub or the network is slow or down; re-run later (files already uploaded "
                        "are not sent again), raise --timeout/--deadline for a slow link, or "
                        + _REACH_HINT.split("; ", 1)[0],
                    ) from err
                logger.warning(
                    "Could not %s (%s); retry %d/%d in %.1f s", what, cause, attempt, self.max_retries, delay
                )
                time.sleep(delay)


@contextlib.contextmanager
def signals_raise_interrupt() -> Iterator[None]:
    """While pushing, SIGTERM raises KeyboardInterrupt like SIGINT (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
