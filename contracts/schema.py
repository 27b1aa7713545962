"""Machine-readable descriptions of every wire message: AsyncAPI 3.0 and plain JSON Schema.

``saga schema`` prints :func:`asyncapi_document`; :func:`json_schema_bundle` is the same set of
models for tools that only speak JSON Schema. Both are plain dicts built from the pydantic
models, so the documents cannot drift from the code, and nothing here does I/O.

The schemas are pydantic's *validation* schemas: what the receiving side accepts, which is the
contract a producer written in any language must meet. Fields with a default (``kind``,
``event``, ``schema_version``) are therefore optional in them, although our own producers
always write them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from contracts import names, orders
from contracts.client import (
    OperateSaga,
    OperationAnswer,
    QuerySaga,
    SagaOutcome,
    SagaSnapshot,
    StartAnswer,
)
from contracts.events import LIFECYCLE_EVENTS, EventName
from contracts.messages import (
    SCHEMA_VERSION,
    CommandEnvelope,
    Heartbeat,
    PickedUp,
    Reply,
    StartSaga,
    TimerMessage,
)

ASYNCAPI_VERSION: Final = "3.0.0"
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
CONTENT_TYPE: Final = "application/json"

PARTICIPANT_MESSAGES: Final[tuple[type[BaseModel], ...]] = (Reply, PickedUp, Heartbeat)
"""What participants send to the replies queue: answers, pick-ups and heartbeats."""

CLIENT_ANSWERS: Final[tuple[type[BaseModel], ...]] = (
    StartAnswer,
    SagaSnapshot,
    SagaOutcome,
    OperationAnswer,
)
"""What the orchestrator sends to a client's own queue."""

CLIENT_REQUESTS: Final[tuple[type[BaseModel], ...]] = (QuerySaga, OperateSaga)
"""What clients and operators send to the queries queue."""

MESSAGE_MODELS: Final[tuple[type[BaseModel], ...]] = (
    StartSaga,
    *CLIENT_REQUESTS,
    CommandEnvelope,
    *PARTICIPANT_MESSAGES,
    TimerMessage,
    *CLIENT_ANSWERS,
    *LIFECYCLE_EVENTS,
)
"""Every model that travels on the wire as a whole message body."""

ORDER_MODELS: Final[tuple[type[BaseModel], ...]] = (
    orders.OrderData,
    orders.OrderItem,
    orders.ReserveInventory,
    orders.InventoryReserved,
    orders.ReleaseInventory,
    orders.ProcessPayment,
    orders.PaymentProcessed,
    orders.RefundPayment,
    orders.CreateShipment,
    orders.ShipmentCreated,
    orders.CancelShipment,
    orders.SendConfirmation,
    orders.ConfirmationSent,
)
"""The example order saga's start data, command payloads and step results."""

ORDER_SCHEMA_PREFIX: Final = "example.order_fulfillment."
"""Name prefix of :data:`ORDER_MODELS` among the schemas, keeping the example apart."""


@dataclass(frozen=True)
class AppContracts:
    """An app's own models (start data, commands, results) and the name prefix that keeps
    their schemas apart from the wire envelopes'."""

    models: Sequence[type[BaseModel]]
    prefix: str
    described_as: str
    """How the documents name the app, e.g. ``the example order saga``."""
    sagas: Mapping[str, Any] = field(default_factory=dict)
    """Each saga definition's flow, exported as the document's ``x-sagas`` extension: its
    stages in order, a parallel group's members in one stage, with their services and
    commands (see :meth:`orchestrator.definition.Saga.flow`)."""


EXAMPLE_CONTRACTS: Final = AppContracts(ORDER_MODELS, ORDER_SCHEMA_PREFIX, "the example order saga")
"""What ``saga schema`` exports without ``--app``."""

PARKED_MESSAGE: Final = "ParkedMessage"
"""Component name of whatever lands in :data:`contracts.names.PARKED_QUEUE`."""

_COMPONENT_SCHEMAS: Final = "#/components/schemas/"
_BUNDLE_DEFS: Final = "#/$defs/"
_AMQP_BINDING_VERSION: Final = "0.3.0"
_SAGA_ID_CORRELATION: Final = "sagaId"


