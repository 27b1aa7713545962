"""``python -m bench.participant``: the participant SDK's own CPU per command, without I/O.

The example inventory service handles ``--commands`` fresh ``reserve_inventory`` commands
through :meth:`Participant.on_command`, the path a delivery takes in the daemon (decode,
claim, handler, outcome, reply, metrics, logging), with the in-memory idempotency store and a
transport that only counts what it is given. What it prints is the CPU the SDK's Python costs
per command, apart from the broker client, the database client and the event loop's waits:
set it beside a service's CPU per command in ``python -m bench`` to see how much of that is
the SDK. ``--profile`` adds the functions that cost the most (cProfile, cumulative).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from contracts.messages import CommandEnvelope, Direction, command_message_id, idempotency_key
from contracts.orders import ReserveInventory
from participants.idempotency import MemoryIdempotency
from participants.metrics import ParticipantMetrics
from plumbing.clock import SystemClock
from plumbing.logs import configure_logging
from plumbing.transport import Delivery, Outgoing

_WARMUP = 200
_STEP = "reserve_inventory"


class _Counting:
    """A transport that takes every reply and counts it."""

    def __init__(self) -> None:
        self.published = 0

    async def publish(self, message: Outgoing) -> None:
        self.published += 1


def _delivery(order: str) -> Delivery:
    now = datetime.now(UTC)
    envelope = CommandEnvelope(
        message_id=command_message_id(order, _STEP, Direction.FORWARD, 1),
        saga_id=order,
        saga_type="order_fulfillment",
        step=_STEP,
        command=ReserveInventory.name(),
        direction=Direction.FORWARD,
        attempt=1,
        idempotency_key=idempotency_key(order, _STEP, Direction.FORWARD),
        payload={
            "order_id": order,
            "simulate": {},
            "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
        },
        reply_to="saga.replies",
        sent_at=now,
        deadline=now + timedelta(seconds=60),
    )
    return Delivery(
        queue="saga.inventory.commands",
        body=envelope.model_dump_json().encode(),
        message_id=envelope.message_id,
    )


async def _run(commands: int, profiler: cProfile.Profile | None) -> float:
    """CPU microseconds per command over ``commands`` commands, after a warm-up."""
    from examples.order_fulfillment.services import inventory

    inventory.idempotency = MemoryIdempotency()
    inventory.metrics = ParticipantMetrics(CollectorRegistry())
    transport, clock = _Counting(), SystemClock()
    run = f"{time.monotonic_ns():x}"  # fresh keys on every run: nothing answers from the store
    deliveries = [_delivery(f"o-{run}-{n}") for n in range(_WARMUP + commands)]
    for delivery in deliveries[:_WARMUP]:
        await inventory.on_command(delivery, transport, clock)  # type: ignore[arg-type]
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    for delivery in deliveries[_WARMUP:]:
        await inventory.on_command(delivery, transport, clock)  # type: ignore[arg-type]
    if profiler is not None:
        profiler.disable()
    spent = time.process_time() - started
    if transport.published != len(deliveries):
        raise RuntimeError(f"{transport.published} replies for {len(deliveries)} commands")
    return spent / commands * 1e6


def main() -> None:
    """Print the SDK's CPU per command for each repeat, their median, and the profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=5000, help="commands per repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the last repeat")
    args = parser.parse_args()
    configure_logging("info")  # as the daemon logs: a handled command is a debug line
    figures = []
    for repeat in range(args.repeat):
        last = repeat == args.repeat - 1
        profiler = cProfile.Profile() if args.profile and last else None
        figures.append(asyncio.run(_run(args.commands, profiler)))
        print(f"repeat {repeat + 1}: {figures[-1]:.1f} µs CPU per command", flush=True)
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
            profiled = figures.pop()  # the profiler's own cost is in it
            print(f"(profiled, not in the median: {profiled:.1f} µs)\n{out.getvalue()}")
    if figures:
        print(f"median: {statistics.median(figures):.1f} µs CPU per command")


if __name__ == "__main__":
    main()
