"""The order saga on a three-node RabbitMQ cluster that loses a node mid-run.

The orchestrator (two replicas) and the four services run as processes with ``SAGA_AMQP_URL``
listing the three nodes of a private cluster (``tests/support/rabbit_nodes``), and a PostgreSQL
store on a database of their own. Every queue is a quorum queue replicated on the three nodes.
While 300 orders of every scenario of ``test_order_saga_e2e`` run (at most 50 unfinished at a
time), the node every process is connected to (the first address, which also leads most
queues) is killed with SIGKILL, more orders are sent while it is down, and it is restarted.
No saga may be lost or duplicated: each ends exactly as its scenario says, every step
completed at most once, its compensations in reverse order, and nothing is parked.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from contracts.events import EventName
from orchestrator.processes import SagaProcesses
from orchestrator.state import SagaState
from orchestrator.stores import open_store
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, orchestrator_topology
from tests.e2e.test_order_saga_e2e import (
    APP,
    SERVICES,
    check_outcomes,
    environment,
    orders,
    parked_reasons,
    send_paced,
)
from tests.support.rabbit_nodes import RabbitCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(900),
]

DEAD_LETTER_STALL = "Cannot forward any dead-letter messages"
IN_FLIGHT = 50


def queues_by_members(cluster: RabbitCluster, vhost: str) -> dict[str, tuple[str, list[str]]]:
    """Every queue of ``vhost``: its type and the nodes holding a replica."""
    rows = json.loads(
        cluster.any_running().ctl(
            "list_queues", "-p", vhost, "name", "type", "members", "--formatter", "json"
        )
    )
    return {row["name"]: (row["type"], sorted(row["members"])) for row in rows}


def completed_twice(state: SagaState) -> list[str]:
    """Steps the history shows completed more than once (a duplicated effect)."""
    steps = [e.step or "" for e in state.history if e.event is EventName.STEP_COMPLETED]
    return sorted({step for step in steps if steps.count(step) > 1})


async def test_300_orders_survive_losing_a_node_of_a_three_node_cluster(
    rabbit_cluster: RabbitCluster,
    cluster_vhost: str,
    database_url: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    lost, survivor, _ = rabbit_cluster.nodes
    broker_urls = rabbit_cluster.urls(cluster_vhost)  # all three nodes, the lost one first
    # Step timeouts well beyond the fail-over, so that every saga must end as its scenario says.
    # Info logs kept in the test's directory: a failure names the parked message, and the
    # daemons' logs show how it got there.
    env = {**environment(broker_urls, database_url, timeout=60), "SAGA_LOG_LEVEL": "info"}
    processes = SagaProcesses(APP, SERVICES, env, replicas=2, log_dir=tmp_path)
    request.node.user_properties.append(("daemon_logs", str(tmp_path)))
    store = open_store(database_url)
    transport = RabbitTransport(broker_urls)
    work = orders(300)
    try:
        await processes.start()
        await transport.declare(orchestrator_topology((), QueuePolicy()))
        everywhere = sorted(node.name for node in rabbit_cluster.nodes)
        queues = queues_by_members(rabbit_cluster, cluster_vhost)
        assert queues, "the daemons declared no queue"
        assert {name: q for name, q in queues.items() if q != ("quorum", everywhere)} == {}

        await send_paced(transport, store, work, 0, 120, in_flight=IN_FLIGHT)
        await asyncio.to_thread(lost.kill)  # mid-run, up to IN_FLIGHT sagas in every state
        # Through the surviving nodes.
        await send_paced(transport, store, work, 120, 200, in_flight=IN_FLIGHT)
        await asyncio.to_thread(lost.start)  # same data and ports: it rejoins the cluster
        await send_paced(transport, store, work, 200, len(work), in_flight=IN_FLIGHT)

        await check_outcomes(store, work)
        duplicated = {}
        for order_id, _, _ in work:
            record = await store.load(order_id)
            assert record is not None
            if twice := completed_twice(record.state):
                duplicated[order_id] = twice
        assert duplicated == {}
        assert await parked_reasons(survivor.vhost_url(cluster_vhost)) == []
        codes = await processes.stop()
        assert set(codes.values()) == {0}, codes
    finally:
        await processes.stop()
        await transport.close()
        await store.close()
        # Evidence of RabbitMQ 3.10 quorum queues that stop dead-lettering for a while after a
        # node restart (the store sweep covers the timers that takes): kept in the report.
        stalls = sum(
            node.log_file.read_text(errors="replace").count(DEAD_LETTER_STALL)
            for node in rabbit_cluster.nodes
            if node.log_file.exists()
        )
        request.node.user_properties.append(("dead_letter_forwarding_stalls", stalls))
