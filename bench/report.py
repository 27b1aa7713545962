"""Medians across repeats, the printed tables and the method notes."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

CEILING = "ceiling+timer"
"""The row the project is compared with: request/reply plus one TTL-queue publish a request."""

_PROCESS_COLUMNS = (
    ("orch", ("orchestrator", "requester")),
    ("inv", ("inventory", "responder-0")),
    ("pay", ("payment", "responder-1")),
    ("ship", ("shipping", "responder-2")),
    ("ntf", ("notification", "responder-3")),
    ("broker", ("broker",)),
    ("pg", ("postgres",)),
    ("drv", ("driver",)),
)

METHOD = """\
How each figure is measured
  sagas/s     sagas that ended / seconds from the first start to the last end, closed loop with
              --in-flight sagas running (a new one starts as one ends); median of the repeats,
              (min-max) beside it. Ends are the SagaCompleted/SagaFailed events on saga.events.
  steps/s     commands the participants handled (saga_participant_commands_total delta):
              4 per completed saga, 3 per declined one (reserve, refused payment, release).
  x ceil      sagas/s over the median of the ceiling+timer row of the same invocation.
  CPU ms/saga utime+stime from /proc/<pid>/stat over the measured run / sagas. orch sums the
              orchestrator replicas (the requester in ceiling rows); inv..ntf are the services
              (the four responders in ceiling rows). broker: beam.smp minus its idle rate
              measured just before the run (the broker is shared). pg: the backends connected
              to the run's database (pg_stat_activity); the WAL writer and checkpointer are
              not included. drv: this harness (starts and end events).
  xact/step   (xact_commit + xact_rollback) delta of the run's database in pg_stat_database
              minus its idle rate, / steps. Every statement outside a transaction block counts
              one, reads included: it is the number of store round trips that commit.
              pg_stat_statements is not loaded on the shared server, so statements are not
              counted separately.
  pub/step    AMQP publishes of the daemons (counted per exchange by bench.probe, a wrapper
              around aiormq's Channel.basic_publish) / steps; the client's starts are not
              included. Ceiling rows: requests + timers + replies / round trips.
  orch waits  the orchestrator's rounds of confirms / steps: a transition publishes all its
              messages, then awaits their confirms together (counted by bench.probe).
  writes      write system calls per step by process (syscw of /proc/<pid>/io): each socket
              send is one (the broker's include its disk writes). Ceiling rows: per round trip.
  deferred    the timer row only: after the run, CPU until every step timer has come back
              through the delay ladder and been handled as stale, minus idle rates, / sagas.
  latency     open-loop Poisson arrivals at half the PostgreSQL row's median sagas/s. Tap
              queues bound to saga.replies and saga.commands see every message; total = the
              participant's reply timestamp (sent_at, set just before publishing) to the next
              command of that saga reaching the harness through its tap queue. Stages: the
              orchestrator's own wall time per stage over the same window (bench.probe with
              BENCH_STAGES). Floor: the ceiling with timers, open loop at half its own median
              and at the project's rate; a request carries the send time of the reply that
              caused it, and the responder that receives it measures the gap (no store).
  RSS         VmRSS of the orchestrator from /proc/<pid>/status after N sagas are parked on a
              first step that never answers (timeouts set to one day).
"""


def median_figures(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure (nested dicts too) across repeats."""
    if not runs:
        return {}
    merged: dict[str, Any] = {}
    keys = {key for run in runs for key in run}
    for key in sorted(keys):
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, bool) for v in values):
            merged[key] = any(values)
        elif all(isinstance(v, int | float) for v in values):
            merged[key] = statistics.median(values)
        elif all(isinstance(v, dict) for v in values):
            merged[key] = median_figures(values)
        else:
            merged[key] = values[-1]
    return merged


