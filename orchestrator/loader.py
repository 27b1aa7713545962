"""Loading the user's application objects from ``package.module:attribute`` strings."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from orchestrator.definition import App
from orchestrator.errors import ConfigError, DefinitionError
from participants.service import Participant


def load_object(spec: str | None, what: str) -> object:
    """Import ``module:attribute``; every failure is a ``ConfigError`` that says what to fix."""
    if not spec:
        raise ConfigError(f"no {what} given: pass --app package.module:attribute or set SAGA_APP")
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"the {what} must look like package.module:attribute, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} for the {what}: {e}") from e
    try:
        return getattr(module, attribute)
    except AttributeError as e:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from e


def load_app(spec: str | None, step_timeouts: Mapping[str, float] | None = None) -> App:
    """The :class:`App` at ``spec``, with operator step-timeout overrides applied."""
    app = load_object(spec, "saga application")
    if not isinstance(app, App):
        raise ConfigError(
            f"{spec} is a {type(app).__name__}, not an orchestrator App "
            "(did you mean `saga participant`?)"
        )
    if not step_timeouts:
        return app
    try:
        return app.with_step_timeouts(step_timeouts)
    except DefinitionError as e:
        raise ConfigError(f"SAGA_STEP_TIMEOUTS is invalid: {e}") from e


def load_participant(spec: str | None) -> Participant:
    """The :class:`Participant` service at ``spec``."""
    participant = load_object(spec, "participant service")
    if not isinstance(participant, Participant):
        raise ConfigError(
            f"{spec} is a {type(participant).__name__}, not a participants.Participant "
            "(did you mean `saga orchestrator`?)"
        )
    return participant
