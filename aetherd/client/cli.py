"""The client's subcommands of `aetherd`: attach, ls, logs, cp, ports (and exec, agent).

Each connects with `--url`/`--token`, else `AETHERD_URL`/`AETHERD_TOKEN`, else the
local daemon (port `AETHERD_PORT` or 3001, the token it generated in its data dir), so
on the workspace itself no flag is needed. Tables for people, `--json` for scripts;
an error is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import os
import posixpath
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from aetherd.client.core import Client
from aetherd.client.errors import AetherdError
from aetherd.client.target import resolve
from aetherd.client.terminal import Terminal, exit_status

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("attach", "ls", "logs", "cp", "ports", "exec", "agent")
DETACH_HELP = "detach with Enter ~ . (type ~~ for a literal ~ at the start of a line)"


# -- parsers ------------------------------------------------------------------------------


def _connection_flags() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--url", help="daemon URL or connect URL (env AETHERD_URL)")
    group.add_argument("--token", help="access token (env AETHERD_TOKEN)")
    return parent


def add_commands(commands: Any) -> None:
    """Add the client's subcommands to `aetherd`'s subparsers."""
    common = _connection_flags()
    attach = commands.add_parser(
        "attach",
        parents=[common],
        help="attach this terminal to a workspace terminal session",
        description=f"Attach to SESSION (created if it does not exist). {DETACH_HELP}.",
    )
    attach.add_argument("session", nargs="?", help="session id (default: choose or create)")
    attach.add_argument(
        "--command", dest="new_command", help="for a new session: run this instead of a shell"
    )
    listing = commands.add_parser("ls", parents=[common], help="list terminal sessions")
    listing.add_argument("--json", action="store_true", help="print JSON")
    logs = commands.add_parser("logs", parents=[common], help="print a session's scrollback")
    logs.add_argument("session")
    cp = commands.add_parser(
        "cp",
        parents=[common],
        help="copy files to or from the workspace (:PATH is a workspace path)",
        description="aetherd cp LOCAL :REMOTE, or aetherd cp :REMOTE LOCAL",
    )
    cp.add_argument("-r", "--recursive", action="store_true", help="copy directories")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cp.add_argument("source")
    cp.add_argument("dest")
    run_ = commands.add_parser(
        "exec",
        parents=[common],
        help="run a command in the workspace, without a terminal",
        description="aetherd exec [--cwd DIR] [--env K=V] -- CMD ARGS...: stdout and stderr "
        "to yours, your stdin to it (with end of file), Ctrl-C as SIGINT, its exit code "
        "(128 + signal when a signal ended it).",
    )
    run_.add_argument("--cwd", help="workspace directory to run in (default: the root)")
    run_.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="an environment variable"
    )
    run_.add_argument("--timeout", type=float, help="seconds, then SIGTERM (and SIGKILL)")
    run_.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    agent = commands.add_parser(
        "agent",
        parents=[common],
        help="give the workspace's agent a task and stream what it does",
        description="Stream the answer, tool calls and results; ask for approvals.",
    )
    agent.add_argument("prompt", help="the task (- reads it from stdin)")
    agent.add_argument("--json", action="store_true", help="print events as JSON lines")
    agent.add_argument("--task-id", help="the task's id (default: made by the daemon)")
    agent.add_argument(
        "--yes", action="store_true", help="approve every permission request without asking"
    )
    ports = commands.add_parser("ports", parents=[common], help="list listening ports")
    ports.add_argument("--json", action="store_true", help="print JSON")
    ports.add_argument("--kill", type=int, metavar="PORT", help="end the processes on PORT")


def run(args: argparse.Namespace) -> int:
    """Run a client subcommand; returns the exit status."""
    handlers: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
        "attach": cmd_attach,
        "ls": cmd_ls,
        "logs": cmd_logs,
        "cp": cmd_cp,
        "ports": cmd_ports,
        "exec": cmd_exec,
        "agent": cmd_agent,
    }
    handler = handlers[args.command]
    try:
        target = resolve(args.url, args.token)
        client = Client(target.ws_url, target.token, workspace=target.workspace_id)
        result: int = asyncio.run(_with_client(client, handler, args))
        return result
    except AetherdError as err:
        _error(err.message if err.code == "CONNECTION_FAILED" else f"{err.code}: {err.message}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `aetherd ls | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        _error(str(err))
        return 1


async def _with_client(
    client: Client, handler: Callable[[Client, argparse.Namespace], Any], args: argparse.Namespace
) -> int:
    try:
        await client.connect()
    except AetherdError as err:
        if err.code == "CONNECTION_LOST":
            raise AetherdError(
                "CONNECTION_FAILED",
                f"cannot reach the daemon at {client.target.ws_url} "
                "(is `aetherd serve` running? set --url or AETHERD_URL)",
            ) from None
        raise
    try:
        result: int = await handler(client, args)
        return result
    finally:
        await client.close()


def _error(message: str) -> None:
    print(f"aetherd: error: {message}", file=sys.stderr)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO) -> None:
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


# -- ls, logs, ports ----------------------------------------------------------------------


async def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    sessions = await client.terminal.list()
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in sessions], indent=2))
        return 0
    rows = [
        (
            s.session_id,
            s.pid,
            f"{s.cols}x{s.rows}",
            s.clients,
            f"exited ({exit_status(s.exit_code, s.signal)})" if s.exited else "running",
            s.cwd,
            s.command,
        )
        for s in sessions
    ]
    _table(rows, ("SESSION", "PID", "SIZE", "CLIENTS", "STATE", "CWD", "COMMAND"), sys.stdout)
    return 0


async def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    sessions = {s.session_id: s for s in await client.terminal.list()}
    if args.session not in sessions:
        raise AetherdError("SESSION_NOT_FOUND", f"no session {args.session!r}")
    term = await client.terminal.attach(args.session, resume_from=0)
    end = term.info.offset if term.info is not None else 0
    out = sys.stdout.buffer
    position = 0
    while position < end:
        try:
            item = await term.output.get(client.options.request_timeout)
        except StopAsyncIteration:
            break
        data = item.data.encode("utf-8", "surrogateescape")
        out.write(data)
        position = item.offset + len(data)
    out.flush()
    if not term.output.ended:
        await term.detach()
    return 0


async def cmd_ports(client: Client, args: argparse.Namespace) -> int:
    if args.kill is not None:
        result = await client.ports.kill(args.kill)
        print(
            f"port {result.port}: sent SIGTERM to {', '.join(map(str, result.pids)) or 'nothing'}"
        )
        return 0
    ports = await client.ports.list()
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in ports], indent=2))
        return 0
    rows = [(p.port, p.address, p.pid, p.process, p.url, p.label) for p in ports]
    _table(rows, ("PORT", "ADDRESS", "PID", "PROCESS", "URL", "LABEL"), sys.stdout)
    return 0


# -- attach -------------------------------------------------------------------------------


class EscapeParser:
    """ssh's escape: `~.` at the start of a line detaches; `~~` sends one `~`."""

    def __init__(self) -> None:
        self.line_start = True
        self.tilde = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes to send, and whether the detach sequence was typed."""
        out = bytearray()
        for byte in data:
            char = bytes([byte])
            if self.tilde:
                self.tilde = False
                if char == b".":
                    return bytes(out), True
                out += b"~" if char == b"~" else b"~" + char
            elif self.line_start and char == b"~":
                self.tilde = True
                continue
            else:
                out += char
            self.line_start = char in (b"\r", b"\n")
        return bytes(out), False


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 80, 24
    return max(1, min(size.columns, 1000)), max(1, min(size.lines, 1000))


async def _choose_session(client: Client) -> str | None:
    """Without SESSION: the one to attach to, or None for a new one."""
    live = [s for s in await client.terminal.list() if not s.exited]
    if not live or not sys.stdin.isatty():
        return None
    print("Sessions:")
    for index, session in enumerate(live, 1):
        print(f"  {index}) {session.session_id}  {session.command}  ({session.clients} attached)")
    print("  n) new session")
    while True:
        answer = (await asyncio.to_thread(input, "attach to [1]: ")).strip() or "1"
        if answer.lower() == "n":
            return None
        if answer.isdigit() and 1 <= int(answer) <= len(live):
            return live[int(answer) - 1].session_id
        if any(s.session_id == answer for s in live):
            return answer


class Screen:
    """The local terminal: raw mode, and a status line on the bottom row."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.out = sys.stdout.fileno()
        self.tty = os.isatty(self.fd)
        self._saved: Any = None
        self.status_shown = False
        self.tail = b""  # the output after the last newline: the cursor's line

    def __enter__(self) -> Screen:
        if self.tty:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSADRAIN)  # keep what was typed ahead
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def output(self, data: bytes) -> None:
        """Write the session's output, remembering the cursor's line."""
        if self.status_shown:
            self.status(None)  # before the first bytes after a reconnect
        newline = data.rfind(b"\n")
        self.tail = data[newline + 1 :] if newline >= 0 else (self.tail + data)[-4096:]
        self.write(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.out, view)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            view = view[written:]

    def status(self, text: str | None) -> None:
        """Show `text` on the bottom row (keeping the cursor), or clear it."""
        _, rows = _terminal_size()
        if text is None:
            if self.status_shown:
                self.write(f"\x1b7\x1b[{rows};1H\x1b[2K\x1b8".encode())
                if b"\x1b" not in self.tail and len(self.tail) < 1024:
                    # When the cursor's line was the bottom row, the status covered it:
                    # write it again (plain text only; full-screen programs redraw).
                    self.write(b"\r\x1b[2K" + self.tail)
            self.status_shown = False
            return
        self.write(f"\x1b7\x1b[{rows};1H\x1b[0;7m {text} \x1b[0m\x1b[K\x1b8".encode())
        self.status_shown = True


