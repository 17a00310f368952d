"""The watcher alone, on real inotify: watches placed, events, coalescing, limits."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aetherd.services.fs import FileSystem
from aetherd.services.jail import Jail
from aetherd.services.watcher import IgnoreRules, Watcher, count_fd_watches

REPO = Path(__file__).resolve().parents[2]


class Events:
    """Collects watcher events; `expect` waits (bounded) for one matching a predicate."""

    def __init__(self, watcher: Watcher) -> None:
        self.seen: list[dict[str, Any]] = []
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        watcher.subscribe(self.queue.put_nowait)

    async def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event; seen {self.seen[-10:]}")
            try:
                event = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no matching event; seen {self.seen[-10:]}") from None
            self.seen.append(event)
            if pred(event):
                return event

    async def change(self, action: str, path: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self.expect(
            lambda e: e["type"] == "change" and e["action"] == action and e["path"] == path,
            timeout,
        )

    async def until_marker(self, root: Path, name: str = "marker") -> list[dict[str, Any]]:
        """Create `name` and return every event seen before its `create` arrived."""
        start = len(self.seen)
        (root / name).write_text("m")
        await self.change("create", "/" + name)
        return self.seen[start:-1]


@pytest.fixture
async def watch(tmp_path: Path):
    root = tmp_path / "ws"
    root.mkdir()
    made: list[Watcher] = []

    async def start(**kwargs: Any) -> tuple[Watcher, Events]:
        kwargs.setdefault("debounce", 0.05)
        watcher = Watcher(root, **kwargs)
        events = Events(watcher)
        await watcher.start()
        made.append(watcher)
        return watcher, events

    yield root, start
    for watcher in made:
        await watcher.stop()


def _make_dirs(root: Path, paths: list[str]) -> None:
    for path in paths:
        (root / path).mkdir(parents=True, exist_ok=True)


async def test_ignored_directories_get_no_watches(watch):
    root, start = watch
    _make_dirs(root, ["src/a/b", "docs", ".aether"])
    for ignored in ("node_modules", ".git", ".next", "dist", "build", "__pycache__"):
        _make_dirs(root, [f"{ignored}/x/y", f"src/{ignored}/z"])
    _make_dirs(root, [f"node_modules/pkg{i}/lib" for i in range(50)])
    watcher, _ = await start()
    expected = ["/", "/.aether", "/docs", "/src", "/src/a", "/src/a/b"]
    assert watcher.watched_dirs() == expected
    assert watcher.kernel_watch_count() == len(expected) == watcher.watch_count
    assert watcher.stats().kernel_limit and watcher.stats().kernel_limit > 0


@pytest.mark.slow
async def test_create_modify_delete_and_coalescing(watch):
    root, start = watch
    _, events = await start(debounce=1.0)
    (root / "a.txt").write_text("1")
    with open(root / "a.txt", "a") as handle:
        handle.write("2")
    created = await events.change("create", "/a.txt")
    assert created == {"type": "change", "action": "create", "path": "/a.txt", "isDirectory": False}
    before = await events.until_marker(root)
    assert not [e for e in before if e.get("path") == "/a.txt"]  # create+modify → create only
    (root / "a.txt").write_text("3")
    await events.change("modify", "/a.txt")
    (root / "gone.txt").write_text("x")
    (root / "gone.txt").unlink()
    before = await events.until_marker(root, "marker2")
    assert not [e for e in before if e.get("path") == "/gone.txt"]  # create+delete → nothing
    (root / "a.txt").unlink()
    deleted = await events.change("delete", "/a.txt")
    assert deleted["isDirectory"] is False


async def test_rename_reports_old_path_and_directories_keep_their_watches(watch):
    root, start = watch
    _make_dirs(root, ["old/inner"])
    (root / "f.txt").write_text("x")
    watcher, events = await start()
    os.rename(root / "f.txt", root / "g.txt")
    event = await events.change("rename", "/g.txt")
    assert event["oldPath"] == "/f.txt" and event["isDirectory"] is False
    os.rename(root / "old", root / "new")
    event = await events.change("rename", "/new")
    assert event == {
        "type": "change",
        "action": "rename",
        "path": "/new",
        "isDirectory": True,
        "oldPath": "/old",
    }
    assert watcher.watched_dirs() == ["/", "/new", "/new/inner"]
    (root / "new" / "inner" / "deep.txt").write_text("x")
    await events.change("create", "/new/inner/deep.txt")
    # Moved out of the tree: a delete, and its watches go.
    outside = root.parent / "outside"
    os.rename(root / "new", outside)
    await events.change("delete", "/new")
    assert watcher.watched_dirs() == ["/"]
    assert watcher.kernel_watch_count() == 1
    # Moved back in: a create, with watches for the whole subtree.
    os.rename(outside, root / "back")
    await events.change("create", "/back")
    assert watcher.watched_dirs() == ["/", "/back", "/back/inner"]


async def test_changes_made_by_a_program_are_reported(watch):
    root, start = watch
    watcher, events = await start()
    done = await asyncio.create_subprocess_exec(
        "sh", "-c", "mkdir -p proj/src/deep && echo hi > proj/src/deep/main.c", cwd=root
    )
    assert await done.wait() == 0
    await events.change("create", "/proj/src/deep/main.c")
    assert "/proj/src/deep" in watcher.watched_dirs()
    done = await asyncio.create_subprocess_exec(
        "sh", "-c", "echo more >> proj/src/deep/main.c", cwd=root
    )
    assert await done.wait() == 0
    await events.change("modify", "/proj/src/deep/main.c")


async def test_atomic_writes_read_as_create_or_modify(watch):
    root, start = watch
    _, events = await start()
    fs = FileSystem(Jail(root))
    await fs.write("/doc.md", b"v1")
    await events.change("create", "/doc.md")
    await fs.write("/doc.md", b"v2")
    await events.change("modify", "/doc.md")
    seen = await events.until_marker(root)
    assert not [e for e in events.seen if ".~aetherd-" in e.get("path", "")]
    assert not [e for e in seen if e.get("action") == "rename"]


async def test_nothing_inside_ignored_directories_is_watched_or_reported(watch):
    root, start = watch
    _make_dirs(root, ["node_modules"])
    watcher, events = await start()
    count = watcher.kernel_watch_count()
    _make_dirs(root, ["node_modules/new/deep", "src/.git/objects", "build/out"])
    (root / "node_modules" / "new" / "deep" / "x.js").write_text("x")
    (root / "src" / ".git" / "objects" / "o").write_text("x")
    await events.change("create", "/src")
    before = await events.until_marker(root)
    assert [e["path"] for e in before] == []
    assert watcher.watched_dirs() == ["/", "/src"]
    assert watcher.kernel_watch_count() == count + 1


async def test_extra_ignores_apply_at_runtime(watch):
    root, start = watch
    _make_dirs(root, ["generated/a", "src/gen2", "src/keep"])
    watcher, events = await start(extra_ignores=["gen2"])
    assert watcher.watched_dirs() == ["/", "/generated", "/generated/a", "/src", "/src/keep"]
    await watcher.set_extra_ignores(["generated", "src/keep/**", "*.log"])
    # The setting's pattern (gen2) stays; the config's patterns are added.
    assert watcher.watched_dirs() == ["/", "/src"]
    assert watcher.kernel_watch_count() == 2
    (root / "generated" / "a" / "x").write_text("x")
    (root / "debug.log").write_text("x")
    (root / "src" / "y").write_text("y")
    await events.change("create", "/src/y")
    before = await events.until_marker(root)
    assert [e for e in events.seen if e.get("path") in ("/generated/a/x", "/debug.log")] == []
    del before
    # Dropping the config's patterns watches those directories again.
    await watcher.set_extra_ignores([])
    assert watcher.watched_dirs() == ["/", "/generated", "/generated/a", "/src", "/src/keep"]
    (root / "generated" / "a" / "z").write_text("z")
    await events.change("create", "/generated/a/z")


def test_ignore_rules():
    rules = IgnoreRules(["*.log", "docs/tmp", "**/cache/**"])
    assert rules.ignored("a/node_modules", "node_modules")
    assert rules.ignored("x.log", "x.log") and rules.ignored("a/b.log", "b.log")
    assert rules.ignored("docs/tmp", "tmp") and not rules.ignored("src/tmp", "tmp")
    assert rules.ignored("a/cache", "cache")
    assert rules.ignored("a/.~aetherd-0123456789ab.new", ".~aetherd-0123456789ab.new")
    assert not rules.ignored("src/main.py", "main.py")


async def test_watch_limit_pushes_resync_and_keeps_serving(watch):
    root, start = watch
    _make_dirs(root, ["a", "b", "c", "d", "e"])
    watcher, events = await start(max_watches=3)
    await events.expect(lambda e: e == {"type": "resync", "reason": "watch_limit"})
    assert watcher.watch_count == 3 == watcher.kernel_watch_count()
    (root / "top.txt").write_text("x")
    await events.change("create", "/top.txt")
    assert watcher.stats().resyncs["watch_limit"] == 1


ENOSPC_SCRIPT = r"""
import asyncio, json, os, sys
from aetherd.services.watcher import Watcher

