"""The git service (PROTOCOL.md section 11): the real `git` binary, run as asyncio subprocesses.

Nothing here parses output meant for people. Every command uses a machine format:
`status --porcelain=v2 -z --branch`, `diff --raw --numstat -z` (plus the patch text,
split at its `diff ` header lines, in the same order as the numstat records),
`log -z --format=` with NUL-separated fields, `for-each-ref --format=` with `%00`.

Every command runs:
- with `GIT_TERMINAL_PROMPT=0`, `GIT_PAGER=cat`, `GIT_EDITOR=true`, `LC_ALL=C`, stdin
  from a pipe or /dev/null, and in a new session (no controlling terminal: nothing
  can prompt on `/dev/tty`); inherited variables that would point git at another
  repository, index or config (`GIT_DIR`, `GIT_INDEX_FILE`, ...) are dropped first;
- with `GIT_CEILING_DIRECTORIES` set to the root's parent, so a workspace that is not
  a repository is never mistaken for part of a repository above it;
- with `GIT_OPTIONAL_LOCKS=0` for reads (a status never rewrites the index);
- with a timeout (`git_timeout`; the process group is killed) and bounded output
  (`git_max_output`), at most `git_max_concurrent` at once.

Paths: git's bytes are decoded with surrogateescape, so a name that is not UTF-8
keeps its exact bytes; the wire form is a workspace path (`/src/a.py`), plus
`rawPath` (base64 of the bytes) for names that are not UTF-8 (the files channel's
convention, `services.fs.path_fields`).

Untracked files count as added in the `worktree`, `head` and `main` diffs: they are
added with intent-to-add (`git add -N`) to a temporary, otherwise empty index
(`GIT_INDEX_FILE` in a private temporary directory), and `git diff` against that
index shows exactly those files as new. The repository's own index is never touched.

The `changed` push: `GitService.hold()` (one per interested connection) starts a
small inotify watch (no thread: the fd is read on the event loop) on the root
repository's git directory (HEAD, index, packed-refs) and on its `refs` tree, plus
the root directory itself, so that a repository created later (`git init`) or removed
is noticed. Events are gathered for `git_watch_debounce` seconds, then listeners get
`{"repo": "/", "branch": ..., "head": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample
from aetherd.services.executors import BoundedExecutor
from aetherd.services.fs import path_fields, wire_text
from aetherd.services.jail import Jail

log = logging.getLogger("aetherd.git")

MiB = 1024 * 1024
STDERR_LIMIT = 64 * 1024
ERROR_TEXT_LIMIT = 4000
DiffMode = Literal["worktree", "staged", "head", "main", "lastCommit"]
Listener = Callable[[dict[str, Any]], None]

_XY = {
    ".": "unmodified",
    " ": "unmodified",
    "M": "modified",
    "T": "modified",
    "A": "added",
    "D": "deleted",
    "R": "renamed",
    "C": "copied",
    "U": "conflicted",
    "?": "untracked",
    "!": "ignored",
}
_RAW_STATUS = {
    "A": "added",
    "D": "deleted",
    "M": "modified",
    "T": "modified",
    "R": "renamed",
    "C": "added",
    "U": "modified",
}
SUBMODULE_MODE = "160000"
# What would point git at another repository, index or config than the request's
# (`git rev-parse --local-env-vars`, plus the discovery settings we set ourselves).
# Everything else of the daemon's environment is kept: an identity in GIT_AUTHOR_NAME,
# GIT_CONFIG_GLOBAL, proxies and CA settings are the operator's choice.
_LOCAL_ENV = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "GIT_OBJECT_DIRECTORY",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_GRAFT_FILE",
        "GIT_INDEX_FILE",
        "GIT_NO_REPLACE_OBJECTS",
        "GIT_REPLACE_REF_BASE",
        "GIT_PREFIX",
        "GIT_INTERNAL_SUPER_PREFIX",
        "GIT_SHALLOW_FILE",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_DISCOVERY_ACROSS_FILESYSTEM",
        "GIT_CEILING_DIRECTORIES",
        "GIT_QUARANTINE_PATH",
    }
)


@dataclass
class GitResult:
    """One finished git command."""

    code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False  # stdout was cut at the limit (and the process stopped)


@dataclass
class Repo:
    """A repository as a request sees it: its work tree (real path) and git directory."""

    top: str
    git_dir: str

    def wire(self, jail: Jail, rel: bytes | str) -> str:
        """The workspace path of a path relative to the work tree (git's form)."""
        text = rel.decode("utf-8", "surrogateescape") if isinstance(rel, bytes) else rel
        return jail.to_wire(os.path.join(self.top, text) if text else self.top)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    """Bytes for a person (names, subjects, messages): invalid UTF-8 becomes U+FFFD."""
    return data.decode("utf-8", "replace")


def _error_text(result: GitResult) -> str:
    text = _text(result.stderr).strip() or _text(result.stdout).strip()
    if len(text) > ERROR_TEXT_LIMIT:
        text = text[:ERROR_TEXT_LIMIT] + "…"
    return text or f"git exited with status {result.code}"


def _paths(
    key: str, wire: str, old_key: str | None = None, old: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = dict(path_fields(key, wire))
    if old_key is not None and old is not None:
        out.update(path_fields(old_key, old))
    return out


class GitService:
    """Git requests on repositories inside the workspace, and the root repository's watch."""

    def __init__(
        self,
        jail: Jail,
        *,
        binary: str = "git",
        timeout: float = 30.0,
        max_output: int = 16 * MiB,
        max_concurrent: int = 8,
        watch_debounce: float = 0.2,
        watch_max_dirs: int = 1024,
        search_path: str | None = None,
        executor: BoundedExecutor | None = None,
    ) -> None:
        self.jail = jail
        self.binary = binary
        self.timeout = timeout
        self.max_output = max_output
        self.watch_debounce = watch_debounce
        self.watch_max_dirs = watch_max_dirs
        # PATH used to find `binary` (None: the daemon's PATH at call time).
        self.search_path = search_path
        self._executor = executor
        self._slots = asyncio.Semaphore(max_concurrent)
        self._listeners: list[Listener] = []
        self._holds = 0
        self._watch: _RepoWatch | None = None
        self._stopped = False
        self.commands = 0  # git processes started (for metrics and tests)
        self.timeouts = 0
        self.running = 0

    @property
    def executor(self) -> BoundedExecutor:
        """The pool for the little blocking work there is (temporary index directories)."""
        return self._executor or self.jail.executor

    # -- lifecycle and the watch -------------------------------------------------------
    async def stop(self) -> None:
        """Stop the watch (no thread, no fd left)."""
        self._stopped = True
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.close()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` on the loop for every `changed`; returns unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def hold(self) -> Callable[[], Any]:
        """Keep the root repository watched until the returned function is called."""
        self._holds += 1
        if self._watch is None and not self._stopped:
            self._watch = _RepoWatch(self)
            self._watch.open()
        released = False

        async def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._holds -= 1
            if self._holds == 0 and self._watch is not None:
                watch, self._watch = self._watch, None
                await watch.close()

        return release

    def metrics(self) -> Iterator[Sample]:
        """git commands run, timed out and running now; whether the watch is open."""
        yield Sample("aetherd_git_commands", "git commands started", self.commands, kind="counter")
        yield Sample(
            "aetherd_git_timeouts",
            "git commands killed at git_timeout",
            self.timeouts,
            kind="counter",
        )
        yield Sample("aetherd_git_running", "git commands running now", self.running)
        yield Sample("aetherd_git_watching", "1 while git/changed is watched", int(self.watching))

    @property
    def watching(self) -> bool:
        """True while the root repository's watch is open."""
        return self._watch is not None and self._watch.fd is not None

    def _emit(self, event: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("git change listener failed")

    # -- running git -------------------------------------------------------------------
    def _program(self) -> str:
        found = shutil.which(self.binary, path=self.search_path)
        if found is None:
            raise AetherError(
                ErrorCode.GIT_NOT_INSTALLED, f"git is not installed (no {self.binary!r} found)"
            )
        return found

    def environment(
        self, *, read: bool = True, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The environment of every git command (see the module docstring)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _LOCAL_ENV and not k.startswith(("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_"))
        }
        env.pop("SSH_ASKPASS", None)
        env.update(
            {
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_PAGER": "cat",
                "PAGER": "cat",
                "GIT_EDITOR": "true",
                "GIT_SEQUENCE_EDITOR": "true",
                "GIT_MERGE_AUTOEDIT": "no",
                "GIT_ASKPASS": "true",
                "GCM_INTERACTIVE": "never",
                "GIT_SSH_COMMAND": "ssh -oBatchMode=yes",
                "LC_ALL": "C",
                "LANGUAGE": "C",
                "GIT_LITERAL_PATHSPECS": "1",
                "GIT_CEILING_DIRECTORIES": os.path.dirname(str(self.jail.root)) or "/",
            }
        )
        if self.search_path is not None:
            env["PATH"] = self.search_path
        if read:
            env["GIT_OPTIONAL_LOCKS"] = "0"
        if extra:
            env.update(extra)
        return env

    async def run(
        self,
        cwd: str,
        args: Sequence[str],
        *,
        read: bool = True,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        limit: int | None = None,
        cut: bool = False,
        check: bool = True,
    ) -> GitResult:
        """Run `git <args>` in `cwd`.

        Output beyond `limit` (default `max_output`) stops the command: with `cut` the
        result is marked `truncated`, otherwise LIMIT_EXCEEDED. `check` turns a non-zero
        exit into GIT_ERROR (git's stderr in `error`, the status in `exitCode`).
        """
        program = self._program()
        limit = self.max_output if limit is None else limit
        argv = [
            program,
            "--no-pager",
            "-c",
            "core.quotePath=false",
            "-c",
            "color.ui=false",
            "-c",
            "core.fsmonitor=false",
            *args,
        ]
        async with self._slots:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=cwd,
                    env=self.environment(read=read, extra=env),
                    stdin=asyncio.subprocess.PIPE
                    if stdin is not None
                    else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise AetherError(
                    ErrorCode.GIT_NOT_INSTALLED, f"git is not installed ({self.binary!r} is gone)"
                ) from None
            except NotADirectoryError:
                raise AetherError(ErrorCode.NOT_A_REPOSITORY, "not a directory") from None
            except PermissionError as exc:
                raise AetherError(
                    ErrorCode.PERMISSION_DENIED, f"cannot run git: {exc.strerror}"
                ) from None
            self.commands += 1
            self.running += 1
            try:
                result = await asyncio.wait_for(
                    self._communicate(proc, stdin, limit), timeout=self.timeout
                )
            except asyncio.TimeoutError:
                self.timeouts += 1
                _kill_group(proc)
                await _reap(proc)
                raise AetherError(
                    ErrorCode.GIT_ERROR,
                    f"git {args[0] if args else ''} timed out after {self.timeout:g}s",
                    exitCode=None,
                ) from None
            except BaseException:
                _kill_group(proc)
                await _reap(proc)
                raise
            finally:
                self.running -= 1
        if result.truncated and not cut:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"git {args[0]} printed more than {limit} bytes (git_max_output)",
            )
        if check and result.code != 0 and not result.truncated:
            raise AetherError(ErrorCode.GIT_ERROR, _error_text(result), exitCode=result.code)
        return result

    async def _communicate(
        self, proc: asyncio.subprocess.Process, stdin: bytes | None, limit: int
    ) -> GitResult:
        assert proc.stdout is not None and proc.stderr is not None

        async def feed() -> None:
            if proc.stdin is None:
                return
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if stdin:
                    proc.stdin.write(stdin)
                    await proc.stdin.drain()
                proc.stdin.close()

        over = False

        async def read_out() -> bytes:
            nonlocal over
            data, over = await _read_capped(proc.stdout, limit)  # type: ignore[arg-type]
            if over:
                _kill_group(proc)
            return data

        async def read_err() -> bytes:
            data, _ = await _read_capped(proc.stderr, STDERR_LIMIT)  # type: ignore[arg-type]
            return data

        _, out, err = await asyncio.gather(feed(), read_out(), read_err())
        code = await proc.wait()
        return GitResult(code, out, err, over)

    # -- repositories and paths ------------------------------------------------------------
    async def repo(self, wire_repo: str | None) -> Repo:
        """The repository of workspace path `wire_repo` (default the root), or NOT_A_REPOSITORY."""
        real = str(self.jail.resolve(wire_repo or "/"))
        shown = wire_text(wire_repo or "/")
        if not await self.executor.run(os.path.isdir, real):
            raise AetherError(ErrorCode.NOT_A_REPOSITORY, f"{shown} is not a directory")
        result = await self.run(
            real, ["rev-parse", "--show-toplevel", "--absolute-git-dir"], check=False
        )
        if result.code != 0:
            err = _text(result.stderr)
            if "not a git repository" in err or "must be run in a work tree" in err:
                raise AetherError(ErrorCode.NOT_A_REPOSITORY, f"{shown} is not in a git repository")
            raise AetherError(ErrorCode.GIT_ERROR, _error_text(result), exitCode=result.code)
        lines = result.stdout.split(b"\n")
        if len(lines) < 2 or not lines[0]:
            raise AetherError(ErrorCode.NOT_A_REPOSITORY, f"{shown} has no work tree")
        top = await self.executor.run(os.path.realpath, _decode(lines[0]))
        if not self.jail.is_inside(top):
            raise AetherError(
                ErrorCode.NOT_A_REPOSITORY,
                f"{shown}: the repository's work tree is outside the root",
            )
        return Repo(top, _decode(lines[1]))

    def pathspecs(self, repo: Repo, paths: Iterable[str]) -> list[str]:
        """Workspace paths as literal pathspecs relative to the work tree (`.`: everything)."""
        out: list[str] = []
        for path in paths:
            if path == ".":
                out.append(".")
                continue
            real = str(self.jail.resolve(path, follow_final=False))
            rel = os.path.relpath(real, repo.top)
            if rel == ".." or rel.startswith("../"):
                raise AetherError(
                    ErrorCode.INVALID_PATH,
                    f"invalid path {wire_text(path)!r}: outside the repository",
                )
            out.append(rel)
        return out

    async def _head(self, repo: Repo) -> str | None:
        result = await self.run(
            repo.top, ["rev-parse", "-q", "--verify", "HEAD^{commit}"], check=False
        )
        return _decode(result.stdout).strip() or None if result.code == 0 else None

    async def _branch(self, repo: Repo) -> str | None:
        result = await self.run(repo.top, ["symbolic-ref", "-q", "--short", "HEAD"], check=False)
        return _text(result.stdout).strip() or None if result.code == 0 else None

    async def _empty_tree(self, repo: Repo) -> str:
        result = await self.run(repo.top, ["hash-object", "-t", "tree", "/dev/null"])
        return _decode(result.stdout).strip()

    # -- status ----------------------------------------------------------------------------
    async def status(self, wire_repo: str | None) -> dict[str, Any]:
        """Branch, upstream, ahead/behind and every changed, untracked or conflicted file."""
        repo = await self.repo(wire_repo)
        result = await self.run(
            repo.top,
            [
                "status",
                "--porcelain=v2",
                "-z",
                "--branch",
                "--untracked-files=all",
                "--ignore-submodules=none",
            ],
            cut=True,
        )
        return self._parse_status(repo, result)

    def _parse_status(self, repo: Repo, result: GitResult) -> dict[str, Any]:
        data = result.stdout
        if result.truncated:  # keep whole records only
            data = data[: data.rfind(b"\0") + 1]
        tokens = data.split(b"\0")
        if tokens and tokens[-1] == b"":
            tokens.pop()
        out: dict[str, Any] = {
            "repo": self.jail.to_wire(repo.top),
            "branch": None,
            "head": None,
            "upstream": None,
            "ahead": None,
            "behind": None,
            "detached": False,
            "files": [],
            "truncated": result.truncated,
        }
        files: list[dict[str, Any]] = out["files"]
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            kind = token[:2]
            if kind == b"# ":
                key, _, value = _text(token[2:]).partition(" ")
                if key == "branch.oid":
                    out["head"] = None if value == "(initial)" else value
                elif key == "branch.head":
                    if value == "(detached)":
                        out["detached"] = True
                    else:
                        out["branch"] = value
                elif key == "branch.upstream":
                    out["upstream"] = value
                elif key == "branch.ab":
                    ahead, _, behind = value.partition(" ")
                    out["ahead"] = abs(int(ahead))
                    out["behind"] = abs(int(behind))
                continue
            if kind in (b"1 ", b"2 ", b"u "):
                fields = token.split(b" ", {b"1 ": 8, b"2 ": 9, b"u ": 10}[kind])
                xy = _text(fields[1])
                entry: dict[str, Any]
                if kind == b"u ":
                    index = worktree = "conflicted"
                else:
                    index, worktree = _XY.get(xy[0], "modified"), _XY.get(xy[1], "modified")
                old = None
                if kind == b"2 ":
                    if i >= len(tokens):
                        break  # cut in the middle of a rename record
                    old = repo.wire(self.jail, tokens[i])
                    i += 1
                entry = _paths("path", repo.wire(self.jail, fields[-1]), "oldPath", old)
                if old is None:
                    entry["oldPath"] = None
                entry["index"] = index
                entry["worktree"] = worktree
                if fields[2].startswith(b"S"):
                    entry["submodule"] = True
                files.append(entry)
            elif kind in (b"? ", b"! "):
                state = "untracked" if kind == b"? " else "ignored"
                name = token[2:]
                entry = _paths("path", repo.wire(self.jail, name.rstrip(b"/")))
                entry.update({"oldPath": None, "index": state, "worktree": state})
                files.append(entry)
        return out

    # -- diff ------------------------------------------------------------------------------
    async def _default_branch(self, repo: Repo) -> str:
        for ref in ("refs/remotes/origin/HEAD", "refs/heads/main", "refs/heads/master"):
            result = await self.run(
                repo.top, ["rev-parse", "-q", "--verify", f"{ref}^{{commit}}"], check=False
            )
            if result.code == 0:
                return ref
        raise AetherError(
            ErrorCode.NOT_FOUND, "no default branch: none of origin/HEAD, main or master exists"
        )

    async def diff(
        self,
        wire_repo: str | None,
        mode: DiffMode = "worktree",
        paths: Sequence[str] = (),
        context_lines: int = 3,
        max_bytes: int = MiB,
    ) -> dict[str, Any]:
        """The files changed in `mode`, with numstat counts, the binary flag and patches."""
        repo = await self.repo(wire_repo)
        specs = self.pathspecs(repo, paths)
        max_bytes = max(0, min(max_bytes, self.max_output))
        head = await self._head(repo)
        base_ref: str | None
        if mode == "worktree":
            against: list[str] = []
            base_ref = None
        elif mode == "staged":
            against = ["--cached"] if head else ["--cached", await self._empty_tree(repo)]
            base_ref = head
        elif mode == "head":
            base_ref = head
            against = [head or await self._empty_tree(repo)]
        elif mode == "main":
            if head is None:
                raise AetherError(ErrorCode.NOT_FOUND, "HEAD has no commit yet: no merge base")
            default = await self._default_branch(repo)
            found = await self.run(repo.top, ["merge-base", "HEAD", default], check=False)
            base = _decode(found.stdout).strip()
            if found.code != 0 or not base:
                raise AetherError(
                    ErrorCode.NOT_FOUND, f"HEAD and {default} have no common ancestor"
                )
            against, base_ref = [base], base
        else:  # lastCommit
            if head is None:
                raise AetherError(ErrorCode.NOT_FOUND, "HEAD has no commit yet")
            parent = await self.run(
                repo.top, ["rev-parse", "-q", "--verify", "HEAD~1^{commit}"], check=False
            )
            base_ref = _decode(parent.stdout).strip() or None if parent.code == 0 else None
            against = [base_ref or await self._empty_tree(repo), "HEAD"]

        budget = [max_bytes]
        truncated = [False]
        files = await self._diff_part(repo, against, specs, context_lines, budget, truncated, None)
        if mode in ("worktree", "head", "main"):
            files += await self._untracked_part(repo, specs, context_lines, budget, truncated)
        return {"baseRef": base_ref, "files": files, "truncated": truncated[0]}

    async def _untracked_part(
        self,
        repo: Repo,
        specs: list[str],
        context_lines: int,
        budget: list[int],
        truncated: list[bool],
    ) -> list[dict[str, Any]]:
        listed = await self.run(
            repo.top, ["ls-files", "-z", "--others", "--exclude-standard", "--", *specs], cut=True
        )
        data = listed.stdout
        if listed.truncated:
            data = data[: data.rfind(b"\0") + 1]
            truncated[0] = True
        names = [n for n in data.split(b"\0") if n]
        if not names:
            return []
        nested = [n for n in names if n.endswith(b"/")]  # an untracked repository inside
        names = [n for n in names if not n.endswith(b"/")]
        out: list[dict[str, Any]] = []
        if names:
            # A private, otherwise empty index (outside the workspace; made and removed in
            # the file executor): `git diff` against it shows exactly these files as new.
            tmp = await self.executor.run(tempfile.mkdtemp, "", "aetherd-git-")
            try:
                env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
                await self.run(
                    repo.top,
                    ["add", "--intent-to-add", "--pathspec-from-file=-", "--pathspec-file-nul"],
                    stdin=b"\0".join(names) + b"\0",
                    env=env,
                )
                out = await self._diff_part(repo, [], [], context_lines, budget, truncated, env)
            finally:
                await self.executor.run(shutil.rmtree, tmp, True)
        for name in nested:
            entry = _paths("path", repo.wire(self.jail, name.rstrip(b"/")))
            entry.update(
                {
                    "oldPath": None,
                    "status": "added",
                    "additions": 0,
                    "deletions": 0,
                    "binary": False,
                    "patch": None,
                    "submodule": True,
                }
            )
            out.append(entry)
        return out

    async def _diff_part(
        self,
        repo: Repo,
        against: list[str],
        specs: list[str],
        context_lines: int,
        budget: list[int],
        truncated: list[bool],
        env: dict[str, str] | None,
    ) -> list[dict[str, Any]]:
        common = ["--no-ext-diff", "--no-textconv", "--no-color", "-M", "--submodule=short"]
        listed = await self.run(
            repo.top,
            ["diff", "--raw", "--numstat", "-z", *common, *against, "--", *specs],
            env=env,
        )
        files = self._parse_raw_numstat(repo, listed.stdout)
        if not files:
            return files
        if budget[0] <= 0:
            truncated[0] = True
            return files
        patch = await self.run(
            repo.top,
            ["diff", "-p", f"-U{context_lines}", *common, *against, "--", *specs],
            env=env,
            limit=budget[0] + 1,
            cut=True,
        )
        chunks = _split_patch(patch.stdout)
        complete = not patch.truncated
        if len(chunks) > len(files) or (complete and len(chunks) != len(files)):
            log.warning(
                "git diff: %d patches for %d files; patches left out", len(chunks), len(files)
            )
            truncated[0] = True
            return files
        for index, entry in enumerate(files):
            if index >= len(chunks):
                truncated[0] = True
                break
            chunk = chunks[index]
            last = index == len(chunks) - 1 and not complete
            if entry["binary"]:
                continue
            if len(chunk) > budget[0] or last:
                cut = chunk[: budget[0]]
                cut = cut[: cut.rfind(b"\n") + 1]
                entry["patch"] = _text(cut)
                entry["truncated"] = True
                truncated[0] = True
                budget[0] = 0
                break
            entry["patch"] = _text(chunk)
            budget[0] -= len(chunk)
        return files

    def _parse_raw_numstat(self, repo: Repo, data: bytes) -> list[dict[str, Any]]:
        tokens = data.split(b"\0")
        files: list[dict[str, Any]] = []
        unmerged: list[bool] = []
        i = 0
        # The --raw records first: ":srcmode dstmode srcsha dstsha STATUS\0path\0[path\0]".
        while i < len(tokens) and tokens[i].startswith(b":"):
            meta = _text(tokens[i][1:]).split(" ")
            status = meta[4] if len(meta) > 4 else "M"
            if status[:1] in ("R", "C"):
                old, new = tokens[i + 1], tokens[i + 2]
                i += 3
            else:
                old, new = b"", tokens[i + 1]
                i += 2
            kind = _RAW_STATUS.get(status[:1], "modified")
            entry = _paths(
                "path",
                repo.wire(self.jail, new),
                "oldPath",
                repo.wire(self.jail, old) if kind == "renamed" else None,
            )
            if kind != "renamed":
                entry["oldPath"] = None
            entry.update(
                {"status": kind, "additions": 0, "deletions": 0, "binary": False, "patch": None}
            )
            if SUBMODULE_MODE in (meta[0], meta[1] if len(meta) > 1 else ""):
                entry["submodule"] = True
            files.append(entry)
            unmerged.append(status[:1] == "U")
        # Then the --numstat records, in the same order: "added\tdeleted\tpath" (or "\t"
        # and two more tokens on a rename); "-\t-" for a binary file.
        for entry in files:
            if i >= len(tokens):
                break
            added, _, rest = tokens[i].partition(b"\t")
            deleted, _, path = rest.partition(b"\t")
            i += 1 if path else 3
            if added == b"-":
                entry["binary"] = True
            else:
                entry["additions"] = int(added or 0)
                entry["deletions"] = int(deleted or 0)
        # An unmerged path comes twice (a `U` record, then one against the worktree) but
        # has one (combined) patch: keep one entry, with the second record's counts.
        merged: list[dict[str, Any]] = []
        for index, entry in enumerate(files):
            if index and unmerged[index - 1] and files[index - 1]["path"] == entry["path"]:
                merged[-1].update({k: entry[k] for k in ("additions", "deletions", "binary")})
                continue
            merged.append(entry)
        return merged

    # -- log and branches --------------------------------------------------------------
    async def log(
        self,
        wire_repo: str | None,
        ref: str | None = None,
        path: str | None = None,
        limit: int = 50,
        skip: int = 0,
    ) -> dict[str, Any]:
        """Commits reachable from `ref` (default HEAD), newest first."""
        repo = await self.repo(wire_repo)
        specs = self.pathspecs(repo, [path]) if path is not None else []
        if ref is None and await self._head(repo) is None:
            return {"commits": []}  # an unborn branch has no history yet
        result = await self.run(
            repo.top,
            [
                "log",
                "-z",
                "--no-show-signature",
                "--format=%H%x00%P%x00%an%x00%ae%x00%aI%x00%s",
                f"--max-count={limit}",
                f"--skip={skip}",
                "--end-of-options",
                ref or "HEAD",
                "--",
                *specs,
            ],
        )
        fields = result.stdout.split(b"\0")
        commits = []
        for start in range(0, len(fields) - 5, 6):
            sha, parents, name, email, date, subject = fields[start : start + 6]
            commits.append(
                {
                    "sha": _decode(sha),
                    "parents": _decode(parents).split(),
                    "authorName": _text(name),
                    "authorEmail": _text(email),
                    "authoredAt": _decode(date),
                    "subject": _text(subject),
                }
            )
        return {"commits": commits}

    async def branches(self, wire_repo: str | None) -> dict[str, Any]:
        """The current branch, local branches with their upstream, and remote branches."""
        repo = await self.repo(wire_repo)
        result = await self.run(
            repo.top,
            [
                "for-each-ref",
                "--format=%(refname)%00%(objectname)%00%(upstream:short)%00%(symref)",
                "refs/heads",
                "refs/remotes",
            ],
        )
        local: list[dict[str, Any]] = []
        remote: list[dict[str, Any]] = []
        for line in result.stdout.split(b"\n"):
            parts = line.split(b"\0")
            if len(parts) != 4:
                continue
            refname, sha, upstream, symref = (_text(p) for p in parts)
            if symref:
                continue  # origin/HEAD: a pointer, not a branch
            if refname.startswith("refs/heads/"):
                local.append({"name": refname[11:], "sha": sha, "upstream": upstream or None})
            elif refname.startswith("refs/remotes/"):
                remote.append({"name": refname[13:], "sha": sha})
        return {"current": await self._branch(repo), "local": local, "remote": remote}

    # -- writes --------------------------------------------------------------------------
    async def stage(self, wire_repo: str | None, paths: Sequence[str]) -> dict[str, Any]:
        """`git add -A` of the paths (new, modified and deleted files alike)."""
        repo = await self.repo(wire_repo)
        specs = self.pathspecs(repo, paths)
        await self.run(
            repo.top,
            ["add", "-A", "--pathspec-from-file=-", "--pathspec-file-nul"],
            read=False,
            stdin=_nul_list(specs),
        )
        return {}

    async def unstage(self, wire_repo: str | None, paths: Sequence[str]) -> dict[str, Any]:
        """`git reset` of the paths: the index gets HEAD's version back (the files stay)."""
        repo = await self.repo(wire_repo)
        specs = self.pathspecs(repo, paths)
        if await self._head(repo) is None:  # nothing committed yet: drop them from the index
            await self.run(
                repo.top,
                [
                    "rm",
                    "-r",
                    "-q",
                    "--cached",
                    "--ignore-unmatch",
                    "--pathspec-from-file=-",
                    "--pathspec-file-nul",
                ],
                read=False,
                stdin=_nul_list(specs),
            )
            return {}
        await self.run(
            repo.top,
            ["reset", "-q", "--pathspec-from-file=-", "--pathspec-file-nul"],
            read=False,
            stdin=_nul_list(specs),
        )
        return {}

    async def commit(
        self,
        wire_repo: str | None,
        message: str,
        *,
        all_: bool = False,
        author_name: str | None = None,
        author_email: str | None = None,
    ) -> dict[str, Any]:
        """Commit the index (or every tracked change with `all_`); the new commit's sha."""
        repo = await self.repo(wire_repo)
        env: dict[str, str] = {}
        if author_name is not None:
            env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = author_name
        if author_email is not None:
            env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = author_email
        args = ["commit", "-q", "-F", "-"]
        if all_:
            args.append("-a")
        await self.run(repo.top, args, read=False, stdin=message.encode("utf-8"), env=env)
        head = await self._head(repo)
        if head is None:  # pragma: no cover - git said it committed
            raise AetherError(ErrorCode.GIT_ERROR, "no commit after git commit", exitCode=None)
        return {"sha": head}

    async def checkout(
        self, wire_repo: str | None, ref: str, *, create: bool = False
    ) -> dict[str, Any]:
        """Switch to `ref` (a branch, or a commit: detached), or create branch `ref` here."""
        repo = await self.repo(wire_repo)
        if create:
            await self.run(repo.top, ["checkout", "-q", "-b", ref], read=False)
        else:
            await self.run(repo.top, ["checkout", "-q", ref, "--"], read=False)
        return {"branch": await self._branch(repo), "head": await self._head(repo)}

    async def head_info(self, repo: Repo) -> dict[str, Any]:
        """`{branch, head}` of a repository (branch None when detached)."""
        return {"branch": await self._branch(repo), "head": await self._head(repo)}


def _nul_list(items: Sequence[str]) -> bytes:
    return b"".join(os.fsencode(item) + b"\0" for item in items)


def _split_patch(data: bytes) -> list[bytes]:
    """Patch text cut into one chunk per file, at each `diff ` header line.

    Content lines start with ' ', '+', '-', '\\' or '@', so a line starting with `diff `
    is always a file's first header line (`diff --git`, or `diff --cc` for a conflict).
    """
    if not data:
        return []
    starts = [0] if data.startswith(b"diff ") else []
    pos = data.find(b"\ndiff ")
    while pos != -1:
        starts.append(pos + 1)
        pos = data.find(b"\ndiff ", pos + 1)
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return b"".join(chunks), False
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), timeout=5.0)


# -- the root repository's watch (inotify on the event loop, no thread) ---------------------

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")
_CHANGES = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE
_GIT_FILES = {b"HEAD", b"index", b"packed-refs"}

_libc: Any = None


def _inotify() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return _libc


class _RepoWatch:
    """inotify watches on the root, the root repository's git dir and its refs tree."""

    def __init__(self, service: GitService) -> None:
        self.service = service
        self.root = str(service.jail.root)
        self.fd: int | None = None
        self._kinds: dict[int, tuple[str, str]] = {}  # wd -> (kind, directory)
        self._timer: asyncio.TimerHandle | None = None
        self._rescan = True
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    def open(self) -> None:
        try:
            libc = _inotify()
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:
            log.warning("git/changed is off: cannot open inotify: %s", exc)
            return
        self.fd = fd
        self._loop.add_reader(fd, self._on_readable)
        self._add(
            self.root, "root", IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_ONLYDIR
        )
        self._schedule(rescan=True, first=True)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        fd, self.fd = self.fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)
        self._kinds.clear()

    def _add(self, path: str, kind: str, mask: int) -> bool:
        if self.fd is None:
            return False
        wd = _inotify().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            if code not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                log.warning("git/changed: cannot watch %s: %s", path, os.strerror(code))
            return False
        self._kinds[wd] = (kind, path)
        return True

    def _clear_repo_watches(self) -> None:
        if self.fd is None:
            return
        for wd, (kind, _) in list(self._kinds.items()):
            if kind != "root":
                _inotify().inotify_rm_watch(self.fd, wd)
                del self._kinds[wd]

    def _watch_refs(self, top: str) -> None:
        count = sum(1 for kind, _ in self._kinds.values() if kind == "refs")
        stack = [top]
        while stack:
            if count >= self.service.watch_max_dirs:
                log.warning(
                    "git/changed: more than %d ref directories; the rest are not watched",
                    self.service.watch_max_dirs,
                )
                return
            path = stack.pop()
            if not self._add(path, "refs", _CHANGES | IN_ONLYDIR):
                continue
            count += 1
            with contextlib.suppress(OSError), os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)

    def _on_readable(self) -> None:
        if self.fd is None:
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("git/changed: inotify read failed: %s", exc)
            return
        changed = rescan = False
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                changed = rescan = True
                continue
            kind_dir = self._kinds.get(wd)
            if kind_dir is None:
                continue
            kind, directory = kind_dir
            if mask & IN_IGNORED:
                self._kinds.pop(wd, None)
                if kind == "git":
                    rescan = changed = True
                continue
            if name.endswith(b".lock"):
                continue
            if kind == "root":
                if name == b".git":
                    rescan = changed = True
            elif kind == "git":
                if name in _GIT_FILES or name == b"refs":
                    changed = True
                    rescan = rescan or name == b"refs"
            elif kind == "refs":
                changed = True
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    self._watch_refs(os.path.join(directory, os.fsdecode(name)))
        if changed:
            self._schedule(rescan=rescan)

    def _schedule(self, *, rescan: bool, first: bool = False) -> None:
        self._rescan = self._rescan or rescan
        if self._timer is None and self.fd is not None:
            delay = 0.0 if first else self.service.watch_debounce
            self._timer = self._loop.call_later(delay, self._fire, not first)

    def _fire(self, emit: bool) -> None:
        self._timer = None
        if self._task is not None and not self._task.done():
            # One refresh at a time; run again when it is done.
            self._task.add_done_callback(lambda _t: self._schedule(rescan=False))
            return
        self._task = self._loop.create_task(self._refresh(emit))

    async def _refresh(self, emit: bool) -> None:
        service = self.service
        # Taken before the first await: a rescan asked for meanwhile waits for the next run.
        rescan, self._rescan = self._rescan, False
        try:
            repo = await service.repo("/")
        except AetherError:
            repo = None
        if repo is not None and repo.top != self.root:
            repo = None  # the root is inside another repository's work tree: not ours
        if rescan:
            self._clear_repo_watches()
            if repo is not None:
                result = await service.run(repo.top, ["rev-parse", "--git-common-dir"], check=False)
                common = _decode(result.stdout).strip() if result.code == 0 else repo.git_dir
                common = await service.executor.run(
                    os.path.realpath, os.path.join(repo.top, common)
                )
                self._add(repo.git_dir, "git", _CHANGES | IN_ONLYDIR)
                if common != repo.git_dir:
                    self._add(common, "git", _CHANGES | IN_ONLYDIR)
                self._watch_refs(os.path.join(common, "refs"))
        if repo is None or not emit:
            return
        info = await service.head_info(repo)
        service._emit({"repo": "/", **info})


def git_available(binary: str = "git", search_path: str | None = None) -> bool:
    """True when `binary` is found (for /info and tests)."""
    return shutil.which(binary, path=search_path) is not None
