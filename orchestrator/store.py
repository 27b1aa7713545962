"""The saga store seam: one contract that MongoDB, PostgreSQL and memory all implement.

A saga is one record: its state, a version, and its outbox (the messages its transitions
decided to send and that are not yet confirmed as published). Every transition is a single
compare-and-set on the version that replaces the state and appends its messages to the
outbox, so a crash can never leave a state change without the messages it implies, or the
reverse. Publishing removes messages from the outbox without changing the version.

A saga can be *held*: the daemon that met it could not run it, because the definition it
started with is not loaded (the hold names that definition, and a daemon that has it resumes
the saga), or because handling it failed (an operator must look). A held saga is not swept;
replies that arrive meanwhile are kept in its state's inbox.

Stores also keep a few derived fields for their indexes: ``status``, ``saga_type``,
``definition_version``, ``next_due_at`` (the sweep; empty while held), ``outbox_since`` (the
relay), ``purge_at`` (retention, set only on terminal sagas) and ``held_for`` (the definition
a held saga waits for).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from pydantic import TypeAdapter, ValidationError

from orchestrator.state import SagaState, SagaStatus, StepStatus
from plumbing.codec import validation_summary
from plumbing.errors import SagaUnreadable
from plumbing.transport import Outgoing

DEFAULT_RETENTION = timedelta(days=14)
"""How long a finished saga is kept before it is purged."""


@dataclass(frozen=True)
class Hold:
    """Why a saga is not being advanced, and what would let it carry on.

    ``waiting_for`` is the key (:func:`~orchestrator.definition.definition_key`) of the
    definition the saga needs; a daemon that has it resumes the saga. ``None`` means an
    operator must act (``saga resume`` once the cause is fixed).
    """

    reason: str
    since: datetime
    waiting_for: str | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON shape ``saga ls --json`` and ``saga show --json`` print."""
        return {
            "reason": self.reason,
            "since": self.since.isoformat().replace("+00:00", "Z"),
            "waiting_for": self.waiting_for,
        }


@dataclass(frozen=True)
class SagaRecord:
    """A saga as stored: state, version, unpublished outbox, and a hold if it has one."""

    state: SagaState
    version: int = 1
    outbox: tuple[Outgoing, ...] = field(default=())
    hold: Hold | None = None

    @property
    def saga_id(self) -> str:
        """The saga's id."""
        return self.state.saga_id

    @property
    def next_due_at(self) -> datetime | None:
        """When the sweep should fire the saga: never while it is held."""
        return None if self.hold is not None else self.state.next_due_at

    @property
    def outbox_since(self) -> datetime | None:
        """When the oldest unpublished message was written, if any."""
        return min((entry.created_at for entry in self.outbox), default=None)

    def summary(self, *, with_history: bool = True) -> dict[str, Any]:
        """The state's summary plus the hold, the replies kept and the outbox size."""
        return {
            **self.state.summary(with_history=with_history),
            "held": None if self.hold is None else self.hold.summary(),
            "kept_replies": len(self.state.inbox),
            "outbox": len(self.outbox),
        }

    def purge_at(self, retention: timedelta) -> datetime | None:
        """When a finished saga may be deleted; ``None`` while it is not terminal."""
        finished = self.state.finished_at
        if not self.state.status.is_terminal or finished is None:
            return None
        return finished + retention


CURRENT_STEP_STATUSES: Final = tuple(
    status.value
    for status in (
        StepStatus.RUNNING,
        StepStatus.RETRY_SCHEDULED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRY_SCHEDULED,
        StepStatus.COMPENSATION_FAILED,
    )
)
"""The step statuses that make a step one an unfinished saga is on (``SagaFilter.step``)."""


@dataclass(frozen=True)
class Cursor:
    """Where a listing page ended: the last saga's update time and id (the listing's order)."""

    updated_at: datetime
    saga_id: str


@dataclass(frozen=True)
class SagaFilter:
    """Which sagas an operator listing returns (newest first)."""

    status: SagaStatus | None = None
    saga_type: str | None = None
    version: int | None = None
    """Only sagas running this definition version."""
    held: bool | None = None
    """Only held sagas (True) or only sagas that are not held (False)."""
    step: str | None = None
    """Only sagas on this step: its command or compensation is out, waiting for a retry, or
    gave up (a stuck saga). A finished saga is on no step."""
    id_prefix: str | None = None
    """Only sagas whose id starts with this text."""
    created_from: datetime | None = None
    """Only sagas started at or after this instant."""
    created_to: datetime | None = None
    """Only sagas started before this instant."""
    after: Cursor | None = None
    """Only sagas listed after this one: the next page."""
    limit: int = 100

    def matches(self, state: SagaState, hold: Hold | None) -> bool:
        """Whether a saga passes the filter (the in-memory store's query; the others index)."""
        return (
            (self.status is None or state.status is self.status)
            and (self.saga_type is None or state.saga_type == self.saga_type)
            and (self.version is None or state.definition_version == self.version)
            and (self.held is None or (hold is not None) == self.held)
            and (
                self.step is None
                or any(
                    step.name == self.step and step.status.value in CURRENT_STEP_STATUSES
                    for step in state.steps
                )
            )
            and (self.id_prefix is None or state.saga_id.startswith(self.id_prefix))
            and (self.created_from is None or state.created_at >= self.created_from)
            and (self.created_to is None or state.created_at < self.created_to)
            and (
                self.after is None
                or (state.updated_at, state.saga_id) < (self.after.updated_at, self.after.saga_id)
            )
        )