def _cpu(figures: dict[str, Any], names: tuple[str, ...]) -> float | None:
    cpu: dict[str, float] = figures.get("cpu_ms_per_saga", {})
    found = [
        value
        for key, value in cpu.items()
        if any(key == name or key.startswith(f"{name}-") for name in names)
        and not key.endswith("_raw")
    ]
    return sum(found) if found else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main_table(rows: dict[str, dict[str, Any]]) -> str:
    """The table of sagas/s, CPU per saga per process, round trips and publishes per step."""
    ceiling = rows.get(CEILING, {}).get("median", {}).get("sagas_per_s")
    head = (
        f"{'row':<22}{'runs':>5}{'sagas/s':>9} {'(min-max)':<13}{'steps/s':>8}{'x ceil':>7} |"
        + "".join(f"{name:>7}" for name, _ in _PROCESS_COLUMNS)
        + f" |{'xact/st':>8}{'pub/st':>7}"
    )
    lines = [head, " " * 66 + "CPU ms per saga", "-" * len(head)]
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"{name:<22}  skipped: {row['skipped']}")
            continue
        if not row.get("runs"):
            lines.append(f"{name:<22}  failed in every repeat (see the log above)")
            continue
        runs = row["runs"]
        median = row["median"]
        rates = [run["sagas_per_s"] for run in runs]
        spread = f"({min(rates):.1f}-{max(rates):.1f})"
        ratio = median["sagas_per_s"] / ceiling if ceiling else None
        lines.append(
            f"{name:<22}{len(runs):>5}{median['sagas_per_s']:>9.1f} {spread:<13}"
            f"{median['steps_per_s']:>8.0f}{_fmt(ratio, 2):>7} |"
            + "".join(f"{_fmt(_cpu(median, names)):>7}" for _, names in _PROCESS_COLUMNS)
            + f" |{_fmt(median.get('xact_per_step'), 2):>8}"
            f"{_fmt(median.get('publishes_per_step'), 2):>7}"
        )
    return "\n".join(lines)


def publishes_table(rows: dict[str, dict[str, Any]]) -> str:
    """Publishes per step by kind for the project rows."""
    kinds = ("commands", "replies", "timers", "events", "dead_letters")
    lines = [
        f"{'row':<22}"
        + "".join(f"{kind:>13}" for kind in kinds)
        + f"{'timers fired':>14}{'orch waits':>12}"
    ]
    for name, row in rows.items():
        median = row.get("median", {})
        by_kind = median.get("publishes_per_step_by_kind")
        if not by_kind:
            continue
        fired = median.get("orchestrator_messages", {}).get("saga.timers")
        lines.append(
            f"{name:<22}"
            + "".join(f"{_fmt(by_kind.get(kind), 2):>13}" for kind in kinds)
            + f"{_fmt(fired, 0):>14}"
            + f"{_fmt(median.get('confirm_waits_per_step'), 2):>12}"
        )
    return "\n".join(lines)


def _per_daemon(
    rows: dict[str, dict[str, Any]], figure: str, describe: Callable[[str, Any], str]
) -> str:
    """A line per row that has ``figure`` (a dict by daemon): each daemon ``describe``d."""
    lines = []
    for name, row in rows.items():
        by_daemon = row.get("median", {}).get(figure)
        if by_daemon:
            parts = [describe(daemon, value) for daemon, value in sorted(by_daemon.items())]
            lines.append(f"{name:<22}" + "; ".join(parts))
    return "\n".join(lines)


def statements_table(rows: dict[str, dict[str, Any]]) -> str:
    """asyncpg calls per step of each daemon, by statement verb (PostgreSQL rows)."""

    def describe(daemon: str, verbs: dict[str, float]) -> str:
        counted = " ".join(f"{verb} {value:.2f}" for verb, value in sorted(verbs.items()))
        return f"{daemon}: {counted}"

    return _per_daemon(rows, "statements_per_step", describe)


def write_calls_table(rows: dict[str, dict[str, Any]]) -> str:
    """Write system calls per step of each process: every socket send is one."""

    def describe(process: str, count: float) -> str:
        return f"{process} {count:.2f}"

    return _per_daemon(rows, "write_calls_per_step", describe)


