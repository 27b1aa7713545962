"""Start sagas from a service, know at once whether they were accepted, and await their ends.

::

    async with SagaClient("amqp://guest:guest@localhost:5672/", app=app) as client:
        handle = await client.start("order_fulfillment", "order-1", order)  # accepted, or raises
        outcome = await handle.result(timeout=60)  # completed, failed or stuck, with results
        snapshot = await client.get("order-1")  # the saga's current state

One client holds one connection and serves any number of concurrent calls, so a web service
creates it once (at start-up) and shares it. It talks only to the broker: start requests go to
``saga.start`` and queries to ``saga.queries``, and the orchestrator answers on a queue of the
client's own (exclusive, deleted with the connection). Nothing polls the store: the outcome is
pushed to the client when the saga ends.

If the connection drops, answers sent meanwhile are lost and the calls waiting for them time
out; calling again is safe (a start is idempotent for the same id and data, and a wait asks
the orchestrator afresh).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict, deque
from collections.abc import Mapping
from datetime import timedelta
from types import TracebackType
from typing import Annotated, Any, Self, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from contracts.client import (
    OperateSaga,
    OperationAnswer,
    QuerySaga,
    SagaOutcome,
    SagaSnapshot,
    StartAnswer,
    StartStatus,
)
from contracts.messages import JsonObject, StartSaga
from orchestrator.definition import App
from orchestrator.engine import Action, new_saga
from plumbing import tracing
from plumbing.clock import SystemClock
from plumbing.codec import query_message, start_message
from plumbing.errors import SagaNotFound, StartRefused, UnknownSagaType
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, client_topology
from plumbing.transport import Outgoing

log = structlog.get_logger("client")

A = TypeVar("A", StartAnswer, SagaSnapshot, OperationAnswer)

_Answer = Annotated[
    StartAnswer | SagaSnapshot | SagaOutcome | OperationAnswer, Field(discriminator="kind")
]
_answers: TypeAdapter[StartAnswer | SagaSnapshot | SagaOutcome | OperationAnswer] = TypeAdapter(
    _Answer
)


class SagaHandle:
    """A saga the orchestrator accepted: its id, how it was accepted, and its outcome."""

    def __init__(self, client: SagaClient, answer: StartAnswer) -> None:
        self.client = client
        self.saga_id = answer.saga_id
        self.status = answer.status
        """``started``, or ``already_started`` (the same request was made before)."""
        self.version = answer.version
        """The definition version the saga runs."""

    async def result(self, timeout: float | None = None) -> SagaOutcome:  # noqa: ASYNC109
        """Wait until the saga completes, fails or gets stuck; see :meth:`SagaClient.wait`."""
        return await self.client.wait(self.saga_id, timeout=timeout)


class SagaClient:
    """A connection to the orchestrator through RabbitMQ, for services that start sagas.

    Args:
        amqp_url: the broker the orchestrator uses (``SAGA_AMQP_URL``).
        app: the saga definitions, if the service has them: data is then checked before it is
            sent, so a mistake fails at once with pydantic's explanation.
        answer_timeout: seconds to wait for the orchestrator to answer a start or a query.
        policy: how the orchestrator's queues are declared (as ``SAGA_QUEUE_TYPE`` and
            ``SAGA_DELIVERY_LIMIT`` say), so that requests queue up even before it runs.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        app: App | None = None,
        answer_timeout: float = 30.0,
        policy: QueuePolicy | None = None,
        transport: RabbitTransport | None = None,
    ) -> None:
        self.app = app
        self.answer_timeout = answer_timeout
        self.policy = policy or QueuePolicy()
        self.transport = transport or RabbitTransport(amqp_url)
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._waiting: dict[tuple[str, str], deque[asyncio.Future[Any]]] = defaultdict(deque)
        self._connect_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, declare the request queues, and open this client's answer queue.

        Raises:
            BrokerUnavailable: the broker cannot be reached.
            ConfigError: the URL is wrong, or the queues exist with other arguments.
        """
        async with self._connect_lock:
            if self._queue is not None:
                return
            await self.transport.declare(client_topology(self.policy))
            connection = await self.transport.connect()
            channel = connection.channel()
            await channel.initialize()
            queue = await channel.declare_queue(
                f"saga.client.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
            )
            await queue.consume(self._on_answer, no_ack=True)
            self._channel, self._queue = channel, queue

    async def close(self) -> None:
        """Fail every call still waiting, and close the connection."""
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()
        self._waiting.clear()
        channel, self._channel, self._queue = self._channel, None, None
        if channel is not None and not channel.is_closed:
            await channel.close()
        await self.transport.close()

    # --- calls ------------------------------------------------------------------------------

    async def start(
        self,
        saga_type: str,
        saga_id: str,
        data: Mapping[str, Any] | BaseModel,
        *,
        version: int | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> SagaHandle:
        """Ask the orchestrator to start a saga and return once it has accepted it.

        Starting is idempotent: the same id with the same type and data again answers
        ``already_started``.

        Raises:
            UnknownSagaType, InvalidSagaData: checked here when the client has the app.
            StartRefused: the orchestrator refused it (unknown type or version, invalid data,
                or the id is already used with other data); the reason says which.
            TimeoutError: the orchestrator did not answer within ``answer_timeout``.
        """
        if isinstance(data, BaseModel):
            payload = data.model_dump(mode="json", round_trip=True)
        else:
            payload = dict(data)
        self._check(saga_type, saga_id, payload, version)
        reply_to = await self._reply_to()
        request = StartSaga(
            saga_type=saga_type,
            saga_id=saga_id,
            data=payload,
            version=version,
            reply_to=reply_to,
            watch=True,  # the outcome comes to us when it ends, whether anyone waits or not
            traceparent=tracing.continue_or_start(traceparent),
            tracestate=tracestate if tracing.valid(traceparent) else None,
        )
        answer = await self._ask(
            "start_answer", saga_id, start_message(request, SystemClock().now()), StartAnswer
        )
        if answer.status is StartStatus.REFUSED:
            raise StartRefused(f"saga {saga_id} was refused: {answer.reason}")
        return SagaHandle(self, answer)

    # A timeout argument, as asyncio.wait_for has: what a service calling a client expects.
    async def wait(self, saga_id: str, timeout: float | None = None) -> SagaOutcome:  # noqa: ASYNC109
        """Wait until the saga completes, fails (rolled back) or gets stuck.

        Raises:
            SagaNotFound: the orchestrator has no saga with this id.
            TimeoutError: it did not end within ``timeout`` seconds.
        """
        outcome: asyncio.Future[SagaOutcome] = self._expect("outcome", saga_id)
        try:
            async with asyncio.timeout(timeout):
                snapshot = await self._query(saga_id, watch=True)
                if not snapshot.found:
                    raise SagaNotFound(f"the orchestrator has no saga {saga_id!r}")
                if snapshot.finished:
                    return _outcome(snapshot)
                return await outcome
        finally:
            self._forget("outcome", saga_id, outcome)

    async def get(self, saga_id: str) -> SagaSnapshot:
        """The saga's current state, as the orchestrator has it.

        Raises:
            SagaNotFound: the orchestrator has no saga with this id.
            TimeoutError: the orchestrator did not answer within ``answer_timeout``.
        """
        snapshot = await self._query(saga_id, watch=False)
        if not snapshot.found:
            raise SagaNotFound(f"the orchestrator has no saga {saga_id!r}")
        return snapshot

    async def operate(
        self, saga_id: str, action: Action, *, by: str | None, reason: str | None = None
    ) -> OperationAnswer:
        """Ask the orchestrator to apply an operator action (``retry``, ``abort``,
        ``resolve``) through the saga rules; the answer says whether it did and why not.

        A request not read within ``answer_timeout`` expires: the orchestrator refuses it
        when it finally reads it, so an operator who was told nobody answered is never
        surprised by it later.

        Raises:
            TimeoutError: the orchestrator did not answer within ``answer_timeout``.
        """
        reply_to = await self._reply_to()
        now = SystemClock().now()
        request = OperateSaga(
            saga_id=saga_id,
            action=action.value,
            request_id=uuid.uuid4().hex,
            reply_to=reply_to,
            expires_at=now + timedelta(seconds=self.answer_timeout),
            by=by,
            reason=reason,
        )
        message = query_message(request, f"{saga_id}:operate:{request.request_id}", now)
        return await self._ask("operation", saga_id, message, OperationAnswer)

    # --- plumbing ---------------------------------------------------------------------------

    def _check(self, saga_type: str, saga_id: str, data: JsonObject, version: int | None) -> None:
        """Refuse here what the orchestrator would refuse, when we have the definitions."""
        if self.app is None:
            return
        if saga_type not in self.app:
            known = ", ".join(self.app.types)
            raise UnknownSagaType(f"no saga type {saga_type!r}; the app has {known}")
        saga = self.app[saga_type] if version is None else self.app.version(saga_type, version)
        if saga is None:
            raise UnknownSagaType(f"saga type {saga_type!r} has no version {version}")
        new_saga(saga, saga_id, data, SystemClock().now())  # raises InvalidSagaData

    async def _reply_to(self) -> str:
        await self.connect()
        assert self._queue is not None
        return self._queue.name

    async def _query(self, saga_id: str, *, watch: bool) -> SagaSnapshot:
        reply_to = await self._reply_to()
        query = QuerySaga(saga_id=saga_id, reply_to=reply_to, watch=watch)
        message = query_message(query, f"{saga_id}:query:{uuid.uuid4().hex}", SystemClock().now())
        return await self._ask("snapshot", saga_id, message, SagaSnapshot)

    async def _ask(self, kind: str, saga_id: str, message: Outgoing, model: type[A]) -> A:
        """Publish a request and wait for the answer of ``kind`` about ``saga_id``."""
        answer: asyncio.Future[A] = self._expect(kind, saga_id)
        try:
            await self.transport.publish(message)
            async with asyncio.timeout(self.answer_timeout):
                return await answer
        except TimeoutError as e:
            raise TimeoutError(
                f"the orchestrator did not answer about saga {saga_id} within "
                f"{self.answer_timeout:g} s: is it running on this broker?"
            ) from e
        finally:
            self._forget(kind, saga_id, answer)

    def _expect(self, kind: str, saga_id: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[kind, saga_id].append(future)
        return future

    def _forget(self, kind: str, saga_id: str, future: asyncio.Future[Any]) -> None:
        waiting = self._waiting.get((kind, saga_id))
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self._waiting[kind, saga_id]

    async def _on_answer(self, message: AbstractIncomingMessage) -> None:
        try:
            answer = _answers.validate_json(message.body)
        except ValidationError as e:
            log.warning("client_answer_unreadable", error=str(e)[:200])
            return
        # Starts and queries are answered once each, in order; an outcome is for everyone
        # waiting on that saga.
        waiting = self._waiting.get((answer.kind, answer.saga_id))
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(answer)
                if answer.kind != "outcome":
                    break


def _outcome(snapshot: SagaSnapshot) -> SagaOutcome:
    """The outcome of a saga that had already ended when we asked."""
    assert snapshot.saga_type is not None
    assert snapshot.finished_at is not None or snapshot.status == "stuck"
    return SagaOutcome(
        saga_id=snapshot.saga_id,
        saga_type=snapshot.saga_type,
        status=snapshot.status,  # completed, failed or stuck: finished says so
        results=snapshot.results,
        failure_reason=snapshot.failure_reason,
        finished_at=snapshot.finished_at or snapshot.updated_at or SystemClock().now(),
    )
