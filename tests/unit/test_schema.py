"""The AsyncAPI document and the JSON Schema bundle describe every wire message, self-contained.

Sample messages are real model instances; where possible they also go through the codec, so
that the documented headers, exchanges and routing keys are the ones actually written.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from contracts import names, orders
from contracts.client import (
    OperateSaga,
    OperationAnswer,
    QuerySaga,
    SagaOutcome,
    SagaSnapshot,
    StartAnswer,
    StartStatus,
    StepView,
)
from contracts.events import (
    LIFECYCLE_EVENTS,
    EventName,
    LifecycleEvent,
    SagaLateReply,
    SagaStarted,
    SagaStepCompleted,
    SagaStepRetrying,
)
from contracts.messages import (
    SCHEMA_VERSION,
    CommandEnvelope,
    Direction,
    ErrorDetail,
    Heartbeat,
    PickedUp,
    Reply,
    ReplyStatus,
    StartSaga,
    TimerKind,
    TimerMessage,
    command_message_id,
    idempotency_key,
    timer_message_id,
)
from contracts.schema import (
    MESSAGE_MODELS,
    ORDER_MODELS,
    ORDER_SCHEMA_PREFIX,
    PARKED_MESSAGE,
    asyncapi_document,
    json_schema_bundle,
)
from orchestrator.effects import PublishEvent, ScheduleTimer, SendCommand, outgoing
from plumbing.codec import (
    answer_message,
    progress_message,
    query_message,
    reply_message,
    start_message,
)
from plumbing.transport import Outgoing

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SAGA = "o-1"
SAGA_TYPE = "order_fulfillment"
SERVICE = "inventory"
OUR_HEADERS = (
    names.HEADER_SAGA_ID,
    names.HEADER_MESSAGE_ID,
    names.HEADER_MESSAGE_KIND,
    names.HEADER_TRACEPARENT,
)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ITEM = orders.OrderItem(sku="SKU-1", quantity=2, unit_price=Decimal("12.50"))
ERROR = ErrorDetail(type="PaymentDeclined", message="card declined", code="51")
ORDER_FIELDS: dict[str, Any] = {"order_id": SAGA, "simulate": {"create_shipment": "hang"}}


# --- sample messages ---------------------------------------------------------------------------


def _envelope() -> CommandEnvelope:
    direction = Direction.FORWARD
    payload = orders.ReserveInventory(items=[ITEM], **ORDER_FIELDS)
    return CommandEnvelope(
        message_id=command_message_id(SAGA, "reserve_inventory", direction, 1),
        saga_id=SAGA,
        saga_type=SAGA_TYPE,
        step="reserve_inventory",
        command=orders.ReserveInventory.name(),
        direction=direction,
        attempt=1,
        idempotency_key=idempotency_key(SAGA, "reserve_inventory", direction),
        payload=payload.model_dump(mode="json"),
        reply_to=names.REPLIES_ROUTING_KEY,
        sent_at=NOW,
        deadline=NOW,
        traceparent=TRACEPARENT,
    )


def _reply() -> Reply:
    return Reply(
        message_id=f"{SAGA}:reply:1",
        in_reply_to=command_message_id(SAGA, "process_payment", Direction.FORWARD, 2),
        saga_id=SAGA,
        step="process_payment",
        direction=Direction.FORWARD,
        attempt=2,
        status=ReplyStatus.FAILED,
        error=ERROR,
        sent_at=NOW,
    )


def _timer() -> TimerMessage:
    return TimerMessage(
        message_id=timer_message_id(SAGA, TimerKind.STEP_TIMEOUT, "create_shipment", 1),
        saga_id=SAGA,
        timer=TimerKind.STEP_TIMEOUT,
        step="create_shipment",
        attempt=1,
        due_at=NOW,
    )


def _start() -> StartSaga:
    data = {"order_id": SAGA, "customer_id": "c-1", "items": [ITEM.model_dump(mode="json")]}
    return StartSaga(saga_type=SAGA_TYPE, saga_id=SAGA, data=data, traceparent=TRACEPARENT)


EVENT_EXTRAS: dict[type[LifecycleEvent], dict[str, Any]] = {
    SagaStarted: {"data": {"order_id": SAGA}},
    SagaStepCompleted: {"result": {"reservation_id": "r-1"}},
    SagaStepRetrying: {"retry_at": NOW, "error": ERROR},
    SagaLateReply: {"status": ReplyStatus.COMPLETED},
}


def _event(cls: type[LifecycleEvent], index: int) -> LifecycleEvent:
    extra = EVENT_EXTRAS.get(cls, {})
    if "error" in cls.model_fields:
        extra = {"error": ERROR, **extra}
    return cls(
        event_id=f"{SAGA}:{index}",
        saga_id=SAGA,
        saga_type=SAGA_TYPE,
        at=NOW,
        step="reserve_inventory",
        attempt=1,
        detail="sample",
        **extra,
    )


def _order_samples() -> list[BaseModel]:
    return [
        orders.OrderData(
            customer_id="c-1",
            items=[ITEM],
            payment_method="card",
            shipping_address="1 Main St",
            **ORDER_FIELDS,
        ),
        ITEM,
        orders.ReserveInventory(items=[ITEM], **ORDER_FIELDS),
        orders.InventoryReserved(reservation_id="r-1"),
        orders.ReleaseInventory(reservation_id="r-1", **ORDER_FIELDS),
        orders.ProcessPayment(
            customer_id="c-1", amount=Decimal("25.00"), payment_method="card", **ORDER_FIELDS
        ),
        orders.PaymentProcessed(payment_id="p-1", amount=Decimal("25.00")),
        orders.RefundPayment(payment_id=None, amount=Decimal("25.00"), **ORDER_FIELDS),
        orders.CreateShipment(
            items=[ITEM], shipping_address="1 Main St", reservation_id="r-1", **ORDER_FIELDS
        ),
        orders.ShipmentCreated(shipment_id="s-1", tracking_number="T-1"),
        orders.CancelShipment(shipment_id="s-1", **ORDER_FIELDS),
        orders.SendConfirmation(
            customer_id="c-1",
            payment_id="p-1",
            shipment_id="s-1",
            tracking_number="T-1",
            **ORDER_FIELDS,
        ),
        orders.ConfirmationSent(notification_id="n-1"),
    ]


CLIENT_QUEUE = "amq.gen-client-1"


def _progress() -> list[BaseModel]:
    fields: dict[str, Any] = {
        "saga_id": SAGA,
        "step": "process_payment",
        "direction": Direction.FORWARD,
        "attempt": 1,
        "sent_at": NOW,
    }
    return [
        PickedUp(message_id=f"picked_up:{SAGA}:1", **fields),
        Heartbeat(message_id=f"heartbeat:{SAGA}:1", details="3 of 9 checks", **fields),
    ]


def _client_messages() -> list[BaseModel]:
    results = {"reserve_inventory": {"reservation_id": "r-1"}}
    return [
        QuerySaga(saga_id=SAGA, reply_to=CLIENT_QUEUE, watch=True),
        OperateSaga(
            saga_id=SAGA,
            action="abort",
            request_id="r-1",
            reply_to=CLIENT_QUEUE,
            expires_at=NOW,
            by="ops",
            reason="customer cancelled",
        ),
        OperationAnswer(
            saga_id=SAGA, request_id="r-1", applied=True, before="started", after="compensating"
        ),
        StartAnswer(saga_id=SAGA, status=StartStatus.REFUSED, reason="unknown saga type"),
        SagaSnapshot(
            saga_id=SAGA,
            found=True,
            saga_type=SAGA_TYPE,
            version=1,
            status="started",
            data={"order_id": SAGA},
            results=results,
            steps=[StepView(name="reserve_inventory", status="completed", attempts=1)],
            created_at=NOW,
            updated_at=NOW,
        ),
        SagaOutcome(
            saga_id=SAGA,
            saga_type=SAGA_TYPE,
            status="failed",
            results=results,
            failure_reason="card declined",
            error=ERROR,
            finished_at=NOW,
        ),
    ]


MESSAGES: list[BaseModel] = [
    _start(),
    _envelope(),
    _reply(),
    *_progress(),
    _timer(),
    *_client_messages(),
    *(_event(cls, index) for index, cls in enumerate(LIFECYCLE_EVENTS)),
]
ORDER_SAMPLES = _order_samples()


def _wire(message: BaseModel) -> Outgoing:  # noqa: PLR0911 - one case per message kind
    """The message exactly as the codec puts it on the wire."""
    match message:
        case CommandEnvelope():
            return outgoing(SendCommand(service=SERVICE, envelope=message), NOW)
        case TimerMessage():
            return outgoing(ScheduleTimer(message=message), NOW)
        case LifecycleEvent():
            return outgoing(PublishEvent(event=message), NOW)
        case Reply():
            return reply_message(message, names.REPLIES_ROUTING_KEY, NOW)
        case PickedUp() | Heartbeat():
            return progress_message(message, names.REPLIES_ROUTING_KEY, NOW)
        case StartAnswer() | SagaSnapshot() | SagaOutcome() | OperationAnswer():
            return answer_message(message, CLIENT_QUEUE, NOW)
        case QuerySaga() | OperateSaga():
            return query_message(message, f"{SAGA}:query:1", NOW)
        case StartSaga():
            return start_message(message, NOW)
    raise AssertionError(f"no codec for {type(message).__name__}")


def _body(message: BaseModel) -> Any:
    # round_trip leaves out computed fields (OrderData.amount), which receivers do not accept.
    return message.model_dump(mode="json", round_trip=True)


# --- document helpers --------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = document
    for token in ref[2:].split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


def _documents() -> list[Any]:
    return [
        pytest.param(asyncapi_document, id="asyncapi"),
        pytest.param(json_schema_bundle, id="json-schema"),
    ]


def _message_of(channel: str, message: BaseModel) -> dict[str, Any]:
    document = asyncapi_document()
    ref = document["channels"][channel]["messages"][type(message).__name__]["$ref"]
    resolved: dict[str, Any] = _resolve(document, ref)
    return resolved


CHANNEL_OF: dict[type[BaseModel], str] = {
    StartSaga: "start",
    CommandEnvelope: "commands",
    Reply: "replies",
    PickedUp: "replies",
    Heartbeat: "replies",
    QuerySaga: "queries",
    OperateSaga: "queries",
    OperationAnswer: "answers",
    StartAnswer: "answers",
    SagaSnapshot: "answers",
    SagaOutcome: "answers",
    TimerMessage: "timers",
    **dict.fromkeys(LIFECYCLE_EVENTS, "events"),
}


# --- the documents -----------------------------------------------------------------------------


def test_asyncapi_version_is_3_0_0_and_info_is_overridable() -> None:
    document = asyncapi_document(title="orders", version="0.1.0")

    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "orders"
    assert document["info"]["version"] == "0.1.0"
    assert asyncapi_document()["info"]["version"] == str(SCHEMA_VERSION)


def test_the_server_is_a_variable_free_amqp_broker() -> None:
    (server,) = asyncapi_document()["servers"].values()

    assert server["protocol"] == "amqp"
    assert server["host"] == "localhost:5672"
    assert "variables" not in server
    assert "{" not in server["host"]


def test_samples_cover_every_message_and_example_model() -> None:
    assert {type(m) for m in MESSAGES} == set(MESSAGE_MODELS)
    assert {type(m) for m in ORDER_SAMPLES} == set(ORDER_MODELS)
    assert len(MESSAGE_MODELS) == 12 + len(EventName)


@pytest.mark.parametrize("model", MESSAGE_MODELS, ids=lambda m: m.__name__)
def test_every_message_model_has_a_message_and_a_schema(model: type[BaseModel]) -> None:
    document = asyncapi_document()
    name = model.__name__
    message = document["components"]["messages"][name]

    assert message["name"] == name
    assert message["title"]
    first_paragraph = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0]
    assert message["summary"] == " ".join(first_paragraph.split())
    assert message["contentType"] == "application/json"
    assert set(OUR_HEADERS) <= set(message["headers"]["properties"])
    assert message["payload"] == {"$ref": f"#/components/schemas/{name}"}
    assert document["components"]["schemas"][name]["title"] == name
    assert name in json_schema_bundle()["$defs"]


@pytest.mark.parametrize("name", [*(m.__name__ for m in MESSAGE_MODELS), PARKED_MESSAGE])
def test_every_message_is_correlated_by_the_saga_id_header(name: str) -> None:
    document = asyncapi_document()
    correlation = _resolve(
        document, document["components"]["messages"][name]["correlationId"]["$ref"]
    )

    assert correlation["location"] == f"$message.header#/{names.HEADER_SAGA_ID}"


def test_every_lifecycle_event_is_published_on_the_events_channel() -> None:
    document = asyncapi_document()
    event_names = {cls.__name__ for cls in LIFECYCLE_EVENTS}

    assert event_names == {name.value for name in EventName}
    assert set(document["channels"]["events"]["messages"]) == event_names
    published = document["operations"]["publishEvent"]["messages"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in published} == event_names
    routing = document["channels"]["events"]["parameters"]["event_name"]
    assert routing["enum"] == [name.value for name in EventName]


def test_every_example_order_model_is_a_schema_under_its_own_prefix() -> None:
    defined = {
        obj
        for obj in vars(orders).values()
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == orders.__name__
    }
    schemas = asyncapi_document()["components"]["schemas"]

    assert defined - {orders.OrderCommand} == set(ORDER_MODELS)
    for model in ORDER_MODELS:
        assert schemas[ORDER_SCHEMA_PREFIX + model.__name__]["title"] == model.__name__
        assert model.__name__ not in schemas  # nothing of the example leaks into the core names


@pytest.mark.parametrize("build", _documents())
def test_every_ref_resolves_within_the_document(build: Any) -> None:
    document = build()
    refs = list(_refs(document))

    assert refs
    for ref in refs:
        assert _resolve(document, ref) is not None
    assert "$defs" not in json.dumps(asyncapi_document())  # hoisted, all of them


@pytest.mark.parametrize("build", _documents())
def test_documents_are_plain_json_and_deterministic(build: Any) -> None:
    first = build()
    text = json.dumps(first)

    assert json.loads(text) == first  # nothing JSON would turn into something else
    schemas = first["$defs"] if "$defs" in first else first["components"]["schemas"]
    schemas["Reply"]["properties"].clear()
    assert json.dumps(build()) == text  # same output again, and no shared mutable state


def test_the_bundle_holds_the_asyncapi_schemas() -> None:
    bundle = json_schema_bundle()
    schemas = asyncapi_document()["components"]["schemas"]
    as_components = json.dumps(bundle["$defs"]).replace('"#/$defs/', '"#/components/schemas/')

    assert bundle["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json.loads(as_components) == schemas


def test_channel_addresses_match_the_contract_names() -> None:
    channels = asyncapi_document()["channels"]
    queues = {
        "start": names.START_QUEUE,
        "replies": names.REPLIES_QUEUE,
        "timers": names.TIMERS_QUEUE,
        "parked": names.PARKED_QUEUE,
    }
    for key, queue in queues.items():
        assert channels[key]["address"] == queue
        assert channels[key]["bindings"]["amqp"]["queue"]["name"] == queue

    commands = channels["commands"]["bindings"]["amqp"]["exchange"]
    events = channels["events"]["bindings"]["amqp"]["exchange"]
    assert (commands["name"], commands["type"]) == (names.COMMANDS_EXCHANGE, "direct")
    assert (events["name"], events["type"]) == (names.EVENTS_EXCHANGE, "topic")
    assert names.command_queue("<service>") in channels["commands"]["description"]
    for channel in channels.values():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert placeholders == set(channel.get("parameters", {}))


def test_operations_are_the_orchestrators_sends_and_receives() -> None:
    document = asyncapi_document()
    actions: dict[str, set[str]] = {}
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"]
        actions.setdefault(channel.rsplit("/", 1)[1], set()).add(operation["action"])
        for ref in operation["messages"]:  # AsyncAPI: only messages of the operation's channel
            assert ref["$ref"].startswith(channel + "/messages/")

    assert actions == {
        "start": {"receive"},
        "queries": {"receive"},
        "answers": {"send"},
        "commands": {"send"},
        "replies": {"receive"},
        "timers": {"send", "receive"},
        "events": {"send"},
        "parked": {"send"},
    }
    reply = document["operations"]["sendCommand"]["reply"]
    assert reply["channel"] == {"$ref": "#/channels/replies"}


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_documented_routing_and_headers_are_what_the_codec_writes(message: BaseModel) -> None:
    channel_key = CHANNEL_OF[type(message)]
    channel = asyncapi_document()["channels"][channel_key]
    documented = _message_of(channel_key, message)["headers"]
    wire = _wire(message)

    assert set(documented["required"]) <= set(wire.headers) <= set(documented["properties"])
    kind = wire.headers[names.HEADER_MESSAGE_KIND]
    assert documented["properties"][names.HEADER_MESSAGE_KIND]["const"] == kind
    assert wire.correlation_id == wire.headers[names.HEADER_SAGA_ID]
    amqp = channel.get("bindings", {}).get("amqp", {"is": "a client's own queue"})
    if amqp["is"] == "a client's own queue":  # through the default exchange
        assert wire.exchange == ""
        assert wire.routing_key == _address(channel, json.loads(wire.body))
    elif amqp["is"] == "routingKey":
        assert wire.exchange == amqp["exchange"]["name"]
        assert wire.routing_key == _address(channel, json.loads(wire.body))
    elif wire.exchange:  # a queue fed by an exchange, which the description names
        assert f"`{wire.exchange}`" in channel["description"]
        assert f"`{wire.routing_key}`" in channel["description"]
    else:  # a delayed message addresses its queue through the default exchange
        assert wire.routing_key == channel["address"]


def _address(channel: dict[str, Any], body: dict[str, Any]) -> str:
    """The channel address with its parameters filled in from the body where they say so."""
    values = {}
    for name, parameter in channel["parameters"].items():
        location = parameter.get("location", "")
        field = location.removeprefix("$message.payload#/")
        values[name] = (
            body[field] if location else {"service": SERVICE, "reply_to": CLIENT_QUEUE}[name]
        )
    address: str = channel["address"].format(**values)
    return address


# --- validation with jsonschema ----------------------------------------------------------------


def _validator(document: dict[str, Any], pointer: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    # AsyncAPI's default schema format is a superset of draft-07; the bundle says 2020-12.
    cls = jsonschema.Draft202012Validator if "$defs" in document else jsonschema.Draft7Validator
    return cls({**document, "$ref": pointer}, format_checker=cls.FORMAT_CHECKER)


def _pointers(name: str) -> list[tuple[dict[str, Any], str]]:
    return [
        (asyncapi_document(), f"#/components/schemas/{name}"),
        (json_schema_bundle(), f"#/$defs/{name}"),
    ]


@pytest.mark.parametrize(
    "sample",
    [*MESSAGES, *ORDER_SAMPLES],
    ids=lambda m: type(m).__name__,
)
def test_a_real_instance_validates_against_its_schema(sample: BaseModel) -> None:
    name = type(sample).__name__
    if isinstance(sample, ORDER_MODELS):
        name = ORDER_SCHEMA_PREFIX + name
    for document, pointer in _pointers(name):
        _validator(document, pointer).validate(_body(sample))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_the_codec_headers_validate_against_the_headers_schema(message: BaseModel) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    headers = _message_of(CHANNEL_OF[type(message)], message)["headers"]

    jsonschema.Draft7Validator(headers).validate(_wire(message).headers)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("Reply", {"status": "maybe"}),
        ("CommandEnvelope", {"attempt": 0}),
        ("SagaStepRetrying", {"unexpected": True}),
        ("StartSaga", {"saga_id": ""}),
        ("TimerMessage", {"schema_version": 2}),
    ],
)
def test_an_invalid_instance_is_rejected(name: str, change: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    sample = next(m for m in MESSAGES if type(m).__name__ == name)
    for document, pointer in _pointers(name):
        with pytest.raises(jsonschema.ValidationError):
            _validator(document, pointer).validate({**_body(sample), **change})


def test_the_schemas_are_valid_json_schemas() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    document = asyncapi_document()

    jsonschema.Draft202012Validator.check_schema(json_schema_bundle())
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft7Validator.check_schema(schema)
    for message in document["components"]["messages"].values():
        jsonschema.Draft7Validator.check_schema(message["headers"])