@dataclass(frozen=True)
class Listed:
    """One saga in an operator listing: its state and its hold, if any."""

    state: SagaState
    hold: Hold | None = None

    def summary(self) -> dict[str, Any]:
        """The state's summary without its history, plus the hold."""
        return {
            **self.state.summary(with_history=False),
            "held": None if self.hold is None else self.hold.summary(),
        }


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

    async def save(
        self, record: SagaRecord, expected_version: int, *, drop: Collection[str] = ()
    ) -> bool:
        """Replace the state and hold, remove the ``drop`` messages from the stored outbox and
        *append* ``record.outbox`` to it, if the stored version is ``expected_version``.

        ``record.outbox`` holds only the messages this transition adds. Appending (never
        rewriting the outbox from what was loaded) matters: between the load and the save
        another handler may have published and marked an older entry, and writing it back
        would send it again. ``drop`` names entries this writer knows are done with: published
        already, or timers the new state no longer waits for; folding their removal into the
        transition's write saves a separate ``mark_published``. ``record.version`` must be
        ``expected_version + 1``. ``False`` means another writer got there first: reload and
        decide again.
        """
        ...

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        """Drop these messages from the saga's outbox; does not change the version."""
        ...

    async def mark_published_many(self, published: Mapping[str, Collection[str]]) -> None:
        """:meth:`mark_published` for several sagas at once, in as few round trips as can be."""
        ...

    async def due(self, now: datetime, limit: int) -> Sequence[str]:
        """Ids of active sagas whose ``next_due_at`` is at or before ``now``, oldest first."""
        ...

    async def unpublished(self, older_than: datetime, limit: int) -> Sequence[str]:
        """Ids of sagas holding an outbox message written at or before ``older_than``, oldest
        first; sagas held for an operator are left out (their record may be unreadable)."""
        ...

    async def find(self, query: SagaFilter) -> Sequence[Listed]:
        """Sagas matching ``query``, most recently updated first."""
        ...

    async def hold(self, saga_id: str, hold: Hold) -> None:
        """Hold a saga whose record cannot be read or handled, without reading it.

        The state does not change; the version goes up, so that a writer holding an older
        copy (a replica, or this process's recent records) loses its compare-and-set and reads
        the hold. The sweep and the relay pass a held saga by.
        """
        ...

    async def held(self, waiting_for: Collection[str], limit: int) -> Sequence[str]:
        """Ids of sagas held for one of these definition keys, oldest hold first."""
        ...

    async def count_held(self) -> dict[tuple[str, str], int]:
        """Held sagas per ``(saga_type, waiting_for)``; ``waiting_for`` is ``""`` for sagas
        held for an operator."""
        ...

    async def count_by_definition(self) -> dict[tuple[str, int, str], int]:
        """Active sagas per ``(saga_type, definition version, fingerprint)`` (``""`` for
        sagas stored before fingerprints)."""
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


_OUTBOX: TypeAdapter[list[Outgoing]] = TypeAdapter(list[Outgoing])


def outbox_json(outbox: Sequence[Outgoing]) -> str:
    """Outbox entries as JSON text, as the stores keep them."""
    return _OUTBOX.dump_json(list(outbox)).decode()


def read_state(saga_id: str, document: object) -> SagaState:
    """A stored state, validated: a document (dict) or its JSON text.

    Raises:
        SagaUnreadable: it does not validate (damaged, or from a newer release).
    """
    try:
        if isinstance(document, str | bytes):
            return SagaState.from_json(document)
        return SagaState.from_document(document)
    except ValidationError as e:
        message = f"saga {saga_id}'s state cannot be read: {validation_summary(e)}"
        raise SagaUnreadable(message, saga_id=saga_id) from e


def read_record(
    saga_id: str,
    *,
    state: object,
    outbox: Iterable[object] | str,
    version: int,
    hold: Hold | None,
) -> SagaRecord:
    """A stored record from its parts (documents or JSON text), validated.

    Raises:
        SagaUnreadable: the state or an outbox entry does not validate.
    """
    try:
        if isinstance(outbox, str):
            entries = tuple(_OUTBOX.validate_json(outbox))
        else:
            entries = tuple(Outgoing.model_validate(entry) for entry in outbox)
    except ValidationError as e:
        message = f"saga {saga_id}'s outbox cannot be read: {validation_summary(e)}"
        raise SagaUnreadable(message, saga_id=saga_id) from e
    return SagaRecord(read_state(saga_id, state), version, entries, hold)
