"""Operator actions on sagas (retry, abort, resolve), one saga or every saga a filter matches.

The CLI and the console both act through :class:`Operations`, so an action goes through the
saga rules (:func:`~orchestrator.engine.decide`) the same way wherever it is asked for, names
who asked in the saga's history, and is counted in the metrics of the process that applied it:
with a broker, the CLI and the console send their actions to the orchestrator daemon
(``OperateSaga`` on the queries queue), so the daemon's counters include them; without one
(or ``saga console --apply-here``) they are applied, and counted, where they were asked for.
A bulk action applies to each matching saga in turn: one the rules refuse (it moved on
meanwhile) is reported with the reason and the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from orchestrator.client import SagaClient
from orchestrator.engine import Action
from orchestrator.runtime import Orchestrator
from orchestrator.state import SagaStatus
from orchestrator.store import Cursor, SagaFilter
from plumbing.errors import ActionRefused, PublishFailed, SagaNotFound
from plumbing.topology import Topology
from plumbing.transport import Outgoing

BULK_LIMIT: Final = 10_000
"""The most sagas one bulk action touches; a larger set is refused, to be narrowed first."""

_PAGE: Final = 500


class OutboxOnly:
    """A transport for operator actions where no broker is configured: every publish is
    deferred, so the action is saved with its outbox and the daemon's outbox relay sends it."""

    async def declare(self, topology: Topology) -> None:
        """Nothing to declare."""

    async def publish(self, message: Outgoing) -> None:
        """Leave the message in the outbox."""
        raise PublishFailed("no broker configured here; the daemon's outbox relay will send it")

    async def consume(self, *args: object, **kwargs: object) -> None:
        """Operator actions consume nothing."""
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Applied:
    """An action the saga rules accepted."""

    saga_id: str
    before: SagaStatus
    after: SagaStatus
    unsent: int
    """Messages the action wrote that are not published yet: without a broker here, the
    daemon's outbox relay sends them."""


@dataclass(frozen=True)
class Refused:
    """An action a bulk run could not apply to one saga, and why."""

    saga_id: str
    reason: str


@dataclass(frozen=True)
class BulkOutcome:
    """What a bulk action did to each saga it matched."""

    applied: tuple[Applied, ...]
    refused: tuple[Refused, ...]


class Operations:
    """Applies operator actions through an orchestrator's rules and store.

    Args:
        engine: reads the store, and applies actions when there is no ``daemon``.
        daemon: a client of the running orchestrator daemon: actions are sent to it, so that
            it applies them and counts them in its metrics with every other transition.
    """

    def __init__(self, engine: Orchestrator, daemon: SagaClient | None = None) -> None:
        self.engine = engine
        self.daemon = daemon

    async def act(
        self, saga_id: str, action: Action, *, by: str | None, reason: str | None = None
    ) -> Applied:
        """Apply ``action`` to one saga.

        Raises:
            SagaNotFound: no saga has this id.
            ActionRefused: the saga rules refuse the action in the saga's current state.
        """
        if self.daemon is not None:
            if await self.engine.store.load(saga_id) is None:
                raise SagaNotFound(f"no saga has id {saga_id!r}")
            answer = await self.daemon.operate(saga_id, action, by=by, reason=reason)
            if not answer.applied or answer.before is None or answer.after is None:
                raise ActionRefused(answer.refused or "the orchestrator refused the action")
            # The daemon publishes what the action wrote (its relay, at worst).
            return Applied(saga_id, SagaStatus(answer.before), SagaStatus(answer.after), 0)
        store = self.engine.store
        before = await store.load(saga_id)
        if before is None:
            raise SagaNotFound(f"no saga has id {saga_id!r}")
        after = await self.engine.operate(saga_id, action.event(by=by, reason=reason))
        # Messages already in the outbox before the action are the daemon's to send (a timer
        # it holds back, say); only the ones this action wrote and could not publish count.
        earlier = {entry.message_id for entry in before.outbox}
        record = await store.load(saga_id)
        unsent = 0
        if record is not None:
            unsent = sum(1 for entry in record.outbox if entry.message_id not in earlier)
        return Applied(saga_id, before.state.status, after.status, unsent)

    async def matching(self, query: SagaFilter) -> Sequence[str]:
        """The ids of every saga ``query`` matches (its limit ignored), newest first.

        Raises:
            ActionRefused: more than :data:`BULK_LIMIT` sagas match.
        """
        found: list[str] = []
        page = replace(query, limit=_PAGE, after=None)
        while True:
            listed = await self.engine.store.find(page)
            found += [item.state.saga_id for item in listed]
            if len(found) > BULK_LIMIT:
                raise ActionRefused(
                    f"more than {BULK_LIMIT} sagas match; narrow the filter and act in parts"
                )
            if len(listed) < _PAGE:
                return found
            last = listed[-1].state
            page = replace(page, after=Cursor(last.updated_at, last.saga_id))

    async def bulk(
        self,
        saga_ids: Sequence[str],
        action: Action,
        *,
        by: str | None,
        reason: str | None = None,
    ) -> BulkOutcome:
        """Apply ``action`` to each of ``saga_ids`` in turn (see :meth:`matching`)."""
        applied: list[Applied] = []
        refused: list[Refused] = []
        for saga_id in saga_ids:
            try:
                applied.append(await self.act(saga_id, action, by=by, reason=reason))
            except (ActionRefused, SagaNotFound) as e:
                refused.append(Refused(saga_id, str(e)))
        return BulkOutcome(tuple(applied), tuple(refused))
