"""Records of live processes, for the daemon that starts after one died: which groups
it ends (a dead daemon's), and which it leaves alone (a recycled pid, its own, another
running daemon's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aetherd.services.orphans import ProcessRecords


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait(10)


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait(10)
    return done.pid


def _rewrite(records: ProcessRecords, pid: int, **fields: object) -> None:
    path = records.directory / f"{pid}.json"
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


def test_a_dead_daemons_live_process_is_a_leftover_once(tmp_path: Path, child):
    records = ProcessRecords.open(tmp_path / "run")
    assert os.stat(records.directory).st_mode & 0o777 == 0o700
    records.add("p1", child.pid)
    assert records.leftovers() == []  # this process's own: kept
    assert (records.directory / f"{child.pid}.json").exists()
    _rewrite(records, child.pid, daemon=_dead_pid())
    assert records.leftovers() == [(child.pid, "p1")]
    assert records.leftovers() == []  # the record went with it


def test_a_recycled_pid_and_another_running_daemon_are_left_alone(tmp_path: Path, child):
    records = ProcessRecords.open(tmp_path / "run")
    records.add("p1", child.pid)
    _rewrite(records, child.pid, daemon=_dead_pid(), start=1)  # another process's start
    assert records.leftovers() == [] and list(records.directory.iterdir()) == []
    records.add("p2", child.pid)
    # A live process whose command line names aetherd: another daemon's process.
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "aetherd"], start_new_session=True
    )
    try:
        _rewrite(records, child.pid, daemon=other.pid)
        assert records.leftovers() == []
        assert (records.directory / f"{child.pid}.json").exists()
    finally:
        other.kill()
        other.wait(10)


def test_ended_processes_and_garbage_lose_their_records(tmp_path: Path):
    records = ProcessRecords.open(tmp_path / "run")
    gone = _dead_pid()
    records.add("gone", gone)
    (records.directory / "junk.json").write_text("{not json")
    assert records.leftovers() == [] and list(records.directory.iterdir()) == []
    records.remove(gone)  # idempotent
