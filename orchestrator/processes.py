"""Run the orchestrator daemon and participant services as real processes.

``saga demo`` uses this when ``SAGA_AMQP_URL`` is set, and the end-to-end tests use it to kill
and restart daemons mid-run. Each process gets its own free HTTP port, and :meth:`wait_ready`
polls ``/readyz`` so nothing is sent to a process that is not consuming yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plumbing.errors import ConfigError


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_status(port: int, path: str, wait: float = 2.0) -> int | None:
    """The status of ``GET path`` on localhost, or ``None`` if nothing answers."""
    try:
        async with asyncio.timeout(wait):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readline()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = head.split()
    return int(parts[1]) if len(parts) > 1 else None


async def wait_for_http(port: int, path: str, within: float = 30.0) -> None:
    """Poll ``GET path`` on localhost until it answers 200."""
    async with asyncio.timeout(within):
        while True:
            if await http_status(port, path) == 200:
                return
            await asyncio.sleep(0.1)


@dataclass
class Daemon:
    """One ``saga`` process: its command line, environment and HTTP port."""

    name: str
    args: tuple[str, ...]
    env: dict[str, str]
    port: int
    log: Path | None = None
    """Where the process's output goes (appended across restarts); None: this one's stderr."""
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process."""
        with contextlib.ExitStack() as files:
            output = None if self.log is None else files.enter_context(self.log.open("ab"))
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "orchestrator.cli",
                *self.args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )

    async def wait_ready(self, within: float = 30.0) -> None:
        """Wait until ``/readyz`` answers 200; fail if the process exits first."""
        async with asyncio.timeout(within):
            while await http_status(self.port, "/readyz") != 200:
                if self.process is not None and self.process.returncode is not None:
                    raise ConfigError(f"{self.name} exited with status {self.process.returncode}")
                await asyncio.sleep(0.1)

    async def stop(self, within: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not stopped ``within`` seconds."""
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            return await self.kill()

    async def kill(self) -> int:
        """SIGKILL: the crash the store and outbox must survive."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
        return await self.process.wait()


@dataclass
class SagaProcesses:
    """An orchestrator daemon and participant services sharing one broker and store."""

    app: str
    participants: tuple[str, ...]
    env: Mapping[str, str]
    replicas: int = 1
    """How many orchestrator daemons share the broker and the store."""
    log_dir: Path | None = None
    """Each process writes its output to ``<name>.log`` here; None: to this one's stderr."""
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def __post_init__(self) -> None:
        base = {**os.environ, **self.env}
        targets = [(_replica_name(n), self.app) for n in range(self.replicas)]
        targets += [(spec.rsplit(":", 1)[1], spec) for spec in self.participants]
        for name, target in targets:
            port = free_port()
            command = "orchestrator" if name.startswith("orchestrator") else "participant"
            env = {**base, "SAGA_HTTP_HOST": "127.0.0.1", "SAGA_HTTP_PORT": str(port)}
            log = None if self.log_dir is None else self.log_dir / f"{name}.log"
            self.daemons[name] = Daemon(name, (command, "--app", target), env, port, log)

    async def start(self, within: float = 60.0) -> None:
        """Start every process and wait until all of them consume."""
        for daemon in self.daemons.values():
            await daemon.start()
        for daemon in self.daemons.values():
            await daemon.wait_ready(within)

    async def stop(self) -> dict[str, int | None]:
        """Stop every process gracefully; their exit statuses by name."""
        codes = await asyncio.gather(*(daemon.stop() for daemon in self.daemons.values()))
        return dict(zip(self.daemons, codes, strict=True))

    @property
    def orchestrator(self) -> Daemon:
        """The (first) orchestrator daemon."""
        return self.daemons[_replica_name(0)]


def _replica_name(index: int) -> str:
    return "orchestrator" if index == 0 else f"orchestrator-{index + 1}"
