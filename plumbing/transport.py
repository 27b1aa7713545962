"""The message transport seam: what the orchestrator and participants need from a broker.

Two implementations: RabbitMQ (``plumbing.rabbitmq``) in production and the embedded
in-memory broker (``plumbing.memory``) for tests and the demo. Both follow RabbitMQ's
routing rules, including raising on an unroutable mandatory publish.

The ack policy lives in one place, the transport: a handler returns a :class:`Disposition`
(or a :class:`DeadLetter` with its reason) and never acks by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from plumbing.clock import Clock
from plumbing.topology import Topology


class MessageKind(StrEnum):
    """What a message is; the ``saga-kind`` header and the AMQP ``type`` carry it."""

    COMMAND = "command"
    REPLY = "reply"
    TIMER = "timer"
    EVENT = "event"
    START = "start"
    QUERY = "query"
    ANSWER = "answer"
    """Sent to a client's own queue: a start answer, a snapshot or an outcome."""


class Outgoing(BaseModel):
    """One message to publish, exactly as it is kept in a saga's outbox.

    ``deliver_at`` delays the message: the transport holds it back until that instant (never
    earlier). Delayed messages are addressed to a queue through the default exchange.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: str
    kind: MessageKind
    exchange: str
    routing_key: str
    body: str
    headers: dict[str, str] = {}
    correlation_id: str | None = None
    mandatory: bool = True
    deliver_at: datetime | None = None
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    """One message received from a queue."""

    queue: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    routing_key: str = ""
    redelivered: bool = False


class Disposition(StrEnum):
    """What to do with a delivery once its handler returns."""

    ACK = "ack"
    REQUEUE = "requeue"


@dataclass(frozen=True)
class DeadLetter:
    """Park the delivery in the dead-letter queue with ``reason`` in its headers.

    ``label`` names the kind of problem (``malformed``, ``poison``, ...): a transport with an
    ``on_dead_lettered`` callback reports the message under it once the parked copy is
    confirmed, so a message is counted once however often parking it had to be retried. A
    DeadLetter without a label is counted by whoever returned it.
    """

    reason: str
    label: str | None = None


Handler = Callable[[Delivery], Awaitable[Disposition | DeadLetter]]
"""Processes one delivery and says how to settle it."""


class Transport(Protocol):
    """Publishes and consumes messages."""

    async def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings; idempotent.

        Raises:
            ConfigError: something exists with other arguments, or may not be declared.
            BrokerUnavailable: the broker cannot be reached.
        """
        ...

    async def publish(self, message: Outgoing) -> None:
        """Publish one message and wait until the broker has taken responsibility for it.

        Raises:
            PublishFailed: the message was returned as unroutable, nacked, or not confirmed in
                time. The caller keeps it in its outbox and tries again later.
        """
        ...

    async def consume(
        self, queue: str, handler: Handler, *, ready: asyncio.Event | None = None
    ) -> None:
        """Deliver messages from ``queue`` to ``handler`` until cancelled.

        ``ready`` is set once the consumer is registered with the broker.

        Raises:
            QueueNotFound: the queue has not been declared.
            BrokerUnavailable: the broker cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Release connections; consumers stop."""
        ...


class CommandService(Protocol):
    """A service that consumes its command queue over any transport (a participant service).

    The test harness runs real services through this seam, so the orchestrator never has to
    import the participant SDK.
    """

    @property
    def service(self) -> str:
        """The service's name: its command queue is ``saga.<service>.commands``."""
        ...

    async def run(self, transport: Transport, *, clock: Clock | None = None) -> None:
        """Declare the service's queue and consume commands until cancelled."""
        ...
