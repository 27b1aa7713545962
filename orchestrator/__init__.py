"""saga-orchestrator: define sagas, run them over RabbitMQ with durable state, test them fast."""

from orchestrator.definition import App, RetryPolicy, Saga, Step, StepKind
from orchestrator.engine import Decision, decide
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.state import SagaState, SagaStatus, StepStatus
from plumbing.errors import SagaError

__all__ = [
    "App",
    "Decision",
    "EngineConfig",
    "Orchestrator",
    "RetryPolicy",
    "Saga",
    "SagaError",
    "SagaState",
    "SagaStatus",
    "Step",
    "StepKind",
    "StepStatus",
    "decide",
]
