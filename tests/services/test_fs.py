"""The file service alone: operations, the jail on every path, atomic writes, ENOSPC."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import mmap
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services import fs as fs_module
from aetherd.services.fileio import LOCAL_FS_TYPES, LoopReadGate
from aetherd.services.fs import FileLimits, FileSystem, is_temp_name
from aetherd.services.jail import Jail

REPO = Path(__file__).resolve().parents[2]
LOCAL_MOUNTS = (
    "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    "23 22 0:21 / /proc rw - proc proc rw\n"
    "24 22 0:22 / /tmp rw - tmpfs tmpfs rw\n"
)


def gate_for(tmp_path: Path, text: str) -> LoopReadGate:
    """A gate reading a mount table of our own (a regular file: it never reports a change)."""
    table = tmp_path / f"mountinfo-{len(list(tmp_path.glob('mountinfo-*')))}"
    table.write_text(text)
    return LoopReadGate(str(table))


# Every test of `tree` runs twice: small reads on the event loop (the default), and every
# read in a thread (`files_loop_read_max` 0), so both paths answer alike.
@pytest.fixture(params=[64 * 1024, 0], ids=["loop-reads", "thread-reads"])
def tree(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[FileSystem, Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside-secret"
    (root / "src").mkdir(parents=True)
    outside.mkdir()
    (outside / "passwd").write_text("secret")
    (root / "src" / "a.txt").write_text("hello")
    os.symlink(outside, root / "escape")
    os.symlink(root / "escape", root / "chain")
    os.symlink("src/a.txt", root / "link-in")
    os.symlink("../outside-secret/passwd", root / "rel-out")
    limits = FileLimits(max_file_size=1024 * 1024, read_page_size=4096, loop_read_max=request.param)
    return FileSystem(Jail(root), limits, gate_for(tmp_path, LOCAL_MOUNTS)), root, outside


async def _fails(code: ErrorCode, coro) -> AetherError:
    with pytest.raises(AetherError) as info:
        await coro
    assert info.value.code is code, info.value
    assert "pytest-" not in info.value.message  # no real path (root or outside) leaks
    return info.value


async def test_list_orders_directories_first_and_reports_symlinks(tree):
    fs, root, _ = tree
    (root / "b.bin").write_bytes(b"\x00" * 10)
    (root / "zdir").mkdir()
    items = await fs.list("/")
    names = [i["name"] for i in items]
    assert names == ["src", "zdir", "b.bin", "chain", "escape", "link-in", "rel-out"]
    by_name = {i["name"]: i for i in items}
    assert by_name["src"]["type"] == "directory" and by_name["src"]["size"] == 0
    assert by_name["b.bin"] == {
        "name": "b.bin",
        "type": "file",
        "size": 10,
        "modified": by_name["b.bin"]["modified"],
    }
    assert by_name["b.bin"]["modified"].endswith("Z") and "T" in by_name["b.bin"]["modified"]
    # An inside symlink is reported as its target; outside ones reveal nothing about it.
    assert by_name["link-in"] == {**by_name["link-in"], "type": "file", "size": 5, "symlink": True}
    for name in ("escape", "chain", "rel-out"):
        assert by_name[name]["symlink"] is True and by_name[name]["broken"] is True
        assert by_name[name]["size"] == 0 and by_name[name]["type"] == "file"
    await _fails(ErrorCode.NOT_DIRECTORY, fs.list("/src/a.txt"))
    await _fails(ErrorCode.NOT_FOUND, fs.list("/nope"))


async def test_read_text_binary_and_paging(tree):
    fs, root, _ = tree
    reply = await fs.read("/src/a.txt")
    assert reply["content"] == "hello" and reply["encoding"] == "utf-8"
    assert reply["size"] == 5 and reply["eof"] is True and reply["offset"] == 0
    (root / "bin").write_bytes(b"ab\x00cd")
    reply = await fs.read("/bin")
    assert reply["encoding"] == "base64" and base64.b64decode(reply["content"]) == b"ab\x00cd"
    (root / "latin").write_bytes(b"caf\xe9")
    assert (await fs.read("/latin"))["encoding"] == "base64"
    # 5000 bytes of 2-byte characters: pages of 4096 raw bytes never split a character.
    text = "é" * 2500
    (root / "big.txt").write_text(text)
    pages, offset = [], 0
    for _ in range(10):
        reply = await fs.read("/big.txt", offset)
        pages.append(reply["content"])
        assert reply["encoding"] == "utf-8"
        offset = reply["nextOffset"]
        if reply["eof"]:
            break
    assert len(pages) == 2 and "".join(pages) == text
    reply = await fs.read("/big.txt", 10, 4)
    assert reply["content"] == "éé" and reply["eof"] is False and reply["nextOffset"] == 14
    reply = await fs.read("/big.txt", 99999)
    assert reply["content"] == "" and reply["eof"] is True
    await _fails(ErrorCode.IS_DIRECTORY, fs.read("/src"))
    await _fails(ErrorCode.NOT_FOUND, fs.read("/missing"))


async def test_read_bytes_for_in_process_callers(tree):
    fs = tree[0]
    assert await fs.read_bytes("/src/a.txt") == b"hello"
    assert await fs.read_bytes("/link-in") == b"hello"
    await _fails(ErrorCode.FILE_TOO_LARGE, fs.read_bytes("/src/a.txt", max_size=4))
    await _fails(ErrorCode.IS_DIRECTORY, fs.read_bytes("/src"))
    await _fails(ErrorCode.INVALID_PATH, fs.read_bytes("/escape/passwd"))
    await _fails(ErrorCode.NOT_FOUND, fs.read_bytes("/nope"))


async def test_read_over_cap_is_file_too_large(tree):
    fs, root, _ = tree
    (root / "huge").write_bytes(b"")
    os.truncate(root / "huge", 1024 * 1024 + 1)
    err = await _fails(ErrorCode.FILE_TOO_LARGE, fs.read("/huge"))
    assert err.extra["size"] == 1024 * 1024 + 1


# -- Small reads on the event loop ------------------------------------------------------


def resident_pages(path: Path) -> int:
    """How many of `path`'s pages are in the page cache (mincore(2); reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mapped)
        vec = (ctypes.c_ubyte * pages)()
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), size, vec)
        del anchor
        assert failed == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec)
    finally:
        mapped.close()


