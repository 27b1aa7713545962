"""The ``saga`` command line as an operator uses it, in a fresh interpreter each time.

The commands that read and write sagas run against each durable store (``store_url``):
PostgreSQL and MongoDB.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from contracts import names
from contracts.messages import Command
from examples.order_fulfillment import app
from orchestrator.definition import App, Saga, Step, StepKind
from orchestrator.metrics import Metrics
from orchestrator.runtime import Orchestrator
from orchestrator.state import SagaStatus
from orchestrator.stores import open_store
from orchestrator.testing import SagaHarness, fail, hang
from plumbing.rabbitmq import RabbitTransport
from tests.integration.console_support import park_a_bad_start_request, queue_depth
from tests.unit.test_harness import ORDER


def saga(*args: str, answer: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``saga ARGS`` with only the given SAGA_* settings, ``answer`` on its stdin."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env={**clean, "SAGA_LOG_LEVEL": "warning", **env},
        input=answer,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_prints_three_sagas_as_json() -> None:
    done = saga("demo", "--json")
    assert done.returncode == 0, done.stderr
    sagas = json.loads(done.stdout)["sagas"]
    assert [s["status"] for s in sagas] == ["completed", "failed", "failed"]
    text = saga("demo")
    assert "SagaStepTimedOut" in text.stdout


def test_schema_prints_an_asyncapi_document() -> None:
    done = saga("schema")
    assert done.returncode == 0
    assert json.loads(done.stdout)["asyncapi"] == "3.0.0"


class Greet(Command):
    """A user's own command."""

    who: str


class Greeted(BaseModel):
    """A user's own step result."""

    text: str


own_app = App(
    [
        Saga(
            "greeting",
            steps=[
                Step(
                    "greet",
                    service="greeter",
                    command=Greet,
                    result=Greeted,
                    kind=StepKind.RETRIABLE,
                )
            ],
        )
    ]
)
"""An app of a user's own, for ``saga schema --app``."""


def test_schema_exports_the_apps_own_contracts() -> None:
    done = saga("schema", "--format", "jsonschema", "--app", "tests.integration.test_cli:own_app")
    assert done.returncode == 0, done.stderr
    defined = json.loads(done.stdout)["$defs"]
    assert {"tests.integration.test_cli.Greet", "tests.integration.test_cli.Greeted"} <= set(
        defined
    )
    assert not any("order_fulfillment" in name for name in defined)
    asyncapi = json.loads(saga("schema", "--app", "tests.integration.test_cli:own_app").stdout)
    assert "tests.integration.test_cli.Greet" in asyncapi["components"]["schemas"]


@pytest.fixture
async def populated(store_url: str) -> str:
    """A store of its own with a completed, a failed and a stuck saga."""
    store = open_store(store_url)
    # From the wall clock's now: MongoDB's TTL index deletes a finished saga whose retention
    # ran out by the wall clock, as it would have for the harness's default start in the past.
    async with SagaHarness(app, store=store, start=datetime.now(UTC)) as h:
        await h.start("order_fulfillment", "o-ok", {**ORDER, "order_id": "o-ok"})
        h.participant("payment").on("process_payment", fail("declined"))
        await h.start("order_fulfillment", "o-failed", {**ORDER, "order_id": "o-failed"})
        h.participant("inventory").on("release_inventory", fail("warehouse lost it"))
        await h.start("order_fulfillment", "o-stuck", {**ORDER, "order_id": "o-stuck"})
        assert (await h.saga("o-stuck")).status is SagaStatus.STUCK
    await store.close()
    return store_url


def test_ls_and_show_read_the_store(populated: str) -> None:
    table = saga("ls", SAGA_STORE_URL=populated)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["SAGA", "ID", "TYPE"]
    assert sorted(line.split()[0] for line in lines[1:]) == ["o-failed", "o-ok", "o-stuck"]

    stuck = json.loads(saga("ls", "--status", "stuck", "--json", SAGA_STORE_URL=populated).stdout)
    assert [s["saga_id"] for s in stuck["sagas"]] == ["o-stuck"]
    assert "history" not in stuck["sagas"][0]

    shown = saga("show", "o-failed", SAGA_STORE_URL=populated)
    assert shown.returncode == 0
    assert "o-failed  order_fulfillment  FAILED" in shown.stdout
    assert "SagaCompensationCompleted  reserve_inventory" in shown.stdout
    assert "result of reserve_inventory: {" in shown.stdout
    assert '"order_id": "o-failed"' in shown.stdout  # the data
    assert "error of process_payment (failed): BusinessFailure: declined" in shown.stdout
    one = json.loads(saga("show", "o-failed", "--json", SAGA_STORE_URL=populated).stdout)
    assert one["status"] == "failed"
    assert one["history"][-1]["event"] == "SagaFailed"
    assert one["data"]["order_id"] == "o-failed"
    assert one["results"]["reserve_inventory"] == one["steps"][0]["result"]
    payment = one["steps"][1]
    assert (payment["name"], payment["status"], payment["attempts"]) == (
        "process_payment",
        "failed",
        1,
    )
    assert payment["error"] == {"type": "BusinessFailure", "message": "declined"}

    stuck_row = next(line for line in lines if line.startswith("o-stuck"))
    assert "undo reserve_inventory (compensation_failed)" in stuck_row
    on_step = json.loads(
        saga("ls", "--step", "reserve_inventory", "--json", SAGA_STORE_URL=populated).stdout
    )
    assert [s["saga_id"] for s in on_step["sagas"]] == ["o-stuck"]


