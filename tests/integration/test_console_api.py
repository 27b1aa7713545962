"""The console's HTTP API over the real PostgreSQL store and RabbitMQ: every endpoint, the
rules for acting, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from contracts import names
from examples.order_fulfillment import app
from orchestrator.console.api import ROUTES
from orchestrator.console.auth import Access, parse_tokens
from orchestrator.console.openapi import openapi_document
from orchestrator.console.server import serve_console
from orchestrator.metrics import Metrics
from orchestrator.runtime import Orchestrator
from orchestrator.stores import open_store
from plumbing.errors import ConfigError
from plumbing.rabbitmq import RabbitTransport
from tests.integration.console_support import (
    BAD_START,
    eventually,
    park_a_bad_start_request,
    populate,
)

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.timeout(300)]

TOKEN = "ada:0123456789abcdef"


class Client:
    """A JSON client of one console, and the daemon its actions go to."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, registry: CollectorRegistry
    ) -> None:
        self.session = session
        self.base = base
        self.daemon_metrics = registry

    async def get(self, path: str, **query: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path, params=query) as response:
            return response.status, await response.json()

    async def post(
        self, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.session.post(
            self.base + path, json={} if body is None else body, headers=headers
        ) as response:
            return response.status, await response.json()


@pytest.fixture
async def console(database_url: str, vhost_url: str) -> AsyncIterator[Client]:
    """A console on localhost over a populated store, without tokens, and the orchestrator
    daemon (in this process) that applies its actions."""
    store = open_store(database_url)
    await store.setup()
    await populate(store)
    registry = CollectorRegistry()
    daemon = Orchestrator(app, store, RabbitTransport(vhost_url), metrics=Metrics(registry))
    try:
        async with asyncio.TaskGroup() as group:
            running = group.create_task(daemon.run())
            async with asyncio.timeout(60):
                await daemon.ready.wait()
            try:
                async with (
                    serve_console(
                        app, store, Access(local=True), host="127.0.0.1", port=0, amqp_url=vhost_url
                    ) as url,
                    aiohttp.ClientSession() as session,
                ):
                    yield Client(session, url, registry)
            finally:
                daemon.stop()
                await running
    finally:
        await daemon.transport.close()
        await store.close()


async def test_sagas_are_listed_filtered_paged_and_counted(console: Client) -> None:
    status, page = await console.get("/api/sagas")
    assert status == 200
    assert {s["saga_id"] for s in page["sagas"]} == {"o-ok", "o-failed", "o-stuck-1", "o-stuck-2"}

    _, stuck = await console.get("/api/sagas", status="stuck", saga_type="order_fulfillment")
    assert sorted(s["saga_id"] for s in stuck["sagas"]) == ["o-stuck-1", "o-stuck-2"]
    assert stuck["sagas"][0]["current_step"] == {
        "name": "reserve_inventory",
        "status": "compensation_failed",
        "direction": "compensation",
    }
    _, on_step = await console.get("/api/sagas", step="reserve_inventory")
    assert len(on_step["sagas"]) == 2
    _, prefixed = await console.get("/api/sagas", id_prefix="o-stuck-", version="1")
    assert len(prefixed["sagas"]) == 2
    _, none = await console.get("/api/sagas", created_to="2000-01-01T00:00:00Z")
    assert none["sagas"] == []

    seen: list[str] = []
    query = {"limit": "3"}
    while True:
        _, page = await console.get("/api/sagas", **query)
        seen += [s["saga_id"] for s in page["sagas"]]
        if page["next_cursor"] is None:
            break
        query["cursor"] = page["next_cursor"]
    assert sorted(seen) == ["o-failed", "o-ok", "o-stuck-1", "o-stuck-2"]

    assert (await console.get("/api/sagas", status="lost"))[0] == 400
    assert (await console.get("/api/sagas", cursor="garbage"))[0] == 400

    status, counts = await console.get("/api/counts")
    assert status == 200
    by_status = {c["status"]: c["count"] for c in counts["counts"]}
    assert by_status == {"completed": 1, "failed": 1, "stuck": 2}


async def test_one_saga_shows_data_results_errors_and_history(console: Client) -> None:
    status, saga = await console.get("/api/sagas/o-failed")
    assert status == 200
    assert saga["data"]["order_id"] == "o-failed"
    assert saga["results"]["reserve_inventory"] == saga["steps"][0]["result"]
    payment = saga["steps"][1]
    assert payment["status"] == "failed"
    assert payment["error"]["message"] == "card declined"
    assert payment["attempts"] == 1
    assert saga["history"][-1]["event"] == "SagaFailed"
    assert (await console.get("/api/sagas/nobody"))[0] == 404


async def test_actions_go_through_the_saga_rules_and_name_the_operator(console: Client) -> None:
    status, done = await console.post(
        "/api/sagas/o-stuck-1/retry", headers={"X-Saga-Operator": "grace"}
    )
    assert status == 200, done
    assert (done["before"], done["after"], done["by"]) == ("stuck", "compensating", "grace")
    _, saga = await console.get("/api/sagas/o-stuck-1")
    assert saga["history"][-1]["by"] == "grace"

    status, refused = await console.post("/api/sagas/o-ok/abort", {"reason": "test"})
    assert status == 409
    assert refused["error"] == "saga o-ok is already completed; there is nothing to abort"
    assert (await console.post("/api/sagas/nobody/resolve"))[0] == 404
    assert (await console.post("/api/sagas/o-stuck-2/resolve", {"reason": 3}))[0] == 400

    status, resolved = await console.post("/api/sagas/o-stuck-2/resolve", {"reason": "by hand"})
    assert status == 200
    assert resolved["after"] == "failed"

    async with console.session.post(
        console.base + "/api/sagas/o-stuck-2/retry", data="{}"
    ) as response:  # not JSON: a cross-site form post is refused
        assert response.status == 415

    # The daemon applied the actions, and counted them with every other transition.
    for action in ("retry", "resolve"):
        labels = {"saga_type": "order_fulfillment", "action": action}
        assert console.daemon_metrics.get_sample_value("saga_operator_actions_total", labels) == 1
    async with console.session.get(console.base + "/metrics") as response:
        assert response.status == 200  # the console's own counters: nothing applied here


async def test_bulk_actions_count_first_and_act_only_on_the_confirmed_count(
    console: Client,
) -> None:
    selection = {"status": "stuck", "saga_type": "order_fulfillment"}
    status, dry = await console.post("/api/bulk/retry", {"selection": selection})
    assert status == 200
    assert (dry["matched"], dry["dry_run"], dry["applied"]) == (2, True, [])

    status, changed = await console.post(
        "/api/bulk/retry", {"selection": selection, "dry_run": False, "expected": 3}
    )
    assert status == 409
    assert "2 sagas match now, not 3" in changed["error"]

    status, done = await console.post(
        "/api/bulk/retry", {"selection": selection, "dry_run": False, "expected": 2}
    )
    assert status == 200
    assert sorted(a["saga_id"] for a in done["applied"]) == ["o-stuck-1", "o-stuck-2"]
    assert done["refused"] == []
    assert (await console.post("/api/bulk/abort", {"selection": {}}))[0] == 400
    _, aborted = await console.post(
        "/api/bulk/abort",
        {"selection": {"status": "compensating"}, "dry_run": False, "expected": 2},
    )
    assert len(aborted["refused"]) == 2  # the rules refuse aborting a compensating saga
    assert "use retry or resolve" in aborted["refused"][0]["reason"]


async def test_parked_messages_are_listed_shown_replayed_and_discarded(
    console: Client, vhost_url: str
) -> None:
    await park_a_bad_start_request(vhost_url)
    await park_a_bad_start_request(vhost_url)
    status, listed = await console.get("/api/parked")
    assert status == 200
    assert len(listed["parked"]) == 2
    first, second = listed["parked"]
    assert first["queue"] == names.START_QUEUE
    assert "StartSaga" in first["reason"]  # the orchestrator said why it could not read it

    status, shown = await console.get(f"/api/parked/{first['message_id']}")
    assert status == 200
    assert json.loads(shown["body"]) == json.loads(BAD_START)

    status, replayed = await console.post(f"/api/parked/{first['message_id']}/replay")
    assert status == 200
    assert replayed == {
        "message_id": first["message_id"],
        "outcome": "replayed",
        "queue": names.START_QUEUE,
    }

    async def parked_anew() -> bool:
        # Back in saga.start, the daemon read it again and, still unreadable, parked it anew.
        ids = {m["message_id"] for m in (await console.get("/api/parked"))[1]["parked"]}
        return len(ids) == 2 and first["message_id"] not in ids

    await eventually(parked_anew, "the daemon parking the replayed request again")

    status, discarded = await console.post(f"/api/parked/{second['message_id']}/discard")
    assert (status, discarded["outcome"]) == (200, "discarded")
    remaining = (await console.get("/api/parked"))[1]["parked"]
    assert len(remaining) == 1
    assert remaining[0]["message_id"] not in (first["message_id"], second["message_id"])
    assert (await console.get(f"/api/parked/{second['message_id']}"))[0] == 404
    assert (await console.post(f"/api/parked/{second['message_id']}/replay"))[0] == 404


async def test_with_tokens_acting_needs_one_and_the_operator_is_its_name(
    database_url: str,
) -> None:
    store = open_store(database_url)
    await store.setup()
    await populate(store)
    access = Access.for_binding("127.0.0.1", parse_tokens(TOKEN))
    try:
        async with (
            serve_console(app, store, access, host="127.0.0.1", port=0) as url,
            aiohttp.ClientSession() as session,
        ):
            client = Client(session, url, CollectorRegistry())
            assert (await client.get("/api/sagas"))[0] == 200  # reading stays open
            _, me = await client.get("/api/whoami")
            assert me == {"operator": None, "actions_need_token": True, "can_act": False}
            for headers in (None, {"Authorization": "Bearer wrong-token-0000000"}):
                status, refused = await client.post("/api/sagas/o-stuck-1/retry", headers=headers)
                assert status == 401
                assert "token" in refused["error"]
            assert (await client.post("/api/bulk/retry", {"selection": {"status": "stuck"}}))[
                0
            ] == 401
            assert (await client.post("/api/parked/x/discard"))[0] == 401
            bearer = {"Authorization": "Bearer 0123456789abcdef", "X-Saga-Operator": "mallory"}
            status, done = await client.post("/api/sagas/o-stuck-1/retry", headers=bearer)
            assert (status, done["by"]) == (200, "ada")  # the token names the operator
            # No broker here: the compensation command, its timer and the lifecycle event are
            # saved with the action, for the daemon's outbox relay to send.
            assert done["unsent"] == 3
            assert (await client.get("/api/parked"))[0] == 503
    finally:
        await store.close()


async def test_an_action_nobody_answers_is_a_504_and_expires_unapplied(
    database_url: str, vhost_url: str
) -> None:
    store = open_store(database_url)
    await store.setup()
    await populate(store)
    try:
        async with (
            serve_console(
                app,
                store,
                Access(local=True),
                host="127.0.0.1",
                port=0,
                amqp_url=vhost_url,
                answer_timeout=1,
            ) as url,
            aiohttp.ClientSession() as session,
        ):
            client = Client(session, url, CollectorRegistry())
            status, problem = await client.post("/api/sagas/o-stuck-1/retry")
            assert status == 504
            assert "did not answer about saga o-stuck-1 within 1 s" in problem["error"]
        record = await store.load("o-stuck-1")
        assert record is not None
        assert record.state.status.value == "stuck"
    finally:
        await store.close()


async def test_a_local_console_answers_only_requests_to_a_loopback_host(
    console: Client,
) -> None:
    for host in ("evil.example:8474", "192.168.1.10", "localhost.evil.example"):
        async with console.session.get(
            console.base + "/api/sagas", headers={"Host": host}
        ) as response:
            assert response.status == 421, host
            assert "localhost only" in (await response.json())["error"]
    for host in ("localhost:8474", "127.0.0.1", "[::1]:8474"):
        async with console.session.get(
            console.base + "/api/counts", headers={"Host": host}
        ) as response:
            assert response.status == 200, host


def test_binding_beyond_localhost_needs_a_token() -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve the console on 0\.0\.0\.0"):
        Access.for_binding("0.0.0.0", {})
    assert Access.for_binding("0.0.0.0", parse_tokens(TOKEN)).needs_token
    assert not Access.for_binding("::1", {}).needs_token
    assert Access.for_binding("localhost", {}).operator(None, "ada") == "ada"
    with pytest.raises(ConfigError, match="name:token"):
        parse_tokens("just-a-token")
    with pytest.raises(ConfigError, match="shorter than 16"):
        parse_tokens("ada:short")


async def test_the_openapi_document_describes_every_route(console: Client) -> None:
    status, served = await console.get("/openapi.json")
    assert status == 200
    assert served == json.loads(json.dumps(openapi_document()))
    assert served["openapi"] == "3.1.0"
    operations = {
        (method.upper(), path): operation
        for path, methods in served["paths"].items()
        for method, operation in methods.items()
    }
    assert set(operations) == {(route.method, route.path) for route in ROUTES}
    for route in ROUTES:
        operation = operations[route.method, route.path]
        assert operation["operationId"] == route.operation
        assert ("security" in operation) == route.acts
    retry = operations["POST", "/api/sagas/{saga_id}/retry"]
    assert set(retry["responses"]) == {
        "200",
        "400",
        "401",
        "404",
        "409",
        "415",
        "421",
        "503",
        "504",
    }