def asyncapi_document(
    *,
    title: str = "saga-orchestrator",
    version: str | None = None,
    app: AppContracts = EXAMPLE_CONTRACTS,
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of every channel, operation and message.

    Args:
        title: ``info.title``.
        version: ``info.version``; defaults to the wire schema version, since that is what
            this document describes (the CLI may pass the package version instead).
        app: the app whose own models are exported beside the envelopes.
    """
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": _info(title, version),
        "defaultContentType": CONTENT_TYPE,
        "servers": _servers(),
        "channels": _channels(app),
        "operations": _operations(),
        **({"x-sagas": dict(app.sagas)} if app.sagas else {}),
        "components": {
            "messages": _messages(),
            "schemas": _schemas(_COMPONENT_SCHEMAS, app),
            "correlationIds": {
                _SAGA_ID_CORRELATION: {
                    "description": "Every message of a saga carries the saga's id.",
                    "location": f"$message.header#/{names.HEADER_SAGA_ID}",
                }
            },
        },
    }


def json_schema_bundle(app: AppContracts = EXAMPLE_CONTRACTS) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) document with every message model under ``$defs``.

    The root schema constrains nothing: validate a message against one definition, e.g. with
    a ``$ref`` to ``#/$defs/Reply``. The definition names are those of the AsyncAPI document's
    ``components.schemas``.
    """
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "saga-orchestrator wire messages",
        "description": (
            f"Message bodies of schema_version {SCHEMA_VERSION}. Definitions prefixed with "
            f"{app.prefix!r} belong to {app.described_as}."
        ),
        "$defs": _schemas(_BUNDLE_DEFS, app),
    }


# --- schemas -----------------------------------------------------------------------------------


def _schemas(ref_prefix: str, app: AppContracts) -> dict[str, Any]:
    core = _definitions(MESSAGE_MODELS, ref_prefix)
    # A second pass with its own reference prefix puts the app's models, and whatever they
    # reference, under their own name prefix without renaming anything after the fact.
    own = _definitions(app.models, ref_prefix + app.prefix)
    return core | {app.prefix + name: schema for name, schema in own.items()}


def _definitions(models: Iterable[type[BaseModel]], ref_prefix: str) -> dict[str, Any]:
    # models_json_schema puts every model and every nested model in one shared "$defs" and
    # refers to them through ref_template: hoisting them is only a matter of taking "$defs".
    _, top = models_json_schema(
        [(model, "validation") for model in models], ref_template=ref_prefix + "{model}"
    )
    definitions: dict[str, Any] = top.get("$defs", {})
    return definitions


def _ref(pointer: str) -> dict[str, str]:
    return {"$ref": pointer}


# --- info and servers --------------------------------------------------------------------------


def _info(title: str, version: str | None) -> dict[str, Any]:
    return {
        "title": title,
        "version": version or str(SCHEMA_VERSION),
        "description": (
            "Messages exchanged over RabbitMQ by the saga orchestrator, its participant "
            "services, the clients that start sagas and the observers of lifecycle events. "
            "Bodies are JSON; each carries `schema_version`, and a consumer refuses a version "
            f"it does not know. This document describes schema_version {SCHEMA_VERSION}. "
            "Operations are written from the orchestrator's point of view."
        ),
        "license": {"name": "Apache-2.0"},
    }


def _servers() -> dict[str, Any]:
    return {
        "rabbitmq": {
            "host": "localhost:5672",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "description": (
                "Any RabbitMQ broker; every process reads its URL from `SAGA_AMQP_URL`."
            ),
        }
    }


# --- channels ----------------------------------------------------------------------------------


def _channels(app: AppContracts) -> dict[str, Any]:
    return {
        "start": _start_channel(),
        "queries": _queries_channel(),
        "answers": _answers_channel(),
        "commands": _commands_channel(app),
        "replies": _replies_channel(),
        "timers": _timers_channel(),
        "events": _events_channel(),
        "parked": _parked_channel(),
    }


def _queue_binding(queue: str) -> dict[str, Any]:
    # Every queue is durable (a quorum queue by default, see plumbing.topology).
    return {
        "amqp": {
            "is": "queue",
            "queue": {"name": queue, "durable": True, "exclusive": False, "autoDelete": False},
            "bindingVersion": _AMQP_BINDING_VERSION,
        }
    }


