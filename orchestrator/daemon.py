"""``saga orchestrator``: the orchestrator daemon.

It reads its settings from the environment, logs JSON, serves ``/metrics``, ``/healthz`` and
``/readyz``, waits for the saga store and the broker if they are down at start-up, and shuts
down gracefully on SIGTERM or SIGINT: stop consuming, let in-flight messages finish, flush the
outbox, then close connections. Start-up rules shared with participant services are in
:mod:`plumbing.daemons`.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from orchestrator.definition import App
from orchestrator.metrics import Metrics
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.settings import Settings
from orchestrator.stores import open_store
from plumbing.daemons import (
    ORCHESTRATOR_PORT,
    first_saga_error,
    on_signals,
    rabbit_transport,
    refuse_memory_store,
    start_probes,
    tune_garbage_collector,
    wait_until_reachable,
)
from plumbing.http import ProbeServer


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's tuning from the settings."""
    return EngineConfig(
        sweep_interval=settings.sweep_interval,
        relay_interval=settings.relay_interval,
        outbox_grace=settings.outbox_grace,
        gauge_interval=settings.gauge_interval,
        history_limit=settings.history_limit,
        published_events=settings.published_events,
        queue_policy=settings.queue_policy,
    )


async def run_orchestrator(app: App, settings: Settings) -> None:
    """Run the orchestrator daemon until SIGTERM or SIGINT."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.prepare(app)
    transport = rabbit_transport(settings, metrics)  # no broker configured: said first
    refuse_memory_store(
        settings,
        "SAGA_STORE_URL",
        settings.store_url,
        "would not have the sagas this process keeps, and their replies would be lost",
    )
    store = open_store(settings.store_url, retention=settings.retention)
    orchestrator = Orchestrator(
        app, store, transport, config=engine_config(settings), metrics=metrics
    )
    port = ORCHESTRATOR_PORT if settings.http_port is None else settings.http_port
    probes = ProbeServer(registry, orchestrator.ready.is_set, settings.http_host, port)
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        orchestrator.stop()

    on_signals(stop)
    try:
        if port:
            await start_probes(probes)
        for what, attempt in (
            ("the saga store", store.setup),
            ("RabbitMQ", lambda: transport.declare(orchestrator.topology)),
        ):
            reached = await wait_until_reachable(
                what, attempt, give_up_after=settings.startup_wait, stopping=stopping
            )
            if not reached:
                return
        tune_garbage_collector()
        with first_saga_error():
            await orchestrator.run()
    finally:
        await probes.close()
        await transport.close()
        await store.close()
