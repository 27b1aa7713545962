"""The ``saga`` command line as an operator uses it, in a fresh interpreter each time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import aio_pika
import pytest

from contracts import names
from examples.order_fulfillment import app
from orchestrator.state import SagaStatus
from orchestrator.stores import open_store
from orchestrator.testing import SagaHarness, fail
from tests.unit.test_harness import ORDER


def saga(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``saga ARGS`` with only the given SAGA_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env={**clean, "SAGA_LOG_LEVEL": "warning", **env},
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


@pytest.fixture
async def populated(database_url: str) -> str:
    """A PostgreSQL store with a completed, a failed and a stuck saga."""
    store = open_store(database_url)
    async with SagaHarness(app, store=store) as h:
        await h.start("order_fulfillment", "o-ok", {**ORDER, "order_id": "o-ok"})
        h.participant("payment").on("process_payment", fail("declined"))
        await h.start("order_fulfillment", "o-failed", {**ORDER, "order_id": "o-failed"})
        h.participant("inventory").on("release_inventory", fail("warehouse lost it"))
        await h.start("order_fulfillment", "o-stuck", {**ORDER, "order_id": "o-stuck"})
        assert (await h.saga("o-stuck")).status is SagaStatus.STUCK
    await store.close()
    return database_url


def test_ls_and_show_read_the_postgres_store(populated: str) -> None:
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
    one = json.loads(saga("show", "o-failed", "--json", SAGA_STORE_URL=populated).stdout)
    assert one["status"] == "failed"
    assert one["history"][-1]["event"] == "SagaFailed"


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
