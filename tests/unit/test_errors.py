"""One error tree: every error is drawn in it, and broker trouble is not a publish failure."""

from __future__ import annotations

import inspect

from plumbing import errors
from plumbing.errors import BrokerError, BrokerUnavailable, PublishFailed, QueueNotFound, SagaError


def test_every_error_is_drawn_in_the_tree_and_derives_from_the_root() -> None:
    classes = [
        value
        for _, value in inspect.getmembers(errors, inspect.isclass)
        if value.__module__ == errors.__name__
    ]
    assert classes
    for cls in classes:
        assert issubclass(cls, SagaError)
        drawn = f"── {cls.__name__}" in (errors.__doc__ or "") or cls is SagaError
        assert drawn, f"{cls.__name__} is not in the tree"
        assert cls.__doc__, f"{cls.__name__} says nothing about when it is raised"


def test_broker_errors_are_one_family_and_publishes_have_their_own() -> None:
    assert issubclass(BrokerUnavailable, BrokerError)
    assert issubclass(QueueNotFound, BrokerError)
    assert issubclass(PublishFailed, BrokerError)
    assert not issubclass(BrokerUnavailable, PublishFailed)
    assert not issubclass(PublishFailed, BrokerUnavailable)
