"""The shared file primitives: one reader-opener, one atomic writer, one errno table.

Every service that touches workspace files (the files channel, the HTTP transfer
routes, the agent's tools, the config store) reads and writes through this module,
so the rules below hold everywhere:

- **Opening a file to read** (`open_regular`, `open_workspace_file`): the path has
  been resolved by the jail; the directories down to it are then opened one by one
  from the workspace root with `O_NOFOLLOW`, so a directory swapped for a symlink
  after the jail checked it is refused (`INVALID_PATH`) instead of followed. The
  file itself is opened relative to its directory with `O_NOFOLLOW | O_NONBLOCK |
  O_CLOEXEC | O_NOCTTY`, and the *opened fd* is `fstat`ed: anything that is not a
  regular file (a FIFO, a socket, a device) is refused with `INVALID_PATH` ("not a
  regular file") and a directory with `IS_DIRECTORY`, before a single byte is read.
  `O_NONBLOCK` is what keeps a FIFO from blocking the open until a writer appears.
- **Writing a file** (`AtomicWriter`, `write_atomic`): a temp file with a random name
  in the target's directory, created with `O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC`
  (mode 0600) relative to that directory's fd (opened as above), so it is always a
  new file of ours and never the target of a planted symlink. The data is written
  and fsynced, the old file's mode (and owner, when running as root) is set with
  `fchmod`/`fchown` on the fd (never on a path), the temp file is renamed over the
  target within the same directory fd, and the directory is fsynced.
- **Errors**: `os_error` maps an `OSError` to one stable `ErrorCode` with a message
  that names only the client's path (`ERRNO_CODES`).

All functions here are synchronous: run them in the jail's file executor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import stat as stat_mod
import sys
from collections.abc import Sequence
from pathlib import Path

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.jail import Jail

TEMP_PREFIX = ".~aetherd-"
TEMP_NEW = ".new"  # temp file of a write that creates its target
TEMP_UPD = ".upd"  # temp file of a write that replaces an existing target
UNLIMITED = sys.maxsize

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: errno -> (code, what the message says). The one table for every file operation.
ERRNO_CODES: dict[int, tuple[ErrorCode, str]] = {
    errno.ENOENT: (ErrorCode.NOT_FOUND, "no such file or directory"),
    errno.EEXIST: (ErrorCode.ALREADY_EXISTS, "already exists"),
    errno.ENOTEMPTY: (ErrorCode.CONFLICT, "directory is not empty"),
    errno.EISDIR: (ErrorCode.IS_DIRECTORY, "is a directory"),
    errno.ENOTDIR: (ErrorCode.NOT_DIRECTORY, "not a directory"),
    errno.EACCES: (ErrorCode.PERMISSION_DENIED, "permission denied"),
    errno.EPERM: (ErrorCode.PERMISSION_DENIED, "operation not permitted"),
    errno.EROFS: (ErrorCode.PERMISSION_DENIED, "read-only file system"),
    errno.ETXTBSY: (ErrorCode.PERMISSION_DENIED, "text file busy"),
    errno.ENOSPC: (ErrorCode.NO_SPACE, "no space left on device"),
    errno.EDQUOT: (ErrorCode.NO_SPACE, "disk quota exceeded"),
    errno.EFBIG: (ErrorCode.FILE_TOO_LARGE, "file too large"),
    errno.ENAMETOOLONG: (ErrorCode.INVALID_PATH, "name too long"),
    errno.ELOOP: (ErrorCode.INVALID_PATH, "a symbolic link where none may be"),
    errno.EINVAL: (ErrorCode.INVALID_PATH, "invalid argument"),
    errno.EXDEV: (ErrorCode.INVALID_PATH, "crosses a mount point"),
    errno.ENXIO: (ErrorCode.INVALID_PATH, "not a regular file"),
    errno.ENODEV: (ErrorCode.INVALID_PATH, "not a regular file"),
}


def wire_text(text: str) -> str:
    """`text` made sendable as UTF-8: undecodable bytes and lone surrogates become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        data = text.encode("utf-8", "surrogateescape")  # names that are not UTF-8 on disk
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")  # any other lone surrogate
    return data.decode("utf-8", "replace")


shown_path = wire_text


def os_error(exc: OSError, wire_path: str) -> AetherError:
    """The stable code for an OS error; the message names only the client's path."""
    shown = shown_path(wire_path)
    found = ERRNO_CODES.get(exc.errno or 0)
    if found is None:
        return AetherError(ErrorCode.INTERNAL_ERROR, f"{shown}: {exc.strerror or exc}")
    return AetherError(found[0], f"{shown}: {found[1]}")


