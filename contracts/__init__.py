"""The wire contract of saga-orchestrator: messages, lifecycle events and RabbitMQ names.

Pure pydantic models; nothing here does I/O.
"""

from contracts.events import (
    AnyLifecycleEvent,
    EventName,
    LifecycleEvent,
    SagaCompensationCompleted,
    SagaCompensationFailed,
    SagaCompensationStarted,
    SagaCompleted,
    SagaFailed,
    SagaLateReply,
    SagaStarted,
    SagaStepCompleted,
    SagaStepFailed,
    SagaStepRetrying,
    SagaStepStarted,
    SagaStepTimedOut,
    SagaStuck,
)
from contracts.messages import (
    SCHEMA_VERSION,
    Command,
    CommandEnvelope,
    Direction,
    ErrorDetail,
    Reply,
    ReplyStatus,
    StartSaga,
    TimerKind,
    TimerMessage,
)

__all__ = [
    "SCHEMA_VERSION",
    "AnyLifecycleEvent",
    "Command",
    "CommandEnvelope",
    "Direction",
    "ErrorDetail",
    "EventName",
    "LifecycleEvent",
    "Reply",
    "ReplyStatus",
    "SagaCompensationCompleted",
    "SagaCompensationFailed",
    "SagaCompensationStarted",
    "SagaCompleted",
    "SagaFailed",
    "SagaLateReply",
    "SagaStarted",
    "SagaStepCompleted",
    "SagaStepFailed",
    "SagaStepRetrying",
    "SagaStepStarted",
    "SagaStepTimedOut",
    "SagaStuck",
    "StartSaga",
    "TimerKind",
    "TimerMessage",
]
