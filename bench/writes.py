"""``python -m bench.writes``: the transport's batched writes against one send per frame.

A responder process consumes requests through :class:`~plumbing.rabbitmq.RabbitTransport`
and publishes a reply to each (confirmed, then the request acked), as a participant does
without its handler and store. A driver keeps ``--in-flight`` requests outstanding over raw
aio-pika. Each pair of runs has the responder once with the transport as shipped (frames of
one loop turn in one send, acks held up to 20 ms for company) and once with aiormq's own
writer (one send per frame); pairs are interleaved so that the machine's drift falls on both.
Printed per run: the responder's CPU and write system calls per message, the broker's CPU
per message (``beam.smp``, shared: whatever else uses it counts too) and messages per second;
then the medians of each variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq.connection

from bench import procstat
from bench.context import DEFAULT_AMQP_URL, ROOT

_QUORUM = {"x-queue-type": "quorum"}


async def responder(url: str, requests: str, replies: str, count: int, plain: bool) -> None:
    """Print ``ready`` once consuming, answer ``count`` requests, then return."""
    from plumbing import rabbitmq
    from plumbing.transport import Delivery, Disposition, MessageKind, Outgoing

    if plain:  # aiormq's own TCP transport: one send per frame
        one_send_per_frame = aiormq.connection.TCPTransportFactory
        rabbitmq.CoalescingTransportFactory = one_send_per_frame  # type: ignore[misc,assignment]
    handled = 0
    done = asyncio.Event()
    async with rabbitmq.RabbitTransport(url, prefetch=32) as transport:

        async def answer(delivery: Delivery) -> Disposition:
            nonlocal handled
            reply = Outgoing(
                message_id=f"reply-{delivery.message_id}",
                kind=MessageKind.REPLY,
                exchange="",
                routing_key=replies,
                body='{"ok": true}',
                headers={},
                correlation_id=delivery.correlation_id,
                mandatory=True,
                deliver_at=None,
                created_at=datetime.now(UTC),
            )
            await transport.publish(reply)
            handled += 1
            if handled >= count:
                done.set()
            return Disposition.ACK

        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            consumer = tasks.create_task(transport.consume(requests, answer, ready=ready))
            await ready.wait()
            print("ready", flush=True)
            await done.wait()
            consumer.cancel()


async def _spawn_responder(
    url: str, requests: str, replies: str, total: int, plain: bool
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.writes",
        "--responder",
        requests,
        replies,
        str(total),
        *(["--plain"] if plain else []),
        "--url",
        url,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def run_pair_member(url: str, messages: int, in_flight: int, plain: bool) -> dict[str, Any]:
    """One run: a responder process, the driver here; figures for the measured messages."""
    tag = uuid.uuid4().hex[:8]
    requests, replies = f"bench.writes.requests.{tag}", f"bench.writes.replies.{tag}"
    warmup = 300
    total = warmup + messages
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(requests, durable=True, arguments=_QUORUM)
        inbox = await channel.declare_queue(replies, durable=True, arguments=_QUORUM)
        process = await _spawn_responder(url, requests, replies, total, plain)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(60):
                await process.stdout.readline()  # "ready"
            broker = procstat.broker_pid()
            groups = {"responder": [process.pid], "broker": [broker] if broker else []}
            sent = received = 0
            meter: procstat.CpuMeter | None = None
            started = 0.0
            finished = asyncio.Event()

            async def send() -> None:
                nonlocal sent
                sent += 1
                body = aio_pika.Message(
                    b"{}",
                    headers={"saga-message-id": f"{tag}-{sent}"},
                    correlation_id=tag,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(body, routing_key=requests)

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal received, meter, started
                await message.ack()
                received += 1
                if received == warmup:
                    meter = procstat.CpuMeter.start(groups)
                    started = asyncio.get_running_loop().time()
                if sent < total:
                    await send()
                if received >= total:
                    finished.set()

            for _ in range(min(in_flight, total)):
                await send()
            consumer_tag = await inbox.consume(on_reply)
            async with asyncio.timeout(600):
                await finished.wait()
            await inbox.cancel(consumer_tag)
            elapsed = asyncio.get_running_loop().time() - started
            assert meter is not None
            meter.sample(groups)
        finally:
            async with asyncio.timeout(60):
                await process.wait()
            await channel.queue_delete(requests)
            await channel.queue_delete(replies)
    return _figures(meter, messages, elapsed, plain)


def _figures(
    meter: procstat.CpuMeter, messages: int, elapsed: float, plain: bool
) -> dict[str, Any]:
    cpu, writes = meter.seconds(), meter.write_calls()
    return {
        "variant": "one send per frame" if plain else "batched (shipped)",
        "responder_cpu_us": 1e6 * cpu["responder"] / messages,
        "responder_writes": writes["responder"] / messages,
        "broker_cpu_us": 1e6 * cpu.get("broker", 0.0) / messages,
        "messages_per_s": messages / elapsed,
    }


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in procstat.load_average())


def _row(run: dict[str, Any]) -> str:
    return (
        f"{run['variant']:<20} {run['responder_cpu_us']:>10.0f} {run['responder_writes']:>8.2f} "
        f"{run['broker_cpu_us']:>10.0f} {run['messages_per_s']:>9.0f}"
    )


async def compare(url: str, pairs: int, messages: int, in_flight: int) -> list[dict[str, Any]]:
    """``pairs`` interleaved pairs of runs; prints each and the medians."""
    print(f"load average at start {_load()}")
    print(f"{'variant':<20} {'resp us':>10} {'writes':>8} {'broker us':>10} {'msg/s':>9}")
    runs: list[dict[str, Any]] = []
    for index in range(pairs):
        order = (False, True) if index % 2 == 0 else (True, False)
        for plain in order:
            run = await run_pair_member(url, messages, in_flight, plain)
            runs.append(run)
            print(_row(run), flush=True)
    print(f"load average at end {_load()}")
    print("medians (per message)")
    for variant in ("batched (shipped)", "one send per frame"):
        mine = [run for run in runs if run["variant"] == variant]
        median = {
            key: statistics.median(run[key] for run in mine)
            for key in ("responder_cpu_us", "responder_writes", "broker_cpu_us", "messages_per_s")
        }
        print(_row({"variant": variant, **median}))
    return runs


def main() -> None:
    """Parse the arguments and run the comparison (or, with ``--responder``, one responder)."""
    parser = argparse.ArgumentParser(prog="python -m bench.writes", description=__doc__)
    parser.add_argument("--pairs", type=int, default=6, help="interleaved pairs of runs (6)")
    parser.add_argument("--messages", type=int, default=4000, help="measured per run (4000)")
    parser.add_argument("--in-flight", type=int, default=32, help="requests outstanding (32)")
    parser.add_argument("--url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--json", help="write the runs to this file")
    parser.add_argument("--responder", nargs=3, metavar=("REQUESTS", "REPLIES", "COUNT"))
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    import uvloop

    if options.responder:
        requests, replies, count = options.responder
        uvloop.run(responder(options.url, requests, replies, int(count), options.plain))
        return
    runs = uvloop.run(compare(options.url, options.pairs, options.messages, options.in_flight))
    if options.json:
        with open(options.json, "w") as out:
            json.dump(runs, out, indent=2)


if __name__ == "__main__":
    main()
