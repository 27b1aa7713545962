"""``python -m bench.ab BEFORE AFTER``: one change measured side by side, in pairs of runs.

BEFORE and AFTER are two checkouts of the project (``git worktree add`` or a clone each, with
this environment's packages importable). Each pair runs ``python -m bench --rows ROWS --sagas
N --repeat 1 --no-profile`` once in each, from its own directory, so every process of a run
imports that checkout's code. The order alternates from pair to pair. On this shared machine
the second run of a pair ran slower: with one order kept, a change that made no difference
looked 8% worse. Printed per run and as medians per side: sagas/s, CPU per saga in all and
by process, PostgreSQL transactions per step, the services' statements per step, and write
system calls per step. Counts repeat from run to run; wall clock and CPU drift with the
machine, so read them as medians of several pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.daemons import SERVICES


def _run(checkout: Path, rows: str, sagas: int) -> dict[str, Any]:
    """Run the bench once in ``checkout`` and return the JSON it wrote."""
    results = checkout / "bench" / "results"
    before = set(results.glob("bench-*.json")) if results.exists() else set()
    command = [sys.executable, "-m", "bench", "--rows", rows, "--sagas", str(sagas)]
    command += ["--repeat", "1", "--no-profile"]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, check=False)
    written = sorted(set(results.glob("bench-*.json")) - before)
    if done.returncode != 0 or not written:
        raise SystemExit(f"the bench failed in {checkout}:\n{done.stdout[-2000:]}{done.stderr}")
    result: dict[str, Any] = json.loads(written[-1].read_text())
    return result


def _figures(row: dict[str, Any]) -> dict[str, float]:
    """The figures compared, from one row's median of one run."""
    cpu = row["cpu_ms_per_saga"]
    statements = row.get("statements_per_step", {})
    writes = row.get("write_calls_per_step", {})
    services = sum(cpu.get(service, 0.0) for service in SERVICES)
    return {
        "sagas/s": row["sagas_per_s"],
        "cpu ms/saga": services
        + sum(cpu.get(k, 0.0) for k in ("orchestrator", "broker", "postgres")),
        "cpu orch": cpu.get("orchestrator", 0.0),
        "cpu services": services,
        "cpu broker": cpu.get("broker", 0.0),
        "cpu pg": cpu.get("postgres", 0.0),
        "xact/step": row.get("xact_per_step") or 0.0,
        "svc stmts/step": sum(sum(statements.get(s, {}).values()) for s in SERVICES),
        "orch writes/step": writes.get("orchestrator", 0.0),
        "svc writes/step": sum(writes.get(service, 0.0) for service in SERVICES),
        "broker writes/step": writes.get("broker", 0.0),
    }


def main() -> None:
    """Run the pairs and print each run, then the medians of both sides."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="checkout without the change")
    parser.add_argument("after", type=Path, help="checkout with the change")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rows", default="postgres", help="one row of python -m bench")
    parser.add_argument("--sagas", type=int, default=1000)
    args = parser.parse_args()
    if "," in args.rows:
        parser.error("--rows takes one row: the figures of a pair are compared row by row")
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    for side, checkout in sides.items():
        if not (checkout / "bench" / "__main__.py").exists():
            parser.error(f"{side} checkout {checkout} has no bench/__main__.py")
    figures: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for pair in range(args.pairs):
        order = ("before", "after") if pair % 2 == 0 else ("after", "before")
        for side in order:
            load = os.getloadavg()[0]
            started = time.strftime("%H:%M:%S")
            result = _run(sides[side], args.rows, args.sagas)
            run = _figures(result["rows"][args.rows]["median"])
            figures[side].append(run)
            shown = ", ".join(f"{name} {value:.2f}" for name, value in run.items())
            print(f"pair {pair + 1} {side:6s} {started} load {load:.2f}: {shown}", flush=True)
    print(f"\nmedians of {args.pairs} runs each (before -> after)")
    for name in figures["before"][0]:
        before = statistics.median(run[name] for run in figures["before"])
        after = statistics.median(run[name] for run in figures["after"])
        change = f"{(after / before - 1) * 100:+.1f}%" if before else "-"
        print(f"  {name:18s} {before:8.2f} -> {after:8.2f}  {change}")


if __name__ == "__main__":
    main()
