"""``saga demo`` over RabbitMQ: the daemon and the four services as real processes.

Used when ``SAGA_AMQP_URL`` is set. The processes must share a durable store, so
``SAGA_STORE_URL`` must name PostgreSQL or MongoDB. The shipment timeout is cut to five
seconds (unless ``SAGA_STEP_TIMEOUTS`` says otherwise) so the hanging order fails in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from contracts.messages import StartSaga
from orchestrator.demo import DEMO_ORDERS
from orchestrator.processes import SagaProcesses
from orchestrator.settings import Settings
from orchestrator.state import SagaState
from orchestrator.store import SagaStore
from orchestrator.stores import open_store
from plumbing.clock import SystemClock
from plumbing.codec import start_message
from plumbing.daemons import rabbit_transport
from plumbing.errors import ConfigError
from plumbing.topology import orchestrator_topology

SERVICES = tuple(
    f"examples.order_fulfillment:{service}"
    for service in ("inventory", "payment", "shipping", "notification")
)


async def run_with_processes(settings: Settings, *, within: float = 120.0) -> list[SagaState]:
    """Start the processes, run the three demo orders through RabbitMQ, return their states."""
    if settings.store_url.startswith("memory://"):
        raise ConfigError(
            "with SAGA_AMQP_URL set, the demo runs the daemon and four services as separate "
            "processes, which need a shared store: set SAGA_STORE_URL to a postgresql:// or "
            "mongodb:// URL"
        )
    env = {
        "SAGA_LOG_LEVEL": "warning",
        "SAGA_SWEEP_INTERVAL": "1",
        # The services keep their outcomes where the sagas are (unless told otherwise).
        "SAGA_IDEMPOTENCY_URL": os.environ.get("SAGA_IDEMPOTENCY_URL") or settings.store_url,
    }
    if not settings.step_timeouts:
        env["SAGA_STEP_TIMEOUTS"] = json.dumps({"order_fulfillment.create_shipment": 5})
    suffix = format(int(time.time() * 1000) % 36**6, "x")  # a rerun starts new sagas
    orders = [
        order.model_copy(update={"order_id": f"{order.order_id}-{suffix}"}) for order in DEMO_ORDERS
    ]
    processes = SagaProcesses("examples.order_fulfillment:app", SERVICES, env)
    store = open_store(settings.store_url, retention=settings.retention)
    transport = rabbit_transport(settings)
    try:
        await store.setup()
        await processes.start()
        await transport.declare(orchestrator_topology((), settings.queue_policy))
        now = SystemClock().now()
        for order in orders:
            data = order.model_dump(mode="json", round_trip=True)
            request = StartSaga(saga_type="order_fulfillment", saga_id=order.order_id, data=data)
            await transport.publish(start_message(request, now))
        return await _wait_for_ends(store, [o.order_id for o in orders], within)
    finally:
        await processes.stop()
        await transport.close()
        await store.close()


async def _wait_for_ends(store: SagaStore, saga_ids: list[str], within: float) -> list[SagaState]:
    async with asyncio.timeout(within):
        while True:
            records = [await store.load(saga_id) for saga_id in saga_ids]
            states = [r.state for r in records if r is not None]
            if len(states) == len(saga_ids) and not any(s.status.is_active for s in states):
                return states
            await asyncio.sleep(0.5)
