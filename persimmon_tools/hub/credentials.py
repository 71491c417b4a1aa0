"""Which Hub token a push would send, found before any request, so that "no token" is said as such.

``huggingface_hub`` looks for a token itself (``HF_TOKEN``, then the login stored by ``hf auth login``) and,
finding none, sends the requests without one: the Hub then answers 401, which read like refused credentials.
:func:`find_token` asks the same places first (``--token``, then ``huggingface_hub.get_token()``), and says
where the token came from (never the token itself), or that there is none. Without one:

* a push to huggingface.co stops before anything is read or sent (the Hub never accepts an anonymous write);
  to another endpoint it goes on with a warning (a private server may accept it), and a 401 then says that
  no token was sent;
* ``--dry-run`` says that a real push would need one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from persimmon_tools.errors import HubError

logger = logging.getLogger("persimmon_tools.hub.push")

#: How to give push a token, for errors, hints and the dry run.
HOW_TO_LOG_IN = (
    "log in with `hf auth login` (`huggingface-cli login` in older huggingface_hub versions), set HF_TOKEN, "
    "or pass --token; the token needs write access"
)
_OFFICIAL_HOSTS = ("huggingface.co", "hf.co")


@dataclass(frozen=True)
class TokenFound:
    """``source``: where the token comes from (``--token``, ``HF_TOKEN``, ...), or ``None``: there is none."""

    source: str | None

    @property
    def found(self) -> bool:
        return self.source is not None

    def describe(self) -> str:
        """For the dry run: where the token comes from, or that a real push would need one."""
        if self.source is not None:
            return f"from {self.source}"
        return "none found: a real push would need one (`hf auth login` or `huggingface-cli login`, HF_TOKEN, --token)"


def find_token(given: str | None) -> TokenFound:
    """Where the token a push sends comes from: ``given`` (``--token``), else what ``huggingface_hub`` finds."""
    if given is not None and given.strip():
        return TokenFound("--token")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if (os.environ.get(name) or "").strip():
            return TokenFound(name)
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as err:  # e.g. a failed OIDC exchange: huggingface_hub raises it again when it asks
        logger.debug("Could not look up the stored Hub token: %s", err)
        return TokenFound("huggingface_hub's login (it could not be read now)")
    return TokenFound("the login stored by `hf auth login`" if token else None)


def needs_token_up_front(endpoint: str) -> bool:
    """Whether a push to ``endpoint`` without a token can be refused before any request: huggingface.co
    never accepts an anonymous write; another server (a mirror, a test server) might."""
    host = (urlsplit(endpoint).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in _OFFICIAL_HOSTS)


def no_token_error(endpoint: str, *, offline: bool = False) -> HubError:
    """The refusal of a push with no token (``offline``: HF_HUB_OFFLINE is set too, and said so)."""
    also = "; HF_HUB_OFFLINE is set as well, so the Hub would not be reached either" if offline else ""
    return HubError(
        f"cannot push to {endpoint}: no Hub token was found (no --token, no HF_TOKEN, no stored login), and "
        f"the Hub accepts no write without one{also}",
        hint=HOW_TO_LOG_IN
        + ("; unset HF_HUB_OFFLINE to push" if offline else "")
        + "; `push --dry-run` shows the plan without a token",
    )