def not_regular(wire_path: str) -> AetherError:
    """The error for a FIFO, socket or device: INVALID_PATH, "not a regular file"."""
    return AetherError(ErrorCode.INVALID_PATH, f"{shown_path(wire_path)}: not a regular file")


def current_umask() -> int:
    """The process umask, read without changing it (os.umask is racy across threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def is_temp_name(name: str) -> bool:
    """True for the temp files of an atomic write (the watcher hides them)."""
    return name.startswith(TEMP_PREFIX) and name.endswith((TEMP_NEW, TEMP_UPD))


# -- Directories, opened without following symlinks ----------------------------------------


def _parts_below_root(jail: Jail, real_dir: str) -> list[str]:
    root = str(jail.root)
    if real_dir == root:
        return []
    if not jail.is_inside(real_dir):
        raise OSError(errno.ELOOP, "outside the workspace root")
    return [part for part in real_dir[len(root.rstrip("/")) :].split("/") if part]


def open_dir(jail: Jail, real_dir: str | Path, *, create: bool = False) -> int:
    """An fd of directory `real_dir` (a jail-resolved path), walked down from the root.

    Every component is opened with `O_NOFOLLOW`: a symlink anywhere on the way (one
    that appeared after the jail resolved the path) fails with ELOOP or ENOTDIR
    rather than being followed. With `create`, missing directories are made (mode
    0777 less the umask, like `mkdir -p`). Raises OSError; the caller closes the fd.
    """
    parts = _parts_below_root(jail, str(real_dir))
    fd = os.open(jail.root, _DIR_FLAGS)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- Reading --------------------------------------------------------------------------------


def open_regular(jail: Jail, real: str | Path, wire_path: str) -> tuple[int, os.stat_result]:
    """A read-only fd of the regular file at the jail-resolved `real`, and its fstat.

    Never blocks (O_NONBLOCK) and never follows a symlink (O_NOFOLLOW on every
    component below the root). Raises AetherError: IS_DIRECTORY for a directory,
    INVALID_PATH ("not a regular file") for a FIFO, socket or device, and the
    `ERRNO_CODES` code for any other failure. The caller closes the fd.
    """
    real_str = str(real)
    if jail.is_root(Path(real_str)):
        raise AetherError(ErrorCode.IS_DIRECTORY, f"{shown_path(wire_path)}: is a directory")
    parent, name = os.path.split(real_str)
    try:
        dir_fd = open_dir(jail, parent)
        try:
            # A cheap first look, so that a device is never even opened ...
            lst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            _check_regular(lst, wire_path)
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise os_error(exc, wire_path) from None
    try:
        # ... and the check that counts: the fd we hold, not whatever the path is now.
        st = os.fstat(fd)
        _check_regular(st, wire_path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _check_regular(st: os.stat_result, wire_path: str) -> None:
    if stat_mod.S_ISDIR(st.st_mode):
        raise AetherError(ErrorCode.IS_DIRECTORY, f"{shown_path(wire_path)}: is a directory")
    if not stat_mod.S_ISREG(st.st_mode):
        raise not_regular(wire_path)


def open_workspace_file(jail: Jail, wire_path: str) -> tuple[int, os.stat_result]:
    """`open_regular` of a wire path (resolved by the jail first)."""
    return open_regular(jail, jail.resolve(wire_path), wire_path)


def read_regular(
    jail: Jail, real: str | Path, wire_path: str, limit: int
) -> tuple[bytes, os.stat_result]:
    """At most `limit + 1` bytes of a regular file (the caller decides what "too large" is)."""
    fd, st = open_regular(jail, real, wire_path)
    try:
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise os_error(exc, wire_path) from None
    finally:
        os.close(fd)
    return b"".join(chunks), st


# -- Small reads on the event loop ------------------------------------------------------------

#: File system types whose lookups and page-cache reads never wait on a network or on a
#: user-space server: local disk file systems and the kernel's pseudo file systems.
#: Anything else (nfs, cifs, 9p, ceph, fuse.*, autofs, ...) can block a lookup for as
#: long as its server likes.
LOCAL_FS_TYPES = frozenset(
    {
        "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "zfs", "bcachefs",
        "vfat", "exfat", "ntfs", "ntfs3", "hfsplus", "squashfs", "erofs", "iso9660", "udf",
        "tmpfs", "ramfs", "overlay", "proc", "sysfs", "devtmpfs", "devpts", "mqueue",
        "cgroup", "cgroup2", "securityfs", "debugfs", "tracefs", "pstore", "bpf",
        "configfs", "hugetlbfs", "fusectl", "binfmt_misc", "nsfs", "efivarfs", "selinuxfs",
    }
)  # fmt: skip
MOUNTINFO = "/proc/self/mountinfo"


def mount_types(text: str) -> set[str]:
    """The file system types named in a /proc/self/mountinfo text."""
    types = set()
    for line in text.splitlines():
        _, sep, after = line.partition(" - ")
        if sep:
            types.add(after.split(" ", 1)[0])
    return types


class LoopReadGate:
    """Whether a small file read may run on the event loop instead of in a thread.

    Only while every mount of this process is of a `LOCAL_FS_TYPES` type: the jail's
    realpath and the opener's walk may touch any mount (a symlink can point anywhere
    before the jail refuses it), so one network mount anywhere sends every read to the
    file executor. The mount table is read once, and again when the kernel reports a
    change (poll on the open mountinfo file gives POLLPRI), so a mount made later is
    seen at the next read. The data itself is read with RWF_NOWAIT (`pread_cached`).
    """

    def __init__(self, path: str = MOUNTINFO) -> None:
        self.path = path
        self.types: set[str] = set()
        self._fd: int | None = None
        self._poll: select.poll | None = None
        self._ok = False
        with contextlib.suppress(OSError):
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # kept open, to be polled
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLPRI)
            self._scan()

    def _scan(self) -> None:
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        self.types = mount_types(b"".join(chunks).decode("utf-8", "replace"))
        self._ok = bool(self.types) and self.types <= LOCAL_FS_TYPES

    def close(self) -> None:
        """Close the mount table (the gate then says no)."""
        self._poll = None
        self._ok = False
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()

    def allowed(self) -> bool:
        """True when reads may run on the loop now (the table is re-read if it changed)."""
        if self._poll is None:
            return False
        try:
            if self._poll.poll(0):
                self._scan()
        except (OSError, ValueError):
            self._ok = False
        return self._ok


_GATE: LoopReadGate | None = None


def loop_read_gate() -> LoopReadGate:
    """The process's gate (one mount table per process), made on first use."""
    global _GATE
    if _GATE is None:
        _GATE = LoopReadGate()
    return _GATE


def pread_cached(fd: int, count: int, offset: int) -> bytes | None:
    """Exactly `count` bytes at `offset` if they are all in the page cache, else None.

    `preadv` with RWF_NOWAIT never waits for the disk: it fails with EAGAIN, or reads
    only the cached part (a short read that is not the end of the file). Both give
    None, and so does a kernel or file system without RWF_NOWAIT; the caller then reads
    in a thread.
    """
    if count <= 0:
        return b""
    buf = bytearray(count)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except (BlockingIOError, AttributeError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    return bytes(buf) if got == count else None


# -- Writing --------------------------------------------------------------------------------


class AtomicWriter:
    """Write a file atomically: random temp file in its directory, fsync, rename, mode kept.

    Synchronous (run it in the file executor). `open()`, `write()` chunks, then
    `commit()`; on any failure `abort()` removes the temp file and the target stays
    as it was. Raises OSError (map it with `os_error`).
    """

    def __init__(
        self,
        jail: Jail,
        target: Path | str,
        max_size: int = UNLIMITED,
        umask: int | None = None,
        *,
        make_parents: bool = True,
    ) -> None:
        self.jail = jail
        self.target = Path(target)
        self.max_size = max_size
        self.make_parents = make_parents
        self.size = 0
        self._written_back = 0  # bytes whose writeback to disk has been started
        self._umask = current_umask() if umask is None else umask
        self._dir_fd: int | None = None
        self._fd: int | None = None
        self._old: os.stat_result | None = None
        self.temp: str | None = None  # the temp file's name in the target's directory

    @property
    def existed(self) -> bool:
        """True when the target existed when the write began."""
        return self._old is not None

    def open(self) -> AtomicWriter:
        """Open the directory (parents made) and create the temp file (O_EXCL, 0600)."""
        name = self.target.name
        if not name or self.jail.is_root(self.target):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        self._dir_fd = open_dir(self.jail, self.target.parent, create=self.make_parents)
        try:
            try:
                old: os.stat_result | None = os.stat(
                    name, dir_fd=self._dir_fd, follow_symlinks=False
                )
            except FileNotFoundError:
                old = None
            if old is not None and stat_mod.S_ISDIR(old.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            # A symlink here was planted after the jail resolved the path: the rename
            # replaces the link itself; its target's mode is none of our business.
            self._old = None if old is not None and stat_mod.S_ISLNK(old.st_mode) else old
            suffix = TEMP_UPD if self._old is not None else TEMP_NEW
            for _ in range(16):
                temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"
                try:
                    self._fd = os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=self._dir_fd)
                except FileExistsError:
                    continue
                self.temp = temp
                return self
            raise FileExistsError(errno.EEXIST, "could not create a temp file")
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes | memoryview | Sequence[bytes]) -> None:
        """Append `data` (or its pieces, in one writev) to the temp file; EFBIG beyond `max_size`."""
        assert self._fd is not None
        pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        count = sum(len(piece) for piece in pieces)
        if self.size + count > self.max_size:
            self.size += count
            raise OSError(errno.EFBIG, "file too large")
        write_all(self._fd, pieces)
        self.size += count
        if self.size - self._written_back >= WRITEBACK_STEP:
            start_writeback(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def commit(self) -> os.stat_result:
        """fsync, set the old file's mode (and owner), rename over the target, fsync the dir."""
        assert self._fd is not None and self.temp is not None and self._dir_fd is not None
        fd = self._fd
        if self._old is not None:
            mode = stat_mod.S_IMODE(self._old.st_mode)
            if os.geteuid() == 0 and (self._old.st_uid, self._old.st_gid) != (0, 0):
                with contextlib.suppress(OSError):
                    os.fchown(fd, self._old.st_uid, self._old.st_gid)
        else:
            mode = 0o666 & ~self._umask
        os.fchmod(fd, mode)
        if self._old is not None:
            advance_mtime(fd, self._old)
        os.fsync(fd)
        self._fd = None
        os.close(fd)
        dir_fd = self._dir_fd
        os.replace(self.temp, self.target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self.temp = None
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
        st = os.stat(self.target.name, dir_fd=dir_fd, follow_symlinks=False)
        self._dir_fd = None
        os.close(dir_fd)
        return st

    def abort(self) -> None:
        """Drop the temp file; the target is untouched."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.temp is not None and self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self._dir_fd)
        self.temp = None
        if self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = None


WRITEBACK_STEP = 4 * 1024 * 1024  # a large write starts writeback every this many bytes


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Start writing `count` bytes at `offset` to disk now, without waiting (a hint only).

    POSIX_FADV_DONTNEED on dirty pages starts their writeback (WB_SYNC_NONE) and drops
    only pages that are already clean, so the range stays cached; PostgreSQL's
    `pg_flush_data` uses it the same way where `sync_file_range` is missing. The disk
    then works while the rest of the file arrives, and the fsync of `commit` waits
    for the tail only. Durability is unchanged: `commit` still fsyncs the file and its
    directory before and after the rename.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)


IOV_MAX = 1024  # pieces one writev may take (Linux)


def write_all(fd: int, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write every piece, in order, with as few writev(2) calls as the kernel allows.

    No piece is copied into a joined buffer first; a short write goes on from where
    the kernel stopped.
    """
    views = [memoryview(piece) for piece in pieces if len(piece)]
    while views:
        batch = views[:IOV_MAX]
        written = os.writev(fd, batch) if len(batch) > 1 else os.write(fd, batch[0])
        done = 0
        while done < len(views) and written >= len(views[done]):
            written -= len(views[done])
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]


def advance_mtime(fd: int, old: os.stat_result) -> None:
    """Make sure `modified` changes on every write, even within one coarse clock tick.

    File times come from the kernel's coarse clock (a few ms), so two quick writes
    could report the same `modified` and defeat `expectedModified`. The microsecond
    form is what clients see, so the new time is at least 1 µs after the old one.
    """
    st = os.fstat(fd)
    if st.st_mtime_ns // 1000 <= old.st_mtime_ns // 1000:
        os.utime(fd, ns=(st.st_atime_ns, (old.st_mtime_ns // 1000 + 1) * 1000))


def write_atomic(
    jail: Jail,
    target: Path | str,
    data: bytes,
    max_size: int = UNLIMITED,
    umask: int | None = None,
) -> os.stat_result:
    """Write `data` to the jail-resolved `target` atomically (see AtomicWriter)."""
    writer = AtomicWriter(jail, target, max_size, umask).open()
    try:
        writer.write(data)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def open_append(
    jail: Jail, real: str | Path, wire_path: str, umask: int
) -> tuple[int, os.stat_result | None]:
    """An O_APPEND fd of the regular file `real` (created if missing), and its old stat.

    Like `open_regular`: no symlink followed, never blocks (a FIFO is refused, not
    waited on), parents made. Raises AetherError.
    """
    parent, name = os.path.split(str(real))
    try:
        dir_fd = open_dir(jail, parent, create=True)
        try:
            try:
                old: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None:
                _check_regular(old, wire_path)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW
            fd = os.open(name, flags | os.O_CLOEXEC | os.O_NOCTTY, 0o666 & ~umask, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise os_error(exc, wire_path) from None
    try:
        _check_regular(os.fstat(fd), wire_path)
    except BaseException:
        os.close(fd)
        raise
    return fd, old
