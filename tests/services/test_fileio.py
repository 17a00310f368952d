"""The shared file primitives: the one writer, the one opener, the errno table, executors."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.executors import BoundedExecutor, Executors
from aetherd.services.fileio import (
    ERRNO_CODES,
    TEMP_PREFIX,
    WRITEBACK_STEP,
    AtomicWriter,
    open_regular,
    open_workspace_file,
    os_error,
    pread_cached,
    read_regular,
    write_atomic,
)
from aetherd.services.jail import Jail
from tests.support import REPO


@pytest.fixture
def jail(workspace: Path) -> Jail:
    return Jail(workspace)


def code_of(call) -> ErrorCode:
    with pytest.raises(AetherError) as info:
        call()
    return info.value.code


# -- The writer ----------------------------------------------------------------------------


def test_writer_keeps_mode_uses_random_exclusive_temp_names(jail, workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("SECRET")
    target = workspace / "a.txt"
    target.write_text("old")
    os.chmod(target, 0o751)
    names: set[str] = set()
    for round_ in range(5):
        writer = AtomicWriter(jail, target).open()
        assert writer.temp is not None and writer.temp.startswith(TEMP_PREFIX)
        names.add(writer.temp)
        # The temp file is ours: a fresh regular file, mode 0600 until commit.
        st = os.lstat(workspace / writer.temp)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        writer.write(f"new {round_}".encode())
        writer.commit()
    assert len(names) == 5  # random, not predictable
    assert target.read_text() == "new 4" and stat.S_IMODE(target.stat().st_mode) == 0o751
    assert outside.read_text() == "SECRET"
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]


def test_writer_never_follows_a_symlink_swapped_in_after_the_jail(jail, workspace, tmp_path):
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    (outside_dir / "a.txt").write_text("SECRET")
    os.chmod(outside_dir / "a.txt", 0o600)
    (workspace / "sub").mkdir()
    real = jail.resolve("/sub/a.txt")
    # The directory becomes a symlink out of the root after the jail resolved the path.
    (workspace / "sub").rmdir()
    os.symlink(outside_dir, workspace / "sub")
    with pytest.raises(OSError) as info:
        write_atomic(jail, real, b"PWNED")
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    code = os_error(info.value, "/sub/a.txt").code
    assert code in (ErrorCode.INVALID_PATH, ErrorCode.NOT_DIRECTORY)
    assert (outside_dir / "a.txt").read_text() == "SECRET"
    assert os.listdir(outside_dir) == ["a.txt"]
    # The target itself swapped for a symlink: the link is replaced, its target untouched.
    os.unlink(workspace / "sub")
    real = jail.resolve("/b.txt")
    os.symlink(outside_dir / "a.txt", workspace / "b.txt")
    write_atomic(jail, real, b"mine")
    assert (workspace / "b.txt").read_bytes() == b"mine" and not (workspace / "b.txt").is_symlink()
    assert (outside_dir / "a.txt").read_text() == "SECRET"
    assert stat.S_IMODE((outside_dir / "a.txt").stat().st_mode) == 0o600


def test_writer_abort_and_limits(jail, workspace):
    writer = AtomicWriter(jail, workspace / "new" / "deep" / "f.bin", max_size=4).open()
    assert (workspace / "new" / "deep").is_dir()  # parents made
    with pytest.raises(OSError) as info:
        writer.write(b"12345")
    assert os_error(info.value, "/f").code is ErrorCode.FILE_TOO_LARGE
    writer.abort()
    assert os.listdir(workspace / "new" / "deep") == []
    with pytest.raises(IsADirectoryError):
        AtomicWriter(jail, workspace / "new").open()
    with pytest.raises(IsADirectoryError):
        AtomicWriter(jail, workspace).open()


def test_writer_takes_pieces_in_one_writev_and_starts_writeback_of_large_files(jail, workspace):
    # 1,500 pieces (more than one writev's IOV_MAX), some empty, some bytearrays.
    pieces = [bytes([i % 251]) * (i % 7) for i in range(1500)] + [bytearray(b"tail")]
    big = os.urandom(WRITEBACK_STEP + 1)
    writer = AtomicWriter(jail, workspace / "f.bin").open()
    writer.write(pieces)
    writer.write([big[:100], memoryview(big)[100:]])
    writer.write(b"end")
    assert writer.size == sum(map(len, pieces)) + len(big) + 3
    st = writer.commit()
    assert (workspace / "f.bin").read_bytes() == b"".join(pieces) + big + b"end"
    assert st.st_size == writer.size


def test_write_all_goes_on_after_a_short_write(tmp_path):
    # A file size limit makes the kernel write part of a writev, then refuse (EFBIG):
    # a real short write. Run in a child, so the limit and the signal stay there.
    script = f"""
