"""What both long-running processes share: the broker from settings, and signal handling.

``saga orchestrator`` (:mod:`orchestrator.daemon`) and ``saga participant``
(:mod:`participants.daemon`) read their settings from the environment, log JSON, serve
``/metrics``, ``/healthz`` and ``/readyz``, and shut down gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from plumbing.delays import DelayLadder
from plumbing.errors import ConfigError
from plumbing.metrics import ProcessMetrics
from plumbing.rabbitmq import RabbitTransport
from plumbing.settings import SagaSettings


def rabbit_transport(
    settings: SagaSettings, metrics: ProcessMetrics | None = None
) -> RabbitTransport:
    """The RabbitMQ transport the settings describe, counting into ``metrics`` if given."""
    if not settings.amqp_url:
        raise ConfigError(
            "SAGA_AMQP_URL is not set; give the RabbitMQ URL, e.g. "
            "amqp://guest:guest@localhost:5672/ (or the comma-separated URLs of a cluster's nodes)"
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
        # Counted once parked (a parking that fails is retried): messages, not attempts.
        on_dead_lettered=(
            None
            if metrics is None
            else lambda queue, label: metrics.dead_lettered.labels(queue, label).inc()
        ),
        max_body=settings.max_message_bytes,
    )


def on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


async def until_set_or_done(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait until ``event`` is set or ``task`` ends, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
