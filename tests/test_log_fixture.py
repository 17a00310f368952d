"""The autouse fixture that fails a test whose daemon logged an unexpected error."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import ExpectLog, log_verdict


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom inside")
        except ValueError as error:
            exc_info = (type(error), error, error.__traceback__)
    return logging.LogRecord("aetherd.x", level, __file__, 1, msg, None, exc_info)


def test_unexpected_error_is_reported() -> None:
    problems = log_verdict([_record(logging.ERROR, "it broke")], ExpectLog())
    assert len(problems) == 1 and "it broke" in problems[0]


def test_traceback_is_matched_against_the_pattern() -> None:
    expected = ExpectLog()
    expected(r"boom inside")
    assert log_verdict([_record(logging.WARNING, "handled", exc=True)], expected) == []


def test_expected_but_missing_is_reported_unless_optional() -> None:
    expected = ExpectLog()
    expected("never")
    assert log_verdict([], expected) == ["expected error log record never came: 'never'"]
    optional = ExpectLog()
    optional("never", required=False)
    assert log_verdict([], optional) == []


def test_the_fixture_accepts_a_declared_error(expect_log: ExpectLog) -> None:
    expect_log(r"aetherd\.test: declared failure")
    logging.getLogger("aetherd.test").error("declared failure")


@pytest.mark.expect_log(r"marked failure")
def test_the_marker_accepts_a_declared_error() -> None:
    logging.getLogger("aetherd.test").error("marked failure")


def test_watchdogs_shutdown_race_is_not_an_error() -> None:
    from aetherd.logs import BenignWatchdogFilter

    record = logging.LogRecord(
        "watchdog.observers.inotify",
        logging.ERROR,
        __file__,
        1,
        "InotifyEmitter.queue_events() called when the thread is inactive",
        None,
        None,
    )
    assert BenignWatchdogFilter().filter(record) is True
    assert record.levelno == logging.DEBUG
    other = _record(logging.ERROR, "a real error")
    BenignWatchdogFilter().filter(other)
    assert other.levelno == logging.ERROR
