"""A password never reaches a log line or an error, whatever shape the URL has."""

from __future__ import annotations

import pytest

from plumbing.urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:pw@h:5672/v", "amqp://guest:***@h:5672/v"),
        ("amqp//guest:s3cret@127.0.0.1", "amqp//guest:***@127.0.0.1"),
        ("guest:s3cret@host", "guest:***@host"),
        ("postgresql://ops:s3cret@127.0.0.1:1/saga", "postgresql://ops:***@127.0.0.1:1/saga"),
        ("postgresql://ops:p@ss@db/saga", "postgresql://ops:***@db/saga"),
        ("mongodb://a:b@h/x?password=z&w=majority", "mongodb://a:***@h/x?password=***&w=majority"),
        (
            "mongodb://h/x?authMechanismProperties=AWS_SESSION_TOKEN:t",
            "mongodb://h/x?authMechanismProperties=***",
        ),
        ("postgresql://db/saga", "postgresql://db/saga"),
        ("memory://", "memory://"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
