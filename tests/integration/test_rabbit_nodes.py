"""The private RabbitMQ nodes fault tests use (``tests/support/rabbit_nodes``): their data
survives a graceful restart and a SIGKILL, they run no plugin and listen on their own ports
only, and nothing of them is left running after a kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import aio_pika
import pytest

from tests.support.rabbit_nodes import RabbitNode

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(900)]


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in command and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def publish(url: str, queue: str, body: bytes) -> None:
    """Publish with a confirm, retrying a nack: a quorum queue that has just been restarted
    refuses publishes until it has elected its leader again (as a publisher's outbox would)."""
    connection = await aio_pika.connect(url)
    async with connection, asyncio.timeout(120):
        while True:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            try:
                await channel.default_exchange.publish(message, routing_key=queue)
                return
            except aio_pika.exceptions.DeliveryError:
                await channel.close()  # its queue client keeps the failure: start afresh
                await asyncio.sleep(0.5)


async def take_all(url: str, queue: str) -> list[bytes]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        bodies = []
        while (message := await source.get(fail=False)) is not None:
            bodies.append(message.body)
            await message.ack()
        return bodies


async def test_a_private_node_keeps_its_data_through_a_kill_and_a_graceful_restart(
    private_rabbit: RabbitNode,
) -> None:
    node = private_rabbit
    status = json.loads(node.ctl("status", "--formatter", "json"))
    assert status["active_plugins"] == []  # so no management or Prometheus listener
    assert sorted((item["protocol"], item["port"]) for item in status["listeners"]) == sorted(
        [("amqp", node.amqp_port), ("clustering", node.dist_port)]
    )

    # The graceful restart comes first: RabbitMQ 3.10 writes a new quorum queue's Ra
    # registration to disk lazily, and a node killed within seconds of declaring one brings
    # the queue back empty and leaderless for good (seen here: term 0, log index 0). A
    # cluster heals that from the other replicas; a single node cannot.
    await publish(node.url, "kept", b"before the graceful restart")
    await asyncio.to_thread(node.restart, hard=False)
    await publish(node.url, "kept", b"before the kill")

    await asyncio.to_thread(node.kill)
    assert not listening(node.amqp_port)
    assert processes_naming(node.name) == []  # nothing of it left running
    await asyncio.to_thread(node.start)
    assert await take_all(node.url, "kept") == [b"before the graceful restart", b"before the kill"]