def collections_table(rows: dict[str, dict[str, Any]]) -> str:
    """The garbage collector's runs in each daemon during the run: runs of any generation and
    the CPU they took, full (generation 2) runs and their pause, and pauses of any generation
    over 10 ms."""

    def describe(daemon: str, counts: dict[str, float]) -> str:
        every = sum(counts.get(f"{generation} runs", 0) for generation in range(3))
        cpu = sum(counts.get(f"{generation} cpu us", 0) for generation in range(3)) / 1000
        runs = counts.get("2 runs", 0)
        total = counts.get("2 us", 0) / 1000
        long = sum(counts.get(f"{generation} over 10 ms", 0) for generation in range(3))
        return (
            f"{daemon} {every:.0f} runs, {cpu:.0f} ms CPU; {runs:.0f} full, {total:.0f} ms;"
            f" {long:.0f} over 10 ms"
        )

    return _per_daemon(rows, "collections", describe)


def deferred_table(deferred: dict[str, Any]) -> str:
    """The deferred timer cost."""
    cpu = deferred["cpu_ms_per_saga"]
    return (
        f"window {deferred['window_s']:.0f} s after the last saga ended; timers published "
        f"{deferred['timers_published_total']:.0f}, came back during the run "
        f"{deferred['timers_handled_before_window']:.0f}, in the window "
        f"{deferred['timers_handled_in_window']:.0f}"
        f"{'' if deferred['all_back'] else ' (NOT all back: window too short)'}\n"
        f"CPU ms per saga in the window: broker {cpu['broker']:.2f} (raw {cpu['broker_raw']:.2f}),"
        f" orchestrator {cpu['orchestrator']:.2f}, postgres {cpu['postgres']:.2f}"
    )


def latency_table(latency: dict[str, Any]) -> str:
    """Reply -> next command percentiles."""
    lines = [
        f"open loop at {latency['target_rate']:.1f} sagas/s (achieved "
        f"{latency['achieved_rate']:.1f}), {latency['sagas']} sagas, {latency['pairs']} "
        "reply->command pairs",
        f"{'ms':<22}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}",
    ]
    for name, values in latency["ms"].items():
        lines.append(_percentile_line(name, values))
    if stages := latency.get("orchestrator_stages_ms"):
        lines.append("the orchestrator's stages (wall time, bench.probe)")
        for name, values in stages.items():
            lines.append(f"{_percentile_line(name, values)}  n={values['n']}")
    for floor in latency.get("floor", []):
        lines.append(
            f"floor: the ceiling (with timers) open loop at {floor['target_rate']:.1f} sagas/s, "
            f"{floor['label']} (achieved {floor['achieved_rate']:.1f}), {floor['pairs']} "
            "reply->request pairs"
        )
        lines.append(_percentile_line("total", floor["ms"]))
    return "\n".join(lines)


def _percentile_line(name: str, values: dict[str, float | None]) -> str:
    return f"{name:<22}" + "".join(f"{_fmt(values[p]):>8}" for p in ("p50", "p90", "p99", "max"))


def rss_table(results: list[dict[str, Any]]) -> str:
    """Orchestrator RSS by sagas parked."""
    lines = [f"{'store':<10}{'parked':>9}{'RSS MiB':>9}{'peak MiB':>9}{'park s':>8}"]
    for result in results:
        for point in result["points"]:
            lines.append(
                f"{result['store']:<10}{point['parked']:>9}{point['rss_mib']:>9.1f}"
                f"{point['hwm_mib']:>9.1f}{point['seconds_to_park']:>8.0f}"
            )
    return "\n".join(lines)


def profile_table(profile: dict[str, Any], top: int = 15) -> str:
    """The profile's top functions by self and by total share of samples."""
    if "error" in profile:
        return str(profile["error"])
    lines = [
        f"{profile['samples']} samples (py-spy record --gil, 100 Hz: samples holding the GIL)",
        "by self:",
    ]
    lines += [f"  {share:5.1f}%  {name}" for name, share in profile["self"][:top]]
    lines.append("by total (inclusive):")
    lines += [f"  {share:5.1f}%  {name}" for name, share in profile["total"][:top]]
    return "\n".join(lines)