def evict(path: Path) -> bool:
    """Drop `path`'s pages from the page cache (a few tries); False if they stay."""
    for _ in range(5):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if resident_pages(path) == 0:
            return True
    return False  # tmpfs, for one, never drops them


def loop_fs(tmp_path: Path, mounts: str = LOCAL_MOUNTS) -> tuple[FileSystem, Path]:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return FileSystem(Jail(root), FileLimits(loop_read_max=1000), gate_for(tmp_path, mounts)), root


async def test_small_cached_reads_skip_the_thread_and_others_take_it(tmp_path):
    fs, root = loop_fs(tmp_path)
    pool = fs.jail.executor
    (root / "small.txt").write_text("x" * 1000)
    (root / "large.txt").write_text("y" * 1001)
    (root / "bin").write_bytes(b"\x00\x01" * 10)
    os.symlink("small.txt", root / "link")
    calls = pool.submitted
    reply = await fs.read("/small.txt")
    assert reply["content"] == "x" * 1000 and reply["eof"] is True and reply["size"] == 1000
    reply = await fs.read("/link", 990, 20)
    assert reply["content"] == "x" * 10 and reply["nextOffset"] == 1000
    reply = await fs.read("/bin", 4)
    assert reply["encoding"] == "base64" and base64.b64decode(reply["content"]) == b"\x00\x01" * 8
    assert pool.submitted == calls  # none of these left the loop
    reply = await fs.read("/large.txt")
    assert reply["content"] == "y" * 1001 and pool.submitted == calls + 1
    # Pages not in memory: the read gives the same answer, whichever path it took (the
    # kernel starts readahead when RWF_NOWAIT fails, and this VM's disk can finish it
    # before the read gives up, so which path is taken is not deterministic here) ...
    assert resident_pages(root / "small.txt") == 1
    if evict(root / "small.txt"):
        assert (await fs.read("/small.txt"))["content"] == "x" * 1000


