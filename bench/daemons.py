"""The project's daemons as separate processes, launched the way ``saga`` users launch them.

Each process is ``python -m bench.probe orchestrator|participant --app TARGET``, which is
``python -m orchestrator.cli ...`` with its publishes counted (:mod:`bench.probe`), with the
``SAGA_*`` environment of the run, its own HTTP port for ``/readyz`` and ``/metrics``, and its
log in a file. Readiness is ``/readyz`` answering 200, as in :mod:`orchestrator.processes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from bench import procstat
from bench.context import ROOT

APP = "examples.order_fulfillment:app"
SERVICES = ("inventory", "payment", "shipping", "notification")
STOP_WITHIN = 30.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_get(port: int, path: str, within: float = 5.0) -> tuple[int, str] | None:
    """Status and body of ``GET path`` on localhost, or ``None`` if nothing answers."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            raw = await reader.read()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(maxsplit=2)
    if len(parts) < 2:
        return None
    return int(parts[1]), body.decode("utf-8", errors="replace")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus samples as ``{'name{label="v",...}': value}`` (labels sorted)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def metric_sum(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in wanted):
            total += value
    return total


@dataclass
class SagaDaemon:
    """One ``saga`` process of a run."""

    name: str
    command: str
    """``orchestrator`` or ``participant``."""
    target: str
    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    _log: IO[bytes] | None = None

    @property
    def probe_file(self) -> Path:
        """Where :mod:`bench.probe` writes this process's publish counts."""
        return self.workdir / f"{self.name}.publishes.json"

    @property
    def log_file(self) -> Path:
        """Where this process's log goes."""
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        """The process id (the Python interpreter running the daemon)."""
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    async def start(self) -> None:
        """Start the process."""
        env = {
            **self.env,
            "SAGA_HTTP_HOST": "127.0.0.1",
            "SAGA_HTTP_PORT": str(self.port),
            "BENCH_PROBE_FILE": str(self.probe_file),
        }
        self._log = self.log_file.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.probe",
            self.command,
            "--app",
            self.target,
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    async def wait_ready(self, within: float = 60.0) -> None:
        """Wait until ``/readyz`` answers 200; fail if the process exits first."""
        async with asyncio.timeout(within):
            while True:
                answer = await http_get(self.port, "/readyz", within=2.0)
                if answer is not None and answer[0] == 200:
                    return
                if self.process is not None and self.process.returncode is not None:
                    tail = self.log_file.read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"{self.name} exited with status {self.process.returncode}: {tail}"
                    )
                await asyncio.sleep(0.1)

    async def metrics(self) -> dict[str, float]:
        """The process's ``/metrics`` samples (empty if it does not answer)."""
        answer = await http_get(self.port, "/metrics")
        if answer is None or answer[0] != 200:
            return {}
        return parse_metrics(answer[1])

    def publishes(self) -> dict[str, int]:
        """Publishes so far by exchange name, as the probe last wrote them."""
        try:
            counts: dict[str, int] = json.loads(self.probe_file.read_text())
        except (OSError, ValueError):
            return {}
        return counts

    def rss(self) -> dict[str, int]:
        """``VmRSS`` and ``VmHWM`` in KiB."""
        return procstat.rss_kib(self.pid)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not stopped within 30 s."""
        process = self.process
        try:
            if process is None or process.returncode is not None:
                return None if process is None else process.returncode
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_WITHIN):
                    return await process.wait()
            except TimeoutError:
                process.kill()
                return await process.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


@dataclass
class SagaCluster:
    """The orchestrator replicas and the four example services of one run."""

    env: dict[str, str]
    workdir: Path
    replicas: int = 1
    daemons: list[SagaDaemon] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for n in range(self.replicas):
            name = "orchestrator" if n == 0 else f"orchestrator-{n + 1}"
            self.daemons.append(SagaDaemon(name, "orchestrator", APP, self.env, self.workdir))
        for service in SERVICES:
            target = f"examples.order_fulfillment:{service}"
            self.daemons.append(SagaDaemon(service, "participant", target, self.env, self.workdir))

    @property
    def orchestrators(self) -> list[SagaDaemon]:
        """The orchestrator replicas."""
        return [d for d in self.daemons if d.command == "orchestrator"]

    @property
    def participants(self) -> list[SagaDaemon]:
        """The participant services."""
        return [d for d in self.daemons if d.command == "participant"]

    async def start(self) -> None:
        """Start the orchestrators first (they declare the topology), then the services."""
        for daemon in self.orchestrators:
            await daemon.start()
        for daemon in self.orchestrators:
            await daemon.wait_ready()
        for daemon in self.participants:
            await daemon.start()
        for daemon in self.participants:
            await daemon.wait_ready()

    async def stop(self) -> dict[str, int | None]:
        """Stop every process gracefully; exit statuses by name."""
        codes = await asyncio.gather(*(d.stop() for d in self.daemons))
        return {d.name: code for d, code in zip(self.daemons, codes, strict=True)}

    def pids(self) -> dict[str, list[int]]:
        """Process ids by daemon name."""
        return {d.name: [d.pid] for d in self.daemons if d.process is not None}

    async def metrics(self) -> dict[str, dict[str, float]]:
        """Every daemon's metrics by name."""
        scraped = await asyncio.gather(*(d.metrics() for d in self.daemons))
        return {d.name: samples for d, samples in zip(self.daemons, scraped, strict=True)}

    def publishes(self) -> dict[str, dict[str, int]]:
        """Every daemon's publish counts by name."""
        return {d.name: d.publishes() for d in self.daemons}
