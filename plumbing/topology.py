"""The RabbitMQ topology as data: exchanges, queues and bindings.

Every process declares what it needs idempotently at start-up (the daemon everything, a
participant its own command queue); ``saga topology`` prints the same description and
``saga topology --declare`` applies it. Durable queues are quorum queues by default, each with
an explicit delivery limit and an at-least-once dead-letter route to :data:`PARKED_QUEUE`, so
a poison message ends up parked instead of looping or vanishing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from contracts import names

T = TypeVar("T")


class QueueType(StrEnum):
    """Durable queue flavour."""

    QUORUM = "quorum"
    CLASSIC = "classic"


@dataclass(frozen=True)
class ExchangeSpec:
    """A durable exchange."""

    name: str
    type: str  # direct, topic or fanout


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue and its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    """A binding from an exchange to a queue, or to another exchange."""

    source: str
    destination: str
    routing_key: str
    to_exchange: bool = False


@dataclass(frozen=True)
class Topology:
    """A set of exchanges, queues and bindings."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            exchanges=_unique(self.exchanges + other.exchanges),
            queues=_unique(self.queues + other.queues),
            bindings=_unique(self.bindings + other.bindings),
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (what ``saga topology`` prints)."""
        return {
            "exchanges": [{"name": e.name, "type": e.type} for e in self.exchanges],
            "queues": [{"name": q.name, "arguments": q.arguments} for q in self.queues],
            "bindings": [
                {
                    "source": b.source,
                    "destination": b.destination,
                    "destination_type": "exchange" if b.to_exchange else "queue",
                    "routing_key": b.routing_key,
                }
                for b in self.bindings
            ],
        }


def _unique(items: tuple[T, ...]) -> tuple[T, ...]:
    seen: dict[str, T] = {}
    for item in items:
        seen.setdefault(repr(item), item)
    return tuple(seen.values())


@dataclass(frozen=True)
class QueuePolicy:
    """How durable work queues are declared."""

    queue_type: QueueType = QueueType.QUORUM
    delivery_limit: int = 20

    def arguments(self) -> dict[str, Any]:
        """Arguments of a work queue that parks poison messages."""
        arguments: dict[str, Any] = {"x-dead-letter-exchange": names.DEAD_LETTER_EXCHANGE}
        if self.queue_type is QueueType.QUORUM:
            arguments |= {
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        else:
            arguments["x-queue-type"] = "classic"
        return arguments

    def parking_arguments(self) -> dict[str, Any]:
        """Arguments of the parking queue (no dead-lettering of its own)."""
        return {"x-queue-type": self.queue_type.value}


def base_topology(policy: QueuePolicy) -> Topology:
    """Exchanges every saga process uses, and the parking queue."""
    return Topology(
        exchanges=(
            ExchangeSpec(names.COMMANDS_EXCHANGE, "direct"),
            ExchangeSpec(names.REPLIES_EXCHANGE, "direct"),
            ExchangeSpec(names.START_EXCHANGE, "direct"),
            ExchangeSpec(names.EVENTS_EXCHANGE, "topic"),
            ExchangeSpec(names.DEAD_LETTER_EXCHANGE, "fanout"),
        ),
        queues=(QueueSpec(names.PARKED_QUEUE, policy.parking_arguments()),),
        bindings=(BindingSpec(names.DEAD_LETTER_EXCHANGE, names.PARKED_QUEUE, ""),),
    )


def participant_topology(service: str, policy: QueuePolicy) -> Topology:
    """What one participant service needs: its command queue."""
    queue = names.command_queue(service)
    return base_topology(policy) + Topology(
        queues=(QueueSpec(queue, policy.arguments()),),
        bindings=(BindingSpec(names.COMMANDS_EXCHANGE, queue, service),),
    )


def client_topology(policy: QueuePolicy) -> Topology:
    """What a client needs to exist: the start and query queues it sends requests to, so
    that requests wait there even before the orchestrator first runs."""
    return base_topology(policy) + Topology(
        queues=(
            QueueSpec(names.START_QUEUE, policy.arguments()),
            QueueSpec(names.QUERIES_QUEUE, policy.arguments()),
        ),
        bindings=(BindingSpec(names.START_EXCHANGE, names.START_QUEUE, names.START_ROUTING_KEY),),
    )


def orchestrator_topology(services: Iterable[str], policy: QueuePolicy) -> Topology:
    """What the orchestrator needs: start, query, reply and timer queues plus every command
    queue.

    The orchestrator declares its participants' command queues too, so that a command sent
    before a participant first starts is queued instead of returned as unroutable.
    """
    topology = client_topology(policy) + Topology(
        queues=(
            QueueSpec(names.REPLIES_QUEUE, policy.arguments()),
            QueueSpec(names.TIMERS_QUEUE, policy.arguments()),
        ),
        bindings=(
            BindingSpec(names.REPLIES_EXCHANGE, names.REPLIES_QUEUE, names.REPLIES_ROUTING_KEY),
        ),
    )
    for service in sorted(set(services)):
        topology = topology + participant_topology(service, policy)
    return topology
