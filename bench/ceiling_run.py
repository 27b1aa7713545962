"""Run the ceiling (:mod:`bench.ceiling`) as five processes and meter them."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench import procstat
from bench.ceiling import STEPS, setup
from bench.context import ROOT, Context
from bench.infra import fresh_vhost


async def _spawn(*args: str, stdin: bool = False) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.ceiling",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )


async def _line(process: asyncio.subprocess.Process, within: float) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(within):
        line = await process.stdout.readline()
    if not line:
        raise RuntimeError(f"ceiling process {process.pid} exited with {process.returncode}")
    return line.decode().strip()


async def run_ceiling(ctx: Context, timer: bool) -> dict[str, Any]:
    """One ceiling run: four responders, one requester; sagas/s and CPU per saga."""
    options = ctx.options
    async with fresh_vhost(ctx.servers) as url:
        await setup(url)
        responders = [await _spawn("responder", "--url", url, "--index", str(i)) for i in range(4)]
        requester: asyncio.subprocess.Process | None = None
        try:
            for responder in responders:
                await _line(responder, 30)
            broker = [ctx.broker_pid] if ctx.broker_pid is not None else []
            idle_meter = procstat.CpuMeter.start({"broker": broker})
            await asyncio.sleep(options.baseline)
            idle_meter.sample({"broker": broker})
            idle_rate = idle_meter.seconds().get("broker", 0.0) / options.baseline
            args = ["requester", "--url", url, "--sagas", str(options.sagas)]
            args += ["--in-flight", str(options.in_flight), "--warmup", str(options.warmup)]
            requester = await _spawn(*args, *(["--timer"] if timer else []), stdin=True)
            await _line(requester, 300)  # warmed up; waits for the go
            groups = {f"responder-{i}": [p.pid] for i, p in enumerate(responders)}
            groups["requester"] = [requester.pid]
            if broker:
                groups["broker"] = broker
            meter = procstat.CpuMeter.start(groups)
            started = time.perf_counter()
            assert requester.stdin is not None
            requester.stdin.write(b"go\n")
            await requester.stdin.drain()
            result = json.loads(await _line(requester, max(600.0, options.sagas)))
            meter.sample(groups)
            elapsed = time.perf_counter() - started
        finally:
            for process in [*responders, *([requester] if requester else [])]:
                if process.returncode is None:
                    process.kill()
                await process.wait()
    sagas = int(result["sagas"])
    cpu = meter.seconds()
    cpu_ms = {name: value * 1000 / sagas for name, value in cpu.items()}
    if "broker" in cpu:
        cpu_ms["broker_raw"] = cpu_ms["broker"]
        cpu_ms["broker"] = max(cpu["broker"] - idle_rate * elapsed, 0.0) * 1000 / sagas
    seconds = float(result["seconds"])
    return {
        "sagas": sagas,
        "seconds": seconds,
        "sagas_per_s": sagas / seconds,
        "steps": sagas * STEPS,
        "steps_per_s": sagas * STEPS / seconds,
        "cpu_ms_per_saga": cpu_ms,
        "idle": {"broker_cpu_per_s": idle_rate},
        # The requester's requests (and timers) plus one reply per step from the responders.
        "publishes_per_step": (result["publishes"] + sagas * STEPS) / (sagas * STEPS),
        "write_calls_per_step": {
            name: count / (sagas * STEPS) for name, count in meter.write_calls().items()
        },
        "in_flight": options.in_flight,
    }
