"""The soak's verdict: invariants over the saga store, the effect ledger and the broker.

Each :class:`Check` is one sentence that must hold, with the evidence in its detail. The
figures (timer lateness, counts) are reported beside them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from bench.soak.chaos import FORGED
from bench.soak.scenarios import Scenario, scenario_of
from contracts.events import EventName
from orchestrator.definition import Saga
from orchestrator.state import SagaState


@dataclass(frozen=True)
class Check:
    """One invariant and whether it held."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Effect:
    """One row of the ledger."""

    seq: int
    saga_id: str
    step: str
    direction: str
    service: str
    pid: int


@dataclass(frozen=True)
class Parked:
    """One message found in the parking queue."""

    message_id: str
    saga_id: str
    reason: str
    queue: str
    hostile: str
    """The soak's hostile-message kind, from the header the parked copy kept ("" if none)."""


def _sample(items: Iterable[object], n: int = 5) -> str:
    shown = list(items)
    return ", ".join(str(i) for i in shown[:n]) + (" ..." if len(shown) > n else "")


def saga_checks(
    sent: Sequence[str], states: Mapping[str, SagaState | None], resolved: set[str]
) -> list[Check]:
    """No saga lost, every one terminal, each as its scenario says."""
    lost = [s for s in sent if states.get(s) is None]
    extra = sorted(set(states) - set(sent))
    not_terminal = [
        s for s, st in states.items() if st is not None and st.status.value not in _TERMINAL
    ]
    wrong = []
    for saga_id, state in states.items():
        if state is None:
            continue
        scenario = scenario_of(saga_id)
        if state.status.value != scenario.status or scenario.stuck != (saga_id in resolved):
            wrong.append(f"{saga_id}={state.status.value}")
    return [
        Check(
            "no saga lost (every start request sent has a saga, and no other saga exists)",
            not lost and not extra,
            f"{len(sent)} sent, {len(lost)} lost ({_sample(lost)}), {len(extra)} unexpected",
        ),
        Check(
            "every saga terminal",
            not not_terminal,
            f"{len(not_terminal)} not terminal ({_sample(not_terminal)})",
        ),
        Check(
            "every saga ended as its scenario says (refused compensations stuck until the "
            "operator resolved them)",
            not wrong,
            f"{len(wrong)} wrong ({_sample(wrong)})",
        ),
    ]


_TERMINAL = {"completed", "failed"}


def effect_checks(
    sent: Sequence[str],
    effects: Sequence[Effect],
    killed: Mapping[str, set[int]],
    at_least_once: frozenset[str],
) -> tuple[list[Check], dict[str, int]]:
    """Forward effects as the scenario says, compensations once each in strict reverse order,
    doubles only from killed processes of at-least-once services, nothing for forged sagas."""
    by_saga: dict[str, list[Effect]] = defaultdict(list)
    for effect in effects:
        by_saga[effect.saga_id].append(effect)
    forged = [e for e in effects if e.saga_id.startswith(FORGED) or e.saga_id not in set(sent)]
    wrong_forward: list[str] = []
    wrong_order: list[str] = []
    twice: list[str] = []
    unexplained: list[str] = []
    doubles = 0
    for saga_id in sent:
        rows = sorted(by_saga.get(saga_id, []), key=lambda e: e.seq)
        scenario = scenario_of(saga_id)
        forward = [e for e in rows if e.direction == "forward"]
        undo = [e for e in rows if e.direction == "compensation"]
        steps_done = _distinct(e.step for e in forward)
        if tuple(steps_done) != scenario.forward:
            wrong_forward.append(f"{saga_id}: {steps_done}")
        counted = _counts(e.step for e in undo)
        twice += [f"{saga_id}:{step}" for step, n in counted.items() if n > 1]
        last_forward = max((e.seq for e in forward), default=0)
        if tuple(e.step for e in undo) != scenario.undone or any(
            e.seq < last_forward for e in undo
        ):
            wrong_order.append(f"{saga_id}: {[e.step for e in undo]}")
        for step, n in _counts(e.step for e in forward).items():
            if n == 1:
                continue
            doubles += n - 1
            copies = [e for e in forward if e.step == step]
            explained = all(
                e.service in at_least_once and e.pid in killed.get(e.service, set())
                for e in copies[:-1]
            )
            if not explained:
                unexplained.append(f"{saga_id}:{step} x{n} pids {[e.pid for e in copies]}")
    checks = [
        Check(
            "forward effects in the ledger are exactly those each scenario makes",
            not wrong_forward,
            f"{len(wrong_forward)} sagas differ ({_sample(wrong_forward)})",
        ),
        Check(
            "every forward effect of a failed saga compensated exactly once, in strict reverse "
            "order, after the last forward effect",
            not wrong_order,
            f"{len(wrong_order)} sagas differ ({_sample(wrong_order)})",
        ),
        Check(
            "no compensation twice",
            not twice,
            f"{len(twice)} compensated twice ({_sample(twice)})",
        ),
        Check(
            "double effects only where a kill explains them (an at-least-once service's "
            "process killed after acting, before recording its outcome)",
            not unexplained,
            f"{doubles} double effects, {len(unexplained)} unexplained ({_sample(unexplained)})",
        ),
        Check(
            "no effect for a forged command",
            not forged,
            f"{len(forged)} effects of sagas never started ({_sample(e.saga_id for e in forged)})",
        ),
    ]
    return checks, {"effects": len(effects), "double_effects": doubles}


