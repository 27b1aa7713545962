"""Meter a peer: worker processes plus a driver process with a warm-up handshake.

The driver runs its warm-up (which also waits for the workers to be up), prints ``warm`` and
waits for a line on stdin; the harness then measures the broker's idle rate, starts the CPU
meter and says go. The driver prints ``{"sagas", "seconds", "ended"}`` as JSON at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import procstat
from bench.context import ROOT, Context
from bench.infra import PgStats

STEPS_COMPLETED = 4
STEPS_DECLINED = 3


async def _line(process: asyncio.subprocess.Process, within: float) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(within):
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                raise RuntimeError(f"driver exited with status {await process.wait()}")
            if line.strip():
                return line.strip()


@dataclass
class Peer:
    """The processes of one peer run and their logs."""

    logdir: Path
    env: dict[str, str]
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)

    def log(self, name: str) -> IO[bytes]:
        """A log file for process ``name``."""
        handle = (self.logdir / f"{name}.log").open("ab")
        self.logs.append(handle)
        return handle

    async def spawn(self, name: str, command: list[str], *, driver: bool = False) -> None:
        """Start a worker (output to its log) or the driver (stdin and stdout piped)."""
        log = self.log(name)
        self.processes[name] = await asyncio.create_subprocess_exec(
            *command,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.PIPE if driver else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if driver else log,
            stderr=log,
        )

    async def stop(self) -> None:
        """SIGTERM every process, SIGKILL after 20 s, close the logs."""
        for running in self.processes.values():
            if running.returncode is None:
                running.terminate()
        for running in self.processes.values():
            try:
                async with asyncio.timeout(20):
                    await running.wait()
            except TimeoutError:
                running.kill()
                await running.wait()
        for log in self.logs:
            log.close()


async def metered_driver_run(
    ctx: Context,
    label: str,
    workers: dict[str, list[str]],
    driver: list[str],
    *,
    env: dict[str, str],
    pg: PgStats | None = None,
) -> dict[str, Any]:
    """Start ``workers``, run ``driver`` through its handshake, meter every process.

    With ``pg``, the backends of its database are metered too and its transactions counted.
    """
    options = ctx.options
    peer = Peer(ctx.workdir / label, env)
    peer.logdir.mkdir(parents=True, exist_ok=True)
    broker = [ctx.broker_pid] if ctx.broker_pid is not None else []
    pg_counts: list[dict[str, int]] = []
    try:
        for name, command in workers.items():
            await peer.spawn(name, command)
        args = ["--sagas", str(options.sagas), "--in-flight", str(options.in_flight)]
        await peer.spawn(
            "driver", [*driver, *args, "--warmup", str(max(options.warmup, 1))], driver=True
        )
        process = peer.processes["driver"]
        await _line(process, 300)
        await asyncio.sleep(options.settle)
        idle_rate = await _idle_broker_rate(broker, options.baseline)
        groups = {name: [p.pid] for name, p in peer.processes.items()}
        groups |= _children(groups) | ({"broker": broker} if broker else {})
        if pg is not None:
            groups["postgres"] = await pg.backend_pids()
            pg_counts.append(await pg.counters())
        meter = procstat.CpuMeter.start(groups)
        started = time.perf_counter()
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        result = json.loads(await _line(process, max(600.0, options.sagas)))
        if pg is not None:
            groups["postgres"] = await pg.backend_pids()
        meter.sample(groups)
        elapsed = time.perf_counter() - started
        if pg is not None:
            await asyncio.sleep(options.settle)
            pg_counts.append(await pg.counters())
    finally:
        await peer.stop()
    figures = _figures(result, _fold_children(meter.seconds()), idle_rate * elapsed)
    figures["idle"] = {"broker_cpu_per_s": idle_rate}
    figures["in_flight"] = options.in_flight
    if pg_counts and figures["steps"]:
        xacts = sum(pg_counts[1][k] - pg_counts[0][k] for k in ("xact_commit", "xact_rollback"))
        figures["xact_per_step"] = xacts / figures["steps"]
    return figures


async def _idle_broker_rate(broker: list[int], seconds: float) -> float:
    meter = procstat.CpuMeter.start({"broker": broker})
    await asyncio.sleep(seconds)
    meter.sample({"broker": broker})
    return meter.seconds().get("broker", 0.0) / seconds


def _figures(result: dict[str, Any], cpu: dict[str, float], idle_broker: float) -> dict[str, Any]:
    sagas = max(int(result["sagas"]), 1)
    cpu_ms = {name: value * 1000 / sagas for name, value in cpu.items()}
    if "broker" in cpu:
        cpu_ms["broker_raw"] = cpu_ms["broker"]
        cpu_ms["broker"] = max(cpu["broker"] - idle_broker, 0.0) * 1000 / sagas
    ended: dict[str, int] = result.get("ended", {})
    steps = ended.get("completed", 0) * STEPS_COMPLETED + ended.get("failed", 0) * STEPS_DECLINED
    seconds = float(result["seconds"])
    return {
        "sagas": sagas,
        "ended": ended,
        "seconds": seconds,
        "sagas_per_s": sagas / seconds,
        "steps": steps,
        "steps_per_s": steps / seconds,
        "cpu_ms_per_saga": cpu_ms,
    }


def _children(groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """Child processes (a worker pool's) metered under ``<parent>+children``."""
    found: dict[str, list[int]] = {}
    for name, pids in groups.items():
        kids = [kid for pid in pids for kid in procstat.children(pid)]
        if kids:
            found[f"{name}+children"] = kids
    return found


def _fold_children(cpu: dict[str, float]) -> dict[str, float]:
    folded: dict[str, float] = {}
    for name, value in cpu.items():
        base = name.removesuffix("+children")
        folded[base] = folded.get(base, 0.0) + value
    with contextlib.suppress(KeyError):
        folded["driver"] = folded.pop("driver")
    return folded
