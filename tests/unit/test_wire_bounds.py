"""Untrusted input is bounded and parsed strictly where it is received, and fuzzed.

Every message a saga process receives goes through ``plumbing.codec.decode``: strict types
(``"attempt": "2"`` is not a number), instants with an offset, the lengths and sizes of
``contracts.messages``, and no NUL anywhere. The participant parks whatever fails with its
reason; no input makes it raise.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.messages import (
    ERROR_MESSAGE_LIMIT,
    JSON_DEPTH_LIMIT,
    SAGA_ID_LIMIT,
    Command,
    CommandEnvelope,
    Reply,
    StartSaga,
    TimerMessage,
)
from examples.order_fulfillment import app
from orchestrator.testing import SagaHarness, fail
from participants import Participant
from plumbing.codec import decode
from plumbing.errors import MessageRejected
from plumbing.memory import MemoryBroker, VirtualClock
from plumbing.transport import DeadLetter, Delivery, Disposition, MessageKind

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def command_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "kind": "command",
        "message_id": "s-1:charge:forward:1",
        "saga_id": "s-1",
        "saga_type": "order",
        "step": "charge",
        "command": "charge",
        "direction": "forward",
        "attempt": 1,
        "idempotency_key": "fwd:s-1:charge",
        "payload": {"order_id": "o-1"},
        "reply_to": "saga.replies",
        "sent_at": NOW.isoformat(),
        "deadline": (NOW + timedelta(minutes=1)).isoformat(),
    }
    body.update(changes)
    return body


def delivery(body: dict[str, Any] | bytes) -> Delivery:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Delivery(queue="saga.payment.commands", body=raw)


def rejected(body: dict[str, Any] | bytes, model: type[Any] = CommandEnvelope) -> str:
    with pytest.raises(MessageRejected) as raised:
        decode(delivery(body), model)
    return str(raised.value)


def test_a_valid_command_decodes() -> None:
    assert decode(delivery(command_body()), CommandEnvelope).attempt == 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"attempt": "2"}, "attempt: Input should be a valid integer"),
        ({"attempt": 2.0}, "attempt: Input should be a valid integer"),
        ({"attempt": True}, "attempt: Input should be a valid integer"),
        ({"sent_at": 1767225600}, "sent_at: Input should be a valid datetime"),
        ({"sent_at": "2026-03-01T00:00:00"}, "sent_at: Value error, must carry a timezone"),
        ({"deadline": "2026-03-01"}, "deadline: Input should be a valid datetime"),
        ({"saga_id": "s" * (SAGA_ID_LIMIT + 1)}, "saga_id: Value error, is 201 characters"),
        ({"saga_id": "s-1\x1b[2J"}, "saga_id: Value error, contains a control character"),
        ({"step": "x" * 201}, "step: Value error, is 201 characters long"),
        ({"payload": {"n": 2**63}}, "payload: Value error, holds an integer that does not fit"),
        ({"payload": {"big": "x" * 600_000}}, "payload: Value error, is larger than"),
        ({"traceparent": "0" * 200}, "traceparent: Value error, is 200 characters long"),
    ],
)
def test_wire_rules_refuse_with_the_field_and_the_rule(
    changes: dict[str, Any], reason: str
) -> None:
    assert reason in rejected(command_body(**changes))


def test_deep_and_non_finite_json_is_refused() -> None:
    deep: Any = "leaf"
    for _ in range(JSON_DEPTH_LIMIT + 1):
        deep = {"d": deep}
    assert "nested deeper than" in rejected(command_body(payload=deep))
    infinite = json.dumps(command_body()).replace('"o-1"', "1e400").encode()
    assert "not finite" in rejected(infinite)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"saga_id": "a\\u0000b"}',
        b'{"payload": {"k\\u0000": 1}}',
        b'{"x": "\\\\\\u0000"}',
        b'\x00{"x": 1}',
    ],
)
def test_a_nul_anywhere_is_refused_before_parsing(raw: bytes) -> None:
    assert "a string holds a NUL character" in rejected(raw)


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    body = json.dumps(command_body(payload={"path": "C:\\u0000"})).encode()
    assert b"\\\\u0000" in body
    assert decode(delivery(body), CommandEnvelope).payload == {"path": "C:\\u0000"}


def test_new_saga_ids_use_a_safe_character_set() -> None:
    start = {"saga_type": "order", "data": {}}
    for good in ("order-1", "3f2a9c1e-7b1d-4c3f-9a7e-0d2f1b6c8e4a", "acme:order#42", "a.b_c@d"):
        assert decode(delivery({**start, "saga_id": good}), StartSaga).saga_id == good
    for bad in ("", "order 1", "-order", "order\n1", "órder", "a'b", "x" * 201):
        assert "saga_id" in rejected({**start, "saga_id": bad}, StartSaga)


def test_error_messages_are_bounded_on_the_wire() -> None:
    reply = {
        "message_id": "reply:m",
        "in_reply_to": "m",
        "saga_id": "s-1",
        "step": "charge",
        "direction": "forward",
        "attempt": 1,
        "status": "error",
        "error": {"type": "Boom", "message": "m" * (ERROR_MESSAGE_LIMIT + 1)},
        "sent_at": NOW.isoformat(),
    }
    assert "error.message: Value error, is 2001 characters" in rejected(reply, Reply)


async def test_everything_the_orchestrator_and_the_sdk_send_decodes_strictly() -> None:
    """The bounds accept every message our own processes produce: a saga that retries,
    times out, fails and compensates, through the real services, decoded message by message."""
    from examples.order_fulfillment.services import payment

    order = {
        "order_id": "o-bounds",
        "customer_id": "c-1",
        "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
        "payment_method": "card",
        "shipping_address": "1 Main St",
        "simulate": {"process_payment": "error:1"},
    }
    async with SagaHarness(app).mount(payment) as h:
        h.participant("shipping").on("create_shipment", fail("no such street"))
        await h.start("order_fulfillment", "o-bounds", order)
        await h.advance(minutes=30)
        published = list(h.broker.published)
    models = {
        MessageKind.COMMAND: CommandEnvelope,
        MessageKind.REPLY: Reply,
        MessageKind.TIMER: TimerMessage,
    }
    kinds = set()
    for message in published:
        model = models.get(message.kind)
        if model is not None:
            decode(Delivery(queue="q", body=message.body.encode()), model)
            kinds.add(message.kind)
    assert kinds == set(models)


# --- fuzzing the decoder through a participant ---------------------------------------------------


class Charge(Command):
    order_id: str


def _service() -> Participant:
    service = Participant("payment")

    @service.handler
    async def charge(cmd: Charge) -> None:
        return None

    return service


SERVICE = _service()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
fields = st.sampled_from(sorted(command_body()))


@st.composite
def mutated_commands(draw: st.DrawFn) -> bytes:
    body = command_body()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        field = draw(fields)
        if draw(st.booleans()):
            body[field] = draw(json_values)
        else:
            body.pop(field, None)
    return json.dumps(body).encode()


bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_commands(),
    st.text(max_size=200).map(lambda t: json.dumps(command_body(saga_id=t)).encode()),
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bodies)
async def test_no_body_crashes_the_participant_and_every_malformed_one_is_parked(
    body: bytes,
) -> None:
    clock = VirtualClock(NOW)
    verdict = await SERVICE.on_command(
        Delivery(queue="saga.payment.commands", body=body), MemoryBroker(clock), clock
    )
    if isinstance(verdict, DeadLetter):
        assert verdict.reason
        assert verdict.label == "malformed"
    else:
        assert verdict in (Disposition.ACK, Disposition.REQUEUE)
        decode(Delivery(queue="q", body=body), CommandEnvelope)  # it was a valid command


@settings(max_examples=300, deadline=None)
@given(bodies, st.sampled_from([CommandEnvelope, Reply, TimerMessage, StartSaga]))
def test_the_decoder_raises_nothing_but_message_rejected(body: bytes, model: type[Any]) -> None:
    reason = f"not a valid {model.__name__}"
    with contextlib.suppress(MessageRejected):
        decode(Delivery(queue="q", body=body), model)
        return
    with pytest.raises(MessageRejected, match=reason):
        decode(Delivery(queue="q", body=body), model)
