"""``saga participant``: a participant service as a daemon.

It reads its settings from the environment, logs JSON, serves ``/metrics``, ``/healthz`` and
``/readyz``, forgets idempotency outcomes past their retention every hour, waits for its
idempotency store and the broker if they are down at start-up, and shuts down gracefully on
SIGTERM or SIGINT: stop consuming, let in-flight commands finish, then close connections.
Start-up rules shared with the orchestrator are in :mod:`plumbing.daemons`; in short, a
participant's probes listen on a free port unless ``SAGA_HTTP_PORT`` names one, so the four
example services run side by side on one host without a setting each.
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CollectorRegistry

from participants.idempotency import MemoryIdempotency, open_idempotency
from participants.metrics import ParticipantMetrics
from participants.service import Participant
from participants.settings import ParticipantSettings
from plumbing.daemons import (
    first_saga_error,
    on_signals,
    rabbit_transport,
    refuse_memory_store,
    start_probes,
    tune_garbage_collector,
    until_set_or_done,
    wait_until_reachable,
)
from plumbing.errors import ConfigError, StoreUnavailable
from plumbing.http import ProbeServer
from plumbing.loader import load_object
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import participant_topology

log = structlog.get_logger("daemon")

_PURGE_INTERVAL = 3600.0


def load_participant(spec: str | None) -> Participant:
    """The :class:`Participant` service at ``spec``."""
    participant = load_object(spec, "participant service")
    if not isinstance(participant, Participant):
        raise ConfigError(
            f"{spec} is a {type(participant).__name__}, not a participants.Participant "
            "(did you mean `saga orchestrator`?)"
        )
    return participant


async def run_participant(participant: Participant, settings: ParticipantSettings) -> None:
    """Run a participant service until SIGTERM or SIGINT."""
    registry = CollectorRegistry()
    metrics = ParticipantMetrics(registry)
    participant.metrics = metrics
    transport = rabbit_transport(settings, metrics)  # no broker configured: said first
    if isinstance(participant.idempotency, MemoryIdempotency):
        # A service that did not choose its own store gets the configured one.
        refuse_memory_store(
            settings,
            "SAGA_IDEMPOTENCY_URL",
            settings.idempotency_url,
            "would not know which commands this process handled, and would run them again",
        )
        participant.idempotency = open_idempotency(settings.idempotency_url)
    participant.lease = settings.lease
    participant.error_message_limit = settings.error_message_limit
    participant.check_store()  # transactional handlers need a store with transactions
    ready = asyncio.Event()
    # Port 0 asks the kernel for a free one: see the module docstring.
    port = 0 if settings.http_port is None else settings.http_port
    probes = ProbeServer(registry, ready.is_set, settings.http_host, port)
    stopping = asyncio.Event()
    on_signals(stopping.set)
    topology = participant_topology(participant.service, settings.queue_policy)
    try:
        if settings.http_port != 0:
            await start_probes(probes)
        for what, attempt in (
            ("the idempotency store", participant.idempotency.setup),
            ("RabbitMQ", lambda: transport.declare(topology)),
        ):
            reached = await wait_until_reachable(
                what, attempt, give_up_after=settings.startup_wait, stopping=stopping
            )
            if not reached:
                return
        tune_garbage_collector()
        with first_saga_error():
            await _serve(
                participant,
                transport,
                settings=settings,
                metrics=metrics,
                ready=ready,
                stopping=stopping,
            )
    finally:
        await probes.close()
        await transport.close()
        await participant.idempotency.close()
    log.info("participant_stopped", service=participant.service)


async def _serve(
    participant: Participant,
    transport: RabbitTransport,
    *,
    settings: ParticipantSettings,
    metrics: ParticipantMetrics,
    ready: asyncio.Event,
    stopping: asyncio.Event,
) -> None:
    """Consume commands and purge old outcomes until ``stopping`` is set."""
    async with asyncio.TaskGroup() as group:
        consumer = group.create_task(
            participant.run(transport, policy=settings.queue_policy, ready=ready)
        )
        purger = group.create_task(_purge_outcomes(participant))
        await until_set_or_done(ready, consumer)
        metrics.consumers_ready.set(1 if ready.is_set() else 0)
        log.info("participant_ready", service=participant.service)
        await until_set_or_done(stopping, consumer)
        ready.clear()
        metrics.consumers_ready.set(0)
        consumer.cancel()  # the transport lets in-flight commands finish first
        purger.cancel()


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
