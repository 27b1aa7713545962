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
(its type and a bounded first line of its message; the traceback stays in this service's log)
and the saga's retry policy decides. :class:`NoReply` acknowledges the command without
answering (for demos of a service that never answers).

How a command is handled, in order:

1. A command whose step has a dispatch timeout is acknowledged at once with a pick-up
   message (see :mod:`participants.progress`), unless it arrived after its ``pickup_by``.
2. Commands of one saga run one at a time in this process (a compensation never overlaps the
   forward command it undoes), however many arrive at once.
3. A compensation first leaves a tombstone under its forward key, unless the forward command
   has an outcome; if the forward command is running on another replica right now, it waits.
4. The command is **claimed** in the idempotency store. A stored outcome always answers first
   (a duplicate, a retried attempt, a redelivery long after the deadline: all get the stored
   answer). A live claim of another replica is waited out. Only a command that nobody ever
   claimed is refused once past its ``deadline`` (``DeadlineExceeded`` means "not executed"),
   or when it was not picked up by its ``pickup_by`` (``PickupExpired``, "not executed").
5. The handler runs while its claim is renewed; its outcome is stored (first writer wins)
   and answered. Errors are not stored: the claim is released and the next attempt runs again.
   A long handler calls ``await ctx.heartbeat("details")`` when its step has a heartbeat
   timeout; the calls are coalesced to what the step needs.

With ``opentelemetry-api`` installed, each handler run is a span, a child of the command's
trace context (``traceparent`` and ``tracestate``) and current while the handler runs, so the
handler's own spans join the saga's trace.

A handler registered with ``@service.handler(transactional=True)`` runs inside a database
transaction of the idempotency store (PostgreSQL or MongoDB) that also records its outcome:
``ctx.transaction`` is the ``asyncpg.Connection`` (or MongoDB ``AsyncClientSession``) to write
the effect with. The effect and the outcome commit together, so a crash anywhere leaves either
both or neither: exactly once. Anything else a handler does (an HTTP call to a payment gateway)
is at least once; pass ``ctx.idempotency_key`` on to such an API so that it can drop repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar, get_type_hints, overload

import structlog
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from contracts.messages import (
    ERROR_MESSAGE_LIMIT,
    RESULT_LIMIT,
    Command,
    CommandEnvelope,
    Direction,
    ErrorDetail,
    Heartbeat,
    JsonObject,
    PickedUp,
    Reply,
    ReplyStatus,
    check_json,
)
from contracts.names import command_queue
from participants.idempotency import (
    DEFAULT_LEASE,
    Busy,
    Claimed,
    ClaimLost,
    ClaimResult,
    IdempotencyStore,
    MemoryIdempotency,
    OutcomeKind,
    Stored,
    StoredOutcome,
    TransactionalIdempotency,
    forward_key,
)
from participants.metrics import CommandOutcome, ParticipantMetrics
from participants.progress import Beats, ProgressSink, missed_pickup, picked_up
from participants.progress import send as progress_send
from plumbing import telemetry, tracing
from plumbing.clock import Clock, SystemClock
from plumbing.codec import answer, decode, progress_message, reply_message
from plumbing.errors import (
    ConfigError,
    DefinitionError,
    MessageRejected,
    ParticipantError,
    PublishFailed,
    StoreUnavailable,
)
from plumbing.topology import QueuePolicy, participant_topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Transport

log = structlog.get_logger("participant")

DEFAULT_ERROR_MESSAGE_LIMIT: Final = 200
"""Characters of an unexpected exception's message sent to the orchestrator."""

_POLL_FIRST: Final = 0.05  # seconds before asking again about another replica's claim
_POLL_MAX: Final = 1.0
_STORE_RETRY_FIRST: Final = 0.5  # seconds before trying an unavailable store again; doubles
_STORE_RETRY_MAX: Final = 8.0
STORE_WAIT: Final = 30.0
"""Seconds a command waits for an unavailable idempotency store before it is requeued."""


class NoReply(Exception):
    """Raised by a handler to acknowledge a command without answering it."""


@dataclass(frozen=True)
class CommandContext:
    """What a handler may want to know besides the command itself.

    ``idempotency_key`` is the same on every attempt of this step's direction: pass it on to
    an external API that deduplicates (a payment gateway), so a repeat is recognised there.
    ``transaction`` is set for a handler registered with ``transactional=True``: the database
    transaction (PostgreSQL: ``asyncpg.Connection``; MongoDB: ``AsyncClientSession``) that
    will also record the outcome. It is None otherwise, and with the in-memory store.
    ``traceparent`` and ``tracestate`` are the command's W3C trace context.
    """

    saga_id: str
    saga_type: str
    step: str
    direction: Direction
    attempt: int
    idempotency_key: str
    deadline: datetime | None
    traceparent: str | None
    clock: Clock
    transaction: Any = None
    tracestate: str | None = None
    beats: Beats | None = field(default=None, repr=False, compare=False)

    async def sleep(self, seconds: float) -> None:
        """Wait on the service's clock (virtual in tests and the demo)."""
        await self.clock.sleep(seconds)

    async def heartbeat(self, details: str | None = None) -> None:
        """Tell the orchestrator this attempt is still being worked on.

        Only for a step with a heartbeat timeout (otherwise it does nothing); call it as
        often as convenient: at most one heartbeat per third of the timeout is sent.
        ``details`` (say, "copied 40 of 90 files") show in ``saga show``.
        """
        if self.beats is not None:
            await self.beats.beat(details)


HandlerFn = Callable[..., Awaitable[BaseModel | JsonObject | None]]
F = TypeVar("F", bound=HandlerFn)


@dataclass(frozen=True)
class _Registration:
    command: type[Command]
    fn: HandlerFn
    wants_context: bool
    transactional: bool


@dataclass(frozen=True)
class _Answer:
    """What a handler's run came to, before anything is stored."""

    status: ReplyStatus | None  # None: acknowledge without answering (NoReply)
    result: JsonObject | None = None
    error: ErrorDetail | None = None

    @property
    def outcome(self) -> OutcomeKind | None:
        """What to store: completed and failed are kept, errors and silence are not."""
        if self.status is ReplyStatus.COMPLETED:
            return OutcomeKind.COMPLETED
        if self.status is ReplyStatus.FAILED:
            return OutcomeKind.FAILED
        return None


@dataclass
class _SagaLock:
    """A per-saga lock and how many commands hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Participant:
    """A participant service: a name (its queue) and one handler per command.

    Args:
        service: the service's name; its command queue is ``saga.<service>.commands``.
        idempotency: where claims and outcomes are kept (default: in memory; the daemon
            replaces the default with ``SAGA_IDEMPOTENCY_URL``).
        lease: how long a claim holds without renewal; a crashed replica's command runs
            again this long after its last renewal.
        error_message_limit: characters of an unexpected exception's message that are sent
            to the orchestrator (0: the type only).
    """

    def __init__(
        self,
        service: str,
        *,
        idempotency: IdempotencyStore | None = None,
        lease: timedelta = DEFAULT_LEASE,
        error_message_limit: int = DEFAULT_ERROR_MESSAGE_LIMIT,
    ) -> None:
        if lease <= timedelta(0):
            raise ConfigError(f"the claim lease must be positive, not {lease}")
        self.service = service
        self.idempotency: IdempotencyStore = idempotency or MemoryIdempotency()
        self.lease = lease
        self.error_message_limit = error_message_limit
        self._handlers: dict[str, _Registration] = {}
        self._locks: dict[str, _SagaLock] = {}
        self._replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics: ParticipantMetrics | None = None
        """Set by the participant daemon; handlers run the same without it."""

    @property
    def commands(self) -> tuple[str, ...]:
        """The names of the commands this service handles."""
        return tuple(self._handlers)

    @property
    def transactional(self) -> bool:
        """Whether any handler runs in the idempotency store's transaction."""
        return any(r.transactional for r in self._handlers.values())

    @overload
    def handler(self, fn: F, /) -> F: ...

    @overload
    def handler(self, fn: None = None, /, *, transactional: bool = False) -> Callable[[F], F]: ...

    def handler(self, fn: Any = None, /, *, transactional: bool = False) -> Any:
        """Register ``fn`` for the command named by its first parameter's annotation.

        Use it bare (``@service.handler``) or with options
        (``@service.handler(transactional=True)``: the handler writes its effect through
        ``ctx.transaction``, which records the outcome in the same transaction).
        """

        def register(fn: F) -> F:
            self._register(fn, transactional=transactional)
            return fn

        return register if fn is None else register(fn)

    def _register(self, fn: HandlerFn, *, transactional: bool) -> None:
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
        if transactional and len(params) < 2:
            raise DefinitionError(
                f"transactional handler {fn.__name__} must take a second parameter, "
                "ctx: CommandContext, to write its effect through ctx.transaction"
            )
        self._handlers[command.name()] = _Registration(
            command, fn, wants_context=len(params) > 1, transactional=transactional
        )

    # --- handling, transport-free ---

    async def handle(
        self, envelope: CommandEnvelope, clock: Clock, progress: ProgressSink | None = None
    ) -> Reply | None:
        """Run one command through pick-up, serialisation, claim, deadline and handler; the
        reply to send (None: acknowledge without answering). ``progress`` sends pick-ups and
        heartbeats (none are sent without it)."""
        registration = self._handlers.get(envelope.command)
        if registration is None:
            raise MessageRejected(
                f"service {self.service!r} has no handler for command {envelope.command!r}; "
                f"it handles {', '.join(self._handlers) or 'nothing'}"
            )
        try:
            command = registration.command.model_validate(envelope.payload)
        except ValidationError as e:
            raise MessageRejected(
                f"payload is not a valid {registration.command.__name__}: {e}"
            ) from e
        late = missed_pickup(envelope, clock.now())
        if envelope.pickup_by is not None and not late and progress is not None:
            await progress_send(progress, picked_up(envelope, clock.now()))
        call = _Call(envelope, clock, late, Beats(envelope, clock, progress))
        async with self._serialised(envelope.saga_id):
            if envelope.direction is Direction.COMPENSATION:
                await self._tombstone_forward(envelope, clock)
            if registration.transactional:
                return await self._run_in_transaction(registration, command, call)
            return await self._run_claimed(registration, command, call)

    @contextlib.asynccontextmanager
    async def _serialised(self, saga_id: str) -> AsyncIterator[None]:
        """One command per saga at a time in this process, so a compensation never overlaps
        the forward command it undoes.

        The lock is forgotten only when nobody holds it or waits for it: a waiter that has
        been woken but has not run yet still counts, so a third command can never find no
        lock and run at once.
        """
        entry = self._locks.get(saga_id)
        if entry is None:
            entry = self._locks[saga_id] = _SagaLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[saga_id]

    async def _tombstone_forward(self, envelope: CommandEnvelope, clock: Clock) -> None:
        """Keep the forward command from running after its compensation.

        If the forward command has not run here, the tombstone makes it refuse to run later;
        if it has, its stored outcome wins and nothing changes; if it runs on another replica
        right now, wait for it to finish (or for its claim to lapse).
        """
        key = forward_key(envelope.idempotency_key)
        waited = 0
        while isinstance(found := await self.idempotency.tombstone(key, clock.now()), Busy):
            waited += 1
            await self._wait_out(found, waited, clock, what="forward command")

    async def _claim(self, key: str, claimant: str, clock: Clock) -> Stored | Claimed:
        """Claim ``key``, waiting while another replica holds a live claim."""
        waited = 0
        while True:
            found = await self.idempotency.claim(key, claimant, clock.now(), self.lease)
            if not isinstance(found, Busy):
                return found
            waited += 1
            await self._wait_out(found, waited, clock, what="command")

    async def _wait_out(self, busy: Busy, waited: int, clock: Clock, *, what: str) -> None:
        if waited == 1:
            log.info("command_claimed_elsewhere", waiting_for=what, until=busy.until.isoformat())
        delay = min(_POLL_FIRST * 2 ** (waited - 1), _POLL_MAX)
        remaining = (busy.until - clock.now()).total_seconds()
        await clock.sleep(max(min(delay, remaining), _POLL_FIRST))

    async def _run_claimed(
        self, registration: _Registration, command: Command, call: _Call
    ) -> Reply | None:
        envelope, clock = call.envelope, call.clock
        key = envelope.idempotency_key
        claimant = self._claimant()
        claim = await self._claim(key, claimant, clock)
        if isinstance(claim, Stored):
            return self._duplicate(envelope, claim.outcome, clock)
        if (refusal := self._refusal(call, claim)) is not None:
            await self.idempotency.release(key, claimant)
            return refusal
        result = await self._with_lease(
            key, claimant, clock, self._invoke(registration, command, call)
        )
        outcome = result.outcome
        if outcome is None:
            await self.idempotency.release(key, claimant)
            return self._unstored(envelope, result, clock)
        stored = await self.idempotency.put(
            key, StoredOutcome(outcome, result.result, result.error, stored_at=clock.now())
        )
        return _from_stored(envelope, stored, clock.now())

    async def _run_in_transaction(
        self, registration: _Registration, command: Command, call: _Call
    ) -> Reply | None:
        """Run the handler inside the store's transaction that records its outcome."""
        envelope, clock = call.envelope, call.clock
        store = self.idempotency
        if not isinstance(store, TransactionalIdempotency):
            raise ConfigError(  # checked at start-up by run(); this is for direct callers
                f"handler for {envelope.command!r} is transactional, but the idempotency "
                f"store {type(store).__name__} has no transactions"
            )
        key = envelope.idempotency_key
        claimant = self._claimant()
        waited = 0
        while True:
            async with store.transaction(key, claimant, clock.now(), self.lease) as tx:
                claim: ClaimResult = tx.claim
                if isinstance(claim, Stored):
                    return self._duplicate(envelope, claim.outcome, clock)
                if isinstance(claim, Claimed):
                    if (refusal := self._refusal(call, claim)) is not None:
                        tx.abandon()
                        return refusal
                    result = await self._with_lease(
                        key, claimant, clock, self._invoke(registration, command, call, tx.session)
                    )
                    if result.status is ReplyStatus.COMPLETED:
                        try:
                            stored = await tx.complete(
                                StoredOutcome(
                                    OutcomeKind.COMPLETED, result.result, stored_at=clock.now()
                                )
                            )
                        except ClaimLost:
                            log.warning("command_claim_lost", key=key)
                            tx.abandon()
                            continue  # ask again: the other claimant's outcome answers
                        return _from_stored(envelope, stored, clock.now())
                    tx.abandon()  # a refusal or an error keeps none of the handler's writes
            if isinstance(claim, Busy):
                waited += 1
                await self._wait_out(claim, waited, clock, what="command")
                continue
            break
        if result.outcome is OutcomeKind.FAILED:
            stored = await store.put(
                key, StoredOutcome(OutcomeKind.FAILED, error=result.error, stored_at=clock.now())
            )
            return _from_stored(envelope, stored, clock.now())
        await store.release(key, claimant)
        return self._unstored(envelope, result, clock)

    async def _with_lease(
        self, key: str, claimant: str, clock: Clock, work: Awaitable[_Answer]
    ) -> _Answer:
        """Await ``work`` while renewing the claim every third of the lease."""
        async with asyncio.TaskGroup() as group:
            keeper = group.create_task(self._keep_claim(key, claimant, clock))
            try:
                return await work
            finally:
                keeper.cancel()

    async def _keep_claim(self, key: str, claimant: str, clock: Clock) -> None:
        period = self.lease.total_seconds() / 3
        while True:
            await clock.sleep(period)
            try:
                kept = await self.idempotency.renew(key, claimant, clock.now() + self.lease)
            except StoreUnavailable as e:
                log.warning("claim_renewal_failed", key=key, error=str(e))
                continue
            if not kept:
                # The lease ran out (a stalled process) and another claimant took over: the
                # first outcome stored wins, and this one's effect may happen twice.
                log.warning("claim_lost_while_running", key=key)
                return

    async def _invoke(
        self,
        registration: _Registration,
        command: Command,
        call: _Call,
        transaction: Any = None,
    ) -> _Answer:
        """Run the handler in its span; what it came to, never an exception (but
        cancellation)."""
        envelope = call.envelope
        with telemetry.live_span(
            f"{self.service}.{envelope.command}",
            traceparent=envelope.traceparent,
            tracestate=envelope.tracestate,
            attributes={
                "saga.id": envelope.saga_id,
                "saga.type": envelope.saga_type,
                "saga.step": envelope.step,
                "saga.attempt": envelope.attempt,
                "saga.direction": envelope.direction.value,
                "saga.service": self.service,
            },
        ) as span:
            result = await self._answer(registration, command, call, transaction)
            if result.error is not None:
                span.fail(result.error.summary)
            return result

    async def _answer(
        self,
        registration: _Registration,
        command: Command,
        call: _Call,
        transaction: Any,
    ) -> _Answer:
        envelope, clock = call.envelope, call.clock
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
            transaction=transaction,
            tracestate=envelope.tracestate,
            beats=call.beats,
        )
        args: tuple[Any, ...] = (command, context) if registration.wants_context else (command,)
        try:
            value = await registration.fn(*args)
            result = _as_result(value)
        except NoReply:
            log.info("command_not_answered")
            return _Answer(None)
        except ParticipantError as e:
            error = ErrorDetail(
                type=e.type[:200],
                message=_bounded(e.message, ERROR_MESSAGE_LIMIT),
                code=None if e.code is None else e.code[:200],
            )
            status = ReplyStatus.FAILED if e.non_retryable else ReplyStatus.ERROR
            return _Answer(status, error=error)
        except Exception as e:
            # The traceback stays here; the bus gets the type and a bounded first line, never
            # a whole str(e) (a driver's error can carry SQL, values, credentials).
            log.exception("command_errored", error_type=type(e).__name__)
            return _Answer(ReplyStatus.ERROR, error=self._unexpected(e))
        return _Answer(ReplyStatus.COMPLETED, result=result)

    def _unexpected(self, error: Exception) -> ErrorDetail:
        limit = min(self.error_message_limit, ERROR_MESSAGE_LIMIT)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = _bounded(first_line, limit) if limit > 0 else ""
        return ErrorDetail(type=type(error).__name__[:200], message=message)

    def _claimant(self) -> str:
        return f"{self._replica}:{uuid.uuid4().hex[:12]}"

    @staticmethod
    def _refusal(call: _Call, claim: Claimed) -> Reply | None:
        """The answer to a command that must not start: never claimed before, and past its
        deadline or picked up after its pick-up deadline (None: run it)."""
        if not claim.first:
            return None
        envelope, now = call.envelope, call.clock.now()
        if call.late:
            assert envelope.pickup_by is not None
            log.info("command_picked_up_late", pickup_by=envelope.pickup_by.isoformat())
            return answer(envelope, ReplyStatus.ERROR, now, error=_PICKED_UP_LATE)
        if envelope.deadline is not None and now > envelope.deadline:
            log.info("command_expired", deadline=envelope.deadline.isoformat())
            return answer(envelope, ReplyStatus.ERROR, now, error=_EXPIRED)
        return None

    def _duplicate(self, envelope: CommandEnvelope, stored: StoredOutcome, clock: Clock) -> Reply:
        log.info("command_duplicate", stored=stored.kind.value)
        if self.metrics:
            self.metrics.commands.labels(
                self.service, envelope.command, CommandOutcome.DUPLICATE
            ).inc()
        return _from_stored(envelope, stored, clock.now())

    @staticmethod
    def _unstored(envelope: CommandEnvelope, result: _Answer, clock: Clock) -> Reply | None:
        if result.status is None:
            return None
        return answer(envelope, result.status, clock.now(), error=result.error)

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

        async def progress(message: PickedUp | Heartbeat) -> None:
            await transport.publish(progress_message(message, envelope.reply_to, clock.now()))

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
            reply = await self._patiently(envelope, clock, progress)
        except StoreUnavailable as e:
            # Waited for long enough: give it back (shutdown must not wait for ever).
            log.warning("command_requeued_store_unavailable", error=str(e))
            return Disposition.REQUEUE
        except MessageRejected as e:
            # Counted by the transport once the message is parked, not here: a parking that
            # fails is retried, and would be counted twice.
            log.warning("command_dead_lettered", reason=str(e))
            return DeadLetter(str(e), label="malformed")
        self._observe(envelope.command, reply, time.perf_counter() - started)
        if reply is None:
            return Disposition.ACK
        try:
            await transport.publish(reply_message(reply, envelope.reply_to, clock.now()))
        except PublishFailed as e:
            # The outcome is stored: the redelivered command will answer from the store.
            log.warning("reply_publish_failed", error=str(e))
            return Disposition.REQUEUE
        # Debug, as the orchestrator logs its messages: at info a busy service spent 3-4% of
        # its CPU writing this line, and saga_participant_commands_total counts them anyway.
        log.debug("command_handled", status=reply.status.value)
        return Disposition.ACK

    async def _patiently(
        self, envelope: CommandEnvelope, clock: Clock, progress: ProgressSink
    ) -> Reply | None:
        """Handle the command, waiting out an idempotency store outage for up to
        :data:`STORE_WAIT` seconds instead of requeueing at once.

        Every requeue counts toward the queue's delivery limit: requeued at once, a command
        comes straight back and fails again, and a short outage parks it as poison (the chaos
        soak saw ten redeliveries in 0.3 s). Holding it keeps it ours, and the full prefetch
        window stops the broker from sending more.
        """
        delay, waited = _STORE_RETRY_FIRST, 0.0
        while True:
            try:
                return await self.handle(envelope, clock, progress)
            except StoreUnavailable as e:
                if waited >= STORE_WAIT:
                    raise
                log.warning("store_unavailable_waiting", error=str(e), retry_in=delay)
                await clock.sleep(delay)
                waited += delay
                delay = min(delay * 2, _STORE_RETRY_MAX)

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

    def check_store(self) -> None:
        """Refuse to start with transactional handlers over a store without transactions.

        Raises:
            ConfigError: which handlers, and what to configure.
        """
        if self.transactional and not isinstance(self.idempotency, TransactionalIdempotency):
            names = ", ".join(n for n, r in self._handlers.items() if r.transactional)
            raise ConfigError(
                f"service {self.service!r} has transactional handlers ({names}) but its "
                f"idempotency store ({type(self.idempotency).__name__}) has no transactions; "
                "set SAGA_IDEMPOTENCY_URL to a postgresql:// or mongodb:// URL"
            )

    async def run(
        self,
        transport: Transport,
        *,
        clock: Clock | None = None,
        policy: QueuePolicy | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Declare this service's queue and consume commands until cancelled."""
        self.check_store()
        chosen_clock = clock or SystemClock()
        await self.idempotency.setup()
        await transport.declare(participant_topology(self.service, policy or QueuePolicy()))

        async def handler(delivery: Delivery) -> Disposition | DeadLetter:
            return await self.on_command(delivery, transport, chosen_clock)

        await transport.consume(command_queue(self.service), handler, ready=ready)


def _as_result(value: BaseModel | JsonObject | None) -> JsonObject:
    """The handler's return value as a JSON object within the wire bounds.

    Raises:
        TypeError: it is not a model, a mapping or None, or holds what JSON cannot.
        ValueError: it is larger than a reply may carry.
    """
    if isinstance(value, BaseModel):
        result = value.model_dump(mode="json")
    elif value is None:
        result = {}
    elif isinstance(value, dict):
        result = dict(to_jsonable_python(value))
    else:
        raise TypeError(f"a handler returns a pydantic model, a dict or None, not {value!r:.80}")
    check_json(result, RESULT_LIMIT)
    return result


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def _from_stored(envelope: CommandEnvelope, stored: StoredOutcome, now: datetime) -> Reply:
    if stored.kind is OutcomeKind.COMPLETED:
        return answer(envelope, ReplyStatus.COMPLETED, now, result=stored.result)
    if stored.kind is OutcomeKind.TOMBSTONE:
        return answer(envelope, ReplyStatus.FAILED, now, error=_CANCELLED)
    return answer(envelope, ReplyStatus.FAILED, now, error=stored.error)


_SPECIAL_OUTCOMES = {
    "Cancelled": CommandOutcome.CANCELLED,
    "DeadlineExceeded": CommandOutcome.EXPIRED,
    "PickupExpired": CommandOutcome.EXPIRED,
}


@dataclass(frozen=True)
class _Call:
    """One delivery of a command being handled, and what its handling carries along."""

    envelope: CommandEnvelope
    clock: Clock
    late: bool  # picked up after its pick-up deadline: must not start
    beats: Beats


_CANCELLED = ErrorDetail(
    type="Cancelled", message="the step was compensated before this command arrived; not executed"
)
_PICKED_UP_LATE = ErrorDetail(
    type="PickupExpired",
    message="the command was picked up after its pick-up deadline and was never executed "
    "here; not executed",
)
_EXPIRED = ErrorDetail(
    type="DeadlineExceeded",
    message="the command arrived after its deadline and was never executed here; not executed",
)
