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

_LINE_LIMIT = 2**26  # an open-loop requester prints every gap it measured on one line


async def _spawn(*args: str, stdin: bool = False) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.ceiling",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        limit=_LINE_LIMIT,
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
    args = ["--sagas", str(options.sagas), "--in-flight", str(options.in_flight)]
    args += ["--warmup", str(options.warmup), *(["--timer"] if timer else [])]
    result, meter, elapsed, idle_rate = await _run(ctx, args, within=max(600.0, options.sagas))
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


async def ceiling_latency(ctx: Context, rate: float) -> dict[str, Any]:
    """The ceiling with a timer per request, open loop at ``rate`` sagas/s: reply -> next
    request gaps (ms), as the requester collected them."""
    seconds = ctx.options.latency_seconds
    args = ["--sagas", "0", "--in-flight", str(ctx.options.in_flight), "--timer"]
    args += ["--warmup", str(ctx.options.warmup), "--rate", str(rate), "--seconds", str(seconds)]
    result, _, _, _ = await _run(ctx, args, within=seconds + 300)
    return {
        "target_rate": rate,
        "achieved_rate": int(result["sagas"]) / seconds,
        "sagas": int(result["sagas"]),
        "gaps_ms": [float(gap) for gap in result["gaps_ms"]],
    }


async def _run(
    ctx: Context, requester_args: list[str], within: float
) -> tuple[dict[str, Any], procstat.CpuMeter, float, float]:
    """Four responders and a requester in a fresh vhost: the requester's JSON result, the CPU
    meter of the measured run, its wall seconds and the broker's idle CPU rate."""
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
            requester = await _spawn("requester", "--url", url, *requester_args, stdin=True)
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
            result: dict[str, Any] = json.loads(await _line(requester, within))
            meter.sample(groups)
            elapsed = time.perf_counter() - started
        finally:
            for process in [*responders, *([requester] if requester else [])]:
                if process.returncode is None:
                    process.kill()
                await process.wait()
    return result, meter, elapsed, idle_rate
