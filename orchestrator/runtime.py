"""The orchestrator: the small I/O shell around the pure core.

For every message: load the saga, ``decide``, save state and outbox in one compare-and-set,
publish the outbox with publisher confirms, mark it published, then settle the message. A lost
version race reloads and decides again. A failed publish is not an error for the message: the
state is committed and the outbox relay publishes the rest later.

Background work runs in one TaskGroup: the consumers, the sweep that fires overdue timeouts
from the store (the truth behind every timer), the outbox relay that re-publishes messages a
crash left behind, the retention purge and the store-backed gauges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from contracts import names
from contracts.client import (
    OperateSaga,
    OperationAnswer,
    QuerySaga,
    SagaSnapshot,
    StartAnswer,
    StartStatus,
    StepView,
)
from contracts.events import EventName
from contracts.messages import Reply, StartSaga, TimerMessage
from orchestrator import spans
from orchestrator.definition import App, Missing, Saga, Step, definition_key
from orchestrator.effects import PublishEvent, outgoing
from orchestrator.engine import (
    HISTORY_LIMIT,
    Action,
    Decision,
    Event,
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    Outcome,
    Progress,
    ReplyReceived,
    Start,
    Wakeup,
    Watch,
    decide,
    new_saga,
    replay,
)
from orchestrator.metrics import Metrics
from orchestrator.outbox import OutboxPublisher
from orchestrator.recent import RecentRecords
from orchestrator.state import SagaState, StepState, StepStatus
from orchestrator.store import Hold, SagaRecord, SagaStore
from plumbing import tracing
from plumbing.clock import Clock, SystemClock
from plumbing.codec import answer_message, decode, decode_answer
from plumbing.errors import (
    ActionRefused,
    BrokerError,
    ConcurrencyExhausted,
    InvalidSagaData,
    MessageRejected,
    PublishFailed,
    SagaConflict,
    SagaNotFound,
    SagaUnreadable,
    StoreUnavailable,
    UnknownSagaType,
)
from plumbing.topology import QueuePolicy, Topology, orchestrator_topology
from plumbing.transport import (
    DeadLetter,
    Delivery,
    Disposition,
    Outgoing,
    Transport,
)

log = structlog.get_logger("orchestrator")

T = TypeVar("T")

_REASON_LIMIT: Final = 1000  # a hold's reason is a sentence an operator reads, not a dump

OperatorAction = OperatorRetry | OperatorAbort | OperatorResolve
"""What an operator can do to a saga."""

_ACTION_LABELS: Final[dict[type[OperatorAction], str]] = {
    OperatorRetry: "retry",
    OperatorAbort: "abort",
    OperatorResolve: "resolve",
}


class Handled(StrEnum):
    """What the shell did with a message besides applying it (an engine :class:`Outcome`).

    Both are the ``outcome`` label of ``saga_messages_total``.
    """

    STARTED = "started"
    ALREADY_STARTED = "already_started"
    REFUSED = "refused"
    """A start request refused, and the requester told why."""
    ANSWERED = "answered"
    SAGA_NOT_FOUND = "saga_not_found"
    REQUEUED = "requeued"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class EngineConfig:
    """Tuning of the orchestrator's loops; every interval is in seconds."""

    sweep_interval: float = 5.0
    sweep_batch: int = 500
    relay_interval: float = 5.0
    outbox_grace: float = 10.0
    purge_interval: float = 300.0
    gauge_interval: float = 15.0
    conflict_retries: int = 25
    store_retry_delay: float = 1.0
    store_retry_max: float = 30.0
    history_limit: int = HISTORY_LIMIT
    published_events: frozenset[EventName] | None = None
    """Lifecycle events to publish to observers; ``None`` publishes every one."""
    queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    timer_hold: float = 2.0
    """Seconds a timer is held back in the process before it is published (see
    :mod:`orchestrator.outbox`); keep it below ``outbox_grace``."""
    mark_delay: float = 0.2
    """Seconds published messages wait to be marked with a saga's next write."""
    recent_records: int = 2000
    """Records of active sagas kept after writing them, so that their next message needs no
    load (see :mod:`orchestrator.recent`); 0 loads every time."""


