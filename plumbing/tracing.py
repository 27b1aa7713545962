"""W3C trace context: one trace per saga, carried by every message it causes.

A start request may bring a ``traceparent`` (the caller's span); if it brings none, or an
invalid one, the saga starts a new trace, as the W3C spec says a receiver should. Every
message the saga sends carries a ``traceparent`` with the saga's trace id and a span id
derived from the message id, so the same message always has the same span (a re-published
outbox entry does not fork the trace) and the pure core needs no randomness. Logs bind
``trace_id`` so one query finds every line of a saga across processes.

See https://www.w3.org/TR/trace-context/ (version 00).
"""

from __future__ import annotations

import hashlib
import re
import secrets

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def valid(traceparent: str | None) -> bool:
    """Whether ``traceparent`` is a usable version-00 header value."""
    if traceparent is None:
        return False
    match = _TRACEPARENT.match(traceparent)
    return match is not None and match[1] != _ZERO_TRACE and match[2] != _ZERO_SPAN


def new_traceparent() -> str:
    """A new trace with a new root span, sampled."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def continue_or_start(traceparent: str | None) -> str:
    """The caller's trace context if it is valid, otherwise a new trace."""
    return traceparent if traceparent is not None and valid(traceparent) else new_traceparent()


def child(traceparent: str, message_id: str) -> str:
    """The context of a message sent within ``traceparent``'s trace.

    The span id is derived from the message id, so it is stable across re-publishes.
    """
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return traceparent
    span = hashlib.sha256(message_id.encode()).hexdigest()[:16]
    if span == _ZERO_SPAN:  # astronomically unlikely, but the spec forbids it
        span = "1" * 16
    return f"00-{match[1]}-{span}-{match[3]}"


def trace_id(traceparent: object) -> str | None:
    """The trace id in a ``traceparent`` value (a header may arrive as bytes), for logs."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT.match(traceparent)
    return match[1] if match else None
