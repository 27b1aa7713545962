"""The participant SDK: typed async handlers for saga commands.

A participant service registers one handler per command::

    inventory = Participant("inventory")

    @inventory.handler
    async def reserve_inventory(cmd: ReserveInventory) -> InventoryReserved:
        ...

    @inventory.handler
    async def release_inventory(cmd: ReleaseInventory, ctx: CommandContext) -> None:
        ...

The command contract in the signature says which command the handler takes; the returned
model is the step's result. The transport envelope (ids, saga, attempt, reply routing) is
added and stripped here, never by the handler. Raising :class:`ParticipantError` answers
``failed`` (or ``error`` with ``non_retryable=False``); any other exception answers ``error``
and the saga's retry policy decides. :class:`NoReply` acknowledges the command without
answering (for demos of a service that never answers).

Every command goes through the idempotency store first, so a duplicate or a retried attempt
gets the stored answer, and a command past its deadline is not executed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_type_hints

import structlog
from pydantic import BaseModel, ValidationError

from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    ErrorDetail,
    JsonObject,
    Reply,
    ReplyStatus,
)
from contracts.names import command_queue
from participants.idempotency import (
    IdempotencyStore,
    MemoryIdempotency,
    OutcomeKind,
    StoredOutcome,
    forward_key,
)
from participants.metrics import CommandOutcome, ParticipantMetrics
from plumbing import tracing
from plumbing.clock import Clock, SystemClock
from plumbing.codec import answer, decode, reply_message
from plumbing.errors import DefinitionError, MessageRejected, ParticipantError, PublishFailed
from plumbing.topology import QueuePolicy, participant_topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Transport

log = structlog.get_logger("participant")


class NoReply(Exception):
    """Raised by a handler to acknowledge a command without answering it."""


@dataclass(frozen=True)
class CommandContext:
    """What a handler may want to know besides the command itself."""

    saga_id: str
    saga_type: str
    step: str
    direction: Direction
    attempt: int
    idempotency_key: str
    deadline: datetime | None
    traceparent: str | None
    clock: Clock

    async def sleep(self, seconds: float) -> None:
        """Wait on the service's clock (virtual in tests and the demo)."""
        await self.clock.sleep(seconds)


HandlerFn = Callable[..., Awaitable[BaseModel | JsonObject | None]]


@dataclass(frozen=True)
class _Registration:
    command: type[Command]
    fn: HandlerFn
    wants_context: bool


