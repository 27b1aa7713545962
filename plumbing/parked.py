"""Parked messages: list, show, replay and discard what the ``saga.parked`` queue holds.

RabbitMQ cannot browse a queue: a message is seen only by taking it. So each operation takes
messages off the head of the queue one at a time and, for every message it keeps, publishes an
identical copy to the tail (with publisher confirms) before acking the original: the queue
rotates, nothing is lost if the process dies halfway (at worst a message is there twice), and
no message is left unacknowledged for the broker to redeliver and count. Listing rotates at most
``limit`` messages; finding one rotates until it is found. Rotations in one process take
turns; another process rotating at the same moment may hide a message from a lookup for that
moment (the lookup then says it is not parked, and asking again finds it).

A message is named by the AMQP ``message_id`` its parked copy carries (the transport gives each
parked copy a fresh random one). A message RabbitMQ dead-lettered itself (a quorum queue's
delivery limit) has ``x-first-death-*`` headers instead of ours; its first rotation writes them
into ours (``x-`` headers are never republished) and gives it an id if it had none.

Replaying publishes the body and our headers, without the parking ones, to the queue it was
parked from, through the default exchange, mandatory and confirmed; only then is it removed
from ``saga.parked``. A message that names no queue cannot be replayed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelClosed, DeliveryError

from contracts import names
from plumbing.errors import PublishFailed, SagaError

_PREVIEW: Final = 2000
"""Characters of a body shown in a listing; ``show`` has it whole."""


class MessageNotParked(SagaError, LookupError):
    """Raised when no parked message has the id asked for."""


class ReplayRefused(SagaError):
    """Raised when a parked message cannot be sent back (it names no queue)."""


@dataclass(frozen=True)
class ParkedMessage:
    """One message in ``saga.parked``: why it was parked, where from, and what it says."""

    message_id: str
    reason: str
    queue: str | None
    """The queue it was parked from, where a replay sends it."""
    saga_id: str | None
    kind: str | None
    parked_at: datetime | None
    """When the message was first published (the AMQP timestamp it keeps), if it says."""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def text(self) -> str:
        """The body as text (it is JSON when it came from a saga process)."""
        return self.body.decode("utf-8", errors="replace")

    def summary(self, *, whole: bool = False) -> dict[str, Any]:
        """The JSON shape of ``saga parked ls|show --json`` and the console's API."""
        text = self.text if whole else self.text[:_PREVIEW]
        return {
            "message_id": self.message_id,
            "reason": self.reason,
            "queue": self.queue,
            "saga_id": self.saga_id,
            "kind": self.kind,
            "parked_at": None if self.parked_at is None else self.parked_at.isoformat(),
            "headers": self.headers,
            "body": text,
            "body_bytes": len(self.body),
        }


class _Verdict(Enum):
    KEEP = "keep"
    REPLAY = "replay"
    DISCARD = "discard"


