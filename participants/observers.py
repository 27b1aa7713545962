"""Observers: services that react to sagas' lifecycle events without coupling to the engine.

::

    audit = Observer("audit", saga_types=["order_fulfillment"])

    @audit.on(SagaFailed)
    async def record_failure(event: SagaFailed) -> None:
        ...

An observer has a durable queue of its own (``saga.observers.<name>``) bound to the
``saga.events`` topic exchange for exactly the saga types and events it handles, so events
published while it is down wait for it. Delivery is at least once: a handler that raises is
retried (and parked as poison after the queue's delivery limit), and an event may arrive
twice, so handlers should be idempotent (every event has a deterministic ``event_id``).
Events of one saga may arrive out of order when several arrive at once; ``at`` and the
``event_id`` sequence give their order.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, get_type_hints

import structlog
from pydantic import ValidationError

from contracts import names
from contracts.events import EVENT_CLASSES, LifecycleEvent, lifecycle_event_adapter
from plumbing.codec import validation_summary
from plumbing.errors import DefinitionError
from plumbing.topology import BindingSpec, QueuePolicy, QueueSpec, Topology, base_topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Transport

log = structlog.get_logger("observer")

E = TypeVar("E", bound=LifecycleEvent)
EventHandler = Callable[[Any], Awaitable[None]]


class Observer:
    """A consumer of lifecycle events, with typed handlers per event class.

    Args:
        name: names its queue, ``saga.observers.<name>``; two processes with one name share
            the work, two names each get every event.
        saga_types: the saga types to observe; ``None`` observes all.
    """

    def __init__(self, name: str, *, saga_types: Iterable[str] | None = None) -> None:
        self.name = name
        self.saga_types = None if saga_types is None else tuple(saga_types)
        self._handlers: dict[str, list[EventHandler]] = {}

    @property
    def service(self) -> str:
        """The observer's name (what the harness and daemons call a service)."""
        return self.name

    @property
    def queue(self) -> str:
        """The observer's durable queue."""
        return f"saga.observers.{self.name}"

    def on(self, *events: type[LifecycleEvent]) -> Callable[[EventHandler], EventHandler]:
        """Register the decorated coroutine for ``events`` (default: its parameter's type)."""

        def register(fn: EventHandler) -> EventHandler:
            wanted = events or (_annotated_event(fn),)
            for event in wanted:
                if event not in EVENT_CLASSES.values():
                    raise DefinitionError(f"{event!r} is not a lifecycle event class")
                name = event.model_fields["event"].default.value
                self._handlers.setdefault(name, []).append(fn)
            return fn

        return register

    def topology(self, policy: QueuePolicy) -> Topology:
        """The queue and the bindings for the handled saga types and events."""
        types = self.saga_types or ("*",)
        return base_topology(policy) + Topology(
            queues=(QueueSpec(self.queue, policy.arguments()),),
            bindings=tuple(
                BindingSpec(names.EVENTS_EXCHANGE, self.queue, names.event_routing_key(t, e))
                for t in types
                for e in sorted(self._handlers)
            ),
        )

    async def handle(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Run the handlers of one delivered event; the transport settles it as returned."""
        try:
            event = lifecycle_event_adapter.validate_json(delivery.body)
        except ValidationError as e:
            reason = f"not a valid lifecycle event: {validation_summary(e)}"
            log.warning("event_dead_lettered", observer=self.name, reason=reason)
            return DeadLetter(reason)
        if self.saga_types is not None and event.saga_type not in self.saga_types:
            return Disposition.ACK
        for handler in self._handlers.get(event.event.value, ()):
            await handler(event)  # an exception is a bug: the transport logs and requeues
        return Disposition.ACK

    async def run(
        self,
        transport: Transport,
        *,
        policy: QueuePolicy | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Declare the queue and bindings and handle events until cancelled."""
        if not self._handlers:
            raise DefinitionError(f"observer {self.name!r} has no handlers")
        await transport.declare(self.topology(policy or QueuePolicy()))
        await transport.consume(self.queue, self.handle, ready=ready)


def _annotated_event(fn: Callable[..., Any]) -> type[LifecycleEvent]:
    hints = get_type_hints(fn)
    parameters = list(inspect.signature(fn).parameters)
    event = hints.get(parameters[0]) if parameters else None
    if not (isinstance(event, type) and issubclass(event, LifecycleEvent)):
        raise DefinitionError(
            f"handler {fn.__name__} must take a lifecycle event as its first parameter, "
            "annotated with the event's class, or name the events: @observer.on(SagaFailed)"
        )
    return event
