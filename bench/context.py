"""What every measurement of one invocation shares: options, servers, where results go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.infra import Servers

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: daemons run from here so that ``python -m bench.probe`` resolves."""

DEFAULT_AMQP_URL = os.environ.get("SAGA_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
"""The broker the benchmarks use unless told otherwise (``SAGA_BENCH_AMQP_URL``)."""


@dataclass(frozen=True)
class Options:
    """The command-line options of one invocation."""

    sagas: int
    in_flight: int
    repeat: int
    warmup: int
    baseline: float
    settle: float
    rows: tuple[str, ...]
    timer_sagas: int
    timer_timeout: int
    latency_seconds: float
    rss_counts: tuple[int, ...]
    rss_stores: tuple[str, ...]
    profile: bool
    profile_seconds: float
    quick: bool


@dataclass(frozen=True)
class Context:
    """Options, servers and the run's directories."""

    options: Options
    servers: Servers
    workdir: Path
    """Logs and per-process files of this invocation."""
    broker_pid: int | None

    def base_env(self) -> dict[str, str]:
        """The harness's environment without any ``SAGA_*`` variable: daemons get defaults."""
        return {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