async def main(root):
    with open("/proc/sys/user/max_inotify_watches", "w") as handle:
        handle.write("3")  # this user namespace only: the kernel's own ENOSPC
    for name in ("a", "b", "c", "d", "e"):
        os.makedirs(os.path.join(root, name))
    watcher = Watcher(root, debounce=0.01)
    events = asyncio.Queue()
    watcher.subscribe(events.put_nowait)
    await watcher.start()
    first = await asyncio.wait_for(events.get(), 10)
    with open(os.path.join(root, "top.txt"), "w") as handle:
        handle.write("x")
    second = await asyncio.wait_for(events.get(), 10)
    print(json.dumps({"first": first, "second": second, "watches": watcher.kernel_watch_count(),
                      "max": watcher.max_watches}))
    await watcher.stop()

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
async def test_kernel_enospc_on_add_watch_is_watch_limit(tmp_path: Path):
    # A user namespace has its own inotify watch limit (/proc/sys/user/max_inotify_watches),
    # so the real ENOSPC of inotify_add_watch is produced without touching the host's.
    root = tmp_path / "ws"
    root.mkdir()
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        "--user",
        "--map-root-user",
        sys.executable,
        "-c",
        ENOSPC_SCRIPT,
        str(root),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["first"] == {"type": "resync", "reason": "watch_limit"}
    assert result["max"] > 3  # our own cap was not what stopped it: the kernel was
    assert result["watches"] == 3
    assert result["second"]["path"] == "/top.txt" and result["second"]["action"] == "create"