class Orchestrator:
    """Runs the saga types of an :class:`App` over a store and a transport."""

    def __init__(
        self,
        app: App,
        store: SagaStore,
        transport: Transport,
        *,
        clock: Clock | None = None,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.transport = transport
        self.clock: Clock = clock or SystemClock()
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.outbox = OutboxPublisher(
            store,
            transport,
            self.clock,
            timer_hold=self.config.timer_hold,
            mark_delay=self.config.mark_delay,
        )
        self.recent = RecentRecords(self.config.recent_records)
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    @property
    def topology(self) -> Topology:
        """Exchanges, queues and bindings this orchestrator needs."""
        return orchestrator_topology(self.app.services, self.config.queue_policy)

    # --- Commands ---------------------------------------------------------------------------

    async def start(
        self,
        saga_type: str,
        saga_id: str,
        data: Mapping[str, Any],
        *,
        version: int | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        watchers: tuple[str, ...] = (),
    ) -> SagaState:
        """Start a saga on the newest definition of its type (or ``version``), or return the
        existing one with this id: starting is idempotent for the same type and data.

        ``watchers`` are clients' queues that get the saga's outcome when it ends.

        Raises:
            UnknownSagaType: the app has no saga type ``saga_type``, or not that version.
            InvalidSagaData: ``data`` does not match the saga's data model.
            SagaConflict: the id is taken by a saga of another type, or with other data.
        """
        state, _ = await self._start(
            saga_type,
            saga_id,
            data,
            version=version,
            traceparent=traceparent,
            tracestate=tracestate,
            watchers=watchers,
        )
        return state

    async def _start(
        self,
        saga_type: str,
        saga_id: str,
        data: Mapping[str, Any],
        *,
        version: int | None,
        traceparent: str | None,
        watchers: tuple[str, ...],
        tracestate: str | None = None,
    ) -> tuple[SagaState, bool]:
        """:meth:`start`, also saying whether this call created the saga."""
        saga = self._definition_to_start(saga_type, version)
        now = self.clock.now()
        wanted = new_saga(  # validates the data, raising if it is invalid
            saga,
            saga_id,
            data,
            now,
            traceparent=tracing.continue_or_start(traceparent),
            # A tracestate belongs with the caller's traceparent; a new trace starts without.
            tracestate=tracestate if tracing.valid(traceparent) else None,
            watchers=watchers,
        )
        # Create first and read only if the id is taken: a new saga costs one write.
        decision = decide(wanted, Start(), now, saga, history_limit=self.config.history_limit)
        record = SagaRecord(decision.state, 1, self._outbox(decision, now))
        if not await self.store.create(record):
            existing = await self.store.load(saga_id)
            if existing is None:  # created and purged in between: vanishingly rare, but honest
                raise SagaNotFound(f"saga {saga_id} disappeared while being started")
            return await self._existing(existing, wanted, watchers), False
        self.recent.remember(record)
        self._observe(decision, now)
        await self.outbox.publish(record)
        return decision.state, True

    async def _existing(
        self, record: SagaRecord, wanted: SagaState, watchers: tuple[str, ...]
    ) -> SagaState:
        """The saga a repeated start names, if it is the same saga; its new watchers added."""
        state = record.state
        if state.saga_type != wanted.saga_type:
            raise SagaConflict(
                f"saga id {record.saga_id} is already used by a {state.saga_type} saga"
            )
        if state.data != wanted.data:
            raise SagaConflict(f"saga {record.saga_id} already exists with other data")
        for reply_to in watchers:
            state = (await self.apply(record.saga_id, Watch(reply_to))).state
        return state

    def _definition_to_start(self, saga_type: str, version: int | None) -> Saga:
        if saga_type not in self.app:
            known = ", ".join(self.app.types)
            raise UnknownSagaType(f"no saga type {saga_type!r}; this app runs {known}")
        if version is None:
            return self.app[saga_type]
        saga = self.app.version(saga_type, version)
        if saga is None:
            have = ", ".join(f"v{v}" for v in self.app.versions(saga_type))
            raise UnknownSagaType(
                f"saga type {saga_type!r} has no version {version}; it has {have}"
            )
        return saga

    def _same_type(self, record: SagaRecord, saga_type: str) -> SagaState:
        if record.state.saga_type != saga_type:
            raise SagaConflict(
                f"saga id {record.saga_id} is already used by a {record.state.saga_type} saga"
            )
        return record.state

    async def apply(self, saga_id: str, event: Event) -> Decision:
        """Apply one event to one saga, deciding again after every lost version race.

        A saga this daemon cannot run (its definition is not loaded, or handling it failed)
        is held instead: a reply is kept for when it resumes.

        Raises:
            SagaNotFound: no saga has this id.
            SagaUnreadable: its stored record does not validate.
            ConcurrencyExhausted: the version race was lost ``conflict_retries`` times.
            ActionRefused: an operator action does not apply (a held saga refuses them all).
        """
        _, decision = await self._apply(saga_id, event)
        return decision

    async def _apply(self, saga_id: str, event: Event) -> tuple[SagaState, Decision]:
        """:meth:`apply`, also returning the state the winning decision was made from."""
        # The record this process wrote last is a first guess (an operator's action is always
        # decided from the store). It may be stale, and only a write finds that out (its
        # compare-and-set fails), so a guess is acted on only when the decision writes.
        guess = None if isinstance(event, OperatorAction) else self.recent.get(saga_id)
        for _ in range(self.config.conflict_retries):
            record = guess or await self.store.load(saga_id)
            if record is None:
                raise SagaNotFound(f"no saga has id {saga_id!r}")
            now = self.clock.now()
            verdict = self._decide(record, event, now)
            if guess is not None:
                guess = None
                if isinstance(verdict, Hold) or not verdict.changed:
                    continue  # decide again from the stored record
            if isinstance(verdict, Hold):
                done = await self._hold(record, event, verdict)
            else:
                done = await self._commit(record, verdict, now)
            if done is not None:
                return record.state, done
            self._conflict()
        raise ConcurrencyExhausted(
            f"saga {saga_id}: lost the version race {self.config.conflict_retries} times in a row"
        )

    def _decide(self, record: SagaRecord, event: Event, now: datetime) -> Decision | Hold:
        """The decision about ``event``, or the hold that keeps the saga from being decided."""
        if record.hold is not None:
            return record.hold
        state = record.state
        saga = self.app.resolve(
            state.saga_type, state.definition_version, state.definition_fingerprint
        )
        if isinstance(saga, Missing):
            return Hold(saga.reason, now, waiting_for=_waiting_for(state))
        try:
            return decide(state, event, now, saga, history_limit=self.config.history_limit)
        except ActionRefused:
            raise
        except Exception as e:
            log.exception("saga_decision_failed", saga_id=state.saga_id)
            return Hold(f"handling {_describe_event(event)} failed: {e!r}"[:_REASON_LIMIT], now)

    async def _commit(
        self, record: SagaRecord, decision: Decision, now: datetime
    ) -> Decision | None:
        """Save and publish a decision; ``None`` when another writer got there first."""
        if not decision.changed:
            self._observe(decision, now)
            return decision
        # The store appends these to the saga's outbox; entries of earlier decisions stay with
        # whoever is publishing them (or the relay, if they were left behind).
        saved = SagaRecord(decision.state, record.version + 1, self._outbox(decision, now))
        if not await self._save(saved, record.version):
            return None
        self._observe(decision, now)
        spans.record(record.state, decision.state, decision.events)
        await self.outbox.publish(saved)
        return decision

    async def _hold(self, record: SagaRecord, event: Event, hold: Hold) -> Decision | None:
        """Keep what ``event`` brought for when the saga resumes; ``None`` on a lost race."""
        if isinstance(event, OperatorAction):
            raise ActionRefused(
                f"saga {record.saga_id} is held: {hold.reason}. Resume it (saga resume) or "
                "move it to another version (saga resume --to-version N) first"
            )
        kept = self._keep(record, event, hold)
        if kept is not record and not await self._save(kept, record.version):
            return None
        if record.hold is None:
            self._held(record.state, hold)
        return Decision(kept.state, (), Outcome.HELD, changed=kept is not record)

    def _keep(self, record: SagaRecord, event: Event, hold: Hold) -> SagaRecord:
        """The record with ``hold`` set and a reply kept in the inbox; ``record`` itself when
        nothing changes (a wake-up needs no keeping: due times are in the state)."""
        state = record.state
        if isinstance(event, ReplyReceived) and all(
            kept.message_id != event.reply.message_id for kept in state.inbox
        ):
            state = replace(state, inbox=(*state.inbox, event.reply))
        if isinstance(event, Watch) and event.reply_to not in state.watchers:
            state = replace(state, watchers=(*state.watchers, event.reply_to))
        if state is record.state and hold == record.hold:
            return record
        return SagaRecord(state, record.version + 1, (), hold)

    def _held(self, state: SagaState, hold: Hold) -> None:
        log.warning(
            "saga_held",
            saga_id=state.saga_id,
            saga_type=state.saga_type,
            version=state.definition_version,
            reason=hold.reason,
        )
        if self.metrics:
            cause = "definition" if hold.waiting_for is not None else "error"
            self.metrics.holds.labels(state.saga_type, cause).inc()

    def _conflict(self) -> None:
        if self.metrics:
            self.metrics.version_conflicts.inc()

    async def operate(self, saga_id: str, action: OperatorAction) -> SagaState:
        """Apply an operator action (retry, abort, resolve) through the saga rules."""
        decision = await self.apply(saga_id, action)
        log.info(
            "operator_action_applied", saga_id=saga_id, action=type(action).__name__, by=action.by
        )
        if self.metrics:
            name = _ACTION_LABELS[type(action)]
            self.metrics.operator_actions.labels(decision.state.saga_type, name).inc()
        return decision.state

    # --- Holds ------------------------------------------------------------------------------

    async def resume(self, saga_id: str, *, to_version: int | None = None) -> SagaState:
        """Carry a held saga on: its definition is here now, or an operator fixed the cause.

        The replies it kept are applied in order, then due times are checked. With
        ``to_version`` the saga moves to another version of its definition first (an
        operator's migration): every step it has started must come first in that version,
        with the same kind, service, command and compensation.

        Raises:
            SagaNotFound: no saga has this id.
            ActionRefused: it is not held, its definition is still missing, or the migration
                is not safe.
        """
        for _ in range(self.config.conflict_retries):
            record = await self.store.load(saga_id)
            if record is None:
                raise SagaNotFound(f"no saga has id {saga_id!r}")
            state = record.state
            if to_version is None and record.hold is None:
                raise ActionRefused(f"saga {saga_id} is not held; there is nothing to resume")
            if to_version is not None:
                saga, state = self._migrated(state, to_version)
            else:
                found = self.app.resolve(
                    state.saga_type, state.definition_version, state.definition_fingerprint
                )
                if isinstance(found, Missing):
                    raise ActionRefused(f"saga {saga_id} cannot resume: {found.reason}")
                saga = found
            now = self.clock.now()
            events: list[Event] = [ReplyReceived(reply) for reply in record.state.inbox]
            decisions = replay(
                replace(state, inbox=()),
                [*events, Wakeup()],
                now,
                saga,
                history_limit=self.config.history_limit,
            )
            state = decisions[-1].state
            effects = tuple(effect for decision in decisions for effect in decision.effects)
            resumed = Decision(replace(state, updated_at=now), effects, Outcome.APPLIED)
            saved = SagaRecord(resumed.state, record.version + 1, self._outbox(resumed, now))
            if await self._save(saved, record.version):
                previous = record.state
                for decision in decisions:
                    self._observe(decision, now)
                    spans.record(previous, decision.state, decision.events)
                    previous = decision.state
                log.info(
                    "saga_resumed",
                    saga_id=saga_id,
                    version=state.definition_version,
                    replies=len(record.state.inbox),
                )
                await self.outbox.publish(saved)
                return resumed.state
            self._conflict()
        raise ConcurrencyExhausted(
            f"saga {saga_id}: lost the version race {self.config.conflict_retries} times in a row"
        )

    def _migrated(self, state: SagaState, version: int) -> tuple[Saga, SagaState]:
        """``state`` moved onto ``version`` of its definition, if that is safe."""
        target = self.app.version(state.saga_type, version)
        if target is None:
            have = ", ".join(f"v{v}" for v in self.app.versions(state.saga_type))
            raise ActionRefused(f"this app has no {state.saga_type} v{version} (it has {have})")
        started = [step.name for step in state.steps if step.status is not StepStatus.NOT_STARTED]
        prefix = [step.name for step in target.steps[: len(started)]]
        if started != prefix:
            raise ActionRefused(
                f"saga {state.saga_id} cannot move to v{version}: the steps it has started "
                f"({', '.join(started) or 'none'}) must be the first steps of v{version} "
                f"({', '.join(step.name for step in target.steps)})"
            )
        current = self.app.version(state.saga_type, state.definition_version)
        for name in started:
            new = target.step(name)
            old = None if current is None or name not in current.index else current.step(name)
            if old is not None and _shape(old) != _shape(new):
                raise ActionRefused(
                    f"saga {state.saga_id} cannot move to v{version}: step {name!r} has another "
                    "kind, service, command or compensation there"
                )
        steps = tuple(
            replace(state.step(step.name), group=step.group)
            if step.name in started
            else StepState(name=step.name, group=step.group)
            for step in target.steps
        )
        moved = replace(
            state,
            steps=steps,
            definition_version=target.version,
            definition_fingerprint=target.fingerprint,
        )
        log.info("saga_migrated", saga_id=state.saga_id, to_version=version)
        return target, moved

    # --- Outbox -----------------------------------------------------------------------------

    def _outbox(self, decision: Decision, now: datetime) -> tuple[Outgoing, ...]:
        """The messages a decision adds to the outbox (unwanted lifecycle events left out)."""
        wanted = self.config.published_events
        entries: dict[str, Outgoing] = {}
        for effect in decision.effects:
            if (
                isinstance(effect, PublishEvent)
                and wanted is not None
                and effect.event.event not in wanted
            ):
                continue
            message = outgoing(effect, now)
            entries[message.message_id] = message
        return tuple(entries.values())

    async def _save(self, saved: SagaRecord, expected_version: int) -> bool:
        """One compare-and-set that also drops what the outbox publisher is done with."""
        taken = self.outbox.drops(saved.saga_id, saved.state)
        written = False  # if the save raises, written or not, nobody knows: the next write tells
        try:
            written = await self.store.save(saved, expected_version, drop=taken.ids)
        finally:
            if written:
                self.recent.remember(saved)
            else:
                self.recent.forget(saved.saga_id)
                self.outbox.restore(saved.saga_id, taken)
        return written

    # --- Message handlers -------------------------------------------------------------------

    async def on_start(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Handle a start request from the ``saga.start`` queue."""
        return await self._guarded(delivery, self._handle_start)

    async def on_query(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Answer a client's query from the ``saga.queries`` queue."""
        return await self._guarded(delivery, self._handle_query)

    async def on_reply(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Handle a participant reply from the ``saga.replies`` queue."""
        return await self._guarded(delivery, self._handle_reply)

    async def on_timer(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Handle a wake-up from the ``saga.timers`` queue."""
        return await self._guarded(delivery, self._handle_timer)

    async def _guarded(
        self, delivery: Delivery, handler: Callable[[Delivery], Awaitable[Outcome | Handled]]
    ) -> Disposition | DeadLetter:
        """The one place where a message's fate is decided."""
        queue = delivery.queue
        # Each delivery is handled in its own task, so these bindings die with it.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            queue=queue,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            trace_id=tracing.trace_id(delivery.headers.get(names.HEADER_TRACEPARENT)),
        )
        try:
            outcome = await self._patiently(handler, delivery)
        except (MessageRejected, UnknownSagaType, InvalidSagaData, SagaConflict) as e:
            return self._dead_letter(queue, _reason_label(e), str(e))
        except SagaUnreadable as e:
            # Its record is damaged: hold it for an operator, and park the message with the
            # reason so that it can be replayed once the record is repaired.
            await self._hold_for_operator(e.saga_id, str(e))
            return self._dead_letter(queue, "saga_unreadable", str(e))
        except SagaNotFound as e:
            if queue == names.TIMERS_QUEUE:  # the saga was purged; its timer has nothing to do
                self._count(queue, Handled.SAGA_NOT_FOUND)
                return Disposition.ACK
            return self._dead_letter(queue, Handled.SAGA_NOT_FOUND, str(e))
        except (ConcurrencyExhausted, StoreUnavailable) as e:
            log.warning("message_requeued", error=str(e))
            self._count(queue, Handled.REQUEUED)
            return Disposition.REQUEUE
        self._count(queue, outcome)
        log.debug("message_handled", outcome=outcome)
        return Disposition.ACK

    async def _patiently(
        self, handler: Callable[[Delivery], Awaitable[Outcome | Handled]], delivery: Delivery
    ) -> Outcome | Handled:
        """Run ``handler``, waiting out a store outage instead of requeueing.

        Every requeue counts toward the queue's delivery limit, so a short outage would park
        innocent messages. Holding the message keeps it ours, and the full prefetch window
        stops the broker from sending more: backpressure, not redelivery. Only a shutdown
        gives the message back.
        """
        delay = self.config.store_retry_delay
        while True:
            try:
                return await handler(delivery)
            except StoreUnavailable as e:
                if self._stopping.is_set():
                    raise
                log.warning("store_unavailable_waiting", error=str(e), retry_in=delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, self.config.store_retry_max)

    def _dead_letter(self, queue: str, label: str, reason: str) -> DeadLetter:
        log.warning("message_dead_lettered", reason=reason)
        self._count(queue, Handled.DEAD_LETTERED)
        # The transport counts it in saga_dead_lettered_total once the parked copy is
        # confirmed: once, however often parking it has to be tried.
        return DeadLetter(reason, label=label)

    def _count(self, queue: str, outcome: Outcome | Handled) -> None:
        if self.metrics:
            self.metrics.messages.labels(queue, outcome).inc()

    async def _handle_start(self, delivery: Delivery) -> Handled:
        request = decode(delivery, StartSaga)
        structlog.contextvars.bind_contextvars(saga_id=request.saga_id, saga_type=request.saga_type)
        watch = request.watch and request.reply_to is not None
        try:
            state, created = await self._start(
                request.saga_type,
                request.saga_id,
                request.data,
                version=request.version,
                traceparent=request.traceparent,
                tracestate=request.tracestate,
                watchers=(request.reply_to,) if watch and request.reply_to else (),
            )
        except (UnknownSagaType, InvalidSagaData, SagaConflict) as e:
            if request.reply_to is None:
                raise  # nobody to tell: parked with the reason
            log.info("start_refused", reason=str(e))
            answer = StartAnswer(saga_id=request.saga_id, status=StartStatus.REFUSED, reason=str(e))
            await self._answer(request.reply_to, answer)
            return Handled.REFUSED
        if request.reply_to is not None:
            status = StartStatus.STARTED if created else StartStatus.ALREADY_STARTED
            answer = StartAnswer(
                saga_id=request.saga_id, status=status, version=state.definition_version
            )
            await self._answer(request.reply_to, answer)
        return Handled.STARTED if created else Handled.ALREADY_STARTED

    async def _handle_query(self, delivery: Delivery) -> Handled:
        if _kind_of(delivery) == "operate":
            return await self._handle_operation(decode(delivery, OperateSaga))
        query = decode(delivery, QuerySaga)
        structlog.contextvars.bind_contextvars(saga_id=query.saga_id)
        record = await self.store.load(query.saga_id)
        if record is not None and query.watch and record.state.status.is_active:
            await self.apply(query.saga_id, Watch(query.reply_to))
            record = await self.store.load(query.saga_id)
        await self._answer(query.reply_to, snapshot(query.saga_id, record))
        return Handled.ANSWERED

    async def _handle_operation(self, request: OperateSaga) -> Handled:
        """Apply an operator's action sent by ``saga retry|abort|resolve``, and answer."""
        structlog.contextvars.bind_contextvars(saga_id=request.saga_id)
        answer = await self._operated(request)
        await self._answer(request.reply_to, answer, f"{request.saga_id}:{request.request_id}")
        return Handled.ANSWERED

    async def _operated(self, request: OperateSaga) -> OperationAnswer:
        def refused(reason: str) -> OperationAnswer:
            return OperationAnswer(
                saga_id=request.saga_id,
                request_id=request.request_id,
                applied=False,
                refused=reason,
            )

        if self.clock.now() > request.expires_at:
            return refused("the request expired before the orchestrator read it; nothing done")
        record = await self.store.load(request.saga_id)
        if record is None:
            return refused(f"no saga has id {request.saga_id!r}")
        event = Action(request.action).event(by=request.by, reason=request.reason)
        try:
            after = await self.operate(request.saga_id, event)
        except ActionRefused as e:
            return refused(str(e))
        return OperationAnswer(
            saga_id=request.saga_id,
            request_id=request.request_id,
            applied=True,
            before=record.state.status.value,
            after=after.status.value,
        )

    async def _answer(
        self,
        reply_to: str,
        answer: StartAnswer | SagaSnapshot | OperationAnswer,
        request: str | None = None,
    ) -> None:
        """Send an answer to a client's own queue; a client that is gone can ask again."""
        message = answer_message(answer, reply_to, self.clock.now(), request)
        try:
            await self.transport.publish(message)
        except PublishFailed as e:
            log.warning("answer_publish_failed", reply_to=reply_to, error=str(e))

    async def _handle_reply(self, delivery: Delivery) -> Outcome:
        message = decode_answer(delivery)
        structlog.contextvars.bind_contextvars(
            saga_id=message.saga_id, step=message.step, attempt=message.attempt
        )
        event: Event = ReplyReceived(message) if isinstance(message, Reply) else Progress(message)
        decision = await self.apply(message.saga_id, event)
        return decision.outcome

    async def _handle_timer(self, delivery: Delivery) -> Outcome:
        timer = decode(delivery, TimerMessage)
        structlog.contextvars.bind_contextvars(
            saga_id=timer.saga_id, step=timer.step, timer=timer.timer.value
        )
        decision = await self.apply(timer.saga_id, Wakeup(timer))
        if self.metrics and decision.outcome is Outcome.APPLIED:
            self.metrics.timers_fired.labels("broker").inc()
            lateness = (self.clock.now() - timer.due_at).total_seconds()
            self.metrics.timer_lateness.labels("broker").observe(max(lateness, 0.0))
        return decision.outcome

    def _observe(self, decision: Decision, now: datetime) -> None:
        if self.metrics is None:
            return
        if decision.outcome is Outcome.STALE_TIMER:
            self.metrics.stale_timers.inc()
        self.metrics.observe_events(decision.events, decision.state, now)

    # --- Background loops -------------------------------------------------------------------

    async def sweep_once(self) -> int:
        """Resume held sagas this daemon can now run, then fire every saga whose stored due
        time has passed; returns how many fired.

        A saga that cannot be handled is held for an operator; the others go on.
        """
        await self.resume_once()
        now = self.clock.now()
        fired = 0
        for saga_id in await self.store.due(now, self.config.sweep_batch):
            result = await self._isolated("sweep", saga_id, self._apply(saga_id, Wakeup()))
            if result is None:
                continue
            before, decision = result
            due_at = before.next_due_at
            if decision.outcome is Outcome.APPLIED:
                fired += 1
                if self.metrics:
                    self.metrics.timers_fired.labels("sweeper").inc()
                    if due_at is not None:
                        lateness = (self.clock.now() - due_at).total_seconds()
                        self.metrics.timer_lateness.labels("sweeper").observe(max(lateness, 0.0))
        if fired:
            log.info("sweep_fired", count=fired)
        return fired

    async def resume_once(self) -> int:
        """Resume the held sagas that wait for a definition this daemon has."""
        resumed = 0
        held = await self.store.held(self.app.definition_keys, self.config.sweep_batch)
        for saga_id in held:
            if await self._isolated("resume", saga_id, self.resume(saga_id)) is not None:
                resumed += 1
        return resumed

    async def relay_once(self, *, grace: float | None = None) -> int:
        """Publish outbox messages older than the grace period; returns how many."""
        older_than = self.clock.now() - timedelta(
            seconds=self.config.outbox_grace if grace is None else grace
        )
        published = 0
        for saga_id in await self.store.unpublished(older_than, self.config.sweep_batch):
            count = await self._isolated("relay", saga_id, self._relay(saga_id, older_than))
            published += count or 0
        if published:
            log.info("outbox_relayed", count=published)
        return published

    async def _relay(self, saga_id: str, older_than: datetime) -> int:
        record = await self.store.load(saga_id)
        if record is None:
            return 0
        # Fresh entries belong to the handler that wrote them; only stale ones are ours.
        return await self.outbox.publish(record, lambda entry: entry.created_at <= older_than)

    async def _isolated(self, loop: str, saga_id: str, work: Awaitable[T]) -> T | None:
        """Run one saga's share of a loop; a failure holds that saga and the loop goes on.

        A store or broker outage is not the saga's fault: it ends the round (the loop tries
        again next time). A lost version race leaves the saga for the next round.
        """
        try:
            return await work
        except (StoreUnavailable, BrokerError):
            raise
        except (SagaNotFound, ConcurrencyExhausted, ActionRefused):
            return None
        except Exception as e:
            log.exception("saga_loop_failed", loop=loop, saga_id=saga_id)
            await self._hold_for_operator(saga_id, f"the {loop} failed on it: {e}")
            return None

    async def _hold_for_operator(self, saga_id: str, reason: str) -> None:
        """Hold a saga that could not be handled, without reading its record."""
        if self.metrics:
            self.metrics.loop_errors.labels("hold").inc()
        self.recent.forget(saga_id)
        await self.store.hold(saga_id, Hold(reason[:_REASON_LIMIT], self.clock.now()))
        log.warning("saga_held", saga_id=saga_id, reason=reason)

    async def purge_once(self) -> int:
        """Delete finished sagas past their retention."""
        purged = await self.store.purge(self.clock.now())
        if purged:
            log.info("sagas_purged", count=purged)
        return purged

    async def refresh_gauges(self) -> None:
        """Recompute the store-backed gauges (in-flight sagas, outbox backlog)."""
        if self.metrics is None:
            return
        counts = await self.store.count_by_status()
        self.metrics.set_active(counts, self.app.types)
        self.metrics.set_held(await self.store.count_held(), self.app.types)
        size, oldest = await self.store.outbox_backlog()
        self.metrics.set_outbox(size, oldest, self.clock.now())

    async def log_definitions(self) -> None:
        """Log how many sagas in flight each definition has, and warn about those missing."""
        for (saga_type, version, fingerprint), count in sorted(
            (await self.store.count_by_definition()).items()
        ):
            found = self.app.resolve(saga_type, version, fingerprint or None)
            if isinstance(found, Missing):
                log.warning(
                    "definition_missing",
                    saga_type=saga_type,
                    version=version,
                    sagas_in_flight=count,
                    reason=found.reason,
                )
            else:
                log.info("definition_in_flight", saga_type=saga_type, version=version, sagas=count)

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[object]], name: str
    ) -> None:
        """Run ``job`` every ``interval`` seconds; no failure of one round ends the loop."""
        while True:
            await self._survive(job, name)
            await self.clock.sleep(interval)

    async def _survive(self, job: Callable[[], Awaitable[object]], name: str) -> None:
        """Run one round of background work; its failure is logged and counted, not raised."""
        try:
            await job()
        except (StoreUnavailable, BrokerError) as e:
            log.warning("background_job_failed", job=name, error=str(e))
        except Exception:  # a bug in one round must not stop the daemon
            log.exception("background_job_crashed", job=name)
            if self.metrics:
                self.metrics.loop_errors.labels(name).inc()

    # --- Running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Declare the topology, consume, and run the background loops until :meth:`stop`.

        Shutdown is graceful: consumers stop taking messages, in-flight ones finish, and the
        outbox is flushed before the loops are cancelled.
        """
        await self.store.setup()
        await self.transport.declare(self.topology)
        await self._survive(self.log_definitions, "definitions")
        await self._survive(self.refresh_gauges, "gauges")
        async with asyncio.TaskGroup() as group:
            publisher = group.create_task(self.outbox.run(), name="outbox")
            consumers = []
            readiness = []
            for queue, handler in (
                (names.START_QUEUE, self.on_start),
                (names.QUERIES_QUEUE, self.on_query),
                (names.REPLIES_QUEUE, self.on_reply),
                (names.TIMERS_QUEUE, self.on_timer),
            ):
                ready = asyncio.Event()
                readiness.append(ready)
                consumers.append(
                    group.create_task(
                        self.transport.consume(queue, handler, ready=ready), name=f"consume:{queue}"
                    )
                )
            loops = [
                group.create_task(
                    self._every(self.config.sweep_interval, self.sweep_once, "sweep")
                ),
                group.create_task(
                    self._every(self.config.relay_interval, self.relay_once, "relay")
                ),
                group.create_task(
                    self._every(self.config.purge_interval, self.purge_once, "purge")
                ),
                group.create_task(
                    self._every(self.config.gauge_interval, self.refresh_gauges, "gauges")
                ),
            ]
            for ready in readiness:
                await ready.wait()
            self.ready.set()
            if self.metrics:
                self.metrics.consumers_ready.set(1)
            log.info("orchestrator_ready", sagas=[saga.label for saga in self.app.sagas])
            await self._stopping.wait()
            self.ready.clear()
            if self.metrics:
                self.metrics.consumers_ready.set(0)
            for task in consumers:
                task.cancel()  # consumers finish their in-flight messages before they return
            await asyncio.gather(*consumers, return_exceptions=True)
            try:
                await self.outbox.drain()  # held timers out, published ids marked
                await self.relay_once(grace=0)
            except (StoreUnavailable, BrokerError) as e:
                log.warning("outbox_flush_failed", error=str(e))
            for task in (*loops, publisher):
                task.cancel()
        log.info("orchestrator_stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully."""
        self._stopping.set()


