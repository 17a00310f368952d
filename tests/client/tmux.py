"""A real terminal for CLI tests: a private tmux server, typed into with `send-keys` and
read with `capture-pane`. Every wait is bounded."""

from __future__ import annotations

import asyncio
import re
import shlex
import uuid
from collections.abc import Callable


class Tmux:
    """One tmux server (its own socket) with one 100x30 window."""

    def __init__(self, cols: int = 100, rows: int = 30) -> None:
        self.socket = f"aetherd-test-{uuid.uuid4().hex[:10]}"
        self.cols = cols
        self.rows = rows
        self.started = False

    async def tmux(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "tmux",
            "-L",
            self.socket,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        if proc.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {err.decode()}")
        return out.decode("utf-8", "replace")

    @staticmethod
    def shell_line(command: list[str], env: dict[str, str]) -> str:
        """`env -i K=V ... command; echo EXIT=$?; sleep`: the exit code stays on screen."""
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        return f"env -i {assignments} {shlex.join(command)}; echo EXIT=$?; sleep 600"

    async def start(self, command: list[str], env: dict[str, str]) -> None:
        """Run `command` in the window (a fresh server on first use)."""
        line = self.shell_line(command, env)
        if not self.started:
            await self.tmux(
                "new-session", "-d", "-s", "main", "-x", str(self.cols), "-y", str(self.rows), line
            )
            await self.tmux("set-option", "-t", "main", "remain-on-exit", "on")
            self.started = True
        else:
            await self.tmux("respawn-pane", "-k", "-t", "main", line)
            await self.tmux("clear-history", "-t", "main")

    async def keys(self, *keys: str, literal: bool = False) -> None:
        await self.tmux("send-keys", "-t", "main", *(["-l"] if literal else []), *keys)

    async def screen(self) -> str:
        return await self.tmux("capture-pane", "-p", "-t", "main")

    async def history(self) -> str:
        """The whole pane: scrollback and screen, wrapped lines joined."""
        return await self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "main")

    async def wait(
        self, check: str | Callable[[str], bool], timeout: float = 20, whole: bool = False
    ) -> str:
        """Poll the screen (or the whole pane) until it holds `check` (text or predicate)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            text = await (self.history() if whole else self.screen())
            if (check in text) if isinstance(check, str) else check(text):
                return text
            if loop.time() > deadline:
                raise TimeoutError(f"screen never showed {check!r}:\n{text}")
            await asyncio.sleep(0.1)

    async def exit_code(self, timeout: float = 20) -> int:
        text = await self.wait(lambda t: re.search(r"EXIT=\d+", t) is not None, timeout)
        match = re.search(r"EXIT=(\d+)", text)
        assert match is not None
        return int(match.group(1))

    async def close(self) -> None:
        if self.started:
            try:
                await self.tmux("kill-server")
            except RuntimeError:
                pass
