"""A participant service's settings: the common ``SAGA_*`` variables plus its outcome store."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from participants.idempotency import DEFAULT_LEASE
from participants.service import DEFAULT_ERROR_MESSAGE_LIMIT
from plumbing.settings import SagaSettings


class ParticipantSettings(SagaSettings):
    """Every ``SAGA_*`` environment variable a participant service reads."""

    idempotency_url: str = Field(default="memory://", description="Participants' outcome store.")
    idempotency_lease: float = Field(
        default=DEFAULT_LEASE.total_seconds(),
        ge=1,
        le=3600,
        description="Seconds a claim holds without renewal: a crashed replica's command runs "
        "again this long after its last renewal.",
    )
    error_message_limit: int = Field(
        default=DEFAULT_ERROR_MESSAGE_LIMIT,
        ge=0,
        le=2000,
        description="Characters of an unexpected exception's message sent to the orchestrator "
        "(0: its type only).",
    )

    @property
    def lease(self) -> timedelta:
        """The claim lease as a duration."""
        return timedelta(seconds=self.idempotency_lease)
