"""The in-memory saga store: the harness, the demo and the store contract's reference."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from orchestrator.state import SagaState
from orchestrator.store import DEFAULT_RETENTION, Hold, Listed, SagaFilter, SagaRecord


class MemoryStore:
    """Keeps saga records in a dict; every method is atomic because none awaits mid-update."""

    def __init__(self, retention: timedelta = DEFAULT_RETENTION) -> None:
        self.retention = retention
        self._records: dict[str, SagaRecord] = {}

    async def setup(self) -> None:
        """Nothing to create."""

    async def create(self, record: SagaRecord) -> bool:
        """Insert unless the id exists."""
        if record.saga_id in self._records:
            return False
        self._records[record.saga_id] = record
        return True

    async def load(self, saga_id: str) -> SagaRecord | None:
        """The record, after yielding once so that concurrent writers really interleave."""
        await asyncio.sleep(0)
        return self._records.get(saga_id)

    async def save(
        self, record: SagaRecord, expected_version: int, *, drop: Collection[str] = ()
    ) -> bool:
        """Compare-and-set on the version; ``drop`` leaves the stored outbox and the new
        messages join it."""
        if record.version != expected_version + 1:
            raise ValueError("record.version must be expected_version + 1")
        current = self._records.get(record.saga_id)
        if current is None or current.version != expected_version:
            return False
        kept = tuple(entry for entry in current.outbox if entry.message_id not in drop)
        self._records[record.saga_id] = replace(record, outbox=kept + record.outbox)
        return True

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        """Drop the entries from the outbox, keeping the version."""
        current = self._records.get(saga_id)
        if current is None:
            return
        remaining = tuple(e for e in current.outbox if e.message_id not in message_ids)
        if len(remaining) != len(current.outbox):
            self._records[saga_id] = replace(current, outbox=remaining)

    async def mark_published_many(self, published: Mapping[str, Collection[str]]) -> None:
        """Drop the entries of several sagas."""
        for saga_id, message_ids in published.items():
            await self.mark_published(saga_id, message_ids)

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Active sagas whose next due time has passed."""
        due = [
            (record.next_due_at, saga_id)
            for saga_id, record in self._records.items()
            if record.next_due_at is not None and record.next_due_at <= now
        ]
        return [saga_id for _, saga_id in sorted(due)[:limit]]

    async def unpublished(self, older_than: datetime, limit: int) -> list[str]:
        """Sagas whose oldest outbox entry is at or before ``older_than``."""
        found = [
            (record.outbox_since, saga_id)
            for saga_id, record in self._records.items()
            if record.outbox_since is not None
            and record.outbox_since <= older_than
            and not _held_for_operator(record)
        ]
        return [saga_id for _, saga_id in sorted(found)[:limit]]

    async def find(self, query: SagaFilter) -> Sequence[Listed]:
        """Matching sagas, most recently updated first."""
        found = [
            Listed(record.state, record.hold)
            for record in self._records.values()
            if query.matches(record.state, record.hold)
        ]
        found.sort(key=lambda listed: (listed.state.updated_at, listed.state.saga_id), reverse=True)
        return found[: query.limit]

    async def hold(self, saga_id: str, hold: Hold) -> None:
        """Set the hold, leaving the state alone; the version goes up."""
        current = self._records.get(saga_id)
        if current is not None:
            self._records[saga_id] = replace(current, version=current.version + 1, hold=hold)

    async def held(self, waiting_for: Collection[str], limit: int) -> list[str]:
        """Sagas held for one of these definitions, oldest hold first."""
        found = [
            (record.hold.since, saga_id)
            for saga_id, record in self._records.items()
            if record.hold is not None and record.hold.waiting_for in waiting_for
        ]
        return [saga_id for _, saga_id in sorted(found)[:limit]]

    async def count_held(self) -> dict[tuple[str, str], int]:
        """Held sagas per (type, definition waited for)."""
        counts: dict[tuple[str, str], int] = {}
        for record in self._records.values():
            if record.hold is not None:
                key = (record.state.saga_type, record.hold.waiting_for or "")
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def count_by_definition(self) -> dict[tuple[str, int, str], int]:
        """Active sagas per (type, version, fingerprint)."""
        counts: dict[tuple[str, int, str], int] = {}
        for record in self._records.values():
            state = record.state
            if state.status.is_active:
                key = (
                    state.saga_type,
                    state.definition_version,
                    state.definition_fingerprint or "",
                )
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def count_by_status(self) -> dict[tuple[str, str], int]:
        """Sagas per (type, status)."""
        counts: dict[tuple[str, str], int] = {}
        for record in self._records.values():
            key = (record.state.saga_type, record.state.status.value)
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Unpublished messages and the oldest one's write time."""
        size = sum(len(record.outbox) for record in self._records.values())
        oldest = min(
            (r.outbox_since for r in self._records.values() if r.outbox_since is not None),
            default=None,
        )
        return size, oldest

    async def purge(self, now: datetime) -> int:
        """Delete finished sagas past retention."""
        expired = [
            saga_id
            for saga_id, record in self._records.items()
            if (purge_at := record.purge_at(self.retention)) is not None and purge_at <= now
        ]
        for saga_id in expired:
            del self._records[saga_id]
        return len(expired)

    async def close(self) -> None:
        """Nothing to release."""

    def states(self) -> list[SagaState]:
        """Every stored state (for tests and the demo)."""
        return [record.state for record in self._records.values()]


def _held_for_operator(record: SagaRecord) -> bool:
    return record.hold is not None and record.hold.waiting_for is None
