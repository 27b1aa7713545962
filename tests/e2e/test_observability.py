"""What operators see: the daemons' /metrics after a small run, and a real Prometheus server
that scrapes the daemon and fires the step-timeout alert from deploy/prometheus/alerts.yml.
Each runs on PostgreSQL and on MongoDB as the saga store.

The step timeouts (20 s) are ten times what a step takes on a loaded two-core machine, so only
the orders that hang time out; the counts asserted hold however slow the machine is.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from contracts.messages import StartSaga
from orchestrator.processes import SagaProcesses, free_port, http_status, wait_for_http
from orchestrator.stores import open_store
from plumbing.clock import SystemClock
from plumbing.codec import start_message
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, orchestrator_topology
from tests.conftest import unavailable
from tests.e2e.test_order_saga_e2e import APP, SERVICES, STEPS, wait_until_settled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.timeout(300),
]

ALERTS = Path(__file__).parents[2] / "deploy" / "prometheus" / "alerts.yml"
STEP_TIMEOUT = 20


def order(order_id: str, simulate: dict[str, str]) -> dict[str, object]:
    return {
        "order_id": order_id,
        "customer_id": "c-1",
        "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
        "payment_method": "card",
        "shipping_address": "1 Main St",
        "simulate": simulate,
    }


def env(amqp: str, database: str, **extra: str) -> dict[str, str]:
    return {
        "SAGA_AMQP_URL": amqp,
        "SAGA_STORE_URL": database,
        # The participants keep their outcomes in memory: one process each, never restarted.
        "SAGA_ALLOW_MEMORY_STORE": "1",
        "SAGA_STEP_TIMEOUTS": json.dumps({f"order_fulfillment.{s}": STEP_TIMEOUT for s in STEPS}),
        "SAGA_SWEEP_INTERVAL": "1",
        "SAGA_GAUGE_INTERVAL": "1",
        "SAGA_LOG_LEVEL": "error",
        **extra,
    }


async def start_orders(url: str, orders: list[dict[str, object]]) -> None:
    transport = RabbitTransport(url)
    try:
        await transport.declare(orchestrator_topology((), QueuePolicy()))
        for data in orders:
            request = StartSaga(
                saga_type="order_fulfillment", saga_id=str(data["order_id"]), data=data
            )
            await transport.publish(start_message(request, SystemClock().now()))
    finally:
        await transport.close()


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on a /metrics page, keyed by name and labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_until(
    port: int, condition: Callable[[Samples], bool], within: float = 60
) -> Samples:
    """Scrape until the samples satisfy ``condition``; the last scrape."""
    async with asyncio.timeout(within):
        while not condition(samples := await scrape(port)):  # noqa: ASYNC110 - /metrics has no change feed
            await asyncio.sleep(0.2)
    return samples


async def test_metrics_after_a_small_run(vhost_url: str, store_url: str) -> None:
    processes = SagaProcesses(APP, SERVICES, env(vhost_url, store_url))
    store = open_store(store_url)
    try:
        await processes.start()
        assert await http_status(processes.orchestrator.port, "/healthz") == 200
        await start_orders(
            vhost_url,
            [
                order("m-ok", {}),
                order("m-declined", {"process_payment": "fail"}),
                order("m-hang", {"create_shipment": "hang"}),
                order("m-flaky", {"reserve_inventory": "error:1"}),
            ],
        )
        await wait_until_settled(store, 4, within=600)
        kind = {"saga_type": "order_fulfillment"}
        # The gauges are read from the store every second: wait until they show the end
        # (no saga active any more) and the counters have counted every end.
        o = await scrape_until(
            processes.orchestrator.port,
            lambda o: (
                value(o, "saga_completed_total", **kind) == 2
                and value(o, "saga_failed_total", **kind) == 2
                and value(o, "saga_active", **kind, status="started") == 0
                and value(o, "saga_active", **kind, status="pending") == 0
                and value(o, "saga_active", **kind, status="compensating") == 0
            ),
        )
        assert value(o, "saga_started_total", **kind) == 4
        assert value(o, "saga_completed_total", **kind) == 2
        assert value(o, "saga_failed_total", **kind) == 2
        assert value(o, "saga_stuck_total", **kind) == 0

        def step(name: str, outcome: str) -> float:
            return value(o, "saga_step_outcomes_total", **kind, step=name, outcome=outcome)

        assert step("reserve_inventory", "completed") == 4
        assert step("reserve_inventory", "error") == 1
        assert step("process_payment", "failed") == 1
        assert step("create_shipment", "timed_out") == 1
        assert step("send_confirmation", "completed") == 2
        assert value(o, "saga_step_retries_total", **kind, step="reserve_inventory") == 1

        def undone(name: str) -> float:
            return value(o, "saga_compensations_total", **kind, step=name, outcome="completed")

        assert (
            undone("reserve_inventory"),
            undone("process_payment"),
            undone("create_shipment"),
        ) == (2, 1, 1)
        assert value(o, "saga_active", **kind, status="started") == 0
        assert value(o, "saga_active", **kind, status="stuck") == 0
        assert value(o, "saga_outbox_backlog") == 0
        assert value(o, "saga_consumers_ready") == 1
        # A timeout and a retry fired; which of the broker's delay ladder or the store sweep
        # (every second here) got there first depends on the machine's load.
        fired = value(o, "saga_timers_fired_total", source="broker") + value(
            o, "saga_timers_fired_total", source="sweeper"
        )
        assert fired >= 2
        assert value(o, "saga_step_duration_seconds_count", **kind, step="process_payment") == 3
        assert value(o, "saga_duration_seconds_count", **kind, status="failed") == 2

        p = await scrape(processes.daemons["payment"].port)
        commands = {"service": "payment", "command": "process_payment"}
        assert value(p, "saga_participant_commands_total", **commands, outcome="completed") == 3
        assert value(p, "saga_participant_commands_total", **commands, outcome="failed") == 1
        assert value(p, "saga_consumers_ready") == 1
    finally:
        await processes.stop()
        await store.close()


def fast_rules(tmp: Path) -> Path:
    """The production step-timeout alert with windows short enough for a test.

    The expression, metric and labels are the ones in deploy/prometheus/alerts.yml; only
    the range window shrinks to one minute and ``for`` to nothing.
    """
    rules = yaml.safe_load(ALERTS.read_text())
    alert = next(
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "SagaStepTimeouts"
    )
    alert["expr"] = re.sub(r"\[\d+[smhd]\]", "[1m]", alert["expr"])
    alert["for"] = "0s"
    path = tmp / "alerts.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "test", "rules": [alert]}]}))
    return path


def prometheus_get(port: int, path: str, **params: str) -> dict[str, Any]:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?{query}", timeout=5) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


TIMED_OUT = 'saga_step_outcomes_total{outcome="timed_out",step="create_shipment"}'


async def wait_for_sample(port: int, query: str, within: float = 60) -> None:
    """Wait until an instant query for ``query`` returns a series."""
    async with asyncio.timeout(within):
        while True:
            answer = await asyncio.to_thread(prometheus_get, port, "/api/v1/query", query=query)
            if answer["data"]["result"]:
                return
            await asyncio.sleep(0.5)


async def wait_for_alert(port: int, name: str, within: float) -> list[dict[str, Any]]:
    """The firing instances of alert ``name``; on timeout, fail with what Prometheus saw."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while loop.time() < give_up:
        await asyncio.sleep(1)
        alerts = (await asyncio.to_thread(prometheus_get, port, "/api/v1/alerts"))["data"]["alerts"]
        firing = [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]
        if firing:
            return firing
    targets = await asyncio.to_thread(prometheus_get, port, "/api/v1/targets")
    health = [
        (t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["data"]["activeTargets"]
    ]
    series = await asyncio.to_thread(
        prometheus_get,
        port,
        "/api/v1/query",
        query=f"{TIMED_OUT}[2m]",
    )
    rules = await asyncio.to_thread(prometheus_get, port, "/api/v1/rules")
    states = [
        (r.get("name"), r.get("health"), r.get("lastError"), r.get("query"))
        for group in rules["data"]["groups"]
        for r in group["rules"]
    ]
    pytest.fail(
        f"{name} never fired: targets {health}, rules {states}, alerts {alerts}, "
        f"series {series['data']}"
    )


async def test_prometheus_fires_the_step_timeout_alert(
    vhost_url: str, store_url: str, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        unavailable("prometheus", "the binary is not installed (Debian package: prometheus)")
    processes = SagaProcesses(APP, SERVICES, env(vhost_url, store_url))
    config = tmp_path / "prometheus.yml"
    web = free_port()
    server = None
    try:
        await processes.start()
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": "2s",
                        "scrape_timeout": "2s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(fast_rules(tmp_path))],
                    "scrape_configs": [
                        {
                            "job_name": "saga-orchestrator",
                            "static_configs": [
                                {"targets": [f"127.0.0.1:{processes.orchestrator.port}"]}
                            ],
                        }
                    ],
                }
            )
        )
        server = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_http(web, "/-/ready")
        # rate() needs a sample from before the first timeout: wait until Prometheus has
        # scraped the zeroed series (it applies new targets only after a reload throttle).
        await wait_for_sample(web, TIMED_OUT)
        await start_orders(
            vhost_url, [order(f"h-{n}", {"create_shipment": "hang"}) for n in range(12)]
        )
        # The timeouts fire STEP_TIMEOUT seconds after the orders start; then the rule needs a
        # couple of scrapes.
        firing = await wait_for_alert(web, "SagaStepTimeouts", within=STEP_TIMEOUT + 300)
        assert firing[0]["labels"]["step"] == "create_shipment"
        assert firing[0]["labels"]["saga_type"] == "order_fulfillment"
        assert firing[0]["labels"]["severity"] == "warning"
        up = await asyncio.to_thread(
            prometheus_get, web, "/api/v1/query", query='up{job="saga-orchestrator"}'
        )
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        if server is not None and server.returncode is None:
            server.terminate()
            await server.wait()
        await processes.stop()
