"""The application: settings → services → channels → aiohttp app, and the serve loop."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, web

from aetherd import __version__, systemd
from aetherd.channels import CHANNELS
from aetherd.daemon import Daemon, build_services
from aetherd.errors import SettingsError
from aetherd.logs import AccessLogger, install_log_filters
from aetherd.protocol import Hub, Registry
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


async def close_sockets(app: web.Application) -> None:
    """Close every socket with 1001 (going away) and stop reporting ready.

    `serve()` calls this before the runner's cleanup, because aiohttp's
    `pre_shutdown` drops open connections before `on_shutdown` runs.
    """
    daemon = app[DAEMON]
    daemon.ready = False
    peers = list(daemon.hub)
    if peers:
        await asyncio.gather(
            *(peer.close(WSCloseCode.GOING_AWAY, "server shutting down") for peer in peers),  # type: ignore[attr-defined]
            return_exceptions=True,
        )


@dataclass
class Listening:
    """Where the daemon ended up listening."""

    host: str
    port: int


def _bind(settings: Settings) -> socket.socket:
    """Bind the listening socket ourselves, so a port in use is a clear one-line error."""
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
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


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (or `stop`), then shut down gracefully.

    The socket is bound before the token is set up, so a start that fails (a port in
    use) leaves no token file behind: the first start that succeeds generates the
    token and prints the connect URL.
    """
    check_environment(settings)
    activated = systemd.listen_fds()
    if activated:
        sock = activated[0]
        for extra in activated[1:]:
            extra.close()
        log.info("using the socket passed by socket activation")
    else:
        sock = _bind(settings)
    host, port = sock.getsockname()[:2]
    try:
        tokens = setup_tokens(settings)
        app = create_app(settings, tokens)
    except BaseException:
        sock.close()
        raise
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
    watchdog: asyncio.Task[None] | None = None
    try:
        await runner.setup()
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
        systemd.notify(f"READY=1\nSTATUS=serving workspace {settings.workspace_id} on port {port}")
        interval = systemd.watchdog_interval()
        if interval is not None:
            watchdog = asyncio.create_task(systemd.watchdog_loop(interval), name="sd-watchdog")
        await stop.wait()
        log.info("shutting down")
        systemd.notify("STOPPING=1")
        await close_sockets(app)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        sock.close()
        loop.set_exception_handler(previous_handler)
    log.info("stopped")
