"""Every error the saga orchestrator raises on purpose.

::

    SagaError
    ├── DefinitionError (ValueError)      a saga definition is invalid
    ├── ConfigError (ValueError)          a setting is missing or malformed
    ├── UnknownSagaType (ValueError)      a start names a saga type the app does not have
    ├── InvalidSagaData (ValueError)      start data does not match the saga's data model
    ├── SagaConflict                      a saga id is taken by another type or other data
    ├── StartRefused                      the orchestrator refused a client's start request
    ├── SagaNotFound                      no saga has this id
    ├── ActionRefused                     an operator action does not apply in this state
    ├── ConcurrencyExhausted              version conflicts kept winning; the message is retried
    ├── StoreUnavailable                  the saga store cannot be reached
    ├── SagaUnreadable                    a stored saga's record does not validate
    ├── BrokerError                       RabbitMQ did not do what was asked
    │   ├── BrokerUnavailable             it cannot be reached, or the connection is closed
    │   ├── QueueNotFound                 a queue to consume from does not exist
    │   └── PublishFailed                 a publish was returned, nacked or not confirmed
    ├── MessageRejected                   an incoming message cannot be decoded or validated
    └── ParticipantError                  raised by a participant handler to fail a step

Cancellation and programming bugs are never wrapped: they propagate.
"""

from __future__ import annotations


class SagaError(Exception):
    """Root of every error raised on purpose by saga-orchestrator."""


class DefinitionError(SagaError, ValueError):
    """Raised when a saga definition is invalid (at import or start-up)."""


class ConfigError(SagaError, ValueError):
    """Raised at start-up when a setting is missing or malformed."""


class UnknownSagaType(SagaError, ValueError):
    """Raised when a start request names a saga type the app does not define."""


class InvalidSagaData(SagaError, ValueError):
    """Raised when a start request's data does not validate against the saga's data model."""


class SagaConflict(SagaError):
    """Raised when a saga id is already used by a saga of another type."""


class StartRefused(SagaError):
    """Raised by the client when the orchestrator refused a start request (unknown type or
    version, invalid data, or the id already used with other data); the message says why."""


class SagaNotFound(SagaError):
    """Raised when no saga has the given id."""


class ActionRefused(SagaError):
    """Raised when an operator action (retry, abort, resolve) does not apply to the saga."""


class ConcurrencyExhausted(SagaError):
    """Raised when a transition lost the version race too many times in a row."""


class StoreUnavailable(SagaError):
    """Raised when the saga store cannot be reached or refuses the connection."""


class SagaUnreadable(SagaError):
    """Raised when a stored saga's record does not validate (damaged, or written by a newer
    release); the saga is held for an operator instead of being processed."""

    def __init__(self, message: str, *, saga_id: str) -> None:
        super().__init__(message)
        self.saga_id = saga_id


class BrokerError(SagaError):
    """Root of the errors RabbitMQ (or the in-memory broker) causes."""


class BrokerUnavailable(BrokerError):
    """Raised when the broker cannot be reached, does not answer in time, or the connection
    (or the transport) is closed while declaring or consuming."""


class QueueNotFound(BrokerError):
    """Raised when a consumer is started on a queue that does not exist (declare it first)."""


class PublishFailed(BrokerError):
    """Raised when the broker returns, nacks or does not confirm a publish in time; only ever
    by a publish."""


class MessageRejected(SagaError):
    """Raised when an incoming message cannot be decoded or validated; it is dead-lettered."""


class ParticipantError(SagaError):
    """Raised by a participant handler to answer a command with a failure.

    With ``non_retryable=True`` (the default) the reply is ``failed``: a business refusal
    that retrying will not change (card declined). With ``non_retryable=False`` the reply is
    ``error`` and the step's retry policy decides.

    Args:
        type: the error type reported to the orchestrator (default: the class name), which
            retry policies match with ``retry_on``.
        code: an optional machine-readable code.
    """

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        non_retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.__class__.__name__
        self.code = code
        self.non_retryable = non_retryable
