"""URLs in messages: every URL a log line or an error names goes through :func:`redact_url`."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_MASK = "***"
# Query parameters that carry credentials: libpq's password and sslpassword, MongoDB's
# tlsCertificateKeyFilePassword, and authMechanismProperties (it can hold an AWS session token).
_SECRET_PARAMETERS = ("password", "secret", "token", "authmechanismproperties")


def redact_url(url: str) -> str:
    """``url`` with its password, and any credential-like query parameter, shown as ``***``.

    Used by every error message that names a store or broker URL. A URL too malformed to
    parse is not echoed at all, since where its password starts cannot be known.
    """
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
