"""The participant SDK: typed async handlers for saga commands, with idempotency built in."""

from participants.idempotency import IdempotencyStore, MemoryIdempotency, open_idempotency
from participants.service import CommandContext, NoReply, Participant
from plumbing.errors import ParticipantError

__all__ = [
    "CommandContext",
    "IdempotencyStore",
    "MemoryIdempotency",
    "NoReply",
    "Participant",
    "ParticipantError",
    "open_idempotency",
]
