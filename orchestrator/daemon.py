"""``saga orchestrator``: the orchestrator daemon.

It reads its settings from the environment, logs JSON, serves ``/metrics``, ``/healthz`` and
``/readyz``, and shuts down gracefully on SIGTERM or SIGINT: stop consuming, let in-flight
messages finish, flush the outbox, then close connections.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from orchestrator.definition import App
from orchestrator.metrics import Metrics
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.settings import Settings
from orchestrator.stores import open_store
from plumbing.daemons import on_signals, rabbit_transport
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
    store = open_store(settings.store_url, retention=settings.retention)
    transport = rabbit_transport(settings, metrics)
    orchestrator = Orchestrator(
        app, store, transport, config=engine_config(settings), metrics=metrics
    )
    probes = ProbeServer(
        registry, orchestrator.ready.is_set, settings.http_host, settings.http_port
    )
    on_signals(orchestrator.stop)
    try:
        if settings.http_port:
            await probes.start()
        await orchestrator.run()
    finally:
        await probes.close()
        await transport.close()
        await store.close()
