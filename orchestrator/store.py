"""The saga store seam: one contract that MongoDB, PostgreSQL and memory all implement.

A saga is one record: its state, a version, and its outbox (the messages its transitions
decided to send and that are not yet confirmed as published). Every transition is a single
compare-and-set on the version that replaces the state and appends its messages to the
outbox, so a crash can never leave a state change without the messages it implies, or the
reverse. Publishing removes messages from the outbox without changing the version.

Stores also keep a few derived fields for their indexes: ``status``, ``saga_type``,
``next_due_at`` (the sweep), ``outbox_since`` (the relay) and ``purge_at`` (retention, set only
on terminal sagas).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from orchestrator.state import SagaState, SagaStatus
from plumbing.transport import Outgoing

DEFAULT_RETENTION = timedelta(days=14)
"""How long a finished saga is kept before it is purged."""


@dataclass(frozen=True)
class SagaRecord:
    """A saga as stored: state, version and unpublished outbox."""

    state: SagaState
    version: int = 1
    outbox: tuple[Outgoing, ...] = field(default=())

    @property
    def saga_id(self) -> str:
        """The saga's id."""
        return self.state.saga_id

    @property
    def outbox_since(self) -> datetime | None:
        """When the oldest unpublished message was written, if any."""
        return min((entry.created_at for entry in self.outbox), default=None)

    def purge_at(self, retention: timedelta) -> datetime | None:
        """When a finished saga may be deleted; ``None`` while it is not terminal."""
        finished = self.state.finished_at
        if not self.state.status.is_terminal or finished is None:
            return None
        return finished + retention


@dataclass(frozen=True)
class SagaFilter:
    """Which sagas an operator listing returns (newest first)."""

    status: SagaStatus | None = None
    saga_type: str | None = None
    limit: int = 100


class SagaStore(Protocol):
    """Durable saga records."""

    async def setup(self) -> None:
        """Create schema and indexes; idempotent. Raises ``StoreUnavailable``."""
        ...

    async def create(self, record: SagaRecord) -> bool:
        """Insert a new saga; ``False`` (and nothing written) if the id exists."""
        ...

    async def load(self, saga_id: str) -> SagaRecord | None:
        """The saga's record, or ``None``."""
        ...

    async def save(self, record: SagaRecord, expected_version: int) -> bool:
        """Replace the state and *append* ``record.outbox`` to the stored outbox, if the stored
        version is ``expected_version``.

        ``record.outbox`` holds only the messages this transition adds. Appending (never
        rewriting the outbox from what was loaded) matters: between the load and the save
        another handler may have published and marked an older entry, and writing it back
        would send it again. ``record.version`` must be ``expected_version + 1``. ``False``
        means another writer got there first: reload and decide again.
        """
        ...

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        """Drop these messages from the saga's outbox; does not change the version."""
        ...

    async def due(self, now: datetime, limit: int) -> Sequence[str]:
        """Ids of active sagas whose ``next_due_at`` is at or before ``now``, oldest first."""
        ...

    async def unpublished(self, older_than: datetime, limit: int) -> Sequence[SagaRecord]:
        """Sagas holding an outbox message written at or before ``older_than``."""
        ...

    async def find(self, query: SagaFilter) -> Sequence[SagaState]:
        """Sagas matching ``query``, most recently updated first."""
        ...

    async def count_by_status(self) -> dict[tuple[str, str], int]:
        """Number of sagas per ``(saga_type, status)`` (for the in-flight gauge)."""
        ...

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Number of unpublished messages and the write time of the oldest."""
        ...

    async def purge(self, now: datetime) -> int:
        """Delete finished sagas whose retention has passed; returns how many."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
