"""Start a program on a PTY with posix_spawn(3): no fork of the daemon's address space.

`os.fork()` copies the page tables of the whole daemon (60-100 MiB resident) and makes
every page copy-on-write until the child execs; on this 2-core machine that cost
1-30 ms per terminal session, more than bash takes to print its prompt. glibc's
posix_spawn uses `clone(CLONE_VM | CLONE_VFORK)`: the child borrows the parent's memory
for the few system calls before exec, and nothing is copied.

The child needs what `aetherd.services.terminal._spawn` gave it after fork: its own
session (`POSIX_SPAWN_SETSID`), the PTY as controlling terminal (opening the slave by
name after setsid, without O_NOCTTY, makes it so), the slave on fds 0-2, the working
directory, every signal at its default disposition, an empty signal mask. `os.posix_spawn` has no working-directory action, so libc is called through
ctypes, with `posix_spawn_file_actions_addchdir_np` (glibc >= 2.29, musl >= 1.1.24).
`available()` is False where any of it is missing; the caller then forks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

# <spawn.h> flags: the same values in glibc and musl.
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80
# Opaque libc structures, allocated larger than any libc makes them (glibc x86-64:
# posix_spawn_file_actions_t 80 bytes, posix_spawnattr_t 336, sigset_t 128).
_ACTIONS_SIZE = 512
_ATTR_SIZE = 1024
_SIGSET_SIZE = 256

_libc: ctypes.CDLL | None = None
_checked = False


def _load() -> ctypes.CDLL | None:
    """libc with its posix_spawn functions declared (ctypes is imported on first use:
    an idle daemon that starts no terminal never pays for it)."""
    global _libc, _checked
    if _checked:
        return _libc
    _checked = True
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in (
            "posix_spawn",
            "posix_spawn_file_actions_init",
            "posix_spawn_file_actions_destroy",
            "posix_spawn_file_actions_addopen",
            "posix_spawn_file_actions_adddup2",
            "posix_spawn_file_actions_addchdir_np",
            "posix_spawnattr_init",
            "posix_spawnattr_destroy",
            "posix_spawnattr_setflags",
            "posix_spawnattr_setsigdefault",
            "posix_spawnattr_setsigmask",
        ):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    libc.posix_spawn_file_actions_addopen.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    libc.posix_spawn_file_actions_adddup2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    libc.posix_spawn_file_actions_addchdir_np.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
    libc.posix_spawn.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_char_p),
    ]
    _libc = libc
    return libc


def available() -> bool:
    """Whether this libc offers everything `spawn_on_pty` needs."""
    return _load() is not None


def _strings(items: Iterable[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    import ctypes

    values = list(items)
    return (ctypes.c_char_p * (len(values) + 1))(*values, None)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


# Every signal starts at its default disposition. Not only those the daemon ignores:
# glibc's posix_spawn sets its two internal signals (32 and 33, SIGCANCEL and SIGSETXID)
# to SIG_IGN in the child unless they are in this set, and exec would pass that on to
# every program run in the terminal. sigaddset() refuses those two, so the set is
# written bit by bit (bit n-1 of the unsigned longs for signal n, as <signal.h> lays it).
_ALL_SIGNALS = tuple(sig for sig in range(1, 65) if sig not in (signal.SIGKILL, signal.SIGSTOP))


def _sigset(signals: Iterable[int]) -> ctypes.Array[ctypes.c_ulong]:
    import ctypes

    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = (ctypes.c_ulong * (_SIGSET_SIZE // ctypes.sizeof(ctypes.c_ulong)))()
    for sig in signals:
        words[(sig - 1) // bits] |= 1 << ((sig - 1) % bits)
    return words


def spawn_on_pty(argv: list[str], env: Mapping[str, str], cwd: str, slave_path: str) -> int:
    """Start `argv[0]` (a path) in a new session on the PTY slave `slave_path`; its pid.

    Every signal starts at its default disposition, none blocked. Raises OSError when
    the program cannot be started (glibc reaps the failed child: nothing is left).
    """
    import ctypes

    libc = _load()
    if libc is None:
        raise OSError(0, "posix_spawn with a working directory is not available")
    actions = ctypes.create_string_buffer(_ACTIONS_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _check(libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    try:
        _check(libc.posix_spawnattr_init(attr), "posix_spawnattr_init")
        try:
            # After setsid (done before the file actions), opening the slave without
            # O_NOCTTY makes it the controlling terminal of the new session.
            _check(
                libc.posix_spawn_file_actions_addopen(
                    actions, 0, os.fsencode(slave_path), os.O_RDWR, 0
                ),
                "addopen",
            )
            for target in (1, 2):
                _check(libc.posix_spawn_file_actions_adddup2(actions, 0, target), "adddup2")
            _check(libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd)), "chdir")
            empty = _sigset(())
            _check(libc.posix_spawnattr_setsigdefault(attr, _sigset(_ALL_SIGNALS)), "setsigdefault")
            _check(libc.posix_spawnattr_setsigmask(attr, empty), "setsigmask")
            flags = POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK
            _check(libc.posix_spawnattr_setflags(attr, flags), "setflags")
            pid = ctypes.c_int(0)
            c_argv = _strings(os.fsencode(arg) for arg in argv)
            c_env = _strings(os.fsencode(f"{key}={value}") for key, value in env.items())
            result = libc.posix_spawn(
                ctypes.byref(pid), os.fsencode(argv[0]), actions, attr, c_argv, c_env
            )
            _check(result, f"cannot start {argv[0]}")
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(attr)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)
