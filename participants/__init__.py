"""The participant SDK: typed async handlers for saga commands, with idempotency built in."""

from orchestrator.errors import ParticipantError
from participants.idempotency import IdempotencyStore, MemoryIdempotency, open_idempotency
from participants.service import CommandContext, NoReply, Participant

__all__ = [
    "CommandContext",
    "IdempotencyStore",
    "MemoryIdempotency",
    "NoReply",
    "Participant",
    "ParticipantError",
    "open_idempotency",
]
