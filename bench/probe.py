"""Run a ``saga`` daemon with its AMQP publishes counted: ``python -m bench.probe ARGS``.

``ARGS`` are those of ``python -m orchestrator.cli`` (``orchestrator --app ...`` or
``participant --app ...``): the daemon runs unchanged. Before it starts, aio-pika's
``Exchange.publish`` is wrapped to count each publish by exchange name, and a thread writes
the counts as JSON to ``$BENCH_PROBE_FILE`` twice a second (and at exit). Counting costs a
dictionary update per publish; nothing else in the daemon changes.

Without a management plugin the broker keeps no per-exchange publish counters, and the
project's metrics count failed publishes only, so this is how the harness measures publishes
per step (by destination: commands, replies, timers into the delay ladder, lifecycle events).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_COUNTS: dict[str, int] = {}
_INTERVAL = 0.5


def install() -> None:
    """Wrap ``aio_pika.exchange.Exchange.publish`` to count publishes by exchange name."""
    from aio_pika.exchange import Exchange

    original: Callable[..., Awaitable[Any]] = Exchange.publish

    @functools.wraps(original)
    async def counted(self: Exchange, *args: Any, **kwargs: Any) -> Any:
        _COUNTS[self.name] = _COUNTS.get(self.name, 0) + 1
        return await original(self, *args, **kwargs)

    Exchange.publish = counted  # type: ignore[method-assign]


def dump(path: Path) -> None:
    """Write the counts to ``path`` atomically."""
    snapshot = _COUNTS.copy()  # a C-level copy: safe while the event loop thread counts
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(snapshot))
    partial.replace(path)


def _dump_forever(path: Path, stop: threading.Event) -> None:
    while not stop.wait(_INTERVAL):
        dump(path)


def main() -> int:
    """Install the counter, start the dumper and run the ``saga`` command line."""
    from orchestrator.cli import main as saga_main

    install()
    target = os.environ.get("BENCH_PROBE_FILE")
    if target:
        path = Path(target)
        stop = threading.Event()
        threading.Thread(target=_dump_forever, args=(path, stop), daemon=True).start()
        atexit.register(dump, path)
        atexit.register(stop.set)
    return saga_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
