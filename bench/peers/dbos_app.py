"""The order saga as a DBOS durable workflow on PostgreSQL: a peer for comparison.

One process holds the workflow and its four steps (DBOS is a library, not a broker-based
system): reserve, pay, ship, confirm, each a ``@DBOS.step``; a declined payment runs the
release step and the workflow ends as failed. DBOS runs with its defaults on the system
database named by ``BENCH_DBOS_URL``. ``--mode sync`` runs ``--in-flight`` threads calling the
synchronous workflow; ``--mode async`` runs as many asyncio tasks awaiting the async one.

Driver protocol as :mod:`bench.peers.metered` expects: ``warm``, a line on stdin, a JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dbos import DBOS, DBOSConfig


class PaymentDeclined(Exception):
    """The card was declined (a business failure)."""


def order(n: int) -> dict[str, Any]:
    """The order data of saga ``n`` (every tenth declined)."""
    return {
        "order_id": f"d{n:07d}",
        "amount": "19.99",
        "simulate": {"process_payment": "fail"} if n % 10 == 9 else {},
    }


@DBOS.step()
def reserve(data: dict[str, Any]) -> str:
    """Hold stock."""
    return f"res-{data['order_id']}"


@DBOS.step()
def pay(data: dict[str, Any]) -> str:
    """Charge, or refuse when the order says so."""
    if data["simulate"].get("process_payment") == "fail":
        raise PaymentDeclined(data["order_id"])
    return f"pay-{data['order_id']}"


@DBOS.step()
def ship(data: dict[str, Any]) -> str:
    """Book the shipment."""
    return f"shp-{data['order_id']}"


@DBOS.step()
def confirm(data: dict[str, Any]) -> str:
    """Send the confirmation."""
    return f"ntf-{data['order_id']}"


@DBOS.step()
def release(data: dict[str, Any]) -> str:
    """Give the stock back."""
    return f"rel-{data['order_id']}"


@DBOS.workflow()
def saga_sync(data: dict[str, Any]) -> str:
    """The order saga, synchronous."""
    reserve(data)
    try:
        pay(data)
    except PaymentDeclined:
        release(data)
        return "failed"
    ship(data)
    confirm(data)
    return "completed"


@DBOS.step()
async def reserve_async(data: dict[str, Any]) -> str:
    """Hold stock."""
    return f"res-{data['order_id']}"


@DBOS.step()
async def pay_async(data: dict[str, Any]) -> str:
    """Charge, or refuse when the order says so."""
    if data["simulate"].get("process_payment") == "fail":
        raise PaymentDeclined(data["order_id"])
    return f"pay-{data['order_id']}"


@DBOS.step()
async def ship_async(data: dict[str, Any]) -> str:
    """Book the shipment."""
    return f"shp-{data['order_id']}"


@DBOS.step()
async def confirm_async(data: dict[str, Any]) -> str:
    """Send the confirmation."""
    return f"ntf-{data['order_id']}"


@DBOS.step()
async def release_async(data: dict[str, Any]) -> str:
    """Give the stock back."""
    return f"rel-{data['order_id']}"


@DBOS.workflow()
async def saga_async(data: dict[str, Any]) -> str:
    """The order saga, asynchronous."""
    await reserve_async(data)
    try:
        await pay_async(data)
    except PaymentDeclined:
        await release_async(data)
        return "failed"
    await ship_async(data)
    await confirm_async(data)
    return "completed"


class Counter:
    """Hands out saga numbers and counts ends, thread-safely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next = 0
        self.ended: dict[str, int] = {}

    def take(self, limit: int) -> int | None:
        """The next saga number below ``limit``, or ``None``."""
        with self.lock:
            if self.next >= limit:
                return None
            self.next += 1
            return self.next - 1

    def end(self, status: str) -> None:
        """Count one end."""
        with self.lock:
            self.ended[status] = self.ended.get(status, 0) + 1


def run_sync(counter: Counter, limit: int, in_flight: int) -> float:
    """``in_flight`` threads run workflows until ``limit`` have been taken."""

    def worker() -> None:
        while (n := counter.take(limit)) is not None:
            counter.end(saga_sync(order(n)))

    started = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        for _ in range(in_flight):
            pool.submit(worker)
    return time.perf_counter() - started


async def run_async(counter: Counter, limit: int, in_flight: int) -> float:
    """``in_flight`` tasks run workflows until ``limit`` have been taken."""

    async def worker() -> None:
        while (n := counter.take(limit)) is not None:
            counter.end(await saga_async(order(n)))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - started


async def measure_async(counter: Counter, warmup: int, sagas: int, in_flight: int) -> float:
    """Warm up, hand-shake, run: all on one event loop."""
    await run_async(counter, warmup, in_flight)
    counter.ended.clear()
    print("warm", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return await run_async(counter, warmup + sagas, in_flight)


def main(argv: list[str] | None = None) -> int:
    """The driver."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.dbos_app")
    parser.add_argument("--mode", choices=("sync", "async"), required=True)
    parser.add_argument("--sagas", type=int, required=True)
    parser.add_argument("--in-flight", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args(argv)
    config: DBOSConfig = {"name": "saga-bench", "system_database_url": os.environ["BENCH_DBOS_URL"]}
    DBOS(config=config)
    DBOS.launch()
    counter = Counter()
    if args.mode == "sync":
        run_sync(counter, args.warmup, args.in_flight)
        counter.ended.clear()
        print("warm", flush=True)
        sys.stdin.readline()
        seconds = run_sync(counter, args.warmup + args.sagas, args.in_flight)
    else:
        seconds = asyncio.run(measure_async(counter, args.warmup, args.sagas, args.in_flight))
    result = {"sagas": sum(counter.ended.values()), "seconds": seconds, "ended": counter.ended}
    print(json.dumps(result), flush=True)
    DBOS.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
