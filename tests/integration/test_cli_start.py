"""``saga start`` through the client: it says yes or no, and ``--wait`` waits for the end.

The orchestrator and the example services run in this process over RabbitMQ (the ``running``
fixture of test_client); each ``saga`` command runs in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.integration.test_cli import saga
from tests.integration.test_client import order, running

__all__ = ["running"]  # the fixture, used by name below

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(600)]


async def start(url: str, *args: str, data: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """``saga start ARGS --data DATA`` against ``url``, off the event loop the daemon runs on."""
    return await asyncio.to_thread(
        saga, "start", *args, "--data", json.dumps(data), SAGA_AMQP_URL=url
    )


async def test_an_accepted_start_and_its_repeat(running: str) -> None:
    done = await start(running, "order_fulfillment", "--id", "cli-1", data=order("cli-1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "saga cli-1 started (order_fulfillment v1)"
    again = await start(running, "order_fulfillment", "--id", "cli-1", data=order("cli-1"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "saga cli-1 already started (order_fulfillment v1)"


@pytest.mark.parametrize(
    ("saga_type", "data", "says"),
    [
        ("no_such_saga", order("cli-bad-1"), "no saga type 'no_such_saga'"),
        ("order_fulfillment", {"order_id": "cli-bad-2"}, "customer_id: Field required"),
        (
            "order_fulfillment",
            order("cli-bad-3", process_payment="explode"),
            "use fail, hang, error:N or slow:SECONDS",
        ),
    ],
)
async def test_a_refused_start_says_why_and_fails(
    running: str, saga_type: str, data: dict[str, object], says: str
) -> None:
    done = await start(running, saga_type, "--id", str(data["order_id"]), data=data)
    assert done.returncode == 2
    assert done.stderr.startswith(f"saga start: saga {data['order_id']} was refused: ")
    assert says in done.stderr
    assert "Traceback" not in done.stderr


async def test_other_data_under_a_used_id_is_refused(running: str) -> None:
    assert (
        await start(running, "order_fulfillment", "--id", "cli-2", data=order("cli-2"))
    ).returncode == 0
    other = {**order("cli-2"), "customer_id": "someone-else"}
    done = await start(running, "order_fulfillment", "--id", "cli-2", data=other)
    assert done.returncode == 2
    assert "already exists with other data" in done.stderr


async def test_wait_prints_the_outcome_and_fails_when_the_saga_fails(running: str) -> None:
    done = await start(
        running, "order_fulfillment", "--id", "cli-3", "--wait", "--json", data=order("cli-3")
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.split("\n", 1)[1])
    assert outcome["status"] == "completed"
    assert outcome["results"]["process_payment"]["payment_id"] == "pay-cli-3"
    declined = order("cli-4", process_payment="fail")
    done = await start(running, "order_fulfillment", "--id", "cli-4", "--wait", data=declined)
    assert done.returncode == 1
    assert "saga cli-4 failed" in done.stdout
    assert "reason: step process_payment failed (PaymentDeclined)" in done.stdout


async def test_no_wait_only_hands_the_request_over(running: str) -> None:
    done = await start(
        running, "order_fulfillment", "--id", "cli-5", "--no-wait", data=order("cli-5")
    )
    assert done.returncode == 0, done.stderr
    assert "confirmed by the broker" in done.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("ls", "--limit", "-5"), "argument --limit: -5 is not allowed: give 1 or more"),
        (("ls", "--limit", "many"), "argument --limit: 'many' is not a whole number"),
        (("ls", "--version", "0"), "argument --version: 0 is not allowed"),
        (
            ("start", "order_fulfillment", "--id", "x", "--data", "{}", "--timeout", "-1"),
            "argument --timeout: -1 is not allowed: give more than 0",
        ),
    ],
)
def test_every_argument_is_checked_with_a_sentence(args: tuple[str, ...], says: str) -> None:
    done = saga(*args)
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr
