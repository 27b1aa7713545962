"""Loading the orchestrator's :class:`App` from a ``package.module:attribute`` string."""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.definition import App
from plumbing.errors import ConfigError, DefinitionError
from plumbing.loader import load_object


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
