"""The metrics a participant service exports (``saga participant``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from plumbing.metrics import STEP_BUCKETS, ProcessMetrics


class ParticipantMetrics(ProcessMetrics):
    """The metrics a participant service exports (``saga participant``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.commands = Counter(
            "saga_participant_commands_total",
            "Commands handled, by outcome: completed, failed, error, duplicate, cancelled, "
            "expired, no_reply.",
            ["service", "command", "outcome"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "saga_participant_handler_seconds",
            "Time spent in a command handler.",
            ["service", "command"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
