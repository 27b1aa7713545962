"""Who may act through the console.

Reading is open to whoever reaches the port; acting (retry, abort, resolve, bulk actions,
replaying or discarding parked messages) needs to know who acts:

* Bound to a loopback address (the default, ``127.0.0.1``), without tokens: whoever can reach
  the port is on this machine; the operator's name is the ``X-Saga-Operator`` header (the page
  asks for it once), else the console's own user.
* With tokens (``SAGA_CONSOLE_TOKENS=name:token,...``): an action needs
  ``Authorization: Bearer <token>`` and the operator is the token's name, wherever the console
  is bound.
* Bound beyond loopback without tokens: refused at start-up.

A POST must say ``Content-Type: application/json``: a browser sends that cross-origin only
after a CORS preflight, which the console never grants, so another site's page cannot act
through an operator's browser. And a console bound to loopback answers only requests whose
``Host`` is a loopback name or address, so a page whose domain is re-pointed at 127.0.0.1 (DNS
rebinding) can neither read nor act.
"""

from __future__ import annotations

import getpass
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from plumbing.errors import ConfigError

OPERATOR_HEADER = "X-Saga-Operator"
_NAME_LIMIT = 64


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def parse_tokens(text: str | None) -> dict[str, str]:
    """``name:token,name:token`` as ``{token: name}``.

    Raises:
        ConfigError: an entry is not ``name:token``, or a token is shorter than 16 characters.
    """
    tokens: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, token = item.strip().partition(":")
        if not sep or not name or not token:
            raise ConfigError("SAGA_CONSOLE_TOKENS must be name:token pairs separated by commas")
        if len(token) < 16:
            raise ConfigError(f"the console token of {name!r} is shorter than 16 characters")
        tokens[token] = name
    return tokens


@dataclass(frozen=True)
class Access:
    """The console's access rule (see the module docstring)."""

    local: bool
    tokens: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def for_binding(cls, host: str, tokens: Mapping[str, str]) -> Access:
        """The rule for a console bound to ``host``.

        Raises:
            ConfigError: bound beyond this machine without tokens.
        """
        local = is_loopback(host)
        if not local and not tokens:
            raise ConfigError(
                f"refusing to serve the console on {host} without a token: set "
                "SAGA_CONSOLE_TOKENS=name:token, or bind 127.0.0.1"
            )
        return cls(local=local, tokens=dict(tokens))

    @property
    def needs_token(self) -> bool:
        """Whether actions need a bearer token."""
        return bool(self.tokens) or not self.local

    def operator(self, authorization: str | None, claimed: str | None) -> str | None:
        """Who is acting, or ``None`` if this request may not act."""
        if self.needs_token:
            scheme, _, presented = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not presented:
                return None
            for token, name in self.tokens.items():
                if hmac.compare_digest(token.encode(), presented.strip().encode()):
                    return name
            return None
        name = (claimed or "").strip()[:_NAME_LIMIT]
        return name or _local_user()


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "console"
