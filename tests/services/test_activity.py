"""Idleness accounting."""

from aetherd.services.activity import ActivityTracker


def test_idle_counts_from_the_latest_activity_or_disconnect():
    now = [1000.0]
    tracker = ActivityTracker(clock=lambda: now[0])
    now[0] = 1010.0
    assert tracker.idle_seconds() == 10.0
    tracker.connection_opened()
    now[0] = 1100.0
    assert tracker.idle_seconds() == 0.0  # connected: not idle
    tracker.connection_closed()
    now[0] = 1130.0
    assert tracker.idle_seconds() == 30.0
    assert tracker.idle_seconds(running_tasks=1) == 0.0
    tracker.touch()
    now[0] = 1131.0
    assert tracker.idle_seconds() == 1.0
