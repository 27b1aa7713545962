"""Every ``saga`` argument is checked before anything connects, and errors echo input safely.

The parser runs in this process (``main(argv)``): an argument error never reaches a broker or
a store, so none is needed.
"""

from __future__ import annotations

import os

import pytest

from orchestrator.cli import main

START = ("start", "order_fulfillment", "--data", "{}")


@pytest.fixture(autouse=True)
def no_saga_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the defaults: the memory store, no broker."""
    for name in [name for name in os.environ if name.startswith("SAGA_")]:
        monkeypatch.delenv(name)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line ``saga ARGV`` printed, after checking it exited with status 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ls", "--limit", "-5"], "argument --limit: -5 is not allowed: give 1 or more"),
        (["ls", "--limit", "0"], "argument --limit: 0 is not allowed: give 1 or more"),
        (["ls", "--limit", "ten"], "argument --limit: 'ten' is not a whole number"),
        (["ls", "--version", "-1"], "argument --version: -1 is not allowed"),
        (["ls", "--type", "Order Fulfillment"], "'Order Fulfillment' is not a saga type name"),
        (["watch", "--count", "0"], "argument --count: 0 is not allowed"),
        (["watch", "--event", "SagaDone"], "'SagaDone' is not a lifecycle event; use one of"),
        (["watch", "--type", "orders.*"], "'orders.*' is not a saga type name"),
        ([*START, "--id", "order 1"], "argument --id: 'order 1' is not a saga id"),
        ([*START, "--id", "-x"], "argument --id: expected one argument"),
        ([*START, "--id", "x" * 201], "at most 200 characters"),
        ([*START, "--id", "o-1", "--timeout", "inf"], "inf is not allowed: give a finite number"),
        ([*START, "--id", "o-1", "--timeout", "nan"], "nan is not allowed"),
        ([*START, "--id", "o-1", "--version", "0"], "argument --version: 0 is not allowed"),
        ([*START, "--id", "o-1", "--traceparent", "abc"], "'abc' is not a W3C traceparent"),
        (["start", "Orders", "--id", "o-1", "--data", "{}"], "'Orders' is not a saga type name"),
        (["show", "x" * 201], "a saga id has 1 to 200 characters, not 201"),
        (["show", ""], "a saga id has 1 to 200 characters, not 0"),
        (["abort", "o-1", "--reason", "two\nlines"], "holds control characters or line breaks"),
        (["abort", "o-1", "--reason", "x" * 501], "it has 501 characters; at most 500"),
        (["resume", "o-1", "--to-version", "-2"], "argument --to-version: -2 is not allowed"),
    ],
)
def test_a_bad_argument_is_one_sentence_naming_it(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in refused(argv, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "--type", "a\x1b[2Jb"],
        ["\x1b[2Jdemo"],
        ["ls", "--bogus", "a\x1b[2Jb"],
        ["start", "order_fulfillment", "--id", "a\x1b[2Jb", "--data", "{}"],
        ["watch", "--event", "a\x1b[2Jb"],
    ],
)
def test_control_characters_in_an_argument_error_are_escaped(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(argv, capsys)
    assert "\x1b" not in line
    assert "\\x1b[2J" in line


def test_control_characters_in_an_operational_error_are_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["show", "gone\x1b[2J\u2028"]) == 2
    err = capsys.readouterr().err
    assert err == "saga show: no saga has id 'gone\\x1b[2J\\u2028' in memory://\n"


def test_a_good_start_is_not_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    # Every argument passes; only then does the missing broker stop it, with one sentence.
    argv = [
        *START,
        "--id",
        "order-1:retry@2024/05",
        "--traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "--timeout",
        "2.5",
        "--version",
        "1",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("saga start: SAGA_AMQP_URL is not set")