def _exchange_binding(exchange: str, exchange_type: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": exchange,
                "type": exchange_type,
                "durable": True,
                "autoDelete": False,
            },
            "bindingVersion": _AMQP_BINDING_VERSION,
        }
    }


def _channel_messages(models: Iterable[type[BaseModel]]) -> dict[str, Any]:
    return {model.__name__: _ref(f"#/components/messages/{model.__name__}") for model in models}


def _start_channel() -> dict[str, Any]:
    return {
        "address": names.START_QUEUE,
        "title": "Start requests",
        "description": (
            f"Clients publish to the `{names.START_EXCHANGE}` direct exchange with routing key "
            f"`{names.START_ROUTING_KEY}`; the orchestrator consumes this queue. Starting is "
            "idempotent on `saga_id`. A request with `reply_to` is answered on the client's "
            "queue (the `answers` channel)."
        ),
        "messages": _channel_messages([StartSaga]),
        "bindings": _queue_binding(names.START_QUEUE),
    }


def _queries_channel() -> dict[str, Any]:
    return {
        "address": names.QUERIES_QUEUE,
        "title": "Saga queries",
        "description": (
            "Clients publish here (default exchange, the queue's name as routing key) to ask "
            "for a saga's state, and operators (`saga retry|abort|resolve`, the console) to "
            "have an action applied through the saga rules; answered on their `reply_to` queue."
        ),
        "messages": _channel_messages(CLIENT_REQUESTS),
        "bindings": _queue_binding(names.QUERIES_QUEUE),
    }


def _answers_channel() -> dict[str, Any]:
    return {
        "address": "{reply_to}",
        "title": "Answers to a client",
        "description": (
            "A client's own queue, named in `reply_to`; the orchestrator publishes through the "
            "default exchange with the queue's name as routing key, not mandatory (a client "
            "that went away misses its answers and can ask again)."
        ),
        "parameters": {"reply_to": {"description": "The client's queue."}},
        "messages": _channel_messages(CLIENT_ANSWERS),
    }


def _commands_channel(app: AppContracts) -> dict[str, Any]:
    return {
        "address": "{service}",
        "title": "Participant commands",
        "description": (
            f"The `{names.COMMANDS_EXCHANGE}` direct exchange. The routing key is the "
            "participant service's name, and each service consumes its own queue "
            f"`{names.command_queue('<service>')}`. The envelope's `payload` is the command "
            f"model of the step (for {app.described_as}, one of the `{app.prefix}*` schemas)."
        ),
        "parameters": {
            "service": {
                "description": "The participant service the command is addressed to.",
                "examples": ["inventory", "payment"],
            }
        },
        "messages": _channel_messages([CommandEnvelope]),
        "bindings": _exchange_binding(names.COMMANDS_EXCHANGE, "direct"),
    }


def _replies_channel() -> dict[str, Any]:
    return {
        "address": names.REPLIES_QUEUE,
        "title": "Participant replies",
        "description": (
            f"Participants publish to the `{names.REPLIES_EXCHANGE}` direct exchange with the "
            f"command's `reply_to` as routing key (`{names.REPLIES_ROUTING_KEY}`); the "
            "orchestrator consumes this queue. Besides the reply to each attempt, a "
            "participant acknowledges picking a command up when the command has `pickup_by`, "
            "and a long handler sends heartbeats when it has `heartbeat_timeout`."
        ),
        "messages": _channel_messages(PARTICIPANT_MESSAGES),
        "bindings": _queue_binding(names.REPLIES_QUEUE),
    }


def _timers_channel() -> dict[str, Any]:
    return {
        "address": names.TIMERS_QUEUE,
        "title": "Timers",
        "description": (
            "Delayed wake-ups the orchestrator sends to itself. They travel through the delay "
            f"ladder (`{names.DELAY_EXCHANGE_PREFIX}.<level>` exchanges and queues, then "
            f"`{names.DELAY_DELIVER_EXCHANGE}`) and land in this queue once due, never "
            "earlier."
        ),
        "messages": _channel_messages([TimerMessage]),
        "bindings": _queue_binding(names.TIMERS_QUEUE),
    }


