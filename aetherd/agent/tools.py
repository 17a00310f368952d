"""The agent's tools, jailed to the workspace with the daemon's one `Jail`.

File tools do blocking I/O, so they run in the jail's file executor, and they read and
write only through `aetherd.services.fileio` (no symlink followed, no FIFO opened for a
blocking read, writes through the one atomic writer). `bash` runs a real subprocess
in the workspace root, in its own process group (so abort and timeout kill the whole
group), with capped output. Every failure a tool can have becomes `ToolError`, which
the loop returns to the model as an error result; the task goes on.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aetherd.errors import AetherError
from aetherd.services.fileio import AtomicWriter, is_temp_name, os_error, read_regular
from aetherd.services.jail import Jail

DEFAULT_IGNORE = ("node_modules", ".git", ".next", "dist", "build", "__pycache__")
MAX_FILE_BYTES = 10 * 1024 * 1024  # read_file/edit_file/grep skip files larger than this

TOOL_SPECS: list[dict[str, Any]] = [
    {
        "name": "read_file",
        "description": "Read a text file of the workspace. Paths are workspace paths (/ is the "
        "root). Optional 1-based `offset` line and `limit` lines.",
        "schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "offset": {"type": "integer", "minimum": 1},
                "limit": {"type": "integer", "minimum": 1},
            },
            "required": ["path"],
        },
    },
    {
        "name": "write_file",
        "description": "Create or overwrite a file with `content` (parents are created).",
        "schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    },
    {
        "name": "edit_file",
        "description": "Replace the exact string `old_string` with `new_string` in a file. "
        "`old_string` must occur exactly once.",
        "schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "old_string": {"type": "string"},
                "new_string": {"type": "string"},
            },
            "required": ["path", "old_string", "new_string"],
        },
    },
    {
        "name": "list_files",
        "description": "List a directory (default /): directories end with '/'.",
        "schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
    {
        "name": "glob",
        "description": "Find files whose path (relative to `path`, default /) matches a glob; "
        "`**` spans directories, e.g. `**/*.py`.",
        "schema": {
            "type": "object",
            "properties": {"pattern": {"type": "string"}, "path": {"type": "string"}},
            "required": ["pattern"],
        },
    },
    {
        "name": "grep",
        "description": "Search file contents with a Python regular expression; optional `path` "
        "(default /) and `glob` filter on file paths. Prints path:line: text.",
        "schema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string"},
                "glob": {"type": "string"},
            },
            "required": ["pattern"],
        },
    },
    {
        "name": "bash",
        "description": "Run a bash command in the workspace root; returns its output "
        "(stdout and stderr) and exit code.",
        "schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "timeout": {"type": "number", "description": "seconds"},
            },
            "required": ["command"],
        },
    },
    {
        "name": "ask_user",
        "description": "Ask the user a question and wait for the answer.",
        "schema": {
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
        },
    },
]
TOOL_NAMES = frozenset(spec["name"] for spec in TOOL_SPECS)
FILE_TOOLS = frozenset({"read_file", "write_file", "edit_file", "list_files", "glob", "grep"})


class ToolError(Exception):
    """A tool failed; the message goes back to the model."""


@dataclass
class ToolLimits:
    """Caps of the tools, from settings."""

    timeout: float = 120.0
    output_max: int = 32 * 1024
    max_results: int = 500


def cap(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, keeping head and tail, with a note of the cut."""
    if len(text) <= limit:
        return text
    half = max(1, (limit - 80) // 2)
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n… [{omitted} characters omitted] …\n{text[-half:]}"


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob (`*`, `?`, `[...]`, `**`) as a regex over `/`-separated relative paths."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass
class Tools:
    """The file tools on one jail, plus `bash` with the config's environment."""

    jail: Jail
    limits: ToolLimits = field(default_factory=ToolLimits)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    env: dict[str, str] = field(default_factory=dict)

    def _ignored(self, name: str) -> bool:
        if is_temp_name(name):
            return True  # a write in flight (or a dead writer's): not the workspace's
        for pattern in self.ignore:
            if name == pattern:
                return True
            if any(c in pattern for c in "*?[") and glob_regex(pattern).match(name):
                return True
        return False

    def _resolve(self, path: Any) -> Path:
        if not isinstance(path, str):
            raise ToolError("`path` must be a string")
        try:
            return self.jail.resolve(path)
        except AetherError as err:
            raise ToolError(err.message) from None

    async def run(self, name: str, args: dict[str, Any]) -> str:
        """Run file tool `name` (not bash/ask_user) in a thread; returns the result text."""
        if name not in FILE_TOOLS:
            raise ToolError(f"unknown tool {name!r}")
        func = getattr(self, f"_{name}")
        return await self.jail.executor.run(func, args)

    # -- file tools (run in a thread) ---------------------------------------------------
    def _read_text(self, real: Path, wire: str) -> str:
        try:
            data, st = read_regular(self.jail, real, wire, MAX_FILE_BYTES)
        except AetherError as err:
            if err.code.value == "NOT_FOUND":
                raise ToolError(f"{wire} does not exist") from None
            raise ToolError(err.message) from None
        if len(data) > MAX_FILE_BYTES:
            raise ToolError(f"{wire} is {st.st_size} bytes; larger than {MAX_FILE_BYTES}")
        if b"\x00" in data[:8192]:
            raise ToolError(f"{wire} is a binary file")
        return data.decode("utf-8", "replace")

    def _read_file(self, args: dict[str, Any]) -> str:
        real = self._resolve(args.get("path"))
        wire = self.jail.to_wire(real)
        text = self._read_text(real, wire)
        offset, limit = args.get("offset"), args.get("limit")
        if offset is not None or limit is not None:
            lines = text.splitlines(keepends=True)
            start = max(0, int(offset or 1) - 1)
            end = start + int(limit) if limit is not None else len(lines)
            text = "".join(lines[start:end])
        return cap(text, self.limits.output_max)

    def _write_atomic(self, real: Path, content: str, wire: str) -> None:
        """The daemon's one atomic writer (fileio.AtomicWriter): random temp name, mode kept."""
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolError("the content is not valid Unicode text (a lone surrogate)") from None
        writer = AtomicWriter(self.jail, real)
        try:
            writer.open()
            writer.write(data)
            writer.commit()
        except OSError as exc:
            writer.abort()
            raise ToolError(f"cannot write {os_error(exc, wire).message}") from None
        except BaseException:
            writer.abort()
            raise

    def _write_file(self, args: dict[str, Any]) -> str:
        real = self._resolve(args.get("path"))
        content = args.get("content")
        if not isinstance(content, str):
            raise ToolError("`content` must be a string")
        wire = self.jail.to_wire(real)
        if self.jail.is_root(real) or real.is_dir():
            raise ToolError(f"{wire} is a directory")
        self._write_atomic(real, content, wire)
        return f"wrote {len(content.encode('utf-8'))} bytes to {wire}"

    def _edit_file(self, args: dict[str, Any]) -> str:
        real = self._resolve(args.get("path"))
        old, new = args.get("old_string"), args.get("new_string")
        if not isinstance(old, str) or not isinstance(new, str):
            raise ToolError("`old_string` and `new_string` must be strings")
        if old == "":
            raise ToolError("`old_string` must not be empty")
        wire = self.jail.to_wire(real)
        text = self._read_text(real, wire)
        count = text.count(old)
        if count == 0:
            raise ToolError(f"old_string was not found in {wire}")
        if count > 1:
            raise ToolError(
                f"old_string occurs {count} times in {wire}; include more context to make it unique"
            )
        self._write_atomic(real, text.replace(old, new, 1), wire)
        return f"edited {wire}"

    def _list_files(self, args: dict[str, Any]) -> str:
        real = self._resolve(args.get("path", "/"))
        wire = self.jail.to_wire(real)
        try:
            entries = list(os.scandir(real))
        except NotADirectoryError:
            raise ToolError(f"{wire} is not a directory") from None
        except FileNotFoundError:
            raise ToolError(f"{wire} does not exist") from None
        except OSError as exc:
            raise ToolError(f"cannot list {wire}: {exc.strerror}") from None
        rows = []
        for entry in entries:
            if self._ignored(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            rows.append((not is_dir, entry.name, entry.name + ("/" if is_dir else "")))
        rows.sort()
        limit = self.limits.max_results
        lines = [row[2] for row in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"… {len(rows) - limit} more entries not shown")
        return cap("\n".join(lines) if lines else "(empty directory)", self.limits.output_max)

    def _walk(self, base: Path) -> Iterator[str]:
        """Files under `base` (real paths, inside the jail), ignored directories pruned."""
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not self._ignored(d))
            for name in sorted(filenames):
                if self._ignored(name):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and not self.jail.is_inside(os.path.realpath(path)):
                    continue
                yield path

    def _glob(self, args: dict[str, Any]) -> str:
        pattern = args.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ToolError("`pattern` must be a non-empty string")
        base = self._resolve(args.get("path", "/"))
        regex = glob_regex(pattern.lstrip("/"))
        limit = self.limits.max_results
        found: list[str] = []
        more = False
        for path in self._walk(base):
            rel = os.path.relpath(path, base)
            if regex.match(rel):
                if len(found) >= limit:
                    more = True
                    break
                found.append(self.jail.to_wire(path))
        if more:
            found.append(f"… stopped after {limit} matches")
        return cap("\n".join(found) if found else "no files match", self.limits.output_max)

    def _grep(self, args: dict[str, Any]) -> str:
        pattern = args.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ToolError("`pattern` must be a non-empty string")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ToolError(f"invalid regular expression: {exc}") from None
        base = self._resolve(args.get("path", "/"))
        name_filter = args.get("glob")
        name_regex = glob_regex(name_filter) if isinstance(name_filter, str) else None
        paths = [str(base)] if base.is_file() else self._walk(base)
        limit = self.limits.max_results
        out: list[str] = []
        for path in paths:
            if name_regex is not None:
                rel = os.path.relpath(path, base) if base.is_dir() else os.path.basename(path)
                if not (name_regex.match(rel) or name_regex.match(os.path.basename(path))):
                    continue
            real = os.path.realpath(path)
            if not self.jail.is_inside(real):
                continue
            try:
                data, _ = read_regular(self.jail, real, path, MAX_FILE_BYTES)
            except AetherError:
                continue  # gone, unreadable, or not a regular file (a FIFO, a device)
            if len(data) > MAX_FILE_BYTES:
                continue
            if b"\x00" in data[:8192]:
                continue
            wire = self.jail.to_wire(path)
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if regex.search(line):
                    out.append(f"{wire}:{number}: {line[:500]}")
                    if len(out) >= limit:
                        out.append(f"… stopped after {limit} matches")
                        return cap("\n".join(out), self.limits.output_max)
        return cap("\n".join(out) if out else "no matches", self.limits.output_max)

    # -- bash ---------------------------------------------------------------------------
    def bash_env(self) -> dict[str, str]:
        """The daemon's environment without its own AETHERD_* secrets, plus the config env."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AETHERD_")}
        env.update(self.env)
        return env

    async def bash(
        self, args: dict[str, Any], on_output: Callable[[str], None] | None = None
    ) -> tuple[str, bool]:
        """Run `command`; returns (output, is_error). Cancelling kills the process group.

        `on_output(text)` sees the output as it comes (decoded incrementally)."""
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ToolError("`command` must be a non-empty string")
        timeout = self.limits.timeout
        asked = args.get("timeout")
        if isinstance(asked, (int, float)) and asked > 0:
            timeout = min(float(asked), timeout)
        creating = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                "bash",
                "-c",
                command,
                cwd=str(self.jail.root),
                env=self.bash_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        try:
            proc = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # Cancelled while asyncio was still wiring the pipes: the process (and any
            # children it already forked) runs; asyncio alone would kill bash only.
            with contextlib.suppress(BaseException):
                started = await creating
                _kill_group(started.pid)
                await asyncio.wait_for(started.wait(), 2.0)
            raise
        limit = self.limits.output_max
        head = bytearray()
        tail = bytearray()
        total = 0

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        async def read() -> None:
            nonlocal total, tail
            assert proc.stdout is not None
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    return
                if on_output is not None:
                    on_output(decoder.decode(chunk))
                total += len(chunk)
                room = limit - len(head)
                if room > 0:
                    head.extend(chunk[:room])
                    chunk = chunk[room:]
                if chunk:
                    tail.extend(chunk)
                    if len(tail) > limit // 2:
                        del tail[: len(tail) - limit // 2]

        reader = asyncio.ensure_future(read())
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                timed_out = True
                _kill_group(proc.pid)
                await proc.wait()
            # Background children may hold the pipe open: give the reader a moment only.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 0.5)
        except BaseException:
            _kill_group(proc.pid)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 2.0)
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            # Close our end of the pipe (the process has exited or was killed).
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
        text = bytes(head).decode("utf-8", "replace")
        if tail:
            omitted = total - len(head) - len(tail)
            if omitted > 0:
                text += f"\n… [{omitted} bytes omitted] …\n"
            text += bytes(tail).decode("utf-8", "replace")
        text = cap(text, limit)
        if timed_out:
            return f"{text}\n[timed out after {timeout:g}s; process group killed]", True
        code = proc.returncode
        if code != 0:
            return f"{text}\n[exit code {code}]", True
        return (text or "(no output)"), False


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def resolve_env(values: Mapping[str, Any] | None) -> dict[str, str]:
    """A config `env` map as strings."""
    return {str(k): str(v) for k, v in (values or {}).items()}
