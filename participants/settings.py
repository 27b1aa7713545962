"""A participant service's settings: the common ``SAGA_*`` variables plus its outcome store."""

from __future__ import annotations

from pydantic import Field

from plumbing.settings import SagaSettings


class ParticipantSettings(SagaSettings):
    """Every ``SAGA_*`` environment variable a participant service reads."""

    idempotency_url: str = Field(default="memory://", description="Participants' outcome store.")