def _events_channel() -> dict[str, Any]:
    return {
        "address": names.event_routing_key("{saga_type}", "{event_name}"),
        "title": "Lifecycle events",
        "description": (
            f"The `{names.EVENTS_EXCHANGE}` topic exchange. Observers bind their own queues "
            "with patterns such as `order_fulfillment.SagaFailed`, `*.SagaStuck` or `#`. "
            "Publishing is not mandatory: an event nobody is bound for is dropped."
        ),
        "parameters": {
            "saga_type": {
                "description": "The saga type, e.g. `order_fulfillment`.",
                "location": "$message.payload#/saga_type",
            },
            "event_name": {
                "description": "The event's name.",
                "enum": [name.value for name in EventName],
                "location": "$message.payload#/event",
            },
        },
        "messages": _channel_messages(LIFECYCLE_EVENTS),
        "bindings": _exchange_binding(names.EVENTS_EXCHANGE, "topic"),
    }


def _parked_channel() -> dict[str, Any]:
    return {
        "address": names.PARKED_QUEUE,
        "title": "Parked messages",
        "description": (
            f"Fed by the `{names.DEAD_LETTER_EXCHANGE}` fanout exchange, the dead-letter "
            "exchange of every work queue (start, replies, timers and each command queue). "
            "A message lands here when it could not be processed or exceeded its queue's "
            "delivery limit, and stays until an operator acts."
        ),
        "messages": {PARKED_MESSAGE: _ref(f"#/components/messages/{PARKED_MESSAGE}")},
        "bindings": _queue_binding(names.PARKED_QUEUE),
    }


# --- operations --------------------------------------------------------------------------------


def _operation(
    action: str, channel: str, messages: Iterable[str], summary: str, **extra: Any
) -> dict[str, Any]:
    return {
        "action": action,
        "channel": _ref(f"#/channels/{channel}"),
        "summary": summary,
        "messages": [_ref(f"#/channels/{channel}/messages/{name}") for name in messages],
        **extra,
    }


def _operations() -> dict[str, Any]:
    return {
        "receiveStart": _operation(
            "receive",
            "start",
            [StartSaga.__name__],
            "Start a saga on request.",
            reply={
                "channel": _ref("#/channels/answers"),
                "messages": [_ref(f"#/channels/answers/messages/{StartAnswer.__name__}")],
            },
        ),
        "receiveQuery": _operation(
            "receive",
            "queries",
            [model.__name__ for model in CLIENT_REQUESTS],
            "Answer with a saga's state (and, when watched, its outcome once it ends), or "
            "apply an operator's action and say whether it was applied.",
            reply={
                "channel": _ref("#/channels/answers"),
                "messages": [
                    _ref(f"#/channels/answers/messages/{model.__name__}")
                    for model in (SagaSnapshot, OperationAnswer)
                ],
            },
        ),
        "sendOutcome": _operation(
            "send",
            "answers",
            [SagaOutcome.__name__],
            "Tell a client that watches a saga how it ended.",
        ),
        "sendCommand": _operation(
            "send",
            "commands",
            [CommandEnvelope.__name__],
            "Send one attempt of a step's command or compensation to its participant.",
            reply={
                "channel": _ref("#/channels/replies"),
                "messages": [_ref(f"#/channels/replies/messages/{Reply.__name__}")],
            },
        ),
        "receiveReply": _operation(
            "receive",
            "replies",
            [model.__name__ for model in PARTICIPANT_MESSAGES],
            "Advance a saga on a participant's reply; a pick-up or heartbeat moves the "
            "running attempt's due time.",
        ),
        "scheduleTimer": _operation(
            "send", "timers", [TimerMessage.__name__], "Schedule a step timeout or retry."
        ),
        "receiveTimer": _operation(
            "receive",
            "timers",
            [TimerMessage.__name__],
            "Wake a saga up; a timer the saga has moved past changes nothing.",
        ),
        "publishEvent": _operation(
            "send",
            "events",
            [event.__name__ for event in LIFECYCLE_EVENTS],
            "Publish every change of a saga's lifecycle for observers.",
        ),
        "parkMessage": _operation(
            "send",
            "parked",
            [PARKED_MESSAGE],
            "Park a message that cannot be processed, with the reason in its headers.",
        ),
    }