async def test_queue_overflow_pushes_resync(watch):
    root, start = watch
    watcher, events = await start(queue_size=16)
    # Keep the event loop busy while the reader thread queues far more than 16 events.
    deadline = time.monotonic() + 10
    for i in range(200):
        (root / f"f{i}").write_text("x")
    while not watcher._raw_overflow and time.monotonic() < deadline:
        time.sleep(0.005)
    assert watcher._raw_overflow
    await events.expect(lambda e: e == {"type": "resync", "reason": "overflow"})
    # Still serving: once the flood has drained, a new file is reported again. (While
    # the flood lasts, further overflows may swallow a probe; each probe is a new file.)
    for attempt in range(20):
        name = f"after{attempt}.txt"
        (root / name).write_text("x")
        event = await events.expect(
            lambda e, name=name: e["type"] == "resync" or e.get("path") == "/" + name
        )
        if event["type"] == "change":
            break
    assert event["type"] == "change" and event["action"] == "create"


async def test_stop_releases_the_fd_and_the_thread(tmp_path: Path):
    root = tmp_path / "ws"
    (root / "a").mkdir(parents=True)
    fds_before = len(os.listdir("/proc/self/fd"))
    watcher = Watcher(root)
    await watcher.start()
    reader = watcher._reader
    assert reader is not None and count_fd_watches(reader.fd) == 2
    await watcher.stop()
    assert not reader.is_alive()
    assert not [t for t in threading.enumerate() if t is reader]
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_inotify_fd_is_not_inherited(watch):
    _, start = watch
    watcher, _ = await start()
    assert watcher._reader is not None and watcher.kernel_watch_count() == 1
    proc = await asyncio.create_subprocess_exec(
        "ls", "-l", "/proc/self/fd", stdout=asyncio.subprocess.PIPE, close_fds=False
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert b"anon_inode:inotify" not in out


async def test_a_burst_becomes_one_resync(watch):
    root, start = watch
    watcher, events = await start(max_events_per_second=20, debounce=0.2)
    for i in range(50):
        (root / f"burst{i}").write_text("x")
    await events.expect(lambda e: e == {"type": "resync", "reason": "overflow"})
    changes = [e for e in events.seen if e["type"] == "change"]
    assert len(changes) <= 20
    assert watcher.stats().resyncs["overflow"] == 1


NO_INSTANCE_SCRIPT = r"""
import asyncio, json, sys
from aetherd.services.watcher import Watcher

async def main(root):
    with open("/proc/sys/user/max_inotify_instances", "w") as handle:
        handle.write("0")  # this user namespace only
    watcher = Watcher(root)
    await watcher.start()
    print(json.dumps({"error": watcher.error, "watches": watcher.watch_count}))
    await watcher.stop()

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
async def test_no_inotify_instance_left_degrades_without_crashing(tmp_path: Path):
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        "--user",
        "--map-root-user",
        sys.executable,
        "-c",
        NO_INSTANCE_SCRIPT,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["watches"] == 0 and "inotify" in result["error"]


def _max_queued_events() -> int:
    with open("/proc/sys/fs/inotify/max_queued_events", encoding="ascii") as handle:
        return int(handle.read())


@pytest.mark.slow
async def test_kernel_queue_overflow_pushes_resync_and_rewatches(watch):
    root, start = watch
    (root / "sub").mkdir()
    watcher, events = await start(max_events_per_second=1_000_000, queue_size=1_000_000)
    limit = _max_queued_events()
    a, b = root / "a", root / "b"
    fds = [os.open(a, os.O_WRONLY | os.O_CREAT), os.open(b, os.O_WRONLY | os.O_CREAT)]
    try:
        # Holding the watcher's lock stalls the reader thread inside its callback, so
        # the kernel queue fills; alternating files keeps the kernel from merging events.
        # The reader may already hold one read buffer of events (a few thousand) when it
        # stalls, so the kernel gets `limit` events beyond that.
        with watcher._lock:
            for _ in range(limit // 2 + 8192):
                os.write(fds[0], b"x")
                os.write(fds[1], b"x")
    finally:
        for fd in fds:
            os.close(fd)
    await events.expect(lambda e: e == {"type": "resync", "reason": "overflow"}, timeout=30)
    assert watcher.kernel_overflows == 1
    assert watcher.watched_dirs() == ["/", "/sub"]
    (root / "sub" / "after.txt").write_text("x")
    await events.change("create", "/sub/after.txt", timeout=30)


async def test_more_coalescing_rules(watch):
    root, start = watch
    for name in ("replaced", "a", "gone"):
        (root / name).write_text("0")
    # A window far longer than the few microseconds between the syscalls of one case.
    _, events = await start(debounce=1.0)
    # delete + create within one window: the file was replaced → modify
    (root / "replaced").unlink()
    (root / "replaced").write_text("1")
    # a → b → c reads as a → c
    os.rename(root / "a", root / "b")
    os.rename(root / "b", root / "c")
    # renamed, then deleted: the old name is what vanished
    os.rename(root / "gone", root / "gone2")
    (root / "gone2").unlink()
    seen = await events.until_marker(root)
    changes = sorted(
        (e["action"], e["path"], e.get("oldPath")) for e in seen if e["type"] == "change"
    )
    assert changes == [
        ("delete", "/gone", None),
        ("modify", "/replaced", None),
        ("rename", "/c", "/a"),
    ]


async def test_a_rename_split_across_reads_is_still_a_rename(watch):
    # The reader can wake between a rename's MOVED_FROM and MOVED_TO; the kernel's
    # timing cannot be forced, so the two reads are replayed into the callbacks.
    from watchdog.observers.inotify_c import InotifyConstants as IC
    from watchdog.observers.inotify_c import InotifyEvent

    root, start = watch
    watcher, events = await start(move_grace=0.5)
    wd = watcher._path_wd[watcher.root]
    watcher.on_event(InotifyEvent(wd, IC.IN_MOVED_FROM, 77, b"f.txt"))
    watcher._end_batch()  # first read ends here
    watcher.on_event(InotifyEvent(wd, IC.IN_MOVED_TO, 77, b"g.txt"))
    watcher._end_batch()
    event = await events.change("rename", "/g.txt")
    assert event["oldPath"] == "/f.txt"
    # A source whose destination never comes is a delete once the grace has passed.
    watcher.on_event(InotifyEvent(wd, IC.IN_MOVED_FROM, 78, b"h.txt"))
    watcher._end_batch()
    await events.change("delete", "/h.txt")
    del root


def test_change_kinds_are_an_enum_of_the_wire_words():
    """The watcher's change kinds are one enum (watchfiles' `Change`), valued as on the wire."""
    from aetherd.protocol.files import FilesChange  # the push frame that carries them
    from aetherd.services.watcher import Change

    assert [c.value for c in Change] == ["create", "modify", "delete", "rename"]
    wire = FilesChange.model_fields["action"].annotation
    assert set(getattr(wire, "__args__", ())) == {c.value for c in Change}
