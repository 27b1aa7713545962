"""Observers get every lifecycle event of a run, exactly as published; ``saga watch`` streams
them. Real RabbitMQ; the orchestrator and the example services run in this process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from contracts.events import EVENT_CLASSES, LifecycleEvent, SagaFailed
from examples.order_fulfillment import app, inventory, notification, payment, shipping
from orchestrator.client import SagaClient
from orchestrator.stores.memory import MemoryStore
from participants import Observer
from plumbing.errors import DefinitionError
from tests.integration.in_process import running
from tests.integration.test_cli import saga
from tests.integration.test_client import order

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(600)]


@dataclass
class Run:
    url: str
    store: MemoryStore
    seen: list[LifecycleEvent]
    arrived: asyncio.Event


@pytest.fixture
async def run(vhost_url: str) -> AsyncIterator[Run]:
    """The orchestrator, the four services and an observer of every event, until the end."""
    store = MemoryStore()
    seen: list[LifecycleEvent] = []
    arrived = asyncio.Event()
    audit = Observer("audit")

    @audit.on(*EVENT_CLASSES.values())
    async def record(event: LifecycleEvent) -> None:
        seen.append(event)
        arrived.set()

    services = (audit, inventory, payment, shipping, notification)
    async with running(vhost_url, app, store, services):
        yield Run(vhost_url, store, seen, arrived)


async def test_an_observer_receives_every_event_exactly_as_published(run: Run) -> None:
    async with SagaClient(run.url) as client:
        handles = [
            await client.start("order_fulfillment", "obs-ok", order("obs-ok")),
            await client.start(
                "order_fulfillment", "obs-no", order("obs-no", process_payment="fail")
            ),
        ]
        for handle in handles:
            await handle.result(timeout=120)
    states = {state.saga_id: state for state in run.store.states()}
    expected = {
        (state.saga_id, f"{state.saga_id}:{n}", entry.event.value)
        for state in states.values()
        for n, entry in enumerate(state.history)
    }
    async with asyncio.timeout(60):
        while {(e.saga_id, e.event_id, e.event.value) for e in run.seen} != expected:
            run.arrived.clear()
            await run.arrived.wait()
    # Exactly as published: each event once here (no redelivery happened), with its fields.
    assert len(run.seen) == len(expected)
    failed = next(e for e in run.seen if isinstance(e, SagaFailed))
    assert failed.saga_id == "obs-no"
    assert failed.detail == "step process_payment failed (PaymentDeclined)"


async def test_saga_watch_streams_the_events_of_a_type(run: Run) -> None:
    watching = asyncio.create_task(
        asyncio.to_thread(
            saga,
            "watch",
            "--type",
            "order_fulfillment",
            "--json",
            "--count",
            "3",
            SAGA_AMQP_URL=run.url,
        )
    )
    # The watcher binds its queue a moment after it starts; events published before that
    # reach nobody, so sagas are started until it has seen three events.
    started = 0
    async with asyncio.timeout(120):
        while not watching.done():
            async with SagaClient(run.url) as client:
                handle = await client.start(
                    "order_fulfillment", f"watch-{started}", order(f"watch-{started}")
                )
                await handle.result(timeout=60)
            started += 1
    done = await watching
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3
    assert {line["saga_type"] for line in lines} == {"order_fulfillment"}


def test_an_observer_handler_must_name_its_events() -> None:
    audit = Observer("audit")
    with pytest.raises(DefinitionError, match="lifecycle event as its first parameter"):

        @audit.on()
        async def untyped(event: object) -> None: ...