def _distinct(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _counts(items: Iterable[str]) -> dict[str, int]:
    counted: dict[str, int] = defaultdict(int)
    for item in items:
        counted[item] += 1
    return counted


def parking_checks(parked: Sequence[Parked], must_park: int, may_park: int) -> list[Check]:
    """Only the hostile messages parked, each with a reason, as many as were sent to park."""
    ours = [p for p in parked if p.hostile or p.saga_id.startswith(FORGED)]
    foreign = [p for p in parked if p not in ours]
    reasonless = [p for p in parked if not p.reason.strip()]
    return [
        Check(
            "only the hostile messages parked",
            not foreign,
            f"{len(parked)} parked, {len(foreign)} not ours "
            f"({_sample(f'{p.queue}:{p.message_id}:{p.reason[:80]}' for p in foreign)})",
        ),
        Check(
            "every parked message has a reason",
            not reasonless,
            f"{len(reasonless)} without ({_sample(p.message_id for p in reasonless)})",
        ),
        Check(
            "every hostile message that must park did",
            must_park <= len(ours) <= must_park + may_park,
            f"{len(ours)} parked; {must_park} confirmed sends must park, "
            f"{may_park} unconfirmed may",
        ),
    ]


def lateness(states: Iterable[SagaState], saga: Saga) -> dict[str, list[float]]:
    """Seconds each timer fired after its due time, by kind (negative: early).

    Step timeouts: the ``SagaStepTimedOut`` entry against the attempt's ``SagaStepStarted``
    plus the step's timeout. Retries: the retried attempt's ``SagaStepStarted`` against the
    ``SagaStepRetrying`` entry plus the backoff the policy gives (deterministic per saga).
    """
    found: dict[str, list[float]] = {"step_timeout": [], "retry": []}
    for state in states:
        started: dict[tuple[str, int], datetime] = {}
        retrying: dict[tuple[str, int], datetime] = {}
        for entry in state.history:
            if entry.step is None or entry.attempt is None:
                continue
            key = (entry.step, entry.attempt)
            if entry.event is EventName.STEP_STARTED:
                started[key] = entry.at
                if key in retrying:
                    step = saga.step(entry.step)
                    backoff = step.retry.backoff(
                        entry.attempt - 1, seed=f"{state.saga_id}:{entry.step}"
                    )
                    due = retrying[key] + backoff
                    found["retry"].append((entry.at - due).total_seconds())
            elif entry.event is EventName.STEP_RETRYING:
                retrying[key] = entry.at
            elif entry.event is EventName.STEP_TIMED_OUT and key in started:
                due = started[key] + saga.step(entry.step).timeout
                found["step_timeout"].append((entry.at - due).total_seconds())
    return found


def lateness_summary(samples: Sequence[float]) -> dict[str, float | int]:
    """Count, early count, p50, p99 and max of lateness samples (seconds)."""
    if not samples:
        return {"count": 0, "early": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "count": len(ordered),
        "early": sum(1 for s in ordered if s < -0.001),
        "p50": round(statistics.median(ordered), 3),
        "p99": round(p99, 3),
        "max": round(ordered[-1], 3),
    }


def lateness_check(found: Mapping[str, Sequence[float]]) -> Check:
    """No timer fired early."""
    early = {kind: sum(1 for s in samples if s < -0.001) for kind, samples in found.items()}
    total = {kind: len(samples) for kind, samples in found.items()}
    return Check(
        "no timer fired early",
        not any(early.values()),
        f"early {early} of {total}",
    )


def expected_stuck(sent: Sequence[str]) -> int:
    """How many sagas must rest stuck before the operator steps in."""
    return sum(1 for s in sent if scenario_of(s).stuck)


def by_scenario(sent: Sequence[str]) -> dict[str, int]:
    """Sagas sent per scenario."""
    counted: dict[str, int] = defaultdict(int)
    for saga_id in sent:
        scenario: Scenario = scenario_of(saga_id)
        counted[scenario.name] += 1
    return dict(counted)


def seconds(delta: timedelta) -> float:
    """A duration in seconds, rounded for a report."""
    return round(delta.total_seconds(), 1)
