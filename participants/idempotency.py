"""Participant-side idempotency: execute each step at most once, answer duplicates the same way.

Every command carries an idempotency key that is the same on every attempt of a step's
direction (``fwd:<saga>:<step>``, ``comp:<saga>:<step>``). A participant stores the outcome of
a command under its key; a duplicate delivery or a retry after a timeout gets the stored
outcome back without running the handler again.

A compensation that arrives before its forward command (the forward one was delayed, the
orchestrator timed out and compensated) leaves a *tombstone* under the forward key, so the late
forward command is refused instead of acting after its own undo. Errors (transient failures)
are never stored: the next attempt runs the handler again.

Backends: :class:`MemoryIdempotency` here, ``PostgresIdempotency`` and ``MongoIdempotency`` in
``participants.idempotency_stores``; ``open_idempotency(url)`` picks one from a URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from contracts.messages import ErrorDetail, JsonObject
from plumbing.stores import StoreKind, store_kind

DEFAULT_IDEMPOTENCY_RETENTION = timedelta(days=7)
"""How long outcomes are kept: longer than any redelivery or manual retry horizon."""


class OutcomeKind(StrEnum):
    """What is stored under an idempotency key."""

    COMPLETED = "completed"
    FAILED = "failed"
    TOMBSTONE = "tombstone"


@dataclass(frozen=True)
class StoredOutcome:
    """The remembered answer to a command (or a tombstone)."""

    kind: OutcomeKind
    result: JsonObject | None = None
    error: ErrorDetail | None = None
    stored_at: datetime | None = None


class IdempotencyStore(Protocol):
    """Remembers outcomes by idempotency key."""

    async def setup(self) -> None:
        """Create tables or indexes; idempotent."""
        ...

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome for ``key``, if any."""
        ...

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """Store ``outcome`` unless something is stored already; returns what is stored now."""
        ...

    async def purge(self, now: datetime | None = None) -> int:
        """Forget outcomes stored longer than the retention ago; returns how many."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryIdempotency:
    """Outcomes in a dict: for tests, the demo and single-process services."""

    def __init__(self, retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION) -> None:
        self.retention = retention
        self._outcomes: dict[str, StoredOutcome] = {}

    async def setup(self) -> None:
        """Nothing to create."""

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome."""
        return self._outcomes.get(key)

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """First writer wins."""
        return self._outcomes.setdefault(key, outcome)

    async def purge(self, now: datetime | None = None) -> int:
        """Forget outcomes stored before the retention (outcomes without a time are kept)."""
        cutoff = (now or datetime.now(UTC)) - self.retention
        old = [k for k, o in self._outcomes.items() if o.stored_at and o.stored_at < cutoff]
        for key in old:
            del self._outcomes[key]
        return len(old)

    async def close(self) -> None:
        """Nothing to release."""


def forward_key(compensation_key: str) -> str:
    """The forward key that a compensation key undoes (``comp:s:x`` -> ``fwd:s:x``)."""
    _, _, rest = compensation_key.partition(":")
    return f"fwd:{rest}"


def open_idempotency(url: str) -> IdempotencyStore:
    """An idempotency store for ``memory://``, ``postgresql://...`` or ``mongodb://...``.

    Raises:
        ConfigError: the URL is malformed or names another kind of server.
    """
    kind = store_kind(url, "idempotency store")
    if kind is StoreKind.MEMORY:
        return MemoryIdempotency()
    from participants.idempotency_stores import MongoIdempotency, PostgresIdempotency

    if kind is StoreKind.POSTGRES:
        return PostgresIdempotency(url)
    return MongoIdempotency.from_url(url)
