"""The ceiling: what bare aio-pika request/reply does on this broker, with no saga around it.

A requester and four responder processes. A "saga" is four sequential request/reply round
trips, one to each responder, with what the project's transport does on the wire: persistent
messages, publisher confirms on every publish (``mandatory`` set), quorum queues with the
project's work-queue arguments, manual acks after the reply is published, a prefetch of 32 and
one handler task per delivery. The requester is driven by replies like the orchestrator: a
reply's handler publishes the next request, then acks. With ``--timer``, each request is
followed by one confirmed publish into a TTL quorum queue (what a step timeout costs the
project's hot path, minus the delay ladder's later hops).

With ``--rate``, the requester runs open loop instead (sagas start at Poisson arrivals for
``--seconds``) and measures reply -> next request: each request carries the send time of the
reply that caused it, the responder that receives it reports the gap in its own reply. That is
the floor of the project's reply -> next command latency on this machine: one broker hop to the
requester, its handler, one hop to the next consumer, with no store in between.

Run by the harness as ``python -m bench.ceiling responder|requester ...``; the requester
prints its result as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from plumbing.daemons import event_loop_factory

REQUESTS_EXCHANGE = "bench.requests"
REPLIES_QUEUE = "bench.replies"
TIMER_QUEUE = "bench.timers"
EXPIRED_QUEUE = "bench.expired"
DEAD_LETTER_EXCHANGE = "bench.dead-letter"
STEPS = 4
PREFETCH = 32
TIMER_TTL_MS = 120_000

WORK_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 20,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
"""The arguments the project gives its work queues (quorum, delivery limit, parking)."""


def responder_queue(index: int) -> str:
    """The request queue of responder ``index``."""
    return f"bench.service.{index}"


async def declare(channel: AbstractChannel) -> None:
    """Declare the exchanges and quorum queues of the ceiling run; idempotent."""
    requests = await channel.declare_exchange(REQUESTS_EXCHANGE, "direct", durable=True)
    await channel.declare_exchange(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
    for index in range(STEPS):
        queue = await channel.declare_queue(
            responder_queue(index), durable=True, arguments=WORK_QUEUE_ARGUMENTS
        )
        await queue.bind(requests, routing_key=responder_queue(index))
    await channel.declare_queue(REPLIES_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
    await channel.declare_queue(EXPIRED_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.declare_queue(
        TIMER_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": TIMER_TTL_MS,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": EXPIRED_QUEUE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def _message(body: bytes, correlation_id: str, reply_to: str | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )


async def respond(url: str, index: int) -> None:
    """Answer every request on responder ``index``'s queue until killed."""
    connection = await aio_pika.connect_robust(url)
    publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
    consumer = await connection.channel()
    await consumer.set_qos(prefetch_count=PREFETCH)
    queue = await consumer.declare_queue(responder_queue(index), passive=True)
    default = publisher.default_exchange
    tasks: set[asyncio.Task[None]] = set()

    async def handle(message: AbstractIncomingMessage) -> None:
        request = json.loads(message.body)
        caused_by = request.pop("reply_sent_at", None)
        answer = {**request, "status": "completed", "by": index}
        if caused_by is not None:
            answer["gap_ms"] = (time.time() - caused_by) * 1000
        answer["sent_at"] = time.time()  # just before publishing, as a participant stamps it
        reply = json.dumps(answer).encode()
        await default.publish(
            _message(reply, message.correlation_id or ""), message.reply_to or REPLIES_QUEUE
        )
        await message.ack()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(handle(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await queue.consume(on_message)
    print("ready", flush=True)
    await asyncio.Event().wait()


class Requester:
    """Runs sagas of four round trips, ``in_flight`` at a time, driven by the replies."""

    def __init__(self, requests: AbstractExchange, default: AbstractExchange, timer: bool) -> None:
        self.requests = requests
        self.default = default
        self.timer = timer
        self.publishes = 0
        self.remaining = 0
        self.running = 0
        self.done = asyncio.Event()
        self.counter = 0
        self.open_loop = False
        self.gaps_ms: list[float] = []

    async def send(self, saga: str, step: int, reply_sent_at: float | None = None) -> None:
        """Publish the request of ``step`` (and its timer), each with a confirm."""
        request: dict[str, Any] = {"saga": saga, "step": step}
        if reply_sent_at is not None:
            request["reply_sent_at"] = reply_sent_at
        body = json.dumps(request).encode()
        await self.requests.publish(
            _message(body, f"{saga}:{step}", REPLIES_QUEUE), responder_queue(step)
        )
        self.publishes += 1
        if self.timer:
            await self.default.publish(_message(body, f"{saga}:{step}:timer"), TIMER_QUEUE)
            self.publishes += 1

    async def begin(self) -> None:
        """Start the next saga if any is left."""
        if self.remaining <= 0:
            return
        self.remaining -= 1
        self.running += 1
        self.counter += 1
        await self.send(f"s{self.counter}", 0)

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        """Publish the next request (or start a new saga), then ack."""
        reply = json.loads(message.body)
        if "gap_ms" in reply:
            self.gaps_ms.append(float(reply["gap_ms"]))
        step = int(reply["step"]) + 1
        if step < STEPS:
            await self.send(str(reply["saga"]), step, reply.get("sent_at"))
        else:
            self.running -= 1
            if not self.open_loop:
                await self.begin()
            if self.running == 0 and self.remaining <= 0:
                self.done.set()
        await message.ack()

    async def run(self, count: int, in_flight: int) -> float:
        """Run ``count`` sagas; return the seconds they took."""
        self.remaining = count
        self.done.clear()
        started = time.perf_counter()
        await asyncio.gather(*(self.begin() for _ in range(min(in_flight, count))))
        await self.done.wait()
        return time.perf_counter() - started

    async def run_open(self, rate: float, seconds: float) -> int:
        """Start sagas at Poisson arrivals of ``rate`` a second for ``seconds``; wait for the
        last to end; return how many started."""
        self.open_loop = True
        self.done.clear()
        self.remaining = sys.maxsize  # no end while sagas start: none can set done too early
        first = self.counter
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        starts: set[asyncio.Task[None]] = set()
        next_at = loop.time()
        while (next_at := next_at + random.expovariate(rate)) < end:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            task = asyncio.create_task(self.begin())
            starts.add(task)
            task.add_done_callback(starts.discard)
        if starts:
            await asyncio.wait(set(starts))
        self.remaining = 0
        if self.running:
            await self.done.wait()
        return self.counter - first


async def request(  # noqa: PLR0917  # the command line's arguments, one by one
    url: str,
    count: int,
    in_flight: int,
    warmup: int,
    timer: bool,
    rate: float | None = None,
    seconds: float = 30.0,
) -> None:
    """Run the ceiling and print ``{"sagas", "seconds", "publishes"}`` as JSON; open loop at
    ``rate`` sagas/s for ``seconds`` when a rate is given (``"gaps_ms"`` added)."""
    connection = await aio_pika.connect_robust(url)
    publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
    requests = await publisher.get_exchange(REQUESTS_EXCHANGE, ensure=True)
    requester = Requester(requests, publisher.default_exchange, timer)
    consumer = await connection.channel()
    await consumer.set_qos(prefetch_count=PREFETCH)
    replies = await consumer.declare_queue(REPLIES_QUEUE, passive=True)
    tasks: set[asyncio.Task[None]] = set()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(requester.on_reply(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await replies.consume(on_message)
    if warmup:
        await requester.run(warmup, in_flight)
    requester.publishes = 0
    print("warm", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    result: dict[str, Any]
    if rate is None:
        took = await requester.run(count, in_flight)
        result = {"sagas": count, "seconds": took, "publishes": requester.publishes}
    else:
        requester.gaps_ms.clear()
        started = await requester.run_open(rate, seconds)
        result = {"sagas": started, "seconds": seconds, "publishes": requester.publishes}
        result["gaps_ms"] = requester.gaps_ms
    print(json.dumps(result), flush=True)
    # The last replies' handlers may still be acking: let them end before the channel does.
    if tasks:
        await asyncio.wait(set(tasks), timeout=10)
    await connection.close()


async def setup(url: str) -> None:
    """Declare the ceiling's topology."""
    connection = await aio_pika.connect(url)
    async with connection:
        await declare(await connection.channel())


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.ceiling setup|responder|requester``."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    sub = parser.add_subparsers(dest="role", required=True)
    setup_parser = sub.add_parser("setup")
    setup_parser.add_argument("--url", required=True)
    responder = sub.add_parser("responder")
    responder.add_argument("--url", required=True)
    responder.add_argument("--index", type=int, required=True)
    requester = sub.add_parser("requester")
    requester.add_argument("--url", required=True)
    requester.add_argument("--sagas", type=int, required=True)
    requester.add_argument("--in-flight", type=int, required=True)
    requester.add_argument("--warmup", type=int, default=0)
    requester.add_argument("--timer", action="store_true")
    requester.add_argument("--rate", type=float, help="open loop: sagas started a second")
    requester.add_argument("--seconds", type=float, default=30.0, help="open loop: how long")
    args = parser.parse_args(argv)
    # The same event loop as the daemons (uvloop when installed): the ceiling is what aio-pika
    # can do on it, so the ratio measures the project, not the loop.
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        if args.role == "setup":
            runner.run(setup(args.url))
        elif args.role == "responder":
            runner.run(respond(args.url, args.index))
        else:
            runner.run(
                request(
                    args.url,
                    args.sagas,
                    args.in_flight,
                    args.warmup,
                    args.timer,
                    args.rate,
                    args.seconds,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