import errno, os, resource, signal, sys
sys.path.insert(0, {str(REPO)!r})
from aetherd.services.fileio import write_all
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))
fd = os.open({str(tmp_path / "out")!r}, os.O_WRONLY | os.O_CREAT, 0o600)
try:
    write_all(fd, [b"a" * 6000, b"b" * 6000])
except OSError as exc:
    print("errno", errno.errorcode[exc.errno])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "errno EFBIG", done.stderr
    assert (tmp_path / "out").read_bytes() == b"a" * 6000 + b"b" * 4000


# -- The opener ----------------------------------------------------------------------------


def test_opener_refuses_fifos_sockets_devices_and_directories_at_once(jail, workspace):
    os.mkfifo(workspace / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(workspace / "sock"))
    os.symlink("/dev/zero", workspace / "dev-link")  # outside the root: the jail says no
    (workspace / "dir").mkdir()
    try:
        # Each of these would block (fifo) or misbehave without O_NONBLOCK + fstat.
        for name in ("fifo", "sock"):
            with pytest.raises(AetherError) as info:
                open_workspace_file(jail, f"/{name}")
            err = info.value
            assert err.code is ErrorCode.INVALID_PATH and "not a regular file" in err.message
        assert code_of(lambda: open_workspace_file(jail, "/dev-link")) is ErrorCode.INVALID_PATH
        assert code_of(lambda: open_workspace_file(jail, "/dir")) is ErrorCode.IS_DIRECTORY
        assert code_of(lambda: open_workspace_file(jail, "/")) is ErrorCode.IS_DIRECTORY
        assert code_of(lambda: open_workspace_file(jail, "/missing")) is ErrorCode.NOT_FOUND
    finally:
        sock.close()
    # A FIFO with a writer attached is still refused, and its data is not consumed.
    writer_fd = os.open(workspace / "fifo", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(writer_fd, b"data")
        assert code_of(lambda: open_workspace_file(jail, "/fifo")) is ErrorCode.INVALID_PATH
        assert os.read(writer_fd, 4) == b"data"
    finally:
        os.close(writer_fd)


def test_opener_checks_the_fd_not_the_path(jail, workspace, tmp_path):
    (workspace / "f.txt").write_text("hello")
    fd, st = open_workspace_file(jail, "/f.txt")
    try:
        assert os.read(fd, 10) == b"hello" and stat.S_ISREG(st.st_mode)
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    data, _ = read_regular(jail, workspace / "f.txt", "/f.txt", 3)
    assert data == b"hell"  # limit + 1: the caller sees it is too large
    # A symlink where the jail found a file (a race) is refused, not followed.
    (tmp_path / "secret").write_text("SECRET")
    real = jail.resolve("/f.txt")
    os.unlink(workspace / "f.txt")
    os.symlink(tmp_path / "secret", workspace / "f.txt")
    assert code_of(lambda: open_regular(jail, real, "/f.txt")) is ErrorCode.INVALID_PATH


def test_pread_cached_reads_all_it_was_asked_or_nothing(workspace):
    (workspace / "f").write_bytes(b"abcdef")
    fd = os.open(workspace / "f", os.O_RDONLY)
    try:
        assert pread_cached(fd, 3, 2) == b"cde"
        assert pread_cached(fd, 0, 0) == b""
        assert pread_cached(fd, 10, 0) is None  # short: the caller reads in a thread
    finally:
        os.close(fd)


def test_one_errno_table_with_clean_messages():
    assert os_error(OSError(errno.ENXIO, "x"), "/p").code is ErrorCode.INVALID_PATH
    assert os_error(OSError(errno.ENOSPC, "x"), "/p").code is ErrorCode.NO_SPACE
    assert os_error(OSError(errno.ELOOP, "x"), "/p").code is ErrorCode.INVALID_PATH
    unknown = os_error(OSError(errno.EIO, "Input/output error"), "/caf\udce9")
    assert unknown.code is ErrorCode.INTERNAL_ERROR
    unknown.message.encode("utf-8")  # sendable: the undecodable byte became U+FFFD
    assert os_error(OSError(errno.ENOENT, "x"), "/\ud800").message.encode("utf-8")
    assert all(isinstance(code, ErrorCode) for code, _ in ERRNO_CODES.values())


FILE_MODULES = (
    "aetherd/services/fs.py",
    "aetherd/services/config.py",
    "aetherd/config_model.py",
    "aetherd/agent/tools.py",
    "aetherd/transport/files_http.py",
    "aetherd/channels/files.py",
    "aetherd/channels/config.py",
)


def test_every_file_service_uses_the_shared_primitives():
    """No second writer, opener or errno table grows back (how defect 1 got in)."""
    needles = re.compile(
        r"tempfile|O_EXCL|os\.chmod\(|os\.replace\(|os\.open\(|(?<![.\w])open\(|errno\.E"
    )
    offenders = []
    for name in FILE_MODULES:
        path = REPO / name
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if needles.search(code):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == []


# -- Executors -----------------------------------------------------------------------------


async def test_executor_is_bounded_and_shutdown_does_not_wait_on_a_stuck_task(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pool = BoundedExecutor("test", 2)
    started = threading.Event()

    def stuck() -> bytes:
        started.set()
        with open(fifo, "rb") as handle:  # a blocking open, as the old code did
            return handle.read()

    blocked = pool.submit(stuck)
    assert await asyncio.to_thread(started.wait, 5)
    assert await pool.run(lambda: 41 + 1) == 42  # the second thread still works
    assert pool.stats()["threads"] == 2
    queued = [pool.submit(stuck) for _ in range(3)]
    loop = asyncio.get_running_loop()
    stuck_names = await loop.run_in_executor(None, pool.shutdown, 0.2)
    assert len(stuck_names) >= 1  # reported, not waited for
    assert all(f.cancelled() or f.running() for f in queued)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    # Release the stuck thread so the test leaves nothing behind.
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)
    await asyncio.wrap_future(blocked)


EXIT_SCRIPT = r"""
import asyncio, os, sys, threading
from aetherd.services.executors import Executors

async def main(fifo):
    executors = Executors(file_threads=2, shutdown_timeout=0.3)
    started = threading.Event()
    def stuck():
        started.set()
        with open(fifo, "rb") as handle:  # blocks until a writer opens the FIFO: never
            return handle.read()
    executors.file.submit(stuck)
    while not started.is_set():
        await asyncio.sleep(0.01)
    await executors.stop()
    print("stopped", flush=True)

asyncio.run(main(sys.argv[1]))
"""


def test_a_thread_stuck_on_a_fifo_does_not_keep_the_process_alive(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(fifo)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped"
    assert "still blocked" in proc.stderr


async def test_executors_stop_returns_with_a_stuck_thread(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    executors = Executors(file_threads=1, shutdown_timeout=0.2)
    started = threading.Event()

    def stuck() -> None:
        started.set()
        with open(fifo, "rb"):
            pass

    blocked = executors.file.submit(stuck)
    assert await asyncio.to_thread(started.wait, 5)
    await asyncio.wait_for(executors.stop(), 10)
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)
    await asyncio.wrap_future(blocked)


async def test_temp_files_are_never_listed_and_stale_ones_are_removed(workspace):
    """A writer killed mid-write leaves its temp file; nobody sees it, and it goes away."""
    from aetherd.agent.tools import Tools
    from aetherd.services.fs import FileLimits, FileSystem

    jail = Jail(workspace)
    (workspace / "kept.txt").write_text("x")
    live = AtomicWriter(jail, workspace / "live.txt").open()  # a write in flight
    assert live.temp is not None
    dead_name = f"{TEMP_PREFIX}{'ab' * 8}.new"  # what a writer killed by SIGKILL leaves
    (workspace / dead_name).write_bytes(b"partial")
    old = 1_000_000_000
    os.utime(workspace / dead_name, (old, old))
    fs = FileSystem(jail, FileLimits(temp_max_age=60))
    names = [entry["name"] for entry in await fs.list("/")]
    assert names == ["kept.txt"]
    assert not (workspace / dead_name).exists()  # stale: removed
    assert (workspace / live.temp).exists()  # fresh: a live writer's, kept
    tools = Tools(jail)
    assert await tools.run("list_files", {}) == "kept.txt"
    assert await tools.run("glob", {"pattern": "**"}) == "/kept.txt"
    live.write(b"done")
    live.commit()
    assert sorted(os.listdir(workspace)) == ["kept.txt", "live.txt"]
