"""The application: settings → services → channels → aiohttp app, and the serve loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, web

from aetherd import IMPORTED_AT, __version__, systemd
from aetherd.channels import CHANNELS
from aetherd.daemon import Daemon, build_services
from aetherd.errors import SettingsError
from aetherd.eventloop import loop_name
from aetherd.logs import AccessLogger, install_log_filters
from aetherd.protocol import Hub, Registry
from aetherd.reload import (
    Reexec,
    ReloadState,
    check_reload,
    code_fingerprint,
    end_abandoned,
    inherited_listener,
    write_record,
)
from aetherd.services import handover, keeper
from aetherd.services.handover import ProcessHandover, SessionState
from aetherd.settings import Settings
from aetherd.transport.access import AUTH, DAEMON, TRANSPORT, TransportState
from aetherd.transport.auth import (
    Authenticator,
    TokenSetup,
    connect_url,
    setup_tokens,
    watch_key_file,
)
from aetherd.transport.browser import add_browser_http
from aetherd.transport.console import console_url
from aetherd.transport.guard import ConnectionGuard, GuardedSite
from aetherd.transport.proxy import add_preview_proxy
from aetherd.transport.routes import add_routes

log = logging.getLogger("aetherd")
# Seconds between the last accept() of a reloading daemon and closing its connections.
RELOAD_SETTLE = 0.05


def create_app(settings: Settings, tokens: TokenSetup | None = None) -> web.Application:
    """Build the aiohttp application; services start and stop with it."""
    tokens = tokens if tokens is not None else setup_tokens(settings)
    app = web.Application(client_max_size=settings.max_message_size)
    daemon = Daemon(
        settings=settings,
        services=build_services(settings),
        hub=Hub(),
        registry=Registry(CHANNELS),
    )
    app[DAEMON] = daemon
    app[AUTH] = Authenticator(settings, tokens.tokens)
    guard = ConnectionGuard(settings.max_pending_connections, settings.accept_error_log_interval)
    daemon.services.metrics.add_source(guard)
    app[TRANSPORT] = TransportState(guard=guard, prefix=f"{os.getpid():x}")
    install_log_filters()
    add_routes(app)
    app.cleanup_ctx.append(_services_ctx)
    if app[AUTH].key_file is not None:
        app.cleanup_ctx.append(_key_file_ctx)
    add_preview_proxy(app)  # section 13
    add_browser_http(app, settings)  # section 16
    app.on_shutdown.append(close_sockets)
    return app


def runner_options(settings: Settings) -> dict[str, Any]:
    """`web.AppRunner` options shared by `serve()` and the test server."""
    return {
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger("aetherd.access"),
        # aiohttp arms this timer when a connection is made and closes the connection if
        # no complete request head has arrived when it fires: the header-read timeout.
        "keepalive_timeout": settings.header_timeout,
    }


def check_environment(settings: Settings) -> None:
    """Refuse to start with settings that would make every request of a kind fail."""
    if shutil.which(settings.terminal_shell) is None:
        raise SettingsError(f"terminal shell {settings.terminal_shell!r} not found on PATH")


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    await daemon.services.start()
    try:
        for channel in daemon.registry.channels.values():
            for hook in channel.startup_hooks:
                await hook(daemon)
        daemon.ready = True
        yield
    finally:
        daemon.ready = False
        await daemon.services.stop()


async def _key_file_ctx(app: web.Application) -> AsyncIterator[None]:
    """Re-read the JWT key file while the app runs (key rotation without a restart)."""
    daemon = app[DAEMON]
    task = asyncio.create_task(
        watch_key_file(
            app[AUTH], daemon.settings.jwt_key_reload_interval, daemon.services.executors.file.run
        ),
        name="jwt-key-file",
    )
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def close_sockets(
    app: web.Application,
    code: int = WSCloseCode.GOING_AWAY,
    reason: str = "server shutting down",
) -> None:
    """Close every socket with 1001 (going away; 1012 for a reload) and stop reporting ready.

    A socket upgraded after this (its upgrade was under way) is closed with the same
    code and reason at once, instead of being dropped without one by the runner's
    cleanup.

    `serve()` calls this before the runner's cleanup, because aiohttp's
    `pre_shutdown` drops open connections before `on_shutdown` runs.
    """
    daemon = app[DAEMON]
    daemon.ready = False
    daemon.closing = (int(code), reason)  # for sockets upgraded from now on
    peers = list(daemon.hub)
    if peers:
        await asyncio.gather(
            *(peer.close(code, reason) for peer in peers),  # type: ignore[attr-defined]
            return_exceptions=True,
        )


@dataclass
class Listening:
    """Where the daemon ended up listening."""

    host: str
    port: int


def _bind(settings: Settings) -> socket.socket:
    """Bind the listening socket ourselves, so a port in use is a clear one-line error."""
    # An ASCII host goes as bytes: a str is encoded with the "idna" codec, whose import
    # (stringprep, unicodedata) costs an idle daemon 0.4 MiB for nothing.
    host: str | bytes = settings.host.encode("ascii") if settings.host.isascii() else settings.host
    try:
        infos = socket.getaddrinfo(
            host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise SettingsError(f"cannot resolve host {settings.host!r}: {exc.strerror}") from None
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(address)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise SettingsError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> Reexec | None:
    """Run the daemon until SIGTERM/SIGINT (or `stop`), then shut down gracefully.

    The socket is bound before the token is set up, so a start that fails (a port in
    use) leaves no token file behind: the first start that succeeds generates the
    token and prints the connect URL.

    On SIGHUP the daemon reloads (`aetherd.reload`): it returns a `Reexec` once every
    service has stopped and the state is written; the caller execs it outside the loop.
    """
    check_environment(settings)
    taken = handover.take()
    reloads = ReloadState(settings.data_dir)
    reloads.begin(reloaded=taken is not None)
    sock = inherited_listener(taken.listen_fd) if taken is not None else None
    abandoned: list[int] = []
    if taken is not None and taken.state is None:
        # One line, then a clean start: the handed-over sessions are ended and reaped.
        log.warning("reload: %s; starting clean", taken.refused)
        for fd in taken.fds[1:] if sock is not None else taken.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        abandoned = taken.pids
    # Socket activation, and fds a keeper (aetherd init, systemd's fd store) kept
    # through a crash: named as systemd names them (LISTEN_FDNAMES).
    named = keeper.named_fds()
    orphans = [(fd, name) for fd, name in named if name.startswith(keeper.PTY_PREFIX)]
    for fd, name in named:
        if name.startswith(keeper.PTY_PREFIX):
            continue
        candidate = inherited_listener(fd) if sock is None else None
        if candidate is not None:
            sock = candidate
            log.info("using the listening socket passed in LISTEN_FDS")
        else:
            with contextlib.suppress(OSError):
                os.close(fd)
    if sock is None:
        sock = _bind(settings)
    host, port = sock.getsockname()[:2]
    try:
        tokens = setup_tokens(settings)
        app = create_app(settings, tokens)
    except BaseException:
        sock.close()
        raise
    daemon = app[DAEMON]
    daemon.reloads = reloads
    daemon.services.metrics.add_source(reloads)
    terminals = daemon.services.terminals
    if taken is not None and taken.state is not None:
        terminals.handover = (taken.state.terminals, taken.blob)
        daemon.services.processes.handover = (taken.state.processes, taken.blob)
    terminals.orphans = orphans
    kept_by = keeper.from_environment(terminals.keeper_exit)
    terminals.keeper = kept_by
    if isinstance(kept_by, keeper.InitKeeper):
        kept_by.start()
    kept_by.keep_listener(sock.fileno())
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout,
        **runner_options(settings),
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    guard = app[TRANSPORT].guard
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(guard.exception_handler)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reload_wanted = False
    background: set[asyncio.Task[Any]] = set()

    async def try_reload() -> None:
        nonlocal reload_wanted
        if reloads.in_progress or stop.is_set():
            log.info("reload already under way")
            return
        reloads.in_progress = True
        systemd.notify(
            f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        log.info("reload requested: checking the new code")
        why, how = await check_reload(settings.reload_check_timeout, reloads.fingerprint)
        if why is not None:
            reloads.in_progress = False
            reloads.refused += 1
            log.warning("reload refused, still serving: %s", why)
            with contextlib.suppress(OSError):
                write_record(settings.data_dir, reloadError={"at": time.time(), "reason": why})
            systemd.notify("READY=1")
            return
        with contextlib.suppress(OSError):
            write_record(settings.data_dir, lastCheck=how)
        if not stop.is_set():
            reload_wanted = True
            stop.set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(try_reload())
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if abandoned:
        task = asyncio.ensure_future(end_abandoned(abandoned, settings.terminal_kill_grace))
        background.add(task)
        task.add_done_callback(background.discard)
    watchdog: asyncio.Task[None] | None = None
    handed: tuple[list[SessionState], list[ProcessHandover], bytes] | None = None
    listen_copy: int | None = None
    try:
        await runner.setup()
        # Once everything a start imports is imported, before serving: a reload asked
        # for as soon as the daemon answers must find it.
        reloads.fingerprint = await asyncio.to_thread(code_fingerprint, IMPORTED_AT)
        site = GuardedSite(runner, sock, guard)
        await site.start()
        log.info(
            "listening on http://%s:%d",
            host,
            port,
            extra={
                "host": host,
                "port": port,
                "workspaceId": settings.workspace_id,
                "version": __version__,
                "eventLoop": loop_name(asyncio.get_running_loop()),
            },
        )
        log.info("console at %s", console_url(settings, host, port, None))
        if tokens.tokens and (tokens.generated or sys.stdout.isatty()):
            # The one place a token is shown: stdout, never the log.
            print(
                f"aetherd: connect with {connect_url(settings, host, port, tokens.tokens[0])}",
                f"aetherd: console at {console_url(settings, host, port, tokens.tokens[0])}",
                sep="\n",
                flush=True,
            )
        elif tokens.tokens and not settings.token and not settings.token_file:
            log.info("token is in %s", settings.token_path)
        elif not tokens.tokens:
            log.info("no static token: clients authenticate with JWTs")
        with contextlib.suppress(OSError):
            reloads.publish(host, port, __version__)
        if reloads.reloaded:
            log.info(
                "reloaded: generation %d, %d terminal sessions adopted, %d processes adopted",
                reloads.generation,
                daemon.services.terminals.adopted,
                daemon.services.processes.adopted,
                extra={"generation": reloads.generation},
            )
        systemd.notify(f"READY=1\nSTATUS=serving workspace {settings.workspace_id} on port {port}")
        interval = systemd.watchdog_interval()
        if interval is not None:
            watchdog = asyncio.create_task(systemd.watchdog_loop(interval), name="sd-watchdog")
        await stop.wait()
        if reload_wanted:
            # The duplicate keeps the socket listening: connections wait in its backlog.
            listen_copy = os.dup(sock.fileno())
            await site.stop()
            # Requests on connections accepted just before that are answered, not reset.
            await asyncio.sleep(RELOAD_SETTLE)
            await close_sockets(app, WSCloseCode.SERVICE_RESTART, "service restart")
            sessions, terminal_blob = daemon.services.terminals.hand_over()
            blob = bytearray(terminal_blob)
            processes = daemon.services.processes.hand_over(blob)
            handed = (sessions, processes, bytes(blob))
            log.info(
                "reloading: handing over %d terminal sessions and %d processes",
                len(sessions),
                len(processes),
            )
        else:
            log.info("shutting down")
            systemd.notify("STOPPING=1")
            await close_sockets(app)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for task in list(background):
            task.cancel()
        await runner.cleanup()
        sock.close()
        loop.set_exception_handler(previous_handler)
    if handed is not None and listen_copy is not None:
        return _prepare_reexec(settings, listen_copy, handed, kept_by)
    kept_by.close()
    reloads.stopped()
    log.info("stopped")
    return None


def _prepare_reexec(
    settings: Settings,
    listen_fd: int,
    handed: tuple[list[SessionState], list[ProcessHandover], bytes],
    kept_by: keeper.Keeper,
) -> Reexec:
    """Write the handover state; the fds and pids the next process inherits."""
    states, processes, blob = handed
    state = handover.HandoverState(
        version=handover.HANDOVER_VERSION,
        pid=os.getpid(),
        written_at=time.time(),
        listen_fd=listen_fd,
        terminals=states,
        processes=processes,
    )
    fds = [listen_fd] + [s.fd for s in states if s.fd is not None]
    pids = [s.pid for s in states if not s.exited]
    for p in processes:
        fds += [fd for fd in (p.stdout.fd, p.stderr.fd, p.stdin_fd) if fd is not None]
        if p.leader_status is None:
            pids.append(p.pid)
    try:
        path = handover.write_state(settings.runtime_path, state, blob)
    except OSError as exc:
        # The next process finds no state: it ends the sessions and starts clean.
        log.warning("reload: cannot write the handover state: %s", exc)
        path = settings.runtime_path / f"handover-{os.getpid()}.json"
    log.info("re-executing", extra={"pid": os.getpid()})
    extra_env: dict[str, str] = {}
    if isinstance(kept_by, keeper.InitKeeper):
        # The socket to aetherd init outlives the exec, like the PTYs.
        fd = kept_by.sock.detach()
        extra_env[keeper.KEEPER_ENV] = str(fd)
        return Reexec(path, fds, pids, extra_env, [fd])
    return Reexec(path, fds, pids)
