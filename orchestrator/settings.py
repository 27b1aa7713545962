"""The orchestrator's settings: the common ``SAGA_*`` variables plus the saga store and loops."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from contracts.events import EventName
from plumbing.settings import SagaSettings


class Settings(SagaSettings):
    """Every ``SAGA_*`` environment variable the orchestrator and the operator commands read."""

    store_url: str = Field(default="memory://", description="memory://, postgresql://, mongodb://")
    step_timeouts: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description='JSON: {"<saga_type>.<step>": seconds}.'
    )
    sweep_interval: float = Field(default=5.0, gt=0, le=3600)
    relay_interval: float = Field(default=5.0, gt=0, le=3600)
    outbox_grace: float = Field(default=10.0, ge=0, le=3600)
    gauge_interval: float = Field(default=15.0, gt=0, le=3600)
    retention_days: float = Field(default=14.0, gt=0, le=3650)
    history_limit: int = Field(default=200, ge=10, le=100_000)
    published_events: Annotated[frozenset[EventName] | None, NoDecode] = Field(
        default=None, description="Comma-separated lifecycle event names, 'all' or 'none'."
    )
    console_tokens: SecretStr | None = Field(
        default=None,
        description="name:token,... : who may act through `saga console` (see its auth module).",
    )

    @field_validator("step_timeouts", mode="before")
    @classmethod
    def _parse_timeouts(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"it is not JSON ({e.msg})") from e
        if not isinstance(value, dict):
            raise ValueError('give a JSON object such as {"order_fulfillment.create_shipment": 5}')
        for key, seconds in value.items():
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ValueError(f"the timeout of {key!r} must be a positive number of seconds")
        return value

    @field_validator("published_events", mode="before")
    @classmethod
    def _parse_events(cls, value: Any) -> Any:
        if value is None or isinstance(value, frozenset | set | list | tuple):
            return value
        text = str(value).strip()
        if text.lower() in ("", "all"):
            return None
        if text.lower() == "none":
            return frozenset()
        names = [part.strip() for part in text.split(",") if part.strip()]
        known = {e.value for e in EventName}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"unknown event(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return frozenset(EventName(name) for name in names)

    @property
    def retention(self) -> timedelta:
        """How long finished sagas are kept."""
        return timedelta(days=self.retention_days)
