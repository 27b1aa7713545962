"""saga-orchestrator: define sagas, run them over RabbitMQ with durable state, test them fast."""

from orchestrator.client import SagaClient
from orchestrator.definition import App, Parallel, RetryPolicy, Saga, Step, StepKind
from orchestrator.engine import Decision, decide
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.state import SagaState, SagaStatus, StepStatus
from plumbing.errors import SagaError, StartRefused

__all__ = [
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
