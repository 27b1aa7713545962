"""Failover between the nodes of a private three-node RabbitMQ cluster: the transport is given
two of them, consumes and publishes through the first, that node is killed (SIGKILL), and the
transport carries on through the second; then round again.

The cluster belongs to the test session (``tests/support/rabbit_nodes``), never the machine's
shared RabbitMQ; this test runs on a virtual host of its own and restarts what it kills.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from orchestrator.processes import free_port
from plumbing.errors import PublishFailed
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, QueueSpec, Topology, base_topology
from plumbing.transport import Delivery, Disposition, MessageKind, Outgoing
from plumbing.urls import redact_url
from tests.support.rabbit_nodes import RabbitCluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(900)]

POLICY = QueuePolicy()
QUEUE = "failover.work"


async def eventually(condition: Callable[[], bool], within: float = 120) -> None:
    """Poll until ``condition()`` holds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.1)


def message(n: int) -> Outgoing:
    return Outgoing(
        exchange="",
        routing_key=QUEUE,
        body=json.dumps({"n": n}),
        message_id=f"m-{n}",
        correlation_id="failover",
        kind=MessageKind.COMMAND,
        created_at=datetime.now(UTC),
    )


async def publish(transport: RabbitTransport, n: int) -> None:
    """Publish, retrying while the transport fails over (as the outbox relay would)."""
    async with asyncio.timeout(120):
        while True:
            try:
                await transport.publish(message(n))
                return
            except PublishFailed:
                await asyncio.sleep(0.5)


def quorum_members(cluster: RabbitCluster, vhost: str, queue: str) -> list[str]:
    rows = json.loads(
        cluster.any_running().ctl(
            "list_queues", "-p", vhost, "name", "type", "members", "--formatter", "json"
        )
    )
    (row,) = [row for row in rows if row["name"] == queue]
    assert row["type"] == "quorum"
    members: list[str] = row["members"]
    return members


async def test_the_transport_fails_over_to_the_next_node_and_back(
    rabbit_cluster: RabbitCluster, cluster_vhost: str
) -> None:
    first, second, _ = rabbit_cluster.nodes
    addresses = rabbit_cluster.urls(cluster_vhost, nodes=(0, 1))
    received: list[int] = []

    async def handler(delivery: Delivery) -> Disposition:
        received.append(json.loads(delivery.body)["n"])
        return Disposition.ACK

    transport = RabbitTransport(addresses, reconnect_interval=0.5, publish_timeout=5, prefetch=8)
    try:
        await transport.declare(
            base_topology(POLICY) + Topology(queues=(QueueSpec(QUEUE, POLICY.arguments()),))
        )
        # RabbitMQ replicates a quorum queue on 3 nodes by default (quorum_cluster_size): all.
        members = quorum_members(rabbit_cluster, cluster_vhost, QUEUE)
        assert sorted(members) == sorted(node.name for node in rabbit_cluster.nodes)
        assert transport.address == redact_url(first.vhost_url(cluster_vhost))

        async with asyncio.TaskGroup() as tasks:
            ready = asyncio.Event()
            consumer = tasks.create_task(transport.consume(QUEUE, handler, ready=ready))
            await ready.wait()
            for n in range(10):
                await publish(transport, n)
            await eventually(lambda: set(received) >= set(range(10)))

            await asyncio.to_thread(first.kill)
            await eventually(
                lambda: (
                    transport.connected
                    and transport.address == redact_url(second.vhost_url(cluster_vhost))
                )
            )
            for n in range(10, 20):
                await publish(transport, n)
            await eventually(lambda: set(received) >= set(range(20)))

            # Round again: with the first node back, losing the second leads to the first.
            await asyncio.to_thread(first.start)
            await asyncio.to_thread(second.kill)
            await eventually(
                lambda: (
                    transport.connected
                    and transport.address == redact_url(first.vhost_url(cluster_vhost))
                )
            )
            for n in range(20, 30):
                await publish(transport, n)
            await eventually(lambda: set(received) >= set(range(30)))
            consumer.cancel()
    finally:
        await transport.close()
        await asyncio.to_thread(rabbit_cluster.ensure_running)
    # At least once: a delivery that was in flight on a killed node may come twice, none lost.
    assert set(received) == set(range(30))


async def test_start_up_skips_an_address_that_does_not_answer(
    rabbit_cluster: RabbitCluster, cluster_vhost: str
) -> None:
    third = rabbit_cluster.nodes[2]
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/{cluster_vhost}"
    async with RabbitTransport(f"{dead},{rabbit_cluster.urls(cluster_vhost, (2,))}") as transport:
        assert transport.address == redact_url(third.vhost_url(cluster_vhost))