async def cmd_attach(client: Client, args: argparse.Namespace) -> int:
    session_id = args.session or await _choose_session(client)
    cols, rows = _terminal_size()
    known = {s.session_id for s in await client.terminal.list()}
    term: Terminal
    if session_id is not None and session_id in known:
        term = await client.terminal.attach(session_id, cols=cols, rows=rows)
    else:
        term = await client.terminal.create(
            session_id, command=args.new_command, cols=cols, rows=rows
        )
    loop = asyncio.get_running_loop()
    detached = asyncio.Event()
    typed: list[str] = []
    typing = asyncio.Event()
    escape = EscapeParser()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    screen = Screen()

    def on_state(state: str) -> None:
        if state == "reconnecting":
            screen.status("aetherd: reconnecting…")
        elif state == "connected" and client.generation > 1:
            screen.status(None)
            width, height = _terminal_size()
            # A full-screen program redraws on a size change: it repaints the row the
            # status line covered. (Re-applying the same size sends no SIGWINCH.)
            if height > 1:
                client.spawn(term.resize(width, height - 1))
            client.spawn(term.resize(width, height))
        elif state == "closed" and term.exit is None:
            screen.status("aetherd: connection lost")

    def on_input() -> None:
        try:
            data = os.read(screen.fd, 65536)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(screen.fd)
            return
        send, detach = escape.feed(data)
        if send:
            text = decoder.decode(send)
            if text:
                typed.append(text)
                typing.set()
        if detach:
            detached.set()

    def on_winch() -> None:
        width, height = _terminal_size()
        client.spawn(term.resize(width, height))

    async def pump() -> None:
        async for item in term:
            screen.output(item.data.encode("utf-8", "surrogateescape"))

    async def send_input() -> None:
        # One sender keeps keystrokes in order; input typed while reconnecting is
        # kept by the terminal and sent after the reattach.
        while True:
            await typing.wait()
            typing.clear()
            text = "".join(typed)
            typed.clear()
            with contextlib.suppress(AetherdError):
                await term.write(text)

    client.on_state = on_state
    with screen:
        loop.add_reader(screen.fd, on_input)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGWINCH, on_winch)
        output = asyncio.ensure_future(pump())
        sender = asyncio.ensure_future(send_input())
        detaching = asyncio.ensure_future(detached.wait())
        try:
            await asyncio.wait({output, detaching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(screen.fd)
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGWINCH)
            detaching.cancel()
            sender.cancel()
            if not output.done():
                output.cancel()
                with contextlib.suppress(asyncio.CancelledError, AetherdError):
                    await output
        client.on_state = None
        if screen.status_shown:
            screen.status(None)
    if detached.is_set() and term.exit is None:
        await term.detach()
        sys.stderr.write(f"\r\n[detached from {term.session_id}]\r\n")
        return 0
    error = output.exception() if output.done() and not output.cancelled() else None
    if term.exit is not None:
        return exit_status(term.exit.exit_code, term.exit.signal)
    if isinstance(error, AetherdError):
        raise error
    return 1


# -- cp -----------------------------------------------------------------------------------


class ProgressBar:
    """`name  42%  12.0 MiB / 28.6 MiB  9.1 MiB/s` on stderr, redrawn in place."""

    def __init__(self, name: str, enabled: bool, out: TextIO | None = None) -> None:
        self.name = name
        self.enabled = enabled
        self.out = out or sys.stderr
        self.start = time.monotonic()
        self.last = 0.0

    @staticmethod
    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return f"{n:.1f} GiB"  # pragma: no cover

    def line(self, done: int, total: int | None, elapsed: float) -> str:
        rate = self.size(done / elapsed) + "/s" if elapsed > 0 else ""
        if total:
            filled = int(20 * done / total)
            return (
                f"{self.name}  [{'#' * filled}{'.' * (20 - filled)}] {100 * done // total:3d}%  "
                f"{self.size(done)} / {self.size(total)}  {rate}"
            )
        return f"{self.name}  {self.size(done)}  {rate}"

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done != total):
            return
        self.last = now
        self.out.write("\r" + self.line(done, total, now - self.start) + "\x1b[K")
        self.out.flush()

    def finish(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def _local_kind(path: Path) -> str | None:
    if path.is_dir():
        return "directory"
    if path.is_file():
        return "file"
    return None


def _remote(spec: str) -> str | None:
    return "/" + spec[1:].lstrip("/") if spec.startswith(":") else None


async def _remote_type(client: Client, path: str) -> str | None:
    try:
        return (await client.files.stat(path)).type
    except AetherdError as err:
        if err.code == "NOT_FOUND":
            return None
        raise


async def cmd_cp(client: Client, args: argparse.Namespace) -> int:
    source, dest = _remote(args.source), _remote(args.dest)
    if (source is None) == (dest is None):
        raise AetherdError(
            "INVALID_ARGUMENT", "exactly one of SOURCE and DEST must be remote (:PATH)"
        )
    progress = not args.quiet and sys.stderr.isatty()
    if dest is not None:
        await _upload(client, Path(args.source), dest, args.dest.endswith("/"), args, progress)
    else:
        assert source is not None
        await _download(client, source, Path(args.dest), args, progress)
    return 0


async def _upload(
    client: Client, local: Path, remote: str, into: bool, args: argparse.Namespace, progress: bool
) -> None:
    local_kind = await asyncio.to_thread(_local_kind, local)
    if local_kind is None:
        raise AetherdError("NOT_FOUND", f"{local}: no such file or directory")
    kind = await _remote_type(client, remote)
    if into or kind == "directory":
        remote = posixpath.join(remote, local.name)
    if local_kind == "directory":
        if not args.recursive:
            raise AetherdError("IS_DIRECTORY", f"{local} is a directory (use -r)")
        await client.files.mkdir(remote)
        for root, dirs, files in await asyncio.to_thread(lambda: list(os.walk(local))):
            rel = Path(root).relative_to(local).as_posix()
            base = remote if rel == "." else posixpath.join(remote, rel)
            for name in sorted(dirs):
                await client.files.mkdir(posixpath.join(base, name))
            for name in sorted(files):
                path = Path(root) / name
                if await asyncio.to_thread(_local_kind, path) == "file":
                    await _upload_file(client, path, posixpath.join(base, name), progress)
        return
    await _upload_file(client, local, remote, progress)


async def _upload_file(client: Client, local: Path, remote: str, progress: bool) -> None:
    bar = ProgressBar(remote, progress)
    await client.files.upload(local, remote, bar)
    bar.finish()


async def _download(
    client: Client, remote: str, local: Path, args: argparse.Namespace, progress: bool
) -> None:
    kind = await _remote_type(client, remote)
    if kind is None:
        raise AetherdError("NOT_FOUND", f":{remote}: no such file or directory")
    name = posixpath.basename(remote.rstrip("/")) or "workspace"
    if await asyncio.to_thread(_local_kind, local) == "directory" or args.dest.endswith("/"):
        local = local / name
    if kind == "file":
        bar = ProgressBar(str(local), progress)
        await client.files.download(remote, local, bar)
        bar.finish()
        return
    if not args.recursive:
        raise AetherdError("IS_DIRECTORY", f":{remote} is a directory (use -r)")
    await _download_tree(client, remote, local, progress)


async def _download_tree(client: Client, remote: str, local: Path, progress: bool) -> None:
    await asyncio.to_thread(local.mkdir, parents=True, exist_ok=True)
    for entry in await client.files.list(remote):
        source = posixpath.join(remote, entry.name)
        if entry.type == "directory":
            if not entry.symlink:
                await _download_tree(client, source, local / entry.name, progress)
        else:
            bar = ProgressBar(str(local / entry.name), progress)
            await client.files.download(source, local / entry.name, bar)
            bar.finish()


# -- exec ---------------------------------------------------------------------------------


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AetherdError("INVALID_ARGUMENT", f"--env wants K=V, not {pair!r}")
        env[key] = value
    return env


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]) -> None:
    """A thread: local stdin into `queue` (b"" at end of file), with backpressure."""
    while True:
        try:
            data = os.read(sys.stdin.fileno(), 65536)
        except OSError:
            data = b""
        try:
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
        except RuntimeError:  # the loop has ended
            return
        if not data:
            return


