"""The metrics a participant service exports (``saga participant``).

``saga_participant_commands_total`` counts commands by service, command and
:class:`CommandOutcome`; ``saga_participant_handler_seconds`` times them. Every process also
exports :class:`plumbing.metrics.ProcessMetrics`.
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Histogram

from plumbing.metrics import STEP_BUCKETS, ProcessMetrics


class CommandOutcome(StrEnum):
    """How a participant dealt with a command: the ``outcome`` label of its counter."""

    COMPLETED = "completed"
    FAILED = "failed"
    ERROR = "error"
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    NO_REPLY = "no_reply"


class ParticipantMetrics(ProcessMetrics):
    """The metrics a participant service exports (``saga participant``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.commands = Counter(
            "saga_participant_commands_total",
            "Commands handled, by outcome: " + ", ".join(CommandOutcome) + ".",
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