async def test_a_read_not_in_the_page_cache_goes_to_a_thread(tmp_path, monkeypatch):
    # ... so "not cached" is simulated here: pread_cached answers None, as RWF_NOWAIT does.
    fs, root = loop_fs(tmp_path)
    (root / "small.txt").write_text("x" * 1000)
    calls = fs.jail.executor.submitted
    monkeypatch.setattr(fs_module, "pread_cached", lambda fd, count, offset: None)
    reply = await fs.read("/small.txt", 10)
    assert reply["content"] == "x" * 990 and fs.jail.executor.submitted == calls + 1


async def test_loop_reads_refuse_fifos_sockets_dirs_and_escapes_at_once(tmp_path):
    fs, root = loop_fs(tmp_path)
    pool = fs.jail.executor
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    (root / "dir").mkdir()
    (tmp_path / "secret").write_text("SECRET")
    os.symlink(tmp_path / "secret", root / "out")
    os.symlink("/dev/zero", root / "dev")
    writer = os.open(root / "fifo", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(writer, b"data")
        calls = pool.submitted
        for path, code in [
            ("/fifo", ErrorCode.INVALID_PATH),
            ("/sock", ErrorCode.INVALID_PATH),
            ("/dir", ErrorCode.IS_DIRECTORY),
            ("/", ErrorCode.IS_DIRECTORY),
            ("/out", ErrorCode.INVALID_PATH),
            ("/dev", ErrorCode.INVALID_PATH),
            ("/missing", ErrorCode.NOT_FOUND),
            ("/dir/../../secret", ErrorCode.INVALID_PATH),
        ]:
            err = await _fails(code, asyncio.wait_for(fs.read(path), 10))
            assert "SECRET" not in err.message
        assert pool.submitted == calls
        assert os.read(writer, 4) == b"data"  # the FIFO's data was not consumed
    finally:
        os.close(writer)
        sock.close()


@pytest.mark.parametrize("kind", ["nfs4", "fuse.sshfs", "cifs", "autofs", "9p"])
async def test_a_network_mount_anywhere_sends_reads_to_a_thread(tmp_path, kind):
    mounts = LOCAL_MOUNTS + f"40 22 0:50 / /mnt/x rw - {kind} server:/x rw\n"
    fs, root = loop_fs(tmp_path, mounts)
    (root / "f").write_text("hello")
    calls = fs.jail.executor.submitted
    assert (await fs.read("/f"))["content"] == "hello"
    assert fs.jail.executor.submitted == calls + 1


def test_the_gate_reads_the_real_mount_table(tmp_path):
    gate = LoopReadGate()
    assert gate.types and gate.allowed() == (gate.types <= LOCAL_FS_TYPES)
    assert LoopReadGate(str(tmp_path / "missing")).allowed() is False
    assert gate_for(tmp_path, "").allowed() is False  # an empty table proves nothing
    assert gate_for(tmp_path, LOCAL_MOUNTS).types == {"ext4", "proc", "tmpfs"}


async def test_write_creates_parents_keeps_mode_and_is_atomic(tree):
    fs, root, _ = tree
    reply = await fs.write("/deep/er/new.txt", b"one")
    assert reply["path"] == "/deep/er/new.txt" and reply["size"] == 3
    assert (root / "deep/er/new.txt").read_bytes() == b"one"
    target = root / "src" / "a.txt"
    os.chmod(target, 0o751)
    inode = target.stat().st_ino
    await fs.write("/src/a.txt", b"two")
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o7777 == 0o751
    assert target.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert not [p for p in (root / "src").iterdir() if is_temp_name(p.name)]
    # Through an inside symlink: the target changes, the link stays a link.
    await fs.write("/link-in", b"via link")
    assert (root / "link-in").is_symlink() and target.read_bytes() == b"via link"
    await _fails(ErrorCode.IS_DIRECTORY, fs.write("/src", b"x"))
    await _fails(ErrorCode.IS_DIRECTORY, fs.write("/", b"x"))


async def test_append_and_expected_modified(tree):
    fs, root, _ = tree
    await fs.write("/log", b"a", append=True)
    reply = await fs.write("/log", b"b", append=True)
    assert (root / "log").read_bytes() == b"ab" and reply["size"] == 2
    stamp = (await fs.stat("/log"))["modified"]
    reply = await fs.write("/log", b"new", expected_modified=stamp)
    assert reply["modified"] != stamp  # even within one tick of the coarse file clock
    err = await _fails(ErrorCode.CONFLICT, fs.write("/log", b"stale", expected_modified=stamp))
    assert err.extra["modified"] == reply["modified"]
    assert (root / "log").read_bytes() == b"new"
    await _fails(ErrorCode.CONFLICT, fs.write("/gone", b"x", expected_modified=stamp))
    await _fails(ErrorCode.INVALID_MESSAGE, fs.write("/log", b"x", expected_modified="yesterday"))


async def test_write_cap(tree):
    fs, root, _ = tree
    await _fails(ErrorCode.FILE_TOO_LARGE, fs.write("/big", b"x" * (1024 * 1024 + 1)))
    assert not (root / "big").exists()
    await fs.write("/big", b"x" * (1024 * 1024))
    await _fails(ErrorCode.FILE_TOO_LARGE, fs.write("/big", b"x", append=True))


async def test_mkdir_delete_rename(tree):
    fs, root, outside = tree
    assert await fs.mkdir("/a/b/c") == {"path": "/a/b/c"}
    assert await fs.mkdir("/a/b/c") == {"path": "/a/b/c"}
    await _fails(ErrorCode.ALREADY_EXISTS, fs.mkdir("/src/a.txt"))
    (root / "a/b/c/f").write_text("x")
    await _fails(ErrorCode.CONFLICT, fs.delete("/a", recursive=False))
    assert await fs.delete("/a") == {"path": "/a"}
    assert not (root / "a").exists()
    # Deleting a symlink to outside removes the link only.
    await fs.delete("/escape")
    assert not (root / "escape").is_symlink() and (outside / "passwd").exists()
    await _fails(ErrorCode.NOT_FOUND, fs.delete("/nope"))
    # rename
    (root / "b.txt").write_text("b")
    await _fails(ErrorCode.ALREADY_EXISTS, fs.rename("/src/a.txt", "/b.txt"))
    reply = await fs.rename("/src/a.txt", "/b.txt", overwrite=True)
    assert reply == {"oldPath": "/src/a.txt", "newPath": "/b.txt"}
    assert (root / "b.txt").read_text() == "hello"
    await fs.rename("/src", "/moved/src2")
    assert (root / "moved/src2").is_dir()
    await _fails(ErrorCode.INVALID_PATH, fs.rename("/moved", "/moved/src2/inner"))
    await _fails(ErrorCode.NOT_FOUND, fs.rename("/nope", "/x"))


async def test_root_cannot_be_deleted_or_renamed(tree):
    fs, root, _ = tree
    for path in ("/", "", ".", "/src/..", "src/../."):
        await _fails(ErrorCode.INVALID_PATH, fs.delete(path))
        await _fails(ErrorCode.INVALID_PATH, fs.rename(path, "/elsewhere"))
    await _fails(ErrorCode.INVALID_PATH, fs.rename("/src", "/"))
    assert (root / "src" / "a.txt").exists()


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "/../outside-secret/passwd",
        "/src/../../outside-secret/passwd",
        "/escape/passwd",
        "/chain/passwd",
        "/chain",
        "/rel-out",
        "/escape/new-file",
        "/src/a.txt\x00.png",
        "/" + "a" * 300,
        "/" + "/".join(["abcdefgh"] * 600),
    ],
)
async def test_the_jail_guards_every_operation(tree, path):
    fs, _, outside = tree
    before = (outside / "passwd").read_text()
    for call in (
        fs.list(path),
        fs.read(path),
        fs.write(path, b"pwned"),
        fs.write(path, b"pwned", append=True),
        fs.mkdir(path + "/x"),
        fs.delete(path + "/x"),
        fs.rename(path + "/x", "/stolen"),
        fs.rename("/src/a.txt", path + "/x"),
        fs.stat(path + "/x"),
    ):
        await _fails(ErrorCode.INVALID_PATH, call)
    assert (outside / "passwd").read_text() == before
    assert sorted(os.listdir(outside)) == ["passwd"]


