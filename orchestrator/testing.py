"""Test a saga definition in milliseconds: the real engine on an in-memory broker and store,
with virtual time and scripted participants.

A test reads as a script::

    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", fail("card declined"))
        await h.start("order_fulfillment", "o-1", order)
        assert (await h.saga("o-1")).status == "failed"
        assert h.command_names("o-1") == [
            "reserve_inventory", "process_payment", "release_inventory"]

Each participant service of the app is scripted by default to succeed, with a placeholder
result built from the step's result model. Script any command per attempt (the last behaviour
repeats): ``succeed(result)``, ``fail(message)``, ``error(message)``, ``hang()``,
``late(seconds, result)``, ``down()`` (never picked up), ``working(seconds, beat_every=...)``
(heartbeats, then a reply, or none with ``replies=False``), or ``*errors_then(2, succeed())``.
``await h.advance(minutes=16)``
moves virtual time, firing timeouts and retries in order. Real participant services (a
:class:`participants.Participant`, or anything with its ``service`` and ``run``) can be
mounted in place of a script with ``h.mount(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel

from contracts import names
from contracts.events import LifecycleEvent, lifecycle_event_adapter
from contracts.messages import (
    Command,
    CommandEnvelope,
    ErrorDetail,
    Heartbeat,
    JsonObject,
    PickedUp,
    Reply,
    ReplyStatus,
)
from orchestrator.definition import App
from orchestrator.engine import OperatorAbort, OperatorResolve, OperatorRetry
from orchestrator.metrics import Metrics
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.state import HistoryEntry, SagaState
from orchestrator.store import SagaRecord, SagaStore
from orchestrator.stores.memory import MemoryStore
from plumbing.codec import answer, progress_message, reply_message
from plumbing.logs import quiet_unless_configured
from plumbing.memory import MemoryBroker, VirtualClock
from plumbing.transport import CommandService, DeadLetter, Delivery, Disposition, Outgoing

__all__ = [
    "Behaviour",
    "MemoryBroker",
    "SagaHarness",
    "ScriptedParticipant",
    "VirtualClock",
    "down",
    "error",
    "errors_then",
    "fail",
    "hang",
    "late",
    "succeed",
    "working",
]


@dataclass(frozen=True)
class Behaviour:
    """How a scripted participant answers one attempt of a command."""

    kind: Literal["succeed", "fail", "error", "hang", "late", "down", "work"]
    result: JsonObject | None = None
    error: ErrorDetail | None = None
    delay: float = 0.0
    beat_every: float = 0.0
    replies: bool = True


def succeed(result: JsonObject | BaseModel | None = None) -> Behaviour:
    """Reply ``completed`` (with a placeholder result built from the step's model if none)."""
    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    return Behaviour("succeed", result=data)


def fail(message: str = "refused", *, type: str = "BusinessFailure") -> Behaviour:
    """Reply ``failed``: a business refusal."""
    return Behaviour("fail", error=ErrorDetail(type=type, message=message))


def error(message: str = "transient error", *, type: str = "TransientError") -> Behaviour:
    """Reply ``error``: the step's retry policy decides."""
    return Behaviour("error", error=ErrorDetail(type=type, message=message))


def hang() -> Behaviour:
    """Never reply."""
    return Behaviour("hang")


def late(seconds: float, result: JsonObject | BaseModel | None = None) -> Behaviour:
    """Reply ``completed``, but only ``seconds`` later (possibly after the step timed out)."""
    return Behaviour("late", result=succeed(result).result, delay=seconds)


def down() -> Behaviour:
    """The service is down: the command is never picked up (nor answered)."""
    return Behaviour("down")


def working(
    seconds: float,
    *,
    beat_every: float,
    result: JsonObject | BaseModel | None = None,
    replies: bool = True,
) -> Behaviour:
    """Work for ``seconds``, sending a heartbeat every ``beat_every``, then reply
    ``completed``; with ``replies=False`` the handler stalls: the heartbeats stop at
    ``seconds`` and no reply ever comes."""
    return Behaviour(
        "work", result=succeed(result).result, delay=seconds, beat_every=beat_every, replies=replies
    )


def errors_then(times: int, then: Behaviour) -> tuple[Behaviour, ...]:
    """``times`` errors, then ``then`` (spread it: ``.on("x", *errors_then(2, succeed()))``)."""
    return (*(error(f"transient error {n + 1} of {times}") for n in range(times)), then)


class ScriptedParticipant:
    """A participant service whose answers a test scripts per command and attempt."""

    def __init__(self, service: str, results: dict[str, type[BaseModel] | None]) -> None:
        self.service = service
        self._results = results
        self._scripts: dict[str, tuple[Behaviour, ...]] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self.received: list[CommandEnvelope] = []
        """Every command delivered to this service, in order."""

    def on(self, command: str | type[Command], *behaviours: Behaviour) -> ScriptedParticipant:
        """Answer ``command`` with these behaviours, one per attempt; the last one repeats."""
        if not behaviours:
            raise ValueError("give at least one behaviour")
        name = command if isinstance(command, str) else command.name()
        self._scripts[name] = behaviours
        return self

    def behaviour_for(self, envelope: CommandEnvelope) -> Behaviour:
        """The behaviour for this delivery (counting deliveries per saga and command)."""
        key = (envelope.saga_id, envelope.command)
        seen = self._seen.get(key, 0)
        self._seen[key] = seen + 1
        script = self._scripts.get(envelope.command, (succeed(),))
        return script[min(seen, len(script) - 1)]

    def reply_for(self, envelope: CommandEnvelope, behaviour: Behaviour, now: datetime) -> Reply:
        """The reply a behaviour gives."""
        if behaviour.kind in ("fail", "error"):
            status = ReplyStatus.FAILED if behaviour.kind == "fail" else ReplyStatus.ERROR
            return answer(envelope, status, now, error=behaviour.error)
        result = behaviour.result
        if result is None:
            result = _placeholder(self._results.get(envelope.command), envelope.saga_id)
        return answer(envelope, ReplyStatus.COMPLETED, now, result=result)

    async def on_command(
        self, delivery: Delivery, broker: MemoryBroker
    ) -> Disposition | DeadLetter:
        """Receive one command and answer as scripted."""
        envelope = CommandEnvelope.model_validate_json(delivery.body)
        self.received.append(envelope)
        behaviour = self.behaviour_for(envelope)
        now = broker.clock.now()
        if behaviour.kind == "down":
            return Disposition.ACK
        if envelope.pickup_by is not None:
            await broker.publish(_progress(envelope, PickedUp, now, now))
        if behaviour.kind == "hang":
            return Disposition.ACK
        if behaviour.kind == "work":
            beats = int(behaviour.delay // behaviour.beat_every)
            for beat in range(1, beats + 1):
                at = now + timedelta(seconds=beat * behaviour.beat_every)
                await broker.publish(_progress(envelope, Heartbeat, at, now))
            if not behaviour.replies:
                return Disposition.ACK
        message = reply_message(self.reply_for(envelope, behaviour, now), envelope.reply_to, now)
        if behaviour.kind in ("late", "work"):
            message = _later(message, now + timedelta(seconds=behaviour.delay))
        await broker.publish(message)
        return Disposition.ACK


def _later(message: Outgoing, at: datetime) -> Outgoing:
    """``message`` delivered to the replies queue at ``at`` instead of now."""
    return message.model_copy(
        update={"exchange": "", "routing_key": names.REPLIES_QUEUE, "deliver_at": at}
    )


def _progress(
    envelope: CommandEnvelope,
    kind: type[PickedUp] | type[Heartbeat],
    at: datetime,
    now: datetime,
) -> Outgoing:
    """A pick-up or heartbeat about ``envelope``, arriving at ``at``."""
    message = kind(
        message_id=f"{kind.__name__.lower()}:{envelope.message_id}:{at.isoformat()}",
        saga_id=envelope.saga_id,
        step=envelope.step,
        direction=envelope.direction,
        attempt=envelope.attempt,
        sent_at=at,
    )
    outgoing = progress_message(message, envelope.reply_to, now)
    return outgoing if at <= now else _later(outgoing, at)


class SagaHarness:
    """The orchestrator, an in-memory broker and store, a virtual clock and participants.

    Args:
        app: the saga types under test.
        start: the virtual clock's first instant.
        store: a store to run on instead of the in-memory one (e.g. for the contract tests).
    """

    def __init__(
        self,
        app: App,
        *,
        start: datetime | None = None,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
        store: SagaStore | None = None,
    ) -> None:
        self.app = app
        self.clock = VirtualClock(start)
        self.broker = MemoryBroker(
            self.clock,
            on_dead_lettered=(
                None
                if metrics is None
                else lambda queue, label: metrics.dead_lettered.labels(queue, label).inc()
            ),
        )
        self.store: SagaStore = store or MemoryStore()
        self.orchestrator = Orchestrator(
            app, self.store, self.broker, clock=self.clock, config=config, metrics=metrics
        )
        self._results: dict[str, type[BaseModel] | None] = {}
        self._scripted: dict[str, ScriptedParticipant] = {}
        self._script(app)
        self._mounted: dict[str, CommandService] = {}
        self._stack = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _script(self, app: App) -> None:
        """Scripted participants for the services of ``app`` that have none yet."""
        for saga in app.sagas:
            for step in saga.steps:
                self._results[step.command.name()] = step.result
        for service in app.services:
            self._scripted.setdefault(service, ScriptedParticipant(service, self._results))

    def participant(self, service: str) -> ScriptedParticipant:
        """The scripted participant for ``service``."""
        if service in self._mounted:
            raise ValueError(f"service {service!r} is a mounted Participant, not a script")
        return self._scripted[service]

    def mount(self, *participants: CommandService) -> SagaHarness:
        """Run real participant services instead of scripts (before entering the harness)."""
        for participant in participants:
            self._mounted[participant.service] = participant
        return self

    async def __aenter__(self) -> SagaHarness:
        quiet_unless_configured()
        await self.store.setup()
        await self.broker.declare(self.orchestrator.topology)
        group = self._group = await self._stack.enter_async_context(asyncio.TaskGroup())
        handlers = {
            names.START_QUEUE: self.orchestrator.on_start,
            names.QUERIES_QUEUE: self.orchestrator.on_query,
            names.REPLIES_QUEUE: self.orchestrator.on_reply,
            names.TIMERS_QUEUE: self.orchestrator.on_timer,
        }
        for queue, handler in handlers.items():
            self._tasks.append(group.create_task(self.broker.consume(queue, handler)))
        self._serve(self.app.services)
        await self.settle()
        return self

    def _serve(self, services: frozenset[str]) -> None:
        """Start the participants (mounted or scripted) of ``services``."""
        assert self._group is not None, "enter the harness first"
        for service in sorted(services):
            if service in self._mounted:
                task = self._mounted[service].run(self.broker, clock=self.clock)
            else:
                task = self.broker.consume(
                    names.command_queue(service), self._script_handler(service)
                )
            self._tasks.append(self._group.create_task(task))

    def _script_handler(self, service: str) -> Any:
        scripted = self._scripted[service]

        async def handler(delivery: Delivery) -> Disposition | DeadLetter:
            return await scripted.on_command(delivery, self.broker)

        return handler

    async def __aexit__(self, *exc: object) -> None:
        self.clock.cancel_sleepers()  # handlers asleep on virtual time would never wake
        for task in self._tasks:
            task.cancel()
        await self._stack.aclose()

    # --- driving ---

    async def start(
        self,
        saga_type: str,
        saga_id: str,
        data: JsonObject | BaseModel,
        *,
        version: int | None = None,
    ) -> SagaState:
        """Start a saga (on the newest definition, or ``version``) and let everything that
        follows at this instant happen."""
        payload = _as_data(data)
        await self.orchestrator.start(saga_type, saga_id, payload, version=version)
        await self.settle()
        return await self.saga(saga_id)

    async def deploy(self, app: App) -> None:
        """Run the orchestrator on another app from now on, as a redeployed daemon would.

        Services the new app adds get scripted participants; sagas whose definition it lacks
        are held (and resumed by :meth:`sweep` once a deploy brings it back).
        """
        new_services = app.services - self.app.services
        self.app = self.orchestrator.app = app
        self._script(app)
        await self.broker.declare(self.orchestrator.topology)
        self._serve(new_services)
        await self.settle()

    async def resume(self, saga_id: str, *, to_version: int | None = None) -> SagaState:
        """Operator resume of a held saga (optionally moved to another version)."""
        await self.orchestrator.resume(saga_id, to_version=to_version)
        await self.settle()
        return await self.saga(saga_id)

    async def settle(self) -> None:
        """Let every message in flight be handled (time does not move)."""
        await self.broker.settle()

    async def advance(
        self, seconds: float = 0.0, *, minutes: float = 0.0, hours: float = 0.0
    ) -> None:
        """Move virtual time forward, firing timers and late replies in order."""
        await self.broker.advance(timedelta(seconds=seconds, minutes=minutes, hours=hours))

    async def sweep(self) -> int:
        """Run the store sweep once (what the daemon does every few seconds)."""
        fired = await self.orchestrator.sweep_once()
        await self.settle()
        return fired

    async def retry(self, saga_id: str) -> SagaState:
        """Operator retry of a stuck saga; the state once everything it caused has happened."""
        await self.orchestrator.operate(saga_id, OperatorRetry())
        await self.settle()
        return await self.saga(saga_id)

    async def abort(self, saga_id: str, reason: str = "aborted by an operator") -> SagaState:
        """Operator abort (compensate now); the state once the compensations have run."""
        await self.orchestrator.operate(saga_id, OperatorAbort(reason))
        await self.settle()
        return await self.saga(saga_id)

    async def resolve(self, saga_id: str, note: str = "resolved by an operator") -> SagaState:
        """Operator resolve of a stuck compensation; the state once the rest has run."""
        await self.orchestrator.operate(saga_id, OperatorResolve(note))
        await self.settle()
        return await self.saga(saga_id)

    # --- looking ---

    async def saga(self, saga_id: str) -> SagaState:
        """The saga's current state."""
        return (await self.record(saga_id)).state

    async def record(self, saga_id: str) -> SagaRecord:
        """The saga as stored: state, outbox and hold."""
        record = await self.store.load(saga_id)
        if record is None:
            raise KeyError(f"no saga {saga_id!r}")
        return record

    def published(self, kind: str | None = None) -> list[Outgoing]:
        """Every message published, optionally of one kind (command, timer, event, reply)."""
        return [m for m in self.broker.published if kind is None or m.kind == kind]

    def commands(self, saga_id: str | None = None) -> list[CommandEnvelope]:
        """Commands sent, in order, optionally for one saga."""
        envelopes = [CommandEnvelope.model_validate_json(m.body) for m in self.published("command")]
        return [e for e in envelopes if saga_id is None or e.saga_id == saga_id]

    def command_names(self, saga_id: str | None = None) -> list[str]:
        """Names of the commands sent, in order."""
        return [envelope.command for envelope in self.commands(saga_id)]

    def events(self, saga_id: str | None = None) -> list[LifecycleEvent]:
        """Lifecycle events published, in order."""
        events = [lifecycle_event_adapter.validate_json(m.body) for m in self.published("event")]
        return [e for e in events if saga_id is None or e.saga_id == saga_id]

    async def history(self, saga_id: str) -> Sequence[HistoryEntry]:
        """The saga's stored timeline."""
        return (await self.saga(saga_id)).history

    @property
    def parked(self) -> list[tuple[Delivery, str]]:
        """Dead-lettered deliveries and their reasons."""
        return self.broker.parked


def _as_data(data: JsonObject | BaseModel) -> JsonObject:
    """Start data as JSON; computed fields are left out because the saga derives them again."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", round_trip=True)
    return data


def _placeholder(model: type[BaseModel] | None, saga_id: str) -> JsonObject:
    """A result that validates against ``model``, for scripts that do not give one."""
    if model is None:
        return {}
    values: JsonObject = {}
    for name, info in model.model_fields.items():
        if not info.is_required():
            continue
        values[name] = _placeholder_value(
            info.annotation, f"{name}-{saga_id}", model.__name__, name
        )
    return values


def _placeholder_value(annotation: Any, text: str, model: str, field_name: str) -> object:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    simple: dict[Any, object] = {str: text, int: 1, float: 1.0, Decimal: "1.00", bool: True}
    if annotation in simple:
        return simple[annotation]
    raise ValueError(
        f"cannot invent a value for {model}.{field_name}; script the result with succeed({{...}})"
    )
