"""The participant SDK: typed async handlers for saga commands, with idempotency built in,
and observers of sagas' lifecycle events."""

from participants.idempotency import IdempotencyStore, MemoryIdempotency, open_idempotency
from participants.observers import Observer
from participants.service import CommandContext, NoReply, Participant
from plumbing.errors import ParticipantError

__all__ = [
    "CommandContext",
    "IdempotencyStore",
    "MemoryIdempotency",
    "NoReply",
    "Observer",
    "Participant",
    "ParticipantError",
    "open_idempotency",
]
