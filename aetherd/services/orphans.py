"""Processes of the process channel that outlive a daemon which died (PROTOCOL.md §14).

A reload hands processes over; a crash cannot. The processes run in their own sessions,
so the daemon's death sends them nothing: one that writes gets SIGPIPE on its next
write to the closed pipe, one that stays silent would run on forever, orphaned, its
output and exit lost to everyone. So each live process is recorded in the private
runtime directory (`RUNTIME_DIR/processes/<pid>.json`: pid, its start time, the daemon's
pid), and a daemon that starts ends the process groups a dead daemon left behind
(`ProcessManager.start`: SIGTERM, SIGKILL after `process_kill_grace`).

A record is trusted only while its leader has the recorded start time (a recycled pid
has another), or, with the leader gone, while its group still exists (Linux does not
hand out a pid that is still in use as a process group id). Records of a daemon that
still runs (another daemon sharing the runtime directory) are left alone.

Plain files; no event loop here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from aetherd.services.handover import runtime_dir, write_private

SUFFIX = ".json"


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _is_aetherd(pid: int) -> bool:
    """True if `pid` runs and its command line mentions aetherd (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"aetherd" in handle.read()
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` exists (signal 0 checks without signalling)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcessRecords:
    """The directory of records of one runtime directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def open(cls, runtime: Path) -> ProcessRecords:
        """The records under `runtime` (created 0700 if needed; OSError if it cannot be)."""
        return cls(runtime_dir(runtime_dir(runtime) / "processes"))

    def add(self, process_id: str, pid: int) -> None:
        """Record a live process (OSError if the record cannot be written)."""
        record = {"id": process_id, "pid": pid, "start": start_time(pid), "daemon": os.getpid()}
        write_private(self.directory / f"{pid}{SUFFIX}", json.dumps(record).encode())

    def remove(self, pid: int) -> None:
        """Forget a process (it ended, or its group was ended)."""
        with contextlib.suppress(OSError):
            os.unlink(self.directory / f"{pid}{SUFFIX}")

    def leftovers(self) -> list[tuple[int, str]]:
        """(pgid, process id) of the groups dead daemons left running; their records go.

        This process's own records stay while their process lives (a reload keeps the
        pid and hands its processes over); records of processes that ended go.
        """
        found: list[tuple[int, str]] = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return found
        for name in names:
            if not name.endswith(SUFFIX):
                continue
            path = self.directory / name
            try:
                record = json.loads(path.read_bytes())
                pid, daemon = int(record["pid"]), int(record["daemon"])
                recorded_start = record.get("start")
                process_id = str(record.get("id", ""))
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            now = start_time(pid)
            running = now == recorded_start if now is not None else group_alive(pid)
            running = running and pid > 1 and group_alive(pid)
            if running and daemon == os.getpid():
                continue  # this process's own (handed over by a reload)
            if running and _is_aetherd(daemon):
                continue  # another daemon's, sharing the runtime directory
            if running:
                found.append((pid, process_id))
            with contextlib.suppress(OSError):
                path.unlink()
        return found
