# Celery and kombu ship without type information.
# mypy: disable-error-code="import-untyped,untyped-decorator,no-untyped-call,attr-defined"
"""The order saga as a Celery chain, and the driver that runs it: a peer for comparison.

Four tasks, one queue each (``inventory``, ``payment``, ``shipping``, ``notification``),
chained: reserve -> pay -> ship -> confirm. A declined payment raises, and the error callback
on the payment link releases the stock (a compensation task on the inventory queue). The last
task, or the release, sends ``bench.done`` to a queue that no worker consumes: the driver
reads it to know a saga ended. Celery runs with its defaults (classic durable queues,
persistent messages, no publisher confirms, no result backend); each worker consumes one
queue with ``--pool solo`` (one process, like one participant service).

``BENCH_CELERY_BROKER`` names the broker. Workers: ``celery -A bench.peers.celery_app worker
-Q inventory --pool solo``. Driver: ``python -m bench.peers.celery_app --sagas N --in-flight F
--warmup W`` prints ``warm``, waits for a line on stdin, runs, and prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from celery import Celery, chain
from kombu import Consumer, Queue
from kombu.message import Message

DONE_QUEUE = "bench.done"
SERVICES = ("inventory", "payment", "shipping", "notification")

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://"))
app.conf.task_routes = {
    "bench.reserve": {"queue": "inventory"},
    "bench.release": {"queue": "inventory"},
    "bench.pay": {"queue": "payment"},
    "bench.ship": {"queue": "shipping"},
    "bench.confirm": {"queue": "notification"},
    "bench.done": {"queue": DONE_QUEUE},
}


class PaymentDeclined(Exception):
    """The card was declined (a business failure)."""


@app.task(name="bench.reserve")
def reserve(order: dict[str, Any]) -> dict[str, Any]:
    """Hold stock."""
    return {**order, "reservation_id": f"res-{order['order_id']}"}


@app.task(name="bench.pay")
def pay(order: dict[str, Any]) -> dict[str, Any]:
    """Charge, or refuse when the order says so."""
    if order.get("simulate", {}).get("process_payment") == "fail":
        raise PaymentDeclined(order["order_id"])
    return {**order, "payment_id": f"pay-{order['order_id']}"}


@app.task(name="bench.ship")
def ship(order: dict[str, Any]) -> dict[str, Any]:
    """Book the shipment."""
    return {**order, "shipment_id": f"shp-{order['order_id']}"}


@app.task(name="bench.confirm")
def confirm(order: dict[str, Any]) -> None:
    """Send the confirmation; the saga has completed."""
    done.delay(order["order_id"], "completed")


@app.task(name="bench.release")
def release(order_id: str) -> None:
    """Give the stock back; the saga has failed."""
    done.delay(order_id, "failed")


@app.task(name="bench.done")
def done(order_id: str, status: str) -> None:
    """Never executed: the driver reads these messages itself."""


def order(n: int) -> dict[str, Any]:
    """The order data of saga ``n`` (every tenth declined)."""
    declined = n % 10 == 9
    return {
        "order_id": f"c{n:07d}",
        "customer_id": f"cust-{n % 97}",
        "items": [{"sku": f"SKU-{n % 13}", "quantity": 1 + n % 3, "unit_price": "19.99"}],
        "simulate": {"process_payment": "fail"} if declined else {},
    }


class Runner:
    """Keeps ``in_flight`` chains running until ``count`` have ended."""

    def __init__(self) -> None:
        self.counter = 0
        self.remaining = 0
        self.running = 0
        self.ended: dict[str, int] = {}

    def begin(self) -> None:
        """Start the next chain, if any is left."""
        if self.remaining <= 0:
            return
        self.remaining -= 1
        self.running += 1
        n = self.counter
        self.counter += 1
        data = order(n)
        chain(
            reserve.s(data),
            pay.s().on_error(release.si(data["order_id"])),
            ship.s(),
            confirm.s(),
        ).apply_async()

    def on_done(self, body: Any, message: Message) -> None:
        """A chain ended: count it and start another."""
        args = body[0] if isinstance(body, list) else []
        status = str(args[1]) if len(args) > 1 else "unknown"
        self.ended[status] = self.ended.get(status, 0) + 1
        self.running -= 1
        message.ack()
        self.begin()

    def run(self, connection: Any, count: int, in_flight: int) -> float:
        """Run ``count`` chains; the seconds they took."""
        self.remaining = count
        started = time.perf_counter()
        for _ in range(min(in_flight, count)):
            self.begin()
        while self.running > 0:
            connection.drain_events(timeout=120)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """The driver."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.celery_app")
    parser.add_argument("--sagas", type=int, required=True)
    parser.add_argument("--in-flight", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args(argv)
    runner = Runner()
    queue = Queue(DONE_QUEUE, durable=True)
    with (
        app.connection_for_read() as connection,
        Consumer(connection, queues=[queue], callbacks=[runner.on_done], accept=["json"]),
    ):
        if args.warmup:
            runner.run(connection, args.warmup, args.in_flight)
        runner.ended.clear()
        print("warm", flush=True)
        sys.stdin.readline()
        seconds = runner.run(connection, args.sagas, args.in_flight)
    result = {"sagas": sum(runner.ended.values()), "seconds": seconds, "ended": runner.ended}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