class ParkedQueue:
    """Reads and settles parked messages over an open RabbitMQ connection.

    Args:
        connection: a connection to the broker (the transport's).
        timeout: seconds to wait for any one broker answer.
    """

    def __init__(self, connection: AbstractConnection, *, timeout: float = 10.0) -> None:
        self.connection = connection
        self.timeout = timeout
        # One rotation at a time in this process: a message another rotation holds unacked
        # is invisible, and a replay would report it missing (the console polls the list).
        self._rotating = asyncio.Lock()

    async def list(self, limit: int = 100) -> list[ParkedMessage]:
        """Up to ``limit`` parked messages, oldest first (by when they were published)."""
        seen: list[ParkedMessage] = []

        def keep(message: ParkedMessage) -> _Verdict | None:
            seen.append(message)
            return _Verdict.KEEP

        await self._rotate(keep, limit)
        return sorted(seen, key=lambda m: (m.parked_at is None, m.parked_at or 0, m.message_id))

    async def get(self, message_id: str) -> ParkedMessage:
        """The parked message with this id.

        Raises:
            MessageNotParked: no parked message has this id.
        """
        return await self._settle(message_id, _Verdict.KEEP)

    async def replay(self, message_id: str) -> ParkedMessage:
        """Send the message back to the queue it was parked from, then remove it.

        Raises:
            MessageNotParked: no parked message has this id.
            ReplayRefused: it names no queue to go back to.
            PublishFailed: the broker did not take it (the queue is gone): it stays parked.
        """
        return await self._settle(message_id, _Verdict.REPLAY)

    async def discard(self, message_id: str) -> ParkedMessage:
        """Remove the message for good.

        Raises:
            MessageNotParked: no parked message has this id.
        """
        return await self._settle(message_id, _Verdict.DISCARD)

    async def _settle(self, message_id: str, verdict: _Verdict) -> ParkedMessage:
        found: list[ParkedMessage] = []

        def pick(message: ParkedMessage) -> _Verdict | None:
            if message.message_id != message_id:
                return _Verdict.KEEP
            if verdict is _Verdict.REPLAY and not message.queue:
                raise ReplayRefused(
                    f"parked message {message_id} does not say which queue it came from"
                )
            found.append(message)
            return verdict

        await self._rotate(pick, None)
        if not found:
            raise MessageNotParked(f"no parked message has id {message_id!r}")
        return found[0]

    async def _rotate(
        self, visit: Callable[[ParkedMessage], _Verdict | None], limit: int | None
    ) -> None:
        """Take messages off the head in turn and settle each as ``visit`` says; stop after
        ``limit`` messages, after a message that is not kept, or once every message that was
        there at the start has been seen."""
        async with self._rotating:
            await self._rotate_alone(visit, limit)

    async def _rotate_alone(
        self, visit: Callable[[ParkedMessage], _Verdict | None], limit: int | None
    ) -> None:
        channel = self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.initialize(timeout=self.timeout)
        try:
            try:
                queue = await channel.declare_queue(
                    names.PARKED_QUEUE, passive=True, timeout=self.timeout
                )
            except ChannelClosed as e:
                raise MessageNotParked(
                    f"the broker has no {names.PARKED_QUEUE} queue: nothing was ever parked"
                ) from e
            assert queue.declaration_result.message_count is not None
            waiting = queue.declaration_result.message_count
            if limit is not None:
                waiting = min(waiting, limit)
            for _ in range(waiting):
                incoming = await queue.get(no_ack=False, fail=False, timeout=self.timeout)
                if incoming is None:
                    return
                if not await self._handle(channel, queue, incoming, visit):
                    return
        finally:
            await channel.close()

    async def _handle(
        self,
        channel: aio_pika.abc.AbstractChannel,
        queue: AbstractQueue,
        incoming: AbstractIncomingMessage,
        visit: Callable[[ParkedMessage], _Verdict | None],
    ) -> bool:
        """Settle one message; whether to go on rotating."""
        message = _parked(incoming)
        try:
            verdict = visit(message)
        except BaseException:
            await self._keep(channel, message, incoming)
            raise
        if verdict is _Verdict.REPLAY:
            try:
                await self._publish(channel, message.queue or "", _replayed(message))
            except PublishFailed:
                await self._keep(channel, message, incoming)
                raise
            await incoming.ack()
            return False
        if verdict is _Verdict.DISCARD:
            await incoming.ack()
            return False
        await self._keep(channel, message, incoming)
        return True

    async def _keep(
        self,
        channel: aio_pika.abc.AbstractChannel,
        message: ParkedMessage,
        incoming: AbstractIncomingMessage,
    ) -> None:
        """Copy to the tail, confirmed, then ack the original: the message moves, never goes."""
        copy = aio_pika.Message(
            message.body,
            headers=dict(message.headers),
            content_type=incoming.content_type,
            content_encoding=incoming.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=incoming.correlation_id,
            message_id=message.message_id,
            timestamp=incoming.timestamp,
            type=incoming.type,
        )
        try:
            await self._publish(channel, names.PARKED_QUEUE, copy)
        except PublishFailed:
            await incoming.nack(requeue=True)
            raise
        await incoming.ack()

    async def _publish(
        self, channel: aio_pika.abc.AbstractChannel, queue: str, message: aio_pika.Message
    ) -> None:
        try:
            await channel.default_exchange.publish(
                message, routing_key=queue, mandatory=True, timeout=self.timeout
            )
        except DeliveryError as e:
            raise PublishFailed(f"the broker did not take the message for queue {queue!r}") from e
        except TimeoutError as e:
            raise PublishFailed(f"the broker did not confirm the message for {queue!r}") from e


def _parked(incoming: AbstractIncomingMessage) -> ParkedMessage:
    """What a parked delivery says, with RabbitMQ's own dead-letter headers read into ours."""
    raw = dict(incoming.headers or {})
    headers = {key: _text(value) for key, value in raw.items() if not key.lower().startswith("x-")}
    if names.HEADER_DEAD_LETTER_QUEUE not in headers and "x-first-death-queue" in raw:
        headers[names.HEADER_DEAD_LETTER_QUEUE] = _text(raw["x-first-death-queue"])
    if names.HEADER_DEAD_LETTER_REASON not in headers:
        why = _text(raw.get("x-first-death-reason", "unknown"))
        headers[names.HEADER_DEAD_LETTER_REASON] = f"dead-lettered by RabbitMQ ({why})"
    return ParkedMessage(
        message_id=incoming.message_id or uuid.uuid4().hex,
        reason=headers[names.HEADER_DEAD_LETTER_REASON],
        queue=headers.get(names.HEADER_DEAD_LETTER_QUEUE) or None,
        saga_id=headers.get(names.HEADER_SAGA_ID) or incoming.correlation_id,
        kind=headers.get(names.HEADER_MESSAGE_KIND) or incoming.type,
        parked_at=incoming.timestamp,
        headers=headers,
        body=incoming.body,
    )


def _replayed(message: ParkedMessage) -> aio_pika.Message:
    headers = {
        key: value
        for key, value in message.headers.items()
        if key not in (names.HEADER_DEAD_LETTER_QUEUE, names.HEADER_DEAD_LETTER_REASON)
    }
    return aio_pika.Message(
        message.body,
        headers=dict(headers),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.saga_id,
        message_id=uuid.uuid4().hex,
        type=message.kind,
    )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