async def cmd_exec(client: Client, args: argparse.Namespace) -> int:
    import threading

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise AetherdError("INVALID_ARGUMENT", "no command: aetherd exec [options] -- CMD ARGS...")
    env = _env_pairs(args.env)
    process = await client.process.start(
        argv=argv,
        cwd=args.cwd,
        env=env or None,
        stdin=True,
        timeout=args.timeout,
        encoding="base64",
    )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    threading.Thread(target=_read_stdin, args=(loop, queue), daemon=True).start()

    async def forward_stdin() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            data = await queue.get()
            text = decoder.decode(data, final=not data)
            try:
                await process.write(text, eof=not data)
            except AetherdError:
                return  # it has exited, or closed its stdin
            if not data:
                return

    forwarded = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

    def forward(sig: signal.Signals) -> None:
        client.spawn(process.signal(sig.name))

    for sig in forwarded:
        loop.add_signal_handler(sig, forward, sig)
    feeder = asyncio.ensure_future(forward_stdin())
    try:
        async for stream, data in process.chunks():
            fd = sys.stdout.fileno() if stream == "stdout" else sys.stderr.fileno()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        feeder.cancel()
        for sig in forwarded:
            loop.remove_signal_handler(sig)
    if process.exit is None:
        raise process.lost or AetherdError("CONNECTION_LOST", "the process was lost")
    return exit_status(process.exit.exit_code, process.exit.signal)


