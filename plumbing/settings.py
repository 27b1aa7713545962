"""Settings from the environment (``SAGA_*``), checked at start-up.

A bad value stops the process with one sentence that names the variable and says what to fix,
never with a traceback. Every setting has a default that works on a laptop except the broker
URL, which the daemons need.

:class:`SagaSettings` holds what every saga process reads (the broker, its queues, the probe
endpoint, logging); the orchestrator (:class:`orchestrator.settings.Settings`) and participant
services (:class:`participants.settings.ParticipantSettings`) add their own.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from plumbing.errors import ConfigError
from plumbing.topology import QueuePolicy, QueueType
from plumbing.urls import amqp_addresses

S = TypeVar("S", bound="SagaSettings")


class LogFormat(StrEnum):
    """How log lines are rendered."""

    JSON = "json"
    CONSOLE = "console"


class SagaSettings(BaseSettings):
    """The ``SAGA_*`` environment variables every saga process reads."""

    # The input stays out of validation errors: SAGA_AMQP_URL and the store URLs hold passwords.
    # An empty variable means its default, as ``Environment=SAGA_HTTP_PORT=`` does in systemd.
    model_config = SettingsConfigDict(
        env_prefix="SAGA_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        env_ignore_empty=True,
    )

    app: str | None = Field(default=None, description="MODULE:ATTR of the App or Participant.")
    amqp_url: str | None = Field(
        default=None,
        description="RabbitMQ URL, or the comma-separated URLs of a cluster's nodes; unset = "
        "embedded broker.",
    )
    prefetch: int = Field(default=32, ge=1, le=2000)
    queue_type: QueueType = QueueType.QUORUM
    delivery_limit: int = Field(default=20, ge=1, le=10_000)
    publish_timeout: float = Field(default=10.0, gt=0, le=300)
    heartbeat: int = Field(default=10, ge=0, le=600)
    delay_levels: int = Field(default=22, ge=1, le=28)
    max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=128 * 1024 * 1024,
        description="Larger message bodies are parked unread.",
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="Where the probes listen; containers set 0.0.0.0 to serve them to the pod.",
    )
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Unset: 9400 for the orchestrator, a free port for a participant service "
        "(so that several run on one host); 0 disables the endpoint.",
    )
    startup_wait: float = Field(
        default=math.inf,
        ge=0,
        description="Seconds to keep trying to reach the broker and the stores at start-up "
        "before exiting; inf (the default) waits as long as an outage after start-up would.",
    )
    allow_memory_store: bool = Field(
        default=False,
        description="Let a daemon keep sagas or participants' outcomes in memory:// although a "
        "real broker is configured (one throwaway process only: nothing is shared or kept).",
    )
    log_level: str = "info"
    log_format: LogFormat = LogFormat.JSON

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            amqp_addresses(value)  # a bad address stops the process now, not at connect
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("use debug, info, warning, error or critical")
        return value.lower()

    @property
    def queue_policy(self) -> QueuePolicy:
        """How durable queues are declared."""
        return QueuePolicy(queue_type=self.queue_type, delivery_limit=self.delivery_limit)


def load_settings(model: type[S], **overrides: Any) -> S:
    """Read the environment into ``model``; raise :class:`ConfigError` with a fix-it sentence."""
    try:
        return model(**overrides)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"SAGA_{field.upper()} is invalid: {message}")
        raise ConfigError("; ".join(problems)) from e
    except SettingsError as e:
        raise ConfigError(f"a SAGA_* variable could not be read: {e}") from e
