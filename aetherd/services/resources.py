"""Workspace resources: CPU, memory and disk, as the container sees them.

`ResourceMonitor` reads the daemon's own cgroup v2 (found through `/proc/self/cgroup`
under `/sys/fs/cgroup`) when it has the files, so the figures are the container's,
not the host's; otherwise it falls back to psutil's host-wide figures. Disk figures
are those of the file system holding the workspace root (`os.statvfs`).

- **cgroup v2:** memory used = `memory.current` minus `inactive_file` of
  `memory.stat` (the page cache the kernel reclaims first; what `docker stats`
  reports); memory limit = the smallest `memory.max` of the cgroup and its ancestors
  up to the mount, and never more than the machine's memory; CPU time =
  `usage_usec` of `cpu.stat`; CPU limit = the smallest `cpu.max` quota/period of the
  chain, and never more than the CPUs the daemon may run on.
- **psutil:** memory used = total minus available, limit = total; CPU time = the busy
  time of all CPUs (`cpu_times()` without idle and iowait); CPU limit = the CPU count.

CPU use is a rate, so it needs two readings: `usedCores` is the CPU time used between
the previous reading and this one divided by the wall time between them (0.5 = half of
one core), averaged over at least `MIN_CPU_INTERVAL` seconds (a reading sooner than
that repeats the last figure). Readings happen only when someone asks (`/info`, a
`/metrics` scrape, the `activity/resources` timer): nothing runs while nobody looks.

`subscribe(func)` calls `func(resources)` every `interval` seconds; ONE timer serves
every subscriber, started by the first and stopped when the last one leaves.

The files read here are kernel files (`/proc`, `/sys`), never workspace files, so they
are read with plain `open` and not through `fileio`. The cgroup root and the
`/proc/self/cgroup` path can be injected, so tests point them at a fake cgroup tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aetherd.metrics import Sample
from aetherd.services.executors import BoundedExecutor

log = logging.getLogger("aetherd.resources")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MIN_CPU_INTERVAL = 1.0  # seconds: shorter intervals give noisy CPU figures
MAX_CGROUP_DEPTH = 64  # ancestors walked for limits at most
MAX_KERNEL_FILE = 64 * 1024  # bytes read of one /proc or /sys file at most


def _machine_memory() -> int:
    """The machine's memory in bytes (MemTotal, the figure psutil.virtual_memory() gives)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Resources:
    """One reading. Bytes for memory and disk; cores for CPU (1.0 = one core busy)."""

    source: str  # "cgroup" or "psutil"
    cpu_used_cores: float
    cpu_limit_cores: float
    cpu_seconds: float  # CPU time used so far (the cgroup's, or the host's busy time)
    memory_used: int
    memory_limit: int
    disk_used: int
    disk_total: int
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def cpu_used_percent(self) -> float:
        """CPU used as a percentage of the CPU limit (0 to 100)."""
        if self.cpu_limit_cores <= 0:
            return 0.0
        return round(min(100.0, 100.0 * self.cpu_used_cores / self.cpu_limit_cores), 2)


def _read(path: Path) -> str | None:
    """A small kernel file's text, or None when it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read(MAX_KERNEL_FILE)
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _keyed(path: Path) -> dict[str, int]:
    """`key value` lines (`cpu.stat`, `memory.stat`) as a dict; unparsable lines skipped."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value.strip())
    return out


