"""The soak's own RabbitMQ: one private node, or a private cluster of several.

Built on ``tests/support/rabbit_nodes`` (node name, ports, data, cookie of their own; the
machine's shared broker is never touched). With several nodes every process gets all their
addresses (the first one first, so that everyone is connected to the node that is killed
first), every queue is a quorum queue replicated on each node, and the soak kills the nodes in
turn. A node restart in a cluster is where RabbitMQ 3.10 quorum queues may stop forwarding
dead letters for minutes ("Cannot forward any dead-letter messages"): the timers ride on
dead-lettering, so the store sweep must fire them; the report counts the stalls in the logs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from plumbing.errors import ConfigError
from tests.support.rabbit_nodes import RabbitCluster, RabbitNode, RabbitNodes, rabbitmq_scripts

DEAD_LETTER_STALL = "Cannot forward any dead-letter messages"


@dataclass
class Broker:
    """The run's node(s)."""

    group: RabbitNodes
    nodes: tuple[RabbitNode, ...]
    _kills: int = field(default=0)

    @classmethod
    async def start(cls, directory: Path, size: int) -> Broker:
        """Start one node, or form a cluster of ``size`` nodes.

        Raises:
            ConfigError: ``rabbitmq-server`` is not installed.
        """
        scripts = rabbitmq_scripts()
        if scripts is None:
            raise ConfigError("rabbitmq-server is not installed (set SAGA_TEST_RABBITMQ_BIN)")
        group = RabbitNodes(directory, scripts)
        try:
            if size == 1:
                node = group.node()
                await asyncio.to_thread(node.start)
                return cls(group, (node,))
            cluster = await asyncio.to_thread(RabbitCluster.form, group, size)
        except BaseException:
            group.close()
            raise
        return cls(group, cluster.nodes)

    @property
    def urls(self) -> str:
        """``SAGA_AMQP_URL``: every node's address, by commas."""
        return ",".join(node.url for node in self.nodes)

    def url(self) -> str:
        """A node's address for a plain client connection: a running one's if any (while a
        single node is down, its own: the connection attempt fails and is counted)."""
        for node in self.nodes:
            if node.running:
                return node.url
        return self.nodes[0].url

    def running(self) -> RabbitNode:
        """A node whose processes run."""
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node of the soak's broker is running")

    async def ctl(self, *arguments: str) -> str:
        """``rabbitmqctl`` on a running node."""
        return await asyncio.to_thread(self.running().ctl, *arguments)

    async def kill_next(self, down: float) -> str:
        """SIGKILL the next node in turn, wait ``down`` seconds, start it again on its data;
        the node's name."""
        node = self.nodes[self._kills % len(self.nodes)]
        self._kills += 1
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(down)
        await asyncio.to_thread(node.start)
        return node.name

    def stalls(self) -> int:
        """How often the nodes' logs say a quorum queue could not forward dead letters."""
        return sum(
            node.log_file.read_text(errors="replace").count(DEAD_LETTER_STALL)
            for node in self.nodes
            if node.log_file.exists()
        )

    def close(self) -> None:
        """Kill every node."""
        self.group.close()