# -- agent --------------------------------------------------------------------------------


class AgentView:
    """The agent's events for a person: the answer as it streams, tool calls and their
    results, in colour on a terminal; or one JSON object per line."""

    def __init__(self, as_json: bool, color: bool) -> None:
        self.as_json = as_json
        self.color = color
        self.at_line_start = True
        self.tools_shown: set[str] = set()

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def _line(self, text: str, out: TextIO | None = None) -> None:
        out = out or sys.stdout
        if not self.at_line_start:
            out.write("\n")
        out.write(text + "\n")
        out.flush()
        self.at_line_start = True

    def show(self, event: Any) -> None:
        if self.as_json:
            print(json.dumps(event.model_dump(mode="json", by_alias=True, exclude_none=True)))
            sys.stdout.flush()
            return
        kind = event.type
        if kind in ("text", "thinking"):
            content = event.content
            if kind == "thinking":
                if not self.color:
                    return
                content = self._paint("2", content)
            sys.stdout.write(content)
            sys.stdout.flush()
            self.at_line_start = event.content.endswith("\n")
        elif kind == "tool_invocation" and event.tool_call_id not in self.tools_shown:
            self.tools_shown.add(event.tool_call_id)
            args = json.dumps(event.input, ensure_ascii=False)
            if len(args) > 200:
                args = args[:197] + "..."
            self._line(self._paint("36", f"▸ {event.name} {args}"))
        elif kind == "tool_result":
            body = (event.error if event.is_error else event.result) or ""
            first = body.strip().splitlines()[0][:200] if body.strip() else ""
            mark = self._paint("31", "✗") if event.is_error else self._paint("32", "✓")
            self._line(f"  {mark} {first}")
        elif kind == "done":
            usage = f"{event.usage.input_tokens} in, {event.usage.output_tokens} out"
            if event.status != "completed":
                reason = f": {event.error}" if event.error else ""
                self._line(self._paint("31", f"task {event.status}{reason}"), sys.stderr)
            self._line(self._paint("2", f"[{event.status}; tokens {usage}]"), sys.stderr)
        elif kind == "error":
            self._line(self._paint("31", f"agent error: {event.code}: {event.error}"), sys.stderr)