async def test_retry_and_abort_go_through_the_saga_rules(populated: str) -> None:
    retried = saga(
        "retry", "o-stuck", "--app", "examples.order_fulfillment:app", SAGA_STORE_URL=populated
    )
    assert retried.returncode == 0, retried.stderr
    assert "stuck -> compensating" in retried.stdout
    assert "wait in the outbox" in retried.stdout  # no broker here: the daemon will send it
    store = open_store(populated)
    try:
        record = await store.load("o-stuck")
        assert record is not None
        assert record.state.status is SagaStatus.COMPENSATING
        assert record.outbox[0].kind == "command"
    finally:
        await store.close()

    refused = saga(
        "abort", "o-ok", SAGA_STORE_URL=populated, SAGA_APP="examples.order_fulfillment:app"
    )
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        == "saga abort: saga o-ok is already completed; there is nothing to abort"
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("show", "nope"), {}, "saga show: no saga has id 'nope' in memory://"),
        (("ls",), {"SAGA_STORE_URL": "redis://localhost"}, "is not supported; use memory://"),
        (("ls", "--status", "done"), {}, "--status 'done' is not a status"),
        (("ls",), {"SAGA_PREFETCH": "many"}, "SAGA_PREFETCH is invalid"),
        (("retry", "x"), {}, "pass --app package.module:attribute or set SAGA_APP"),
        (
            ("orchestrator", "--app", "examples.order_fulfillment:app"),
            {},
            "SAGA_AMQP_URL is not set",
        ),
        (("start", "t", "--id", "1", "--data", "{"), {}, "--data is not JSON"),
        (
            ("console", "--host", "0.0.0.0", "--app", "examples.order_fulfillment:app"),
            {},
            "refusing to serve the console on 0.0.0.0 without a token",
        ),
        (
            ("console", "--app", "examples.order_fulfillment:app"),
            {"SAGA_CONSOLE_TOKENS": "ada:short"},
            "the console token of 'ada' is shorter than 16 characters",
        ),
        (("parked", "ls"), {}, "SAGA_AMQP_URL is not set"),
    ],
)
def test_mistakes_end_in_one_line_and_status_2(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    done = saga(*args, **env)
    assert done.returncode == 2
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_store_is_named_without_its_password_within_seconds() -> None:
    started = time.monotonic()
    done = saga("ls", SAGA_STORE_URL="postgresql://ops:s3cret@127.0.0.1:1/saga")
    assert time.monotonic() - started < 10
    assert done.returncode == 2
    assert "postgresql://ops:***@127.0.0.1:1/saga" in done.stderr
    assert "s3cret" not in done.stderr
    done = saga(
        "ls", SAGA_STORE_URL="mongodb://ops:s3cret@127.0.0.1:1/saga?serverSelectionTimeoutMS=500"
    )
    assert done.returncode == 2
    assert "s3cret" not in done.stderr
    assert "127.0.0.1:1" in done.stderr


def test_topology_prints_queues_and_the_delay_ladder() -> None:
    done = saga("topology", "--app", "examples.order_fulfillment:app")
    assert done.returncode == 0, done.stderr
    topology = json.loads(done.stdout)
    queues = {q["name"]: q["arguments"] for q in topology["queues"]}
    assert queues["saga.payment.commands"]["x-queue-type"] == "quorum"
    assert queues["saga.replies"]["x-delivery-limit"] == 20
    assert queues["saga.delay.21"]["x-message-ttl"] == 2**21 * 1000
    assert "saga.delay.22" not in queues


async def test_start_and_topology_declare_talk_to_rabbitmq(vhost_url: str) -> None:
    declared = saga(
        "topology", "--declare", "--app", "examples.order_fulfillment:app", SAGA_AMQP_URL=vhost_url
    )
    assert declared.returncode == 0, declared.stderr
    assert "declared" in declared.stdout
    data = json.dumps({**ORDER, "order_id": "cli-1"})
    started = saga(  # fire and forget: nothing runs to answer it here
        "start",
        "order_fulfillment",
        "--id",
        "cli-1",
        "--data",
        data,
        "--no-wait",
        SAGA_AMQP_URL=vhost_url,
    )
    assert started.returncode == 0, started.stderr
    assert "confirmed by the broker" in started.stdout
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.START_QUEUE)
        message = await queue.get(timeout=5)
        assert message is not None
        body = json.loads(message.body)
        assert body["saga_id"] == "cli-1"
        assert body["traceparent"].startswith("00-")
        await message.ack()


