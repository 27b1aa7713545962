"""The public surface is small and deliberate: changing it is a decision, not an accident."""

from __future__ import annotations

import contracts
import orchestrator
import orchestrator.testing
import participants


def test_orchestrator_exports() -> None:
    assert sorted(orchestrator.__all__) == [
        "App",
        "Decision",
        "EngineConfig",
        "Orchestrator",
        "Parallel",
        "RetryPolicy",
        "Saga",
        "SagaClient",
        "SagaError",
        "SagaState",
        "SagaStatus",
        "StartRefused",
        "Step",
        "StepKind",
        "StepStatus",
        "decide",
    ]


def test_participants_exports() -> None:
    assert sorted(participants.__all__) == [
        "CommandContext",
        "IdempotencyStore",
        "MemoryIdempotency",
        "NoReply",
        "Observer",
        "Participant",
        "ParticipantError",
        "open_idempotency",
    ]


def test_testing_exports() -> None:
    assert sorted(orchestrator.testing.__all__) == [
        "Behaviour",
        "MemoryBroker",
        "SagaHarness",
        "ScriptedParticipant",
        "VirtualClock",
        "down",
        "error",
        "errors_then",
        "fail",
        "hang",
        "late",
        "succeed",
        "working",
    ]


def test_contracts_export_every_lifecycle_event() -> None:
    events = [name for name in contracts.__all__ if name.startswith("Saga")]
    assert len(events) == 14
    for module in (contracts, orchestrator, participants):
        for name in module.__all__:
            assert getattr(module, name).__doc__, f"{module.__name__}.{name} has no docstring"