def _allowed_cpus() -> int:
    """The CPUs this process may run on."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        with contextlib.suppress(OSError):
            return max(1, len(getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class ResourceMonitor:
    """CPU, memory and disk of the workspace, read on demand; a shared push timer."""

    def __init__(
        self,
        root: Path,
        *,
        interval: float = 5.0,
        cgroup_root: Path = CGROUP_ROOT,
        proc_self_cgroup: Path = PROC_SELF_CGROUP,
        executor: BoundedExecutor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.interval = interval
        self.cgroup_root = Path(cgroup_root)
        self.proc_self_cgroup = Path(proc_self_cgroup)
        self._executor = executor
        self._clock = clock
        self._lock = threading.Lock()  # readings come from executor threads and scrapes
        self._cgroup: Path | None = None
        self._cgroup_found = False
        self._previous: tuple[str, float, float] | None = None  # source, wall, cpu seconds
        self._used_cores = 0.0
        self._rated = False  # a CPU rate was computed at least once
        self._subscribers: list[Callable[[Resources], None]] = []
        self._ticker: asyncio.Task[None] | None = None

    # -- reading ----------------------------------------------------------------------
    def cgroup_dir(self) -> Path | None:
        """The daemon's cgroup v2 directory when it has the files we read, else None.

        Found once: the line `0::/path` of `/proc/self/cgroup`, under the cgroup root.
        Inside a cgroup namespace the path is `/` and the root is the container's own
        cgroup; when the path is not under the mount, the mount itself is tried.
        """
        with self._lock:
            if not self._cgroup_found:
                self._cgroup = self._find_cgroup()
                self._cgroup_found = True
            return self._cgroup

    def _find_cgroup(self) -> Path | None:
        relative = None
        for line in (_read(self.proc_self_cgroup) or "").splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip()
                break
        if relative is None:
            return None
        candidates = []
        parts = [p for p in relative.split("/") if p and p not in (".", "..")]
        candidates.append(self.cgroup_root.joinpath(*parts))
        candidates.append(self.cgroup_root)
        for candidate in candidates:
            if (candidate / "memory.current").is_file() and (candidate / "cpu.stat").is_file():
                return candidate
        return None

    def _chain(self, directory: Path) -> Iterator[Path]:
        """`directory` and its ancestors, up to and including the cgroup root."""
        current = directory
        for _ in range(MAX_CGROUP_DEPTH):
            yield current
            if current == self.cgroup_root or current.parent == current:
                return
            current = current.parent

    def _from_cgroup(self, directory: Path) -> tuple[float, float, int, int] | None:
        """(cpu seconds, cpu limit cores, memory used, memory limit), or None if unreadable."""
        current = _int(directory / "memory.current")
        usage = _keyed(directory / "cpu.stat").get("usage_usec")
        if current is None or usage is None:
            return None
        inactive = _keyed(directory / "memory.stat").get("inactive_file", 0)
        used = max(0, current - inactive)
        limit = _machine_memory()
        cores = float(_allowed_cpus())
        for level in self._chain(directory):
            value = _int(level / "memory.max")  # "max" (no limit) reads as None
            if value is not None and value > 0:
                limit = min(limit, value)
            quota, _, period = (_read(level / "cpu.max") or "").strip().partition(" ")
            with contextlib.suppress(ValueError, ZeroDivisionError):
                cores = min(cores, int(quota) / int(period))
        return usage / 1e6, cores, used, limit

    @staticmethod
    def _from_psutil() -> tuple[float, float, int, int]:
        import psutil  # only without cgroup v2 files: a container's daemon never loads it

        times = psutil.cpu_times()
        busy = sum(
            getattr(times, name, 0.0)
            for name in ("user", "nice", "system", "irq", "softirq", "steal")
        )
        memory = psutil.virtual_memory()
        cores = float(psutil.cpu_count() or 1)
        return busy, cores, int(memory.total - memory.available), int(memory.total)

    def sample(self) -> Resources:
        """A reading now (blocking: small reads of kernel files and one statvfs)."""
        directory = self.cgroup_dir()
        figures = self._from_cgroup(directory) if directory is not None else None
        source = "cgroup"
        if figures is None:
            figures, source = self._from_psutil(), "psutil"
        cpu_seconds, cpu_limit, memory_used, memory_limit = figures
        stat = os.statvfs(self.root)
        disk_total = stat.f_blocks * stat.f_frsize
        disk_used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        now = self._clock()
        with self._lock:
            previous = self._previous
            if previous is None or previous[0] != source:
                self._previous = (source, now, cpu_seconds)
            elif now - previous[1] >= MIN_CPU_INTERVAL or (not self._rated and now > previous[1]):
                self._used_cores = max(0.0, (cpu_seconds - previous[2]) / (now - previous[1]))
                self._previous = (source, now, cpu_seconds)
                self._rated = True
            used_cores = round(self._used_cores, 4)
        return Resources(
            source=source,
            cpu_used_cores=used_cores,
            cpu_limit_cores=round(cpu_limit, 4),
            cpu_seconds=cpu_seconds,
            memory_used=memory_used,
            memory_limit=memory_limit,
            disk_used=disk_used,
            disk_total=disk_total,
        )

    async def read(self) -> Resources:
        """A reading, taken off the event loop."""
        if self._executor is not None:
            return await self._executor.run(self.sample)
        return await asyncio.to_thread(self.sample)

    def metrics(self) -> Iterator[Sample]:
        """The same figures for /metrics, read at scrape time (off the loop already)."""
        now = self.sample()
        yield Sample(
            "aetherd_workspace_cpu_used_cores",
            "CPU used since the previous reading, in cores",
            now.cpu_used_cores,
        )
        yield Sample(
            "aetherd_workspace_cpu_limit_cores",
            "CPU the workspace may use, in cores",
            now.cpu_limit_cores,
        )
        yield Sample(
            "aetherd_workspace_cpu_used_percent",
            "CPU used as a percentage of the CPU limit",
            now.cpu_used_percent,
        )
        yield Sample(
            "aetherd_workspace_cpu_seconds",
            "CPU time used (the cgroup's, or the host's busy time)",
            now.cpu_seconds,
            kind="counter",
        )
        yield Sample("aetherd_workspace_memory_used_bytes", "Memory used", now.memory_used)
        yield Sample(
            "aetherd_workspace_memory_limit_bytes",
            "Memory the workspace may use",
            now.memory_limit,
        )
        yield Sample(
            "aetherd_workspace_disk_used_bytes",
            "Used bytes of the root's file system",
            now.disk_used,
        )
        yield Sample(
            "aetherd_workspace_disk_total_bytes", "Size of the root's file system", now.disk_total
        )
        yield Sample(
            "aetherd_workspace_resources_source",
            "Where the figures come from (cgroup or psutil): 1 for the source in use",
            1,
            {"source": now.source},
        )

    # -- the shared timer ---------------------------------------------------------------
    @property
    def subscriber_count(self) -> int:
        """Subscribers of the periodic reading."""
        return len(self._subscribers)

    @property
    def ticking(self) -> bool:
        """True while the timer runs (only while someone subscribes)."""
        return self._ticker is not None and not self._ticker.done()

    def subscribe(self, func: Callable[[Resources], None]) -> Callable[[], None]:
        """Call `func(resources)` every `interval` seconds; returns the remover (idempotent)."""
        self._subscribers.append(func)
        if not self.ticking:
            self._ticker = asyncio.create_task(self._tick(), name="resources-timer")

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(func)
            if not self._subscribers and self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None

        return remove

    async def _tick(self) -> None:
        while self._subscribers:
            await asyncio.sleep(self.interval)
            try:
                now = await self.read()
            except Exception as exc:
                log.warning("reading resources failed: %s", exc)
                continue
            for func in list(self._subscribers):
                try:
                    func(now)
                except Exception:
                    log.exception("resources subscriber failed")

    async def start(self) -> None:
        """Take the first reading: the baseline of the first CPU figure."""
        await self.read()

    async def stop(self) -> None:
        """Stop the timer; subscribers are forgotten."""
        self._subscribers.clear()
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
