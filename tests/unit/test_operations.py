"""Operator actions through :class:`Operations`: the step a saga is on, who acted, bulk runs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from contracts import names
from contracts.client import OperateSaga, OperationAnswer
from examples.order_fulfillment import app
from orchestrator.engine import Action
from orchestrator.operations import Operations
from orchestrator.state import SagaStatus
from orchestrator.store import SagaFilter
from orchestrator.testing import SagaHarness, fail, hang
from plumbing.errors import ActionRefused, SagaNotFound
from plumbing.transport import Delivery, Disposition
from tests.unit.test_harness import ORDER


def order(saga_id: str) -> dict[str, object]:
    return {**ORDER, "order_id": saga_id}


async def test_the_current_step_follows_the_saga_forward_and_back() -> None:
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", hang())
        waiting = await h.start("order_fulfillment", "o-wait", order("o-wait"))
        assert waiting.current_step is not None
        assert (waiting.current_step.name, waiting.current_step.status.value) == (
            "process_payment",
            "running",
        )
        assert waiting.summary()["current_step"]["direction"] == "forward"

        h.participant("payment").on("process_payment", fail("declined"))
        h.participant("inventory").on("release_inventory", hang())
        undoing = await h.start("order_fulfillment", "o-undo", order("o-undo"))
        assert undoing.status is SagaStatus.COMPENSATING
        assert undoing.summary()["current_step"] == {
            "name": "reserve_inventory",
            "status": "compensating",
            "direction": "compensation",
        }

        h.participant("inventory").on("release_inventory", fail("lost"))
        h.participant("payment").on("process_payment", fail("declined"))
        done = await h.start("order_fulfillment", "o-stuck", order("o-stuck"))
        assert done.status is SagaStatus.STUCK
        assert done.current_step is not None
        assert done.current_step.status.is_compensation


async def test_actions_name_the_operator_in_the_history_and_report_what_changed() -> None:
    async with SagaHarness(app) as h:
        operations = Operations(h.orchestrator)
        h.participant("payment").on("process_payment", hang())
        await h.start("order_fulfillment", "o-1", order("o-1"))

        applied = await operations.act("o-1", Action.ABORT, by="ada")
        assert (applied.before, applied.after) == (SagaStatus.STARTED, SagaStatus.COMPENSATING)
        assert applied.unsent == 0  # the in-memory broker took every message
        await h.settle()  # the compensations that follow are the engine's, not ada's
        history = (await h.saga("o-1")).history
        by_ada = [(entry.event, entry.step) for entry in history if entry.by == "ada"]
        assert by_ada == [
            ("SagaStepFailed", "process_payment"),
            ("SagaCompensationStarted", "process_payment"),
        ]
        first = next(n for n, entry in enumerate(history) if entry.by == "ada")
        assert history[first].detail == "aborted by ada"
        assert all(entry.by is None for entry in history[:first] + history[first + 2 :])

        with pytest.raises(ActionRefused, match="only a stuck saga can be retried"):
            await operations.act("o-1", Action.RETRY, by="ada")
        with pytest.raises(SagaNotFound):
            await operations.act("nobody", Action.RESOLVE, by="ada")


async def test_a_bulk_action_applies_to_each_match_and_reports_refusals() -> None:
    async with SagaHarness(app) as h:
        operations = Operations(h.orchestrator)
        h.participant("payment").on("process_payment", fail("declined"))
        h.participant("inventory").on("release_inventory", fail("lost"))
        for saga_id in ("s-1", "s-2", "s-3"):
            await h.start("order_fulfillment", saga_id, order(saga_id))
        h.participant("inventory").on("release_inventory", hang())

        stuck = await operations.matching(SagaFilter(status=SagaStatus.STUCK, limit=1))
        assert sorted(stuck) == ["s-1", "s-2", "s-3"]  # the limit is a page, not a cap
        await operations.act("s-2", Action.RESOLVE, by="ada")  # moved on before the bulk run

        outcome = await operations.bulk(stuck, Action.RETRY, by="grace")
        assert sorted(a.saga_id for a in outcome.applied) == ["s-1", "s-3"]
        assert [(r.saga_id, r.reason) for r in outcome.refused] == [
            ("s-2", "saga s-2 is failed; only a stuck saga can be retried")
        ]


async def ask_the_daemon(
    h: SagaHarness, saga_id: str, action: str, expires_in: float
) -> OperationAnswer:
    """Hand the daemon an OperateSaga as the command line sends it; return its answer."""
    request = OperateSaga(
        saga_id=saga_id,
        action=action,  # type: ignore[arg-type]
        request_id=f"r-{saga_id}-{action}",
        reply_to="saga.client.test",
        expires_at=h.clock.now() + timedelta(seconds=expires_in),
        by="ada",
    )
    delivery = Delivery(queue=names.QUERIES_QUEUE, body=request.model_dump_json().encode())
    assert await h.orchestrator.on_query(delivery) is Disposition.ACK
    answers = [OperationAnswer.model_validate_json(m.body) for m in h.published("answer")]
    return next(a for a in reversed(answers) if a.request_id == request.request_id)


async def test_the_daemon_applies_an_operators_request_unless_it_expired() -> None:
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", fail("declined"))
        h.participant("inventory").on("release_inventory", fail("lost"))
        await h.start("order_fulfillment", "s-1", order("s-1"))

        expired = await ask_the_daemon(h, "s-1", "resolve", expires_in=-1)
        assert expired == OperationAnswer(
            saga_id="s-1",
            request_id="r-s-1-resolve",
            applied=False,
            refused="the request expired before the orchestrator read it; nothing done",
        )
        assert (await h.saga("s-1")).status is SagaStatus.STUCK

        applied = await ask_the_daemon(h, "s-1", "resolve", expires_in=30)
        assert (applied.applied, applied.before, applied.after) == (True, "stuck", "failed")
        assert (await h.saga("s-1")).history[-1].by == "ada"

        refused = await ask_the_daemon(h, "s-1", "abort", expires_in=30)
        assert refused.refused == "saga s-1 is already failed; there is nothing to abort"
        missing = await ask_the_daemon(h, "nobody", "retry", expires_in=30)
        assert missing.refused == "no saga has id 'nobody'"