# --- messages ----------------------------------------------------------------------------------


def _messages() -> dict[str, Any]:
    messages = {model.__name__: _message(model) for model in MESSAGE_MODELS}
    messages[PARKED_MESSAGE] = _parked_message()
    return messages


def _message(model: type[BaseModel]) -> dict[str, Any]:
    name = model.__name__
    summary, description = _doc(model)
    message: dict[str, Any] = {"name": name, "title": _words(name), "summary": summary}
    if description:
        message["description"] = description
    return message | {
        "contentType": CONTENT_TYPE,
        "correlationId": _ref(f"#/components/correlationIds/{_SAGA_ID_CORRELATION}"),
        "headers": _headers_schema(_kind(model)),
        "payload": _ref(_COMPONENT_SCHEMAS + name),
    }


def _parked_message() -> dict[str, Any]:
    return {
        "name": PARKED_MESSAGE,
        "title": "Parked message",
        "summary": "A message that could not be processed, exactly as it was received.",
        "description": (
            "The body is unchanged: usually a start request, command, reply or timer, but "
            "possibly not valid at all, which is often why it was parked. The original headers "
            "are kept. RabbitMQ adds `x-death` when it dead-letters by itself."
        ),
        "contentType": CONTENT_TYPE,
        "correlationId": _ref(f"#/components/correlationIds/{_SAGA_ID_CORRELATION}"),
        "headers": _parked_headers_schema(),
        "payload": {"description": "The original message body."},
    }


def _kind(model: type[BaseModel]) -> str:
    # The ``kind`` field's default is the value of the saga-kind header the codec writes,
    # except for messages that share a queue with another kind; lifecycle events have no such
    # field and travel as kind "event".
    if model in PARTICIPANT_MESSAGES:
        return "reply"
    if model in CLIENT_ANSWERS:
        return "answer"
    if model in CLIENT_REQUESTS:
        return "query"
    field = model.model_fields.get("kind")
    return str(field.default) if field is not None else "event"


def _doc(model: type[BaseModel]) -> tuple[str, str | None]:
    """The docstring's first paragraph, and the whole docstring when there is more."""
    doc = inspect.cleandoc(model.__doc__ or model.__name__)
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    return summary, (doc if "\n\n" in doc else None)


def _words(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name)


def _header_properties(kind: dict[str, Any]) -> dict[str, Any]:
    return {
        names.HEADER_SAGA_ID: {"type": "string", "description": "The saga's id."},
        names.HEADER_MESSAGE_ID: {
            "type": "string",
            "description": "The message's deterministic id, the same on every re-publish.",
        },
        names.HEADER_MESSAGE_KIND: {"type": "string", **kind, "description": "What the body is."},
        names.HEADER_TRACEPARENT: {
            "type": "string",
            "description": "W3C Trace Context `traceparent`; present when the body has one.",
        },
    }


def _headers_schema(kind: str) -> dict[str, Any]:
    properties = _header_properties({"const": kind})
    required = [names.HEADER_SAGA_ID, names.HEADER_MESSAGE_ID, names.HEADER_MESSAGE_KIND]
    if kind == "timer":
        properties[names.HEADER_DUE_AT] = {
            "type": "string",
            "format": "date-time",
            "description": "When the timer is due (the body's `due_at`).",
        }
        required.append(names.HEADER_DUE_AT)
    return {"type": "object", "properties": properties, "required": required}


def _parked_headers_schema() -> dict[str, Any]:
    # Only work queues dead-letter here; lifecycle events go to observers' queues.
    properties = _header_properties({"enum": ["start", "query", "command", "reply", "timer"]})
    properties[names.HEADER_DEAD_LETTER_REASON] = {
        "type": "string",
        "description": "Why the message was parked, e.g. which field failed validation.",
    }
    properties[names.HEADER_DEAD_LETTER_QUEUE] = {
        "type": "string",
        "description": "The queue the message was taken from.",
    }
    # Nothing is required: a foreign message may lack our headers, and RabbitMQ's own
    # dead-lettering (delivery limit exceeded) adds only x-death.
    return {"type": "object", "properties": properties}