class Participant:
    """A participant service: a name (its queue) and one handler per command."""

    def __init__(self, service: str, *, idempotency: IdempotencyStore | None = None) -> None:
        self.service = service
        self.idempotency: IdempotencyStore = idempotency or MemoryIdempotency()
        self._handlers: dict[str, _Registration] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics: ParticipantMetrics | None = None
        """Set by the participant daemon; handlers run the same without it."""

    @property
    def commands(self) -> tuple[str, ...]:
        """The names of the commands this service handles."""
        return tuple(self._handlers)

    def handler(self, fn: HandlerFn) -> HandlerFn:
        """Register ``fn`` for the command named by its first parameter's annotation."""
        hints = get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
        if not params or not (
            isinstance(command := hints.get(params[0]), type) and issubclass(command, Command)
        ):
            raise DefinitionError(
                f"handler {fn.__name__} must take a contracts.Command subclass as its first "
                "parameter, annotated with the command's class"
            )
        if command.name() in self._handlers:
            raise DefinitionError(
                f"service {self.service!r} has two handlers for {command.name()!r}"
            )
        self._handlers[command.name()] = _Registration(command, fn, wants_context=len(params) > 1)
        return fn

    # --- handling, transport-free ---

    async def handle(self, envelope: CommandEnvelope, clock: Clock) -> Reply | None:
        """Run one command through idempotency, deadline and handler; the reply to send."""
        registration = self._handlers.get(envelope.command)
        if registration is None:
            raise MessageRejected(
                f"service {self.service!r} has no handler for command {envelope.command!r}; "
                f"it handles {', '.join(self._handlers) or 'nothing'}"
            )
        now = clock.now()
        if envelope.deadline is not None and now > envelope.deadline:
            log.info("command_expired", deadline=envelope.deadline.isoformat())
            return answer(
                envelope,
                ReplyStatus.ERROR,
                now,
                error=ErrorDetail(
                    type="DeadlineExceeded",
                    message="the command arrived after its deadline; not executed",
                ),
            )
        async with self._serialised(envelope.saga_id):
            key = envelope.idempotency_key
            stored = await self.idempotency.get(key)
            if stored is not None:
                log.info("command_duplicate", stored=stored.kind.value)
                if self.metrics:
                    self.metrics.commands.labels(
                        self.service, envelope.command, CommandOutcome.DUPLICATE
                    ).inc()
                return _from_stored(envelope, stored, now)
            if envelope.direction is Direction.COMPENSATION:
                # If the forward command has not run here, this tombstone makes it refuse to
                # run later; if it has, the stored outcome wins and nothing changes.
                await self.idempotency.put(
                    forward_key(key), StoredOutcome(OutcomeKind.TOMBSTONE, stored_at=now)
                )
            return await self._execute(registration, envelope, clock)

    @contextlib.asynccontextmanager
    async def _serialised(self, saga_id: str) -> AsyncIterator[None]:
        """One command per saga at a time in this process, so a compensation never overlaps
        the forward command it undoes."""
        lock = self._locks.setdefault(saga_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._locks.get(saga_id) is lock:
                del self._locks[saga_id]

    async def _execute(
        self, registration: _Registration, envelope: CommandEnvelope, clock: Clock
    ) -> Reply | None:
        try:
            command = registration.command.model_validate(envelope.payload)
        except ValidationError as e:
            raise MessageRejected(
                f"payload is not a valid {registration.command.__name__}: {e}"
            ) from e
        context = CommandContext(
            saga_id=envelope.saga_id,
            saga_type=envelope.saga_type,
            step=envelope.step,
            direction=envelope.direction,
            attempt=envelope.attempt,
            idempotency_key=envelope.idempotency_key,
            deadline=envelope.deadline,
            traceparent=envelope.traceparent,
            clock=clock,
        )
        args: tuple[Any, ...] = (command, context) if registration.wants_context else (command,)
        try:
            value = await registration.fn(*args)
        except NoReply:
            log.info("command_not_answered")
            return None
        except ParticipantError as e:
            error = ErrorDetail(type=e.type, message=e.message, code=e.code)
            if not e.non_retryable:
                return answer(envelope, ReplyStatus.ERROR, clock.now(), error=error)
            stored = await self.idempotency.put(
                envelope.idempotency_key,
                StoredOutcome(OutcomeKind.FAILED, error=error, stored_at=clock.now()),
            )
            return _from_stored(envelope, stored, clock.now())
        except Exception as e:  # noqa: BLE001 - any handler exception is an `error` reply by contract
            log.warning("command_errored", error=repr(e))
            return answer(
                envelope,
                ReplyStatus.ERROR,
                clock.now(),
                error=ErrorDetail(type=type(e).__name__, message=str(e)),
            )
        result = (
            value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value or {})
        )
        stored = await self.idempotency.put(
            envelope.idempotency_key,
            StoredOutcome(OutcomeKind.COMPLETED, result=result, stored_at=clock.now()),
        )
        return _from_stored(envelope, stored, clock.now())

    # --- running over a transport ---

    async def on_command(
        self, delivery: Delivery, transport: Transport, clock: Clock
    ) -> Disposition | DeadLetter:
        """Handle one delivery from the command queue and publish the reply."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            service=self.service,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
        )
        try:
            envelope = decode(delivery, CommandEnvelope)
            structlog.contextvars.bind_contextvars(
                saga_id=envelope.saga_id,
                step=envelope.step,
                attempt=envelope.attempt,
                command=envelope.command,
                trace_id=tracing.trace_id(envelope.traceparent),
            )
            started = time.perf_counter()
            reply = await self.handle(envelope, clock)
        except MessageRejected as e:
            log.warning("command_dead_lettered", reason=str(e))
            if self.metrics:
                self.metrics.dead_lettered.labels(delivery.queue, "malformed").inc()
            return DeadLetter(str(e))
        self._observe(envelope.command, reply, time.perf_counter() - started)
        if reply is None:
            return Disposition.ACK
        try:
            await transport.publish(reply_message(reply, envelope.reply_to, clock.now()))
        except PublishFailed as e:
            # The outcome is stored: the redelivered command will answer from the store.
            log.warning("reply_publish_failed", error=str(e))
            return Disposition.REQUEUE
        log.info("command_handled", status=reply.status.value)
        return Disposition.ACK

    def _observe(self, command: str, reply: Reply | None, seconds: float) -> None:
        if self.metrics is None:
            return
        if reply is None:
            outcome = CommandOutcome.NO_REPLY
        elif reply.error is not None and reply.error.type in _SPECIAL_OUTCOMES:
            outcome = _SPECIAL_OUTCOMES[reply.error.type]
        else:
            outcome = CommandOutcome(reply.status.value)
        self.metrics.commands.labels(self.service, command, outcome).inc()
        self.metrics.handler_duration.labels(self.service, command).observe(seconds)

    async def run(
        self,
        transport: Transport,
        *,
        clock: Clock | None = None,
        policy: QueuePolicy | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Declare this service's queue and consume commands until cancelled."""
        chosen_clock = clock or SystemClock()
        await self.idempotency.setup()
        await transport.declare(participant_topology(self.service, policy or QueuePolicy()))

        async def handler(delivery: Delivery) -> Disposition | DeadLetter:
            return await self.on_command(delivery, transport, chosen_clock)

        await transport.consume(command_queue(self.service), handler, ready=ready)


def _from_stored(envelope: CommandEnvelope, stored: StoredOutcome, now: datetime) -> Reply:
    if stored.kind is OutcomeKind.COMPLETED:
        return answer(envelope, ReplyStatus.COMPLETED, now, result=stored.result)
    if stored.kind is OutcomeKind.TOMBSTONE:
        return answer(envelope, ReplyStatus.FAILED, now, error=_CANCELLED)
    return answer(envelope, ReplyStatus.FAILED, now, error=stored.error)


_SPECIAL_OUTCOMES = {
    "Cancelled": CommandOutcome.CANCELLED,
    "DeadlineExceeded": CommandOutcome.EXPIRED,
}

_CANCELLED = ErrorDetail(
    type="Cancelled", message="the step was compensated before this command arrived; not executed"
)