def _reason_label(error: Exception) -> str:
    """A low-cardinality label for the dead-letter metric."""
    labels: dict[type[Exception], str] = {
        MessageRejected: "malformed",
        UnknownSagaType: "unknown_saga_type",
        InvalidSagaData: "invalid_data",
        SagaConflict: "saga_conflict",
    }
    return labels.get(type(error), "rejected")


def _waiting_for(state: SagaState) -> str:
    """The key of the definition a saga needs."""
    return definition_key(state.saga_type, state.definition_version, state.definition_fingerprint)


def _describe_event(event: Event) -> str:
    match event:
        case ReplyReceived(reply=reply):
            return f"the {reply.direction.value} reply to {reply.step} #{reply.attempt}"
        case Wakeup(timer=TimerMessage() as timer):
            return f"a {timer.timer.value} timer"
        case Wakeup():
            return "a sweep wake-up"
        case _:
            return type(event).__name__


def _shape(step: Step) -> tuple[object, ...]:
    """What a running saga depends on in a step (the fingerprint's part for one step)."""
    compensation = None if step.compensation is None else step.compensation.name()
    return (step.kind, step.service, step.command.name(), compensation)


def snapshot(saga_id: str, record: SagaRecord | None) -> SagaSnapshot:
    """What a client is told about a saga."""
    if record is None:
        return SagaSnapshot(saga_id=saga_id, found=False)
    state = record.state
    return SagaSnapshot(
        saga_id=saga_id,
        found=True,
        saga_type=state.saga_type,
        version=state.definition_version,
        status=state.status.value,
        data=state.data,
        results=state.results,
        steps=[
            StepView(name=step.name, status=step.status.value, attempts=step.attempt)
            for step in state.steps
        ],
        failure_reason=state.failure_reason,
        held=None if record.hold is None else record.hold.reason,
        created_at=state.created_at,
        updated_at=state.updated_at,
        finished_at=state.finished_at,
    )


class _Kind(BaseModel):
    """Just the ``kind`` of a message on the queries queue."""

    model_config = ConfigDict(extra="ignore")

    kind: object = "query"


def _kind_of(delivery: Delivery) -> object:
    """What a request on the queries queue is (``query`` when it does not say, or is not
    JSON: the query's own decoding then says what is wrong)."""
    try:
        return _Kind.model_validate_json(delivery.body).kind
    except ValidationError:
        return "query"