async def _ask(question: str) -> str:
    """A line from the user (stdin), or "" at end of file."""
    sys.stderr.write(question)
    sys.stderr.flush()
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def cmd_agent(client: Client, args: argparse.Namespace) -> int:
    from aetherd.protocol.agent import (
        AgentDone,
        AgentPermissionRequest,
        AgentToolInvocation,
    )

    prompt = args.prompt
    if prompt == "-":
        prompt = (await asyncio.to_thread(sys.stdin.read)).strip()
    view = AgentView(args.json, color=sys.stdout.isatty() and not args.json)
    events = client.agent.events()
    reply = await client.agent.prompt(prompt, args.task_id)
    task_id = reply.task_id
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        client.spawn(client.agent.abort(task_id))

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        async for event in events:
            if getattr(event, "task_id", task_id) != task_id:
                continue
            view.show(event)
            if isinstance(event, AgentPermissionRequest):
                allowed = args.yes or (
                    await _ask(f"Allow {event.name}: {event.description}? [y/N] ")
                ).lower() in ("y", "yes")
                if allowed:
                    await client.agent.approve(event.request_id)
                else:
                    await client.agent.reject(event.request_id, "refused by the user")
            elif (
                isinstance(event, AgentToolInvocation)
                and event.status == "awaiting_input"
                and event.name == "ask_user"
            ):
                question = str(event.input.get("question") or "The agent asks")
                answer = await _ask(f"{question}\n> ")
                await client.agent.tool_response(event.tool_call_id, answer)
            elif isinstance(event, AgentDone):
                if interrupted:
                    return 130
                return 0 if event.status == "completed" else 1
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    raise AetherdError("CONNECTION_LOST", "the event stream ended before the task did")
