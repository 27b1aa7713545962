"""Loading the user's application objects from ``package.module:attribute`` strings."""

from __future__ import annotations

import importlib

from plumbing.errors import ConfigError


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