async def test_a_symlink_out_can_be_moved_or_removed_but_never_followed(tree):
    fs, root, outside = tree
    await fs.rename("/chain", "/chain2")
    assert (root / "chain2").is_symlink()
    await _fails(ErrorCode.INVALID_PATH, fs.read("/chain2"))
    await fs.delete("/chain2")
    assert (outside / "passwd").read_text() == "secret"


async def test_absolute_paths_are_root_relative(tree):
    fs, root, outside = tree
    await fs.write(str(outside / "passwd"), b"inside")
    assert (outside / "passwd").read_text() == "secret"
    assert (root / str(outside / "passwd").lstrip("/")).read_text() == "inside"


async def test_non_utf8_names_are_listed_safely_and_round_trip(tree):
    fs, root, _ = tree
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"bytes")
    entry = next(i for i in await fs.list("/") if i["name"].startswith("caf"))
    assert entry["name"] == "caf\ufffd.txt"
    entry["name"].encode("utf-8")  # sendable as UTF-8 JSON
    assert base64.b64decode(entry["rawName"]) == b"caf\xe9.txt"
    # The raw form addresses the file (rawPath is base64 of the path's bytes).
    from aetherd.services.fs import decode_raw_path

    wire = decode_raw_path(base64.b64encode(b"/caf\xe9.txt").decode())
    reply = await fs.read(wire)
    assert reply["content"] == "bytes"
    stat = await fs.stat(wire)
    assert stat["path"] == "/caf\ufffd.txt" and base64.b64decode(stat["rawPath"]) == b"/caf\xe9.txt"
    renamed = await fs.rename(wire, "/plain.txt")
    assert renamed["oldPath"] == "/caf\ufffd.txt" and "rawOldPath" in renamed
    assert (root / "plain.txt").read_bytes() == b"bytes"


