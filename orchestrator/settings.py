"""Settings from the environment (``SAGA_*``), checked at start-up.

A bad value stops the process with one sentence that names the variable and says what to fix,
never with a traceback. Every setting has a default that works on a laptop except the broker
URL, which the daemons need.
"""

from __future__ import annotations

import json
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from contracts.events import EventName
from orchestrator.errors import ConfigError
from orchestrator.topology import QueuePolicy, QueueType


class LogFormat(StrEnum):
    """How log lines are rendered."""

    JSON = "json"
    CONSOLE = "console"


class Settings(BaseSettings):
    """Every ``SAGA_*`` environment variable the orchestrator and participants read."""

    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore", frozen=True)

    app: str | None = Field(default=None, description="MODULE:ATTR of the App or Participant.")
    amqp_url: str | None = Field(default=None, description="RabbitMQ URL; unset = embedded broker.")
    store_url: str = Field(default="memory://", description="memory://, postgresql://, mongodb://")
    idempotency_url: str = Field(default="memory://", description="Participants' outcome store.")
    step_timeouts: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description='JSON: {"<saga_type>.<step>": seconds}.'
    )
    prefetch: int = Field(default=32, ge=1, le=2000)
    queue_type: QueueType = QueueType.QUORUM
    delivery_limit: int = Field(default=20, ge=1, le=10_000)
    publish_timeout: float = Field(default=10.0, gt=0, le=300)
    heartbeat: int = Field(default=10, ge=0, le=600)
    delay_levels: int = Field(default=22, ge=1, le=28)
    sweep_interval: float = Field(default=5.0, gt=0, le=3600)
    relay_interval: float = Field(default=5.0, gt=0, le=3600)
    outbox_grace: float = Field(default=10.0, ge=0, le=3600)
    gauge_interval: float = Field(default=15.0, gt=0, le=3600)
    retention_days: float = Field(default=14.0, gt=0, le=3650)
    history_limit: int = Field(default=200, ge=10, le=100_000)
    published_events: Annotated[frozenset[EventName] | None, NoDecode] = Field(
        default=None, description="Comma-separated lifecycle event names, 'all' or 'none'."
    )
    http_host: str = "0.0.0.0"  # noqa: S104 - a daemon in a container serves its probes to the pod
    http_port: int = Field(default=9400, ge=0, le=65535, description="0 disables the endpoint.")
    log_level: str = "info"
    log_format: LogFormat = LogFormat.JSON

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

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("use debug, info, warning, error or critical")
        return value.lower()

    @property
    def retention(self) -> timedelta:
        """How long finished sagas are kept."""
        return timedelta(days=self.retention_days)

    @property
    def queue_policy(self) -> QueuePolicy:
        """How durable queues are declared."""
        return QueuePolicy(queue_type=self.queue_type, delivery_limit=self.delivery_limit)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; raise :class:`ConfigError` with a fix-it sentence on bad values."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"SAGA_{field.upper()} is invalid: {message}")
        raise ConfigError("; ".join(problems)) from e
    except SettingsError as e:
        raise ConfigError(f"a SAGA_* variable could not be read: {e}") from e