APP = "examples.order_fulfillment:app"


async def test_bulk_actions_count_ask_and_record_who_acted(populated: str) -> None:
    bulk = ("retry", "--status", "stuck", "--type", "order_fulfillment", "--app", APP)
    declined = saga(*bulk, answer="n\n", SAGA_STORE_URL=populated)
    assert declined.returncode == 1
    assert "retry 1 stuck saga(s) of type order_fulfillment? [y/N]" in declined.stdout
    assert "nothing done" in declined.stdout

    done = saga(*bulk, "--yes", "--by", "ada", SAGA_STORE_URL=populated)
    assert done.returncode == 0, done.stderr
    assert "saga o-stuck: stuck -> compensating" in done.stdout
    assert "retry: 1 applied, 0 refused" in done.stdout
    store = open_store(populated)
    try:
        record = await store.load("o-stuck")
        assert record is not None
        assert record.state.history[-1].by == "ada"
    finally:
        await store.close()

    both = saga("abort", "o-ok", "--status", "started", "--app", APP, SAGA_STORE_URL=populated)
    assert both.returncode == 2
    assert "not both" in both.stderr
    nothing = saga("abort", "--app", APP, SAGA_STORE_URL=populated)
    assert nothing.returncode == 2
    assert "give a SAGA_ID, or --status" in nothing.stderr


async def test_with_a_broker_actions_go_to_the_daemon_which_counts_them(
    store_url: str, vhost_url: str
) -> None:
    store = open_store(store_url)
    async with SagaHarness(app, store=store, start=datetime.now(UTC)) as h:
        h.participant("payment").on("process_payment", hang())
        for saga_id in ("o-run", "o-late"):
            await h.start("order_fulfillment", saga_id, {**ORDER, "order_id": saga_id})
    env = {"SAGA_STORE_URL": store_url, "SAGA_AMQP_URL": vhost_url}
    assert saga("topology", "--declare", "--app", APP, **env).returncode == 0

    # Nobody answers: the command says so, and its request expires unapplied.
    unanswered = saga("abort", "o-late", "--app", APP, "--timeout", "1", **env)
    assert unanswered.returncode == 3
    assert "did not answer about saga o-late within 1 s" in unanswered.stderr

    registry = CollectorRegistry()
    daemon = Orchestrator(app, store, RabbitTransport(vhost_url), metrics=Metrics(registry))
    try:
        async with asyncio.TaskGroup() as group:
            running = group.create_task(daemon.run())
            async with asyncio.timeout(60):
                await daemon.ready.wait()
            aborted = await asyncio.to_thread(
                saga, "abort", "o-run", "--app", APP, "--by", "ada", "--reason", "called", **env
            )
            refused = await asyncio.to_thread(saga, "retry", "o-run", "--app", APP, **env)
            daemon.stop()
            await running
    finally:
        await daemon.transport.close()
        record = await store.load("o-run")
        late = await store.load("o-late")
        await store.close()

    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout.strip() == "saga o-run: started -> compensating"  # nothing waits
    assert refused.returncode == 2
    assert "only a stuck saga can be retried" in refused.stderr
    labels = {"saga_type": "order_fulfillment", "action": "abort"}
    assert registry.get_sample_value("saga_operator_actions_total", labels) == 1
    assert record is not None
    assert record.state.history[-1].by == "ada"
    assert late is not None
    assert late.state.status is SagaStatus.STARTED  # the expired request changed nothing


async def test_parked_messages_from_the_command_line(vhost_url: str) -> None:
    await park_a_bad_start_request(vhost_url)
    env = {"SAGA_AMQP_URL": vhost_url}
    listed = json.loads(saga("parked", "ls", "--json", **env).stdout)["parked"]
    assert len(listed) == 1
    message_id = listed[0]["message_id"]
    table = saga("parked", "ls", **env)
    assert message_id in table.stdout
    assert names.START_QUEUE in table.stdout

    shown = saga("parked", "show", message_id, **env)
    assert shown.returncode == 0, shown.stderr
    assert "reason:    not a valid StartSaga" in shown.stdout
    assert '"saga_id": 7' in shown.stdout
    replayed = saga("parked", "replay", message_id, **env)
    assert replayed.stdout.strip() == f"parked message {message_id} sent back to saga.start"
    assert await queue_depth(vhost_url, names.START_QUEUE) == 1
    assert "no messages are parked" in saga("parked", "ls", **env).stdout

    gone = saga("parked", "discard", message_id, **env)
    assert gone.returncode == 2
    assert gone.stderr.strip() == f"saga parked: no parked message has id {message_id!r}"
