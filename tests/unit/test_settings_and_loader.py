"""Bad configuration stops start-up with a sentence that says what to fix."""

from __future__ import annotations

import re

import pytest

from contracts.events import EventName
from orchestrator.loader import load_app
from orchestrator.settings import Settings
from participants.daemon import load_participant
from plumbing.errors import ConfigError
from plumbing.settings import load_settings
from plumbing.topology import QueueType


def test_defaults_work_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAGA_AMQP_URL", "SAGA_STORE_URL", "SAGA_STEP_TIMEOUTS", "SAGA_QUEUE_TYPE"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(Settings)
    assert settings.amqp_url is None
    assert settings.store_url == "memory://"
    assert settings.queue_type is QueueType.QUORUM
    assert settings.published_events is None


def test_values_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_STEP_TIMEOUTS", '{"order_fulfillment.create_shipment": 5}')
    monkeypatch.setenv("SAGA_PUBLISHED_EVENTS", "SagaFailed, SagaStuck")
    monkeypatch.setenv("SAGA_QUEUE_TYPE", "classic")
    settings = load_settings(Settings)
    assert settings.step_timeouts == {"order_fulfillment.create_shipment": 5}
    assert settings.published_events == {EventName.SAGA_FAILED, EventName.SAGA_STUCK}
    assert settings.queue_policy.arguments()["x-queue-type"] == "classic"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SAGA_STEP_TIMEOUTS", "{nope", "SAGA_STEP_TIMEOUTS is invalid: it is not JSON"),
        ("SAGA_STEP_TIMEOUTS", '{"a.b": -1}', "must be a positive number of seconds"),
        ("SAGA_STEP_TIMEOUTS", "[1, 2]", "give a JSON object"),
        ("SAGA_PREFETCH", "lots", "SAGA_PREFETCH is invalid"),
        ("SAGA_PREFETCH", "0", "SAGA_PREFETCH is invalid"),
        ("SAGA_QUEUE_TYPE", "mirrored", "SAGA_QUEUE_TYPE is invalid"),
        ("SAGA_PUBLISHED_EVENTS", "SagaExploded", "unknown event(s) SagaExploded"),
        ("SAGA_LOG_LEVEL", "loud", "use debug, info, warning, error or critical"),
    ],
)
def test_bad_values_fail_with_a_sentence(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(Settings)


def test_apps_and_participants_load_with_clear_errors() -> None:
    app = load_app("examples.order_fulfillment:app", {"order_fulfillment.create_shipment": 5})
    assert app["order_fulfillment"].step("create_shipment").timeout.total_seconds() == 5
    assert load_participant("examples.order_fulfillment:payment").service == "payment"
    with pytest.raises(ConfigError, match=r"package\.module:attribute"):
        load_app("examples.order_fulfillment")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_app("no_such_module:app")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_app("examples.order_fulfillment:nope")
    with pytest.raises(ConfigError, match="did you mean `saga participant`"):
        load_app("examples.order_fulfillment:payment")
    with pytest.raises(ConfigError, match="did you mean `saga orchestrator`"):
        load_participant("examples.order_fulfillment:app")
    with pytest.raises(ConfigError, match="SAGA_STEP_TIMEOUTS is invalid"):
        load_app("examples.order_fulfillment:app", {"order_fulfillment.nope": 5})
    with pytest.raises(ConfigError, match="set SAGA_APP"):
        load_app(None)
