"""Participant-side idempotency: claim a command before running it, answer duplicates the same way.

Every command carries an idempotency key that is the same on every attempt of a step's
direction (``fwd:<saga>:<step>``, ``comp:<saga>:<step>``). The store keeps one entry per key,
which is in one of three states:

* **absent**: nobody has claimed the command;
* **claimed**: a claimant (one delivery on one replica) is running the handler; the claim has
  a *lease* that the claimant renews while it runs, so a claimant that crashed loses it and
  the command runs again once the lease has expired;
* **an outcome**: ``completed`` or ``failed`` with the answer, or a ``tombstone``.

:meth:`IdempotencyStore.claim` is the one question asked before a handler runs, in one round
trip: it returns the stored outcome if there is one (:class:`Stored`), takes the claim if
nobody holds a live one (:class:`Claimed`, which says whether anybody ever claimed it before),
or says who holds it until when (:class:`Busy`). :meth:`IdempotencyStore.put` records the
outcome, first writer wins, and clears the claim: the second round trip of a fresh command.
So two replicas given the same command at once never run it concurrently, and a duplicate or
a retried attempt gets the stored answer back without running the handler again.

A compensation that arrives before its forward command (the forward one was delayed, the
orchestrator timed out and compensated) leaves a *tombstone* under the forward key
(:meth:`IdempotencyStore.tombstone`), so the late forward command is refused instead of acting
after its own undo. A tombstone replaces only an absent entry or an expired claim: a live claim
means the forward command is running right now, and the compensation waits for it.

Errors (transient failures) are never stored: :meth:`IdempotencyStore.release` drops the claim
and the next attempt runs the handler again.

Stores that can run a handler's effect in the same database transaction that records its
outcome also implement :class:`TransactionalIdempotency` (PostgreSQL, MongoDB): effects in that
transaction happen exactly once.

Backends: :class:`MemoryIdempotency` here, ``PostgresIdempotency`` and ``MongoIdempotency`` in
``participants.idempotency_stores``; ``open_idempotency(url)`` picks one from a URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from contracts.messages import ErrorDetail, JsonObject
from plumbing.stores import StoreKind, store_kind

DEFAULT_IDEMPOTENCY_RETENTION = timedelta(days=7)
"""How long outcomes are kept: longer than any redelivery or manual retry horizon."""

DEFAULT_LEASE = timedelta(seconds=30)
"""How long a claim holds without renewal; the claimant renews it every third of that."""


class OutcomeKind(StrEnum):
    """What is stored under an idempotency key once the command is decided."""

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


@dataclass(frozen=True)
class Stored:
    """The command is decided: answer with ``outcome``, run nothing."""

    outcome: StoredOutcome


@dataclass(frozen=True)
class Claimed:
    """The caller holds the claim and runs the handler.

    ``first`` is False when an earlier claimant's lease expired without an outcome: that
    claimant may have acted before it died, so the command is not "never executed".
    """

    first: bool


@dataclass(frozen=True)
class Busy:
    """Another claimant holds a live claim until ``until`` (renewed while it runs)."""

    until: datetime


ClaimResult = Stored | Claimed | Busy
"""What :meth:`IdempotencyStore.claim` found."""


class ClaimLost(Exception):
    """Raised by :meth:`OutcomeTransaction.complete` when the claim is no longer the caller's
    (its lease expired and another claimant took over); the transaction is rolled back."""


class IdempotencyStore(Protocol):
    """Claims and outcomes by idempotency key (see the module docstring for the states)."""

    async def setup(self) -> None:
        """Create tables or indexes; idempotent."""
        ...

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome for ``key``, if any (a claim is not an outcome)."""
        ...

    async def claim(self, key: str, claimant: str, now: datetime, lease: timedelta) -> ClaimResult:
        """The stored outcome, else the claim until ``now + lease`` unless another is live."""
        ...

    async def renew(self, key: str, claimant: str, until: datetime) -> bool:
        """Extend ``claimant``'s claim to ``until``; False when it is not the claimant's."""
        ...

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """Store ``outcome`` unless an outcome is stored already (first writer wins), clearing
        any claim; returns what is stored now."""
        ...

    async def release(self, key: str, claimant: str) -> None:
        """Drop ``claimant``'s claim without an outcome, so the next attempt runs again."""
        ...

    async def tombstone(self, key: str, now: datetime) -> Stored | Busy:
        """Store a tombstone unless an outcome is stored or a live claim holds the key."""
        ...

    async def purge(self, now: datetime | None = None) -> int:
        """Forget entries stored longer than the retention ago; returns how many."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class OutcomeTransaction(Protocol):
    """A database transaction that holds a command's claim and will record its outcome.

    ``session`` is what the handler writes its effect with (PostgreSQL: the
    ``asyncpg.Connection`` inside the transaction; MongoDB: the ``AsyncClientSession`` in a
    transaction). The transaction commits when the block exits after :meth:`complete`, and
    rolls back otherwise (an exception, :meth:`abandon`, or no outcome recorded).
    """

    claim: ClaimResult
    session: Any

    async def complete(self, outcome: StoredOutcome) -> StoredOutcome:
        """Record ``outcome`` in the transaction.

        Raises:
            ClaimLost: the claim is no longer ours; nothing will be committed.
        """
        ...

    def abandon(self) -> None:
        """Roll the transaction back when the block exits (the handler's effect with it)."""
        ...


@runtime_checkable
class TransactionalIdempotency(Protocol):
    """A store that can run a handler's effect in the transaction that records its outcome."""

    def transaction(
        self, key: str, claimant: str, now: datetime, lease: timedelta
    ) -> contextlib.AbstractAsyncContextManager[OutcomeTransaction]:
        """Open a transaction and claim ``key`` in it (see :class:`OutcomeTransaction`)."""
        ...


@dataclass(frozen=True)
class _Claim:
    claimant: str
    lease_until: datetime
    claims: int


class MemoryIdempotency:
    """Claims and outcomes in a dict: for tests, the demo and single-process services.

    Replicas in one process (tests) may share one instance: every method runs without an
    ``await`` in between, so each is atomic.
    """

    def __init__(self, retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION) -> None:
        self.retention = retention
        self._outcomes: dict[str, StoredOutcome] = {}
        self._claims: dict[str, _Claim] = {}
        self._claimed_at: dict[str, datetime] = {}

    async def setup(self) -> None:
        """Nothing to create."""

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome."""
        return self._outcomes.get(key)

    async def claim(self, key: str, claimant: str, now: datetime, lease: timedelta) -> ClaimResult:
        """The stored outcome, the claim, or who holds it."""
        if (outcome := self._outcomes.get(key)) is not None:
            return Stored(outcome)
        held = self._claims.get(key)
        if held is not None and held.lease_until > now:
            return Busy(held.lease_until)
        claims = 1 if held is None else held.claims + 1
        self._claims[key] = _Claim(claimant, now + lease, claims)
        self._claimed_at.setdefault(key, now)
        return Claimed(first=claims == 1)

    async def renew(self, key: str, claimant: str, until: datetime) -> bool:
        """Extend the claim if it is still ``claimant``'s."""
        held = self._claims.get(key)
        if held is None or held.claimant != claimant:
            return False
        self._claims[key] = replace(held, lease_until=until)
        return True

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """First writer wins; the claim goes."""
        self._claims.pop(key, None)
        self._claimed_at.pop(key, None)
        if outcome.stored_at is None:
            outcome = replace(outcome, stored_at=datetime.now(UTC))
        return self._outcomes.setdefault(key, outcome)

    async def release(self, key: str, claimant: str) -> None:
        """Drop the claim if it is still ``claimant``'s."""
        held = self._claims.get(key)
        if held is not None and held.claimant == claimant:
            del self._claims[key]
            self._claimed_at.pop(key, None)

    async def tombstone(self, key: str, now: datetime) -> Stored | Busy:
        """A tombstone unless an outcome or a live claim is there."""
        held = self._claims.get(key)
        if key not in self._outcomes and held is not None and held.lease_until > now:
            return Busy(held.lease_until)
        return Stored(await self.put(key, StoredOutcome(OutcomeKind.TOMBSTONE, stored_at=now)))

    async def purge(self, now: datetime | None = None) -> int:
        """Forget outcomes and claims from before the retention (entries without a time stay)."""
        cutoff = (now or datetime.now(UTC)) - self.retention
        old = [k for k, o in self._outcomes.items() if o.stored_at and o.stored_at < cutoff]
        for key in old:
            del self._outcomes[key]
        stale = [k for k, at in self._claimed_at.items() if at < cutoff]
        for key in stale:
            self._claims.pop(key, None)
            del self._claimed_at[key]
        return len(old) + len(stale)

    async def close(self) -> None:
        """Nothing to release."""

    @contextlib.asynccontextmanager
    async def transaction(
        self, key: str, claimant: str, now: datetime, lease: timedelta
    ) -> AsyncIterator[OutcomeTransaction]:
        """A claim with no database behind it: ``session`` is None and nothing rolls back.

        Lets a service with transactional handlers run in tests and the demo; its effects
        are only as exactly-once as the handler makes them.
        """
        tx = _MemoryTransaction(self, key, claimant, await self.claim(key, claimant, now, lease))
        try:
            yield tx
        finally:
            if not tx.completed and isinstance(tx.claim, Claimed):
                await self.release(key, claimant)


@dataclass
class _MemoryTransaction:
    store: MemoryIdempotency
    key: str
    claimant: str
    claim: ClaimResult
    session: Any = None
    completed: bool = False
    abandoned: bool = False

    async def complete(self, outcome: StoredOutcome) -> StoredOutcome:
        held = self.store._claims.get(self.key)
        if held is None or held.claimant != self.claimant:
            raise ClaimLost(f"the claim on {self.key!r} is no longer ours")
        self.completed = True
        return await self.store.put(self.key, outcome)

    def abandon(self) -> None:
        self.abandoned = True


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
