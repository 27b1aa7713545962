"""The long-running processes: ``saga orchestrator`` and ``saga participant``.

Both read their settings from the environment, log JSON, serve ``/metrics``, ``/healthz`` and
``/readyz``, and shut down gracefully on SIGTERM or SIGINT: stop consuming, let in-flight
messages finish, flush the outbox (the orchestrator), then close connections.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry

from orchestrator.definition import App
from orchestrator.delays import DelayLadder
from orchestrator.errors import ConfigError, StoreUnavailable
from orchestrator.http import ProbeServer
from orchestrator.metrics import Metrics, ParticipantMetrics, ProcessMetrics
from orchestrator.rabbitmq import RabbitTransport
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.settings import Settings
from orchestrator.stores import open_store
from participants.idempotency import MemoryIdempotency, open_idempotency
from participants.service import Participant

log = structlog.get_logger("daemon")

_PURGE_INTERVAL = 3600.0


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


def rabbit_transport(settings: Settings, metrics: ProcessMetrics | None = None) -> RabbitTransport:
    """The RabbitMQ transport the settings describe, counting into ``metrics`` if given."""
    if not settings.amqp_url:
        raise ConfigError(
            "SAGA_AMQP_URL is not set; give the RabbitMQ URL, e.g. amqp://guest:guest@localhost:5672/"
        )
    return RabbitTransport(
        settings.amqp_url,
        prefetch=settings.prefetch,
        heartbeat=settings.heartbeat,
        publish_timeout=settings.publish_timeout,
        ladder=DelayLadder(levels=settings.delay_levels, queue_type=settings.queue_type),
        # Park a poison message ourselves, with a reason, before the broker's limit drops it.
        poison_threshold=max(1, min(10, settings.delivery_limit - 1)),
        on_publish_failure=(
            None
            if metrics is None
            else lambda reason: metrics.publish_failures.labels(reason).inc()
        ),
        on_poison=(
            None
            if metrics is None
            else lambda queue: metrics.dead_lettered.labels(queue, "poison").inc()
        ),
    )


def _on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


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
    _on_signals(orchestrator.stop)
    try:
        if settings.http_port:
            await probes.start()
        await orchestrator.run()
    finally:
        await probes.close()
        await transport.close()
        await store.close()


async def run_participant(participant: Participant, settings: Settings) -> None:
    """Run a participant service until SIGTERM or SIGINT."""
    registry = CollectorRegistry()
    metrics = ParticipantMetrics(registry)
    participant.metrics = metrics
    if isinstance(participant.idempotency, MemoryIdempotency):
        # A service that did not choose its own store gets the configured one.
        participant.idempotency = open_idempotency(settings.idempotency_url)
    transport = rabbit_transport(settings, metrics)
    ready = asyncio.Event()
    probes = ProbeServer(registry, ready.is_set, settings.http_host, settings.http_port)
    stopping = asyncio.Event()
    _on_signals(stopping.set)
    try:
        if settings.http_port:
            await probes.start()
        async with asyncio.TaskGroup() as group:
            consumer = group.create_task(
                participant.run(transport, policy=settings.queue_policy, ready=ready)
            )
            purger = group.create_task(_purge_outcomes(participant))
            await _until_set_or_done(ready, consumer)
            metrics.consumers_ready.set(1 if ready.is_set() else 0)
            log.info("participant_ready", service=participant.service)
            await _until_set_or_done(stopping, consumer)
            ready.clear()
            metrics.consumers_ready.set(0)
            consumer.cancel()  # the transport lets in-flight commands finish first
            purger.cancel()
    finally:
        await probes.close()
        await transport.close()
        await participant.idempotency.close()
    log.info("participant_stopped", service=participant.service)


async def _purge_outcomes(participant: Participant) -> None:
    """Forget idempotency outcomes past their retention, hourly (PostgreSQL has no TTL)."""
    while True:
        await asyncio.sleep(_PURGE_INTERVAL)
        try:
            purged = await participant.idempotency.purge()
        except StoreUnavailable as e:
            log.warning("idempotency_purge_failed", error=str(e))
            continue
        if purged:
            log.info("idempotency_outcomes_purged", count=purged)


async def _until_set_or_done(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait until ``event`` is set or ``task`` ends, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
