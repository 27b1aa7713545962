"""Metric families every saga process exports, built on a registry that is passed in.

The orchestrator adds its saga-level families (:mod:`orchestrator.metrics`) and participant
services theirs (:mod:`participants.metrics`). Recording a metric must never change how a
message is settled.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
"""Histogram buckets for anything that takes as long as a step: 10 ms to an hour."""


class ProcessMetrics:
    """Families every saga process exports, the orchestrator and participants alike."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.dead_lettered = Counter(
            "saga_dead_lettered_total",
            "Messages parked in the dead-letter queue.",
            ["queue", "reason"],
            registry=registry,
        )
        self.publish_failures = Counter(
            "saga_publish_failures_total",
            "Publishes the broker did not confirm: returned, nacked, timeout, connection, channel.",
            ["reason"],
            registry=registry,
        )
        self.consumers_ready = Gauge(
            "saga_consumers_ready",
            "1 while every consumer is registered with the broker.",
            registry=registry,
        )