WRITER_SCRIPT = r"""
import sys
from pathlib import Path
from aetherd.services.fileio import AtomicWriter
from aetherd.services.jail import Jail
target, chunks = Path(sys.argv[1]), int(sys.argv[2])
writer = AtomicWriter(Jail(target.parent), target, 1 << 30).open()
for i in range(chunks):
    writer.write(b"N" * 65536)
    print("chunk", i, flush=True)
    sys.stdin.readline()  # the parent decides when the next chunk is written
writer.commit()
print("committed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0, 5, 15, "commit"])
def test_sigkill_mid_write_leaves_old_or_new(tmp_path: Path, kill_after):
    target = tmp_path / "data.bin"
    old = b"O" * 300_000
    target.write_bytes(old)
    os.chmod(target, 0o640)
    chunks = 16
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(target), str(chunks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for _ in range(chunks + 1):
            line = proc.stdout.readline().decode()
            assert line, "writer ended early"
            if line.split()[-1] == str(kill_after) or line.startswith(str(kill_after)):
                break
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()
    content = target.read_bytes()
    if kill_after == "commit":
        assert content == b"N" * 65536 * chunks
    else:
        assert content == old  # never torn
    assert target.stat().st_mode & 0o7777 == 0o640


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {done.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_is_no_space_and_the_old_file_stays(tiny_tmpfs: Path):
    fs = FileSystem(Jail(tiny_tmpfs), FileLimits(max_file_size=10 * 1024 * 1024))
    await fs.write("/keep.txt", b"old contents")
    err = await _fails(ErrorCode.NO_SPACE, fs.write("/keep.txt", b"x" * (256 * 1024)))
    assert "keep.txt" in err.message
    assert (tiny_tmpfs / "keep.txt").read_bytes() == b"old contents"
    assert os.listdir(tiny_tmpfs) == ["keep.txt"]  # the temp file is gone
    # HTTP uploads go through the same writer.
    wire, writer = await fs.begin_upload("/keep.txt")
    with pytest.raises(AetherError) as info:
        for _ in range(8):
            await fs.upload_chunk(wire, writer, b"y" * 32768)
    assert info.value.code is ErrorCode.NO_SPACE
    await fs.abort_upload(writer)
    assert (tiny_tmpfs / "keep.txt").read_bytes() == b"old contents"
    assert os.listdir(tiny_tmpfs) == ["keep.txt"]
