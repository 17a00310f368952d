"""The resource monitor alone: a fake cgroup v2 tree of real files, the real machine,
and the shared timer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest

from aetherd.services.resources import MIN_CPU_INTERVAL, ResourceMonitor
from tests.support import child_env, wait_for

GiB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_cgroup(tmp_path: Path, own: str = "/workspace/inner") -> tuple[Path, Path, Path]:
    """A cgroup v2 mount with the daemon in `own`; returns (root, leaf, proc file)."""
    root = tmp_path / "cgroup"
    leaf = root.joinpath(*own.strip("/").split("/")) if own.strip("/") else root
    write(root / "cgroup.controllers", "cpu memory io pids\n")
    write(leaf / "memory.current", "104857600\n")  # 100 MiB, of which 4 MiB cache
    write(leaf / "memory.stat", "anon 90000000\nfile 8000000\ninactive_file 4194304\n")
    write(leaf / "memory.max", "max\n")
    write(leaf / "cpu.stat", "usage_usec 2000000\nuser_usec 1500000\nsystem_usec 500000\n")
    write(leaf / "cpu.max", "max 100000\n")
    if leaf != root:
        # The limits are set one level up, as a container runtime does.
        write(leaf.parent / "memory.max", f"{512 * 1024 * 1024}\n")
        write(leaf.parent / "cpu.max", "150000 100000\n")
    proc = tmp_path / "proc-self-cgroup"
    write(proc, f"0::{own}\n")
    return root, leaf, proc


def test_cgroup_v2_figures_come_from_the_files(tmp_path, workspace):
    root, leaf, proc = fake_cgroup(tmp_path)
    clock = Clock()
    monitor = ResourceMonitor(workspace, cgroup_root=root, proc_self_cgroup=proc, clock=clock)
    assert monitor.cgroup_dir() == leaf
    first = monitor.sample()
    assert first.source == "cgroup"
    assert first.memory_used == 104857600 - 4194304
    # The parent's memory.max applies (the leaf says max); never above the machine's.
    assert first.memory_limit == min(512 * 1024 * 1024, psutil.virtual_memory().total)
    cpus = len(os.sched_getaffinity(0))
    assert first.cpu_limit_cores == min(1.5, cpus)
    assert first.cpu_seconds == 2.0
    assert first.cpu_used_cores == 0.0  # one reading: no rate yet

    # 0.75 s of CPU over 1.5 s of wall time: half a core.
    write(leaf / "cpu.stat", "usage_usec 2750000\n")
    clock.now += 1.5
    second = monitor.sample()
    assert second.cpu_used_cores == 0.5
    assert second.cpu_used_percent == round(100 * 0.5 / min(1.5, cpus), 2)

    # A reading sooner than MIN_CPU_INTERVAL repeats the figure (no noisy tiny interval)...
    write(leaf / "cpu.stat", "usage_usec 2760000\n")
    clock.now += MIN_CPU_INTERVAL / 10
    assert monitor.sample().cpu_used_cores == 0.5
    # ...and the next one measures from the last rated reading.
    write(leaf / "cpu.stat", "usage_usec 3750000\n")
    clock.now += MIN_CPU_INTERVAL
    assert monitor.sample().cpu_used_cores == round(1.0 / (MIN_CPU_INTERVAL * 1.1), 4)

    # Memory changes are read each time.
    write(leaf / "memory.current", "209715200\n")
    write(leaf / "memory.stat", "inactive_file 0\n")
    assert monitor.sample().memory_used == 209715200


def test_a_limit_on_the_leaf_wins_when_smaller(tmp_path, workspace):
    root, leaf, proc = fake_cgroup(tmp_path)
    write(leaf / "memory.max", f"{128 * 1024 * 1024}\n")
    write(leaf / "cpu.max", "50000 100000\n")
    now = ResourceMonitor(workspace, cgroup_root=root, proc_self_cgroup=proc).sample()
    assert now.memory_limit == 128 * 1024 * 1024
    assert now.cpu_limit_cores == 0.5


def test_inside_a_cgroup_namespace_the_mount_is_the_container(tmp_path, workspace):
    root, leaf, proc = fake_cgroup(tmp_path, own="/")
    assert leaf == root
    monitor = ResourceMonitor(workspace, cgroup_root=root, proc_self_cgroup=proc)
    assert monitor.cgroup_dir() == root
    assert monitor.sample().source == "cgroup"
    # A path that is not under the mount (no namespace, host path): the mount is used.
    write(proc, "0::/system.slice/docker-abc.scope\n")
    assert ResourceMonitor(workspace, cgroup_root=root, proc_self_cgroup=proc).cgroup_dir() == root


@pytest.mark.parametrize(
    "break_it",
    [
        "no-unified-line",  # cgroup v1 only
        "no-memory-current",  # v1/v2 hybrid: the v2 mount holds no memory controller
        "garbage",  # unreadable figures
        "no-proc-file",
    ],
)
def test_without_usable_cgroup_v2_files_psutil_is_used(tmp_path, workspace, break_it):
    root, leaf, proc = fake_cgroup(tmp_path)
    if break_it == "no-unified-line":
        write(proc, "4:memory:/docker/abc\n1:cpu:/docker/abc\n")
    elif break_it == "no-memory-current":
        (leaf / "memory.current").unlink()
    elif break_it == "garbage":
        write(leaf / "memory.current", "lots\n")
    else:
        proc.unlink()
    now = ResourceMonitor(workspace, cgroup_root=root, proc_self_cgroup=proc).sample()
    assert now.source == "psutil"
    memory = psutil.virtual_memory()
    assert now.memory_limit == memory.total
    assert 0 < now.memory_used <= memory.total
    assert now.cpu_limit_cores == psutil.cpu_count()


async def test_figures_on_this_machine_are_sane(workspace):
    monitor = ResourceMonitor(workspace)
    await monitor.start()
    now = await monitor.read()
    assert now.source in ("cgroup", "psutil")
    if now.source == "cgroup":
        current = int((monitor.cgroup_dir() / "memory.current").read_text())  # type: ignore[operator]
        assert current > 0
    else:
        assert psutil.Process().memory_info().rss > 0
    assert 0 < now.memory_used <= now.memory_limit
    assert now.disk_total > now.disk_used > 0
    stat = os.statvfs(workspace)
    assert now.disk_total == stat.f_blocks * stat.f_frsize
    assert now.cpu_limit_cores > 0 and now.cpu_used_cores >= 0
    assert 0 <= now.cpu_used_percent <= 100
    assert now.cpu_seconds > 0
    names = {sample.name for sample in monitor.metrics()}
    assert "aetherd_workspace_memory_used_bytes" in names
    await monitor.stop()


async def test_one_timer_for_every_subscriber_stopped_when_none_remain(workspace):
    monitor = ResourceMonitor(workspace, interval=0.02)
    assert not monitor.ticking
    got_a: list[object] = []
    got_b: list[object] = []
    remove_a = monitor.subscribe(got_a.append)
    timer = monitor._ticker
    remove_b = monitor.subscribe(got_b.append)
    assert monitor._ticker is timer and monitor.subscriber_count == 2
    await wait_for(lambda: len(got_a) >= 3 and len(got_b) >= 3)
    # Both got the very same readings: one read per tick, not one per subscriber.
    common = min(len(got_a), len(got_b))
    assert [id(r) for r in got_a[:common]] == [id(r) for r in got_b[:common]]
    remove_a()
    assert monitor.ticking
    remove_b()
    remove_b()  # idempotent
    assert monitor.subscriber_count == 0 and not monitor.ticking
    await asyncio.sleep(0)
    assert timer is not None and timer.done()
    # A new subscriber starts it again; stop() ends it.
    monitor.subscribe(got_a.append)
    assert monitor.ticking
    await monitor.stop()
    assert not monitor.ticking and monitor.subscriber_count == 0


async def test_a_failing_subscriber_does_not_stop_the_others(workspace, expect_log):
    expect_log("resources subscriber failed")
    monitor = ResourceMonitor(workspace, interval=0.02)
    got: list[object] = []

    def broken(_reading: object) -> None:
        raise RuntimeError("boom")

    monitor.subscribe(broken)
    monitor.subscribe(got.append)
    await wait_for(lambda: len(got) >= 2)
    await monitor.stop()


def test_with_cgroup_v2_files_psutil_is_not_imported(tmp_path, workspace):
    """A container's daemon reads its cgroup; psutil (the fallback) stays unloaded."""
    import json
    import subprocess
    import sys

    root, _, proc = fake_cgroup(tmp_path)
    child = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from aetherd.services.resources import ResourceMonitor\n"
        "m = ResourceMonitor(Path(sys.argv[1]), cgroup_root=Path(sys.argv[2]),"
        " proc_self_cgroup=Path(sys.argv[3]))\n"
        "print(json.dumps([m.sample().source, 'psutil' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, str(workspace), str(root), str(proc)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=child_env(tmp_path),
    ).stdout
    assert json.loads(out) == ["cgroup", False]
