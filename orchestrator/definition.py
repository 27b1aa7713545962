"""The saga definition language: a saga type is an ordered list of steps.

A definition reads top to bottom like its sequence diagram::

    order_fulfillment = Saga(
        "order_fulfillment",
        data=OrderData,
        steps=[
            Step("reserve_inventory", service="inventory", command=ReserveInventory,
                 result=InventoryReserved, compensation=ReleaseInventory, timeout=120),
            Step("process_payment", service="payment", command=ProcessPayment,
                 result=PaymentProcessed, compensation=RefundPayment, timeout=60),
            Step("send_confirmation", service="notification", command=SendConfirmation,
                 kind=StepKind.RETRIABLE, timeout=120),
        ],
    )

Step kinds follow Garcia-Molina and Salem: *compensatable* steps can be undone by their
compensation; the *pivot* is the point of no return (it cannot be undone, and once it completes
the saga can only go forward); *retriable* steps never fail for good and are retried until they
succeed. So a definition is ``compensatable* [pivot] retriable*``.

Commands are built from the saga context (the start data plus the results of earlier steps),
matched by field name. Every mistake that can be seen before a saga runs fails here, with a
sentence that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from typing import Any

from pydantic import BaseModel

from contracts.messages import Command
from plumbing.errors import DefinitionError

MAX_TIMER = timedelta(days=30)
"""The longest timeout, backoff or deadline: the delay ladder carries up to 30 days."""

MIN_TIMEOUT = timedelta(seconds=1)
"""Timers have one-second granularity; a shorter timeout would always fire late."""

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
NAME_RULE = "lower-case letters, digits and _, starting with a letter, at most 63 characters"
"""What a saga type, step or service name may be (for error messages that check ``_NAME``)."""


def is_name(text: str) -> bool:
    """Whether ``text`` may name a saga type, a step or a service."""
    return _NAME.match(text) is not None


Duration = timedelta | float | int
"""A duration as a ``timedelta`` or a number of seconds."""


def _duration(value: Duration, what: str) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DefinitionError(f"{what} must be a number of seconds or a timedelta, not {value!r}")
    return timedelta(seconds=value)


class StepKind(StrEnum):
    """How a step behaves when the saga has to go back."""

    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


@dataclass(frozen=True, kw_only=True)
class _RetryFields:
    """The exact fields of a :class:`RetryPolicy` (its constructor also takes seconds)."""

    max_attempts: int | None
    initial_backoff: timedelta
    multiplier: float
    max_backoff: timedelta
    jitter: float
    retry_on: frozenset[str] | None
    retry_timeouts: bool


class RetryPolicy(_RetryFields):
    """When and how often to try a step (or a compensation) again.

    Backoff is exponential, ``initial_backoff * multiplier ** (attempt - 1)`` capped at
    ``max_backoff``, minus up to ``jitter`` of itself. The jitter is derived from the saga id,
    step and attempt, so the pure core stays deterministic while sagas still spread out.

    Args:
        max_attempts: attempts in all, the first included; ``None`` retries forever.
        initial_backoff: the first delay, as a ``timedelta`` or seconds.
        max_backoff: the longest delay, as a ``timedelta`` or seconds.
        retry_on: error types (``ErrorDetail.type``) that are retried; ``None`` retries every
            error. Business failures (``failed`` replies) are never retried.
        retry_timeouts: whether a timed-out attempt is re-sent (with the same idempotency key)
            instead of failing the step.
    """

    def __init__(
        self,
        *,
        max_attempts: int | None = 3,
        initial_backoff: Duration = 1.0,
        multiplier: float = 2.0,
        max_backoff: Duration = 60.0,
        jitter: float = 0.2,
        retry_on: Iterable[str] | None = None,
        retry_timeouts: bool = False,
    ) -> None:
        initial = _duration(initial_backoff, "initial_backoff")
        maximum = _duration(max_backoff, "max_backoff")
        if max_attempts is not None and max_attempts < 1:
            raise DefinitionError(
                f"max_attempts is {max_attempts}; it counts the first attempt, so it must "
                "be at least 1 (or None to retry forever)"
            )
        if initial <= timedelta(0):
            raise DefinitionError(f"initial_backoff must be positive, not {initial}")
        if maximum < initial:
            raise DefinitionError(
                f"max_backoff ({maximum}) is shorter than initial_backoff ({initial})"
            )
        if maximum > MAX_TIMER:
            raise DefinitionError(f"max_backoff ({maximum}) is longer than {MAX_TIMER.days} days")
        if not 1.0 <= multiplier <= 100.0:
            raise DefinitionError(f"multiplier is {multiplier}; use a value from 1 to 100")
        if not 0.0 <= jitter <= 1.0:
            raise DefinitionError(f"jitter is {jitter}; it is a fraction from 0 to 1")
        super().__init__(
            max_attempts=max_attempts,
            initial_backoff=initial,
            multiplier=multiplier,
            max_backoff=maximum,
            jitter=jitter,
            retry_on=None if retry_on is None else frozenset(retry_on),
            retry_timeouts=retry_timeouts,
        )

    @classmethod
    def forever(cls, max_backoff: Duration = 300.0) -> RetryPolicy:
        """The policy of a retriable step: every error and timeout, without limit."""
        return cls(max_attempts=None, max_backoff=max_backoff, retry_timeouts=True)

    @property
    def gives_up(self) -> bool:
        """Whether some error or timeout can end the retries."""
        return self.max_attempts is not None or self.retry_on is not None or not self.retry_timeouts

    def allows_another(self, attempts_made: int) -> bool:
        """Whether another attempt may follow ``attempts_made`` attempts."""
        return self.max_attempts is None or attempts_made < self.max_attempts

    def retries_error(self, error_type: str) -> bool:
        """Whether an error of this type is worth another attempt."""
        return self.retry_on is None or error_type in self.retry_on

    def backoff(self, attempts_made: int, seed: str) -> timedelta:
        """The delay before the attempt that follows ``attempts_made`` attempts."""
        exponent = min(attempts_made - 1, 64)
        raw = min(
            self.initial_backoff.total_seconds() * self.multiplier**exponent,
            self.max_backoff.total_seconds(),
        )
        digest = hashlib.sha256(f"{seed}:{attempts_made}".encode()).digest()
        fraction = int.from_bytes(digest[:8], "big") / 2**64
        return timedelta(seconds=max(raw * (1.0 - self.jitter * fraction), 1.0))


DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=10, max_backoff=300.0, retry_timeouts=True)
"""Compensations retry errors and timeouts ten times, backing off up to five minutes, then
the saga is parked as ``stuck`` for an operator."""


@dataclass(frozen=True, kw_only=True)
class _StepFields:
    """The exact fields of a :class:`Step` (its constructor infers and converts)."""

    name: str
    service: str
    command: type[Command]
    result: type[BaseModel] | None
    compensation: type[Command] | None
    kind: StepKind
    timeout: timedelta
    retry: RetryPolicy
    compensation_timeout: timedelta
    compensation_retry: RetryPolicy
    compensate_on_timeout: bool
    heartbeat_timeout: timedelta | None
    dispatch_timeout: timedelta | None
    budget: timedelta | None
    group: str | None


class Step(_StepFields):
    """One step of a saga.

    Args:
        service: the participant service whose queue receives the commands.
        command: the forward command contract, built from the saga context.
        result: the model of the ``completed`` reply's result, validated on arrival and merged
            into the context of later steps. ``None`` keeps whatever the participant returns.
        compensation: the command that undoes the step; required for compensatable steps.
        kind: inferred as compensatable when a compensation is given.
        timeout: how long one forward attempt may go unanswered (``timedelta`` or seconds).
        retry: the forward retry policy; retriable steps default to :meth:`RetryPolicy.forever`.
        compensation_timeout: how long one compensation attempt may go unanswered
            (default: ``timeout``).
        compensation_retry: the compensation retry policy.
        compensate_on_timeout: whether a step that timed out is compensated too, because the
            participant may have acted (default yes).
        heartbeat_timeout: a long-running handler reports progress with ``ctx.heartbeat()``;
            an attempt that goes this long without one times out early.
        dispatch_timeout: how long a command may wait for a participant to pick it up (a
            service down, a queue backed up); ``timeout`` then counts from the pick-up. An
            attempt not picked up in time was not executed: the retry policy
            (``retry_timeouts``) decides whether to send it again or fail the step.
        budget: the total time all attempts of the step may take, retries and backoffs
            included (Temporal's schedule-to-close), beside each attempt's ``timeout``.
    """

    def __init__(
        self,
        name: str,
        *,
        service: str,
        command: type[Command],
        result: type[BaseModel] | None = None,
        compensation: type[Command] | None = None,
        kind: StepKind | None = None,
        timeout: Duration = 60.0,
        retry: RetryPolicy | None = None,
        compensation_timeout: Duration | None = None,
        compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
        compensate_on_timeout: bool = True,
        heartbeat_timeout: Duration | None = None,
        dispatch_timeout: Duration | None = None,
        budget: Duration | None = None,
        group: str | None = None,
    ) -> None:
        where = f"step {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise DefinitionError(
                f"step name {name!r} must be lower_snake_case (a-z, 0-9, _), starting with a letter"
            )
        if not isinstance(service, str) or not _NAME.match(service):
            raise DefinitionError(f"{where}: service {service!r} must be lower_snake_case")
        _check_command(command, f"{where}: command")
        if compensation is not None:
            _check_command(compensation, f"{where}: compensation")
        if result is not None and not (isinstance(result, type) and issubclass(result, BaseModel)):
            raise DefinitionError(f"{where}: result must be a pydantic model class")
        kind = kind or _inferred_kind(name, compensation)
        if kind is StepKind.COMPENSATABLE and compensation is None:
            raise DefinitionError(
                f"{where} is compensatable but has no compensation; give it one, or declare "
                "it kind=StepKind.PIVOT or kind=StepKind.RETRIABLE"
            )
        if kind is not StepKind.COMPENSATABLE and compensation is not None:
            raise DefinitionError(
                f"{where} is a {kind.value} step and cannot have a compensation: "
                "nothing after the point of no return is undone"
            )
        forward = _timer(timeout, f"{where}: timeout")
        super().__init__(
            name=name,
            service=service,
            command=command,
            result=result,
            compensation=compensation,
            kind=kind,
            timeout=forward,
            retry=_forward_retry(retry, kind, where),
            compensation_timeout=(
                forward
                if compensation_timeout is None
                else _timer(compensation_timeout, f"{where}: compensation_timeout")
            ),
            compensation_retry=compensation_retry,
            compensate_on_timeout=compensate_on_timeout,
            heartbeat_timeout=_optional_timer(heartbeat_timeout, f"{where}: heartbeat_timeout"),
            dispatch_timeout=_optional_timer(dispatch_timeout, f"{where}: dispatch_timeout"),
            budget=_optional_timer(budget, f"{where}: budget"),
            group=group,
        )
        if self.budget is not None and kind is StepKind.RETRIABLE:
            raise DefinitionError(
                f"{where} is retriable, so it never gives up: a budget cannot apply to it"
            )
        if self.budget is not None and self.budget < forward:
            raise DefinitionError(
                f"{where}: the budget ({self.budget}) is shorter than one attempt's timeout "
                f"({forward})"
            )
        if self.heartbeat_timeout is not None and self.heartbeat_timeout > forward:
            raise DefinitionError(
                f"{where}: the heartbeat_timeout ({self.heartbeat_timeout}) is longer than the "
                f"timeout ({forward}); it would never fire"
            )


class Parallel:
    """Steps dispatched together and joined when all of them complete.

    When one fails for good or times out, the others are waited for (none is retried any
    more), then every member that completed or may have acted is compensated with the rest
    of the saga: groups in strict reverse order, and within a group one member at a time, in
    reverse declaration order. Members are either all compensatable or all retriable (after
    the point of no return); a pivot is never in a group, since a sibling failing after it
    could not be undone. A member's command is built from the data and the results of the
    steps before the group, never from its siblings'.

    Args:
        name: how the group is shown (default: its steps' names joined by ``+``).
    """

    def __init__(self, *steps: Step, name: str | None = None) -> None:
        if len(steps) < 2:
            raise DefinitionError("a Parallel group needs at least two steps")
        for step in steps:
            if not isinstance(step, Step):
                raise DefinitionError(f"a Parallel group holds Steps, not {step!r}")
        self.name = name or "+".join(step.name for step in steps)
        kinds = {step.kind for step in steps}
        if StepKind.PIVOT in kinds or len(kinds) > 1:
            raise DefinitionError(
                f"group {self.name!r}: its steps must be all compensatable or all retriable "
                f"(they are {', '.join(sorted(kind.value for kind in kinds))}); a pivot cannot "
                "share a group, since a sibling failing after it could not be undone"
            )
        self.steps = tuple(replace(step, group=self.name) for step in steps)


def _optional_timer(value: Duration | None, what: str) -> timedelta | None:
    return None if value is None else _timer(value, what)


def _inferred_kind(name: str, compensation: type[Command] | None) -> StepKind:
    if compensation is None:
        raise DefinitionError(
            f"step {name!r} has no compensation; give it one, or declare it "
            "kind=StepKind.PIVOT or kind=StepKind.RETRIABLE"
        )
    return StepKind.COMPENSATABLE


def _forward_retry(retry: RetryPolicy | None, kind: StepKind, where: str) -> RetryPolicy:
    if retry is None:
        return RetryPolicy.forever() if kind is StepKind.RETRIABLE else RetryPolicy()
    if kind is StepKind.RETRIABLE and retry.gives_up:
        raise DefinitionError(
            f"{where} is retriable, so it must never give up: use RetryPolicy.forever() "
            "(max_attempts=None, retry_on=None, retry_timeouts=True)"
        )
    return retry


def _check_command(value: object, what: str) -> None:
    if not (isinstance(value, type) and issubclass(value, Command)):
        raise DefinitionError(f"{what} must be a contracts.Command subclass, not {value!r}")


def _timer(value: Duration, what: str) -> timedelta:
    duration = _duration(value, what)
    if duration < MIN_TIMEOUT:
        raise DefinitionError(f"{what} is {duration.total_seconds()}s; timers need at least 1s")
    if duration > MAX_TIMER:
        raise DefinitionError(
            f"{what} is {duration}; the longest supported is {MAX_TIMER.days} days"
        )
    return duration


@dataclass(frozen=True, kw_only=True)
class _SagaFields:
    """The exact fields of a :class:`Saga` (its constructor checks and converts)."""

    name: str
    steps: tuple[Step, ...]
    data: type[BaseModel] | None
    deadline: timedelta | None
    version: int


class Saga(_SagaFields):
    """A saga type: a name, the model of its start data, its steps and an optional deadline.

    The deadline bounds the whole saga: when it passes before the point of no return, the saga
    is rolled back as if an operator had aborted it.

    ``version`` is the author's number for this definition. Every saga records the version and
    the :attr:`fingerprint` it started with and runs to its end on that definition, so any
    change to the steps, their order, kinds, services, commands or compensations needs a new
    version beside the old one in the :class:`App`; timeouts and retry policies may change in
    place.
    """

    def __init__(
        self,
        name: str,
        steps: Iterable[Step | Parallel],
        data: type[BaseModel] | None = None,
        deadline: Duration | None = None,
        *,
        version: int = 1,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise DefinitionError(f"saga name {name!r} must be lower_snake_case")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DefinitionError(
                f"saga {name!r}: version must be a whole number from 1 up, not {version!r}"
            )
        ordered = _flattened(name, steps)
        if not ordered:
            raise DefinitionError(f"saga {name!r} has no steps")
        seen: set[str] = set()
        for step in ordered:
            if step.name in seen:
                raise DefinitionError(f"saga {name!r} has two steps named {step.name!r}")
            seen.add(step.name)
        _check_order(name, ordered)
        if data is not None and not (isinstance(data, type) and issubclass(data, BaseModel)):
            raise DefinitionError(f"saga {name!r}: data must be a pydantic model class")
        _check_inputs(name, ordered, data)
        super().__init__(
            name=name,
            steps=ordered,
            data=data,
            deadline=None if deadline is None else _timer(deadline, f"saga {name!r}: deadline"),
            version=version,
        )

    @cached_property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        """The steps' positions, stage by stage: one per sequential step, all of a group's
        members in one."""
        stages: list[list[int]] = []
        for position, step in enumerate(self.steps):
            previous = self.steps[position - 1] if position else None
            if step.group is not None and previous is not None and previous.group == step.group:
                stages[-1].append(position)
            else:
                stages.append([position])
        return tuple(tuple(stage) for stage in stages)

    @cached_property
    def stage_of(self) -> tuple[int, ...]:
        """The stage of each step, by position."""
        return tuple(stage for stage, positions in enumerate(self.stages) for _ in positions)

    def flow(self) -> dict[str, Any]:
        """The saga's shape for documents (``saga schema``'s ``x-sagas``): its version and
        stages in order, each a list of the steps dispatched together (one, or a parallel
        group's members), with their kind, service and command names."""
        stages = []
        for positions in self.stages:
            members = [self.steps[position] for position in positions]
            stage: dict[str, Any] = {
                "steps": [
                    {
                        "name": step.name,
                        "kind": step.kind.value,
                        "service": step.service,
                        "command": step.command.name(),
                        "compensation": None
                        if step.compensation is None
                        else step.compensation.name(),
                    }
                    for step in members
                ]
            }
            if members[0].group is not None:
                stage["parallel"] = members[0].group
            stages.append(stage)
        return {"saga_type": self.name, "version": self.version, "stages": stages}

    @cached_property
    def fingerprint(self) -> str:
        """A digest of what a running saga depends on: its steps in order, their kinds,
        services, commands and compensations (not timeouts or retry policies)."""
        shape = [
            (
                step.name,
                step.kind.value,
                step.service,
                step.command.name(),
                None if step.compensation is None else step.compensation.name(),
                step.group,
            )
            for step in self.steps
        ]
        text = json.dumps([self.name, shape], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """``name v<version>``, as operators read it."""
        return f"{self.name} v{self.version}"

    @cached_property
    def index(self) -> Mapping[str, int]:
        """Each step's position, by name."""
        return {step.name: position for position, step in enumerate(self.steps)}

    @property
    def services(self) -> frozenset[str]:
        """The participant services this saga sends commands to."""
        return frozenset(step.service for step in self.steps)

    def step(self, name: str) -> Step:
        """The step called ``name``."""
        return self.steps[self.index[name]]

    def with_timeouts(self, timeouts: Mapping[str, Duration]) -> Saga:
        """A copy with some steps' timeouts replaced (keys are step names); a step's
        compensation timeout follows its new timeout."""
        unknown = sorted(set(timeouts) - set(self.index))
        if unknown:
            raise DefinitionError(
                f"saga {self.name!r} has no step named {', '.join(map(repr, unknown))}; "
                f"its steps are {', '.join(self.index)}"
            )
        return replace(self, steps=tuple(_with_timeout(step, timeouts) for step in self.steps))


def _with_timeout(step: Step, timeouts: Mapping[str, Duration]) -> Step:
    if step.name not in timeouts:
        return step
    timeout = _timer(timeouts[step.name], f"step {step.name!r}: timeout")
    return replace(step, timeout=timeout, compensation_timeout=timeout)


def _flattened(name: str, items: Iterable[Step | Parallel]) -> tuple[Step, ...]:
    steps: list[Step] = []
    groups: set[str] = set()
    for position, item in enumerate(items):
        if isinstance(item, Parallel):
            if item.name in groups:
                raise DefinitionError(f"saga {name!r} has two groups named {item.name!r}")
            groups.add(item.name)
            steps.extend(item.steps)
        elif isinstance(item, Step):
            steps.append(item)
        else:
            raise DefinitionError(f"saga {name!r}: step {position} is not a Step or Parallel")
    return tuple(steps)


def _grouped(steps: tuple[Step, ...]) -> list[list[Step]]:
    """The steps stage by stage (consecutive members of one group share a stage)."""
    stages: list[list[Step]] = []
    for step in steps:
        if stages and step.group is not None and stages[-1][-1].group == step.group:
            stages[-1].append(step)
        else:
            stages.append([step])
    return stages


def _check_order(name: str, steps: tuple[Step, ...]) -> None:
    point_of_no_return: Step | None = None
    for step in steps:
        if point_of_no_return is not None and step.kind is not StepKind.RETRIABLE:
            raise DefinitionError(
                f"saga {name!r}: step {step.name!r} is {step.kind.value} but comes after "
                f"{point_of_no_return.name!r}, the point of no return; only retriable steps "
                "may follow it"
            )
        if step.kind is not StepKind.COMPENSATABLE:
            point_of_no_return = point_of_no_return or step


def _check_inputs(name: str, steps: tuple[Step, ...], data: type[BaseModel] | None) -> None:
    """Every required command field must come from the data or an earlier step's result."""
    if data is None:
        return
    known: set[str] = set(data.model_fields) | set(data.model_computed_fields)
    complete = True  # False once a step without a declared result model is seen
    for stage in _grouped(steps):
        # A group's members see the results of earlier stages, never their siblings'; a
        # compensation cannot count on its own step's result (the step may have timed out).
        if complete:
            for step in stage:
                _require(step.command, known, f"saga {name!r}: step {step.name!r}")
                if step.compensation is not None:
                    where = f"saga {name!r}: compensation of {step.name!r}"
                    _require(step.compensation, known, where)
        for step in stage:
            if step.result is None:
                complete = False
            else:
                known |= set(step.result.model_fields) | set(step.result.model_computed_fields)


def _require(command: type[Command], known: set[str], where: str) -> None:
    missing = sorted(
        name
        for name, info in command.model_fields.items()
        if info.is_required() and name not in known
    )
    if missing:
        raise DefinitionError(
            f"{where}: {command.__name__} needs {', '.join(missing)}, which neither the saga "
            "data nor an earlier step's result provides"
        )


def definition_key(saga_type: str, version: int, fingerprint: str | None) -> str:
    """How a held saga names the definition it needs: ``type:version:fingerprint``, with
    ``*`` for a saga stored before definitions had fingerprints."""
    return f"{saga_type}:{version}:{fingerprint or '*'}"


@dataclass(frozen=True)
class Missing:
    """Why an :class:`App` cannot run a saga: the version it started with is not loaded, or was
    changed in place (another fingerprint)."""

    reason: str


class App:
    """The orchestrator application: the saga types one daemon runs, in one or more versions.

    New sagas start on the newest version of their type (or the one a start request names);
    a saga in flight always runs on the version it started with.
    """

    def __init__(self, sagas: Iterable[Saga]) -> None:
        self._sagas: dict[tuple[str, int], Saga] = {}
        for saga in sagas:
            if (saga.name, saga.version) in self._sagas:
                raise DefinitionError(
                    f"two sagas are named {saga.name!r} with version {saga.version}; give the "
                    "new definition the next version number"
                )
            self._sagas[saga.name, saga.version] = saga
        if not self._sagas:
            raise DefinitionError("an App needs at least one saga")
        self._newest: dict[str, Saga] = {}
        for saga in self._sagas.values():
            newest = self._newest.get(saga.name)
            if newest is None or saga.version > newest.version:
                self._newest[saga.name] = saga

    def __getitem__(self, saga_type: str) -> Saga:
        """The newest version of ``saga_type``."""
        return self._newest[saga_type]

    def __contains__(self, saga_type: object) -> bool:
        return saga_type in self._newest

    def __iter__(self) -> Iterator[Saga]:
        return iter(self._sagas.values())

    @property
    def sagas(self) -> tuple[Saga, ...]:
        """Every definition, every version, in declaration order."""
        return tuple(self._sagas.values())

    @property
    def types(self) -> tuple[str, ...]:
        """The saga type names, in declaration order."""
        return tuple(self._newest)

    def versions(self, saga_type: str) -> tuple[int, ...]:
        """The versions of ``saga_type`` this app has, oldest first."""
        return tuple(sorted(version for name, version in self._sagas if name == saga_type))

    def version(self, saga_type: str, version: int) -> Saga | None:
        """Version ``version`` of ``saga_type``, if this app has it."""
        return self._sagas.get((saga_type, version))

    def resolve(self, saga_type: str, version: int, fingerprint: str | None) -> Saga | Missing:
        """The definition a saga started with, or why this app cannot run it.

        A saga stored before definitions had fingerprints (``None``) matches its version.
        """
        saga = self._sagas.get((saga_type, version))
        if saga is None:
            have = ", ".join(f"v{v}" for v in self.versions(saga_type)) or "no version"
            return Missing(
                f"this daemon has no definition {saga_type} v{version} (it has {have}); "
                f"deploy one that has it, or migrate the saga"
            )
        if fingerprint is not None and saga.fingerprint != fingerprint:
            return Missing(
                f"definition {saga_type} v{version} was changed in place (fingerprint "
                f"{saga.fingerprint}, the saga started on {fingerprint}); restore it and add "
                f"the change as v{max(self.versions(saga_type)) + 1}, or migrate the saga"
            )
        return saga

    @property
    def contracts(self) -> tuple[type[BaseModel], ...]:
        """Every model the app's sagas exchange: start data, commands, results and
        compensations, each once, in declaration order (``saga schema --app``)."""
        found: dict[type[BaseModel], None] = {}
        for saga in self._sagas.values():
            if saga.data is not None:
                found[saga.data] = None
            for step in saga.steps:
                for model in (step.command, step.result, step.compensation):
                    if model is not None:
                        found[model] = None
        return tuple(found)

    @property
    def services(self) -> frozenset[str]:
        """Every participant service any saga sends commands to."""
        return frozenset().union(*(saga.services for saga in self._sagas.values()))

    @property
    def definition_keys(self) -> frozenset[str]:
        """The keys of every definition this app can run, for resuming held sagas."""
        return frozenset(
            key
            for saga in self._sagas.values()
            for key in (
                definition_key(saga.name, saga.version, saga.fingerprint),
                definition_key(saga.name, saga.version, None),
            )
        )

    def with_step_timeouts(self, timeouts: Mapping[str, Duration]) -> App:
        """A copy with step timeouts overridden, keyed ``"<saga_type>.<step>"``, in every
        version that has the step.

        This is how operators tune timeouts without a code change (``SAGA_STEP_TIMEOUTS``).
        """
        per_saga: dict[str, dict[str, Duration]] = {}
        for key, seconds in timeouts.items():
            saga_type, dot, step = key.partition(".")
            if not dot or saga_type not in self._newest:
                raise DefinitionError(
                    f"step timeout key {key!r} must be '<saga_type>.<step>' with a saga type "
                    f"among {', '.join(self._newest)}"
                )
            per_saga.setdefault(saga_type, {})[step] = seconds
        for saga_type, wanted in per_saga.items():
            known = {
                step.name
                for saga in self._sagas.values()
                if saga.name == saga_type
                for step in saga.steps
            }
            unknown = sorted(set(wanted) - known)
            if unknown:
                raise DefinitionError(
                    f"saga {saga_type!r} has no step named {', '.join(map(repr, unknown))}; "
                    f"its steps are {', '.join(sorted(known))}"
                )
        return App(
            saga.with_timeouts(
                {step: t for step, t in per_saga.get(saga.name, {}).items() if step in saga.index}
            )
            for saga in self._sagas.values()
        )
