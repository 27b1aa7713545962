"""Exchange, queue and header names: the RabbitMQ contract between all saga processes.

Our own headers never start with ``x-``: RabbitMQ owns that prefix (``x-death`` and friends).
"""

from __future__ import annotations

from typing import Final

COMMANDS_EXCHANGE: Final = "saga.commands"
"""Direct exchange; routing key = participant service name; one queue per service."""

REPLIES_EXCHANGE: Final = "saga.replies"
"""Direct exchange for participant replies; routing key :data:`REPLIES_ROUTING_KEY`."""

REPLIES_QUEUE: Final = "saga.replies"
REPLIES_ROUTING_KEY: Final = "saga.replies"

START_EXCHANGE: Final = "saga.start"
"""Direct exchange for start requests; routing key :data:`START_ROUTING_KEY`."""

START_QUEUE: Final = "saga.start"
START_ROUTING_KEY: Final = "saga.start"

QUERIES_QUEUE: Final = "saga.queries"
"""Clients' queries (QuerySaga), published through the default exchange; answered on their own
queue."""

TIMERS_QUEUE: Final = "saga.timers"
"""Where delayed wake-ups land once their delay has passed."""

DELAY_EXCHANGE_PREFIX: Final = "saga.delay"
"""Delay ladder: exchanges and queues ``saga.delay.<level>`` plus ``saga.delay.deliver``."""

DELAY_DELIVER_EXCHANGE: Final = "saga.delay.deliver"

EVENTS_EXCHANGE: Final = "saga.events"
"""Topic exchange for lifecycle events; routing key ``<saga_type>.<EventName>``."""

DEAD_LETTER_EXCHANGE: Final = "saga.dead-letter"
"""Fanout exchange feeding :data:`PARKED_QUEUE`."""

PARKED_QUEUE: Final = "saga.parked"
"""Messages that could not be processed, with the reason in :data:`HEADER_DEAD_LETTER_REASON`."""

HEADER_SAGA_ID: Final = "saga-id"
HEADER_MESSAGE_ID: Final = "saga-message-id"
HEADER_MESSAGE_KIND: Final = "saga-kind"
HEADER_TRACEPARENT: Final = "traceparent"
HEADER_DUE_AT: Final = "saga-due-at"
HEADER_DEAD_LETTER_REASON: Final = "saga-dead-letter-reason"
HEADER_DEAD_LETTER_QUEUE: Final = "saga-dead-letter-queue"


def command_queue(service: str) -> str:
    """The command queue of a participant service."""
    return f"saga.{service}.commands"


def event_routing_key(saga_type: str, event_name: str) -> str:
    """The routing key a lifecycle event is published with."""
    return f"{saga_type}.{event_name}"
