"""URLs in messages and settings.

Every URL a log line or an error names goes through :func:`redact_url`. ``SAGA_AMQP_URL`` may
list several broker addresses (the nodes of one RabbitMQ cluster) separated by commas;
:func:`split_urls` and :func:`amqp_addresses` read such a list.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from plumbing.errors import ConfigError

_MASK = "***"
# Query parameters that carry credentials: libpq's password and sslpassword, MongoDB's
# tlsCertificateKeyFilePassword, and authMechanismProperties (it can hold an AWS session token).
_SECRET_PARAMETERS = ("password", "secret", "token", "authmechanismproperties")
# A comma separates two URLs only where the next one's scheme starts: a comma inside a
# password, a query or a MongoDB host list ("h1:27017,h2:27017") is not a separator. A
# trailing comma is dropped.
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)|,\s*$")
_AMQP_FORM = "amqp://user:password@host:5672/vhost (or amqps:// for TLS)"


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list (one URL is a list of one); blanks are dropped."""
    return tuple(part for part in (p.strip() for p in _NEXT_URL.split(value)) if part)


def redact_url(url: str) -> str:
    """``url`` with its password, and any credential-like query parameter, shown as ``***``.

    Used by every error message that names a store or broker URL. A comma-separated list of
    URLs has each of them redacted. A URL too malformed to parse is not echoed at all, since
    where its password starts cannot be known.
    """
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(_redact_one(one) for one in urls)
    return _redact_one(url)


def amqp_addresses(value: str) -> tuple[str, ...]:
    """The broker addresses in ``value``: one AMQP URL, or several separated by commas.

    Several addresses are the nodes of one RabbitMQ cluster (or one broker behind several
    names): the transport connects to the first that answers and moves on to the next when it
    loses it. They must name the same virtual host, since the topology lives there.

    Raises:
        ConfigError: the list is empty, an address is not an ``amqp://`` or ``amqps://`` URL
            with a host, or the addresses name different virtual hosts.
    """
    addresses = split_urls(value)
    if not addresses:
        raise ConfigError(f"no RabbitMQ URL is given: use {_AMQP_FORM}")
    vhosts = {address: _amqp_vhost(address) for address in addresses}
    if len(set(vhosts.values())) > 1:
        named = ", ".join(f"{redact_url(a)} -> {v!r}" for a, v in vhosts.items())
        raise ConfigError(
            "the RabbitMQ addresses name different virtual hosts "
            f"({named}); list the nodes of one cluster with the same virtual host"
        )
    return addresses


def amqp_vhost(url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when its path is empty)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if path not in ("", "/") else "/"


def _amqp_vhost(address: str) -> str:
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 - parsing the port is what validates it
    except ValueError as e:
        raise ConfigError(f"the RabbitMQ URL {redact_url(address)!r} is malformed: {e}") from e
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigError(
            f"the RabbitMQ URL {redact_url(address)!r} is not valid: use {_AMQP_FORM}"
        )
    return amqp_vhost(address)


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc
    if not netloc and "@" in url:
        # Not a URL urlsplit understands (``amqp//user:pw@host``), but it may still hold a
        # password: mask anything between a user name's colon and the "@".
        return re.sub(r"(^|//)([^:@/]*):[^@]*@", rf"\1\2:{_MASK}@", url)
    # The last "@" ends the credentials: an unescaped "@" in a password stays hidden.
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{hosts}"
    query = "&".join(_redact_parameter(item) for item in parts.query.split("&"))
    if netloc == parts.netloc and query == parts.query:
        return url
    # Rebuilt by hand: urlunsplit drops the "//" of schemes it does not know (mongodb, memory).
    redacted = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        redacted += f"?{query}"
    if parts.fragment:
        redacted += f"#{parts.fragment}"
    return redacted


def _redact_parameter(item: str) -> str:
    key, equals, _ = item.partition("=")
    if equals and any(secret in key.lower() for secret in _SECRET_PARAMETERS):
        return f"{key}={_MASK}"
    return item
