"""The application: settings → services → channels → aiohttp app, and the serve loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import WSCloseCode, web

from aetherd import __version__, systemd
from aetherd.channels import CHANNELS
from aetherd.daemon import Daemon, build_services
from aetherd.errors import SettingsError
from aetherd.logs import AccessLogger
from aetherd.protocol import Hub, Registry
from aetherd.settings import Settings
from aetherd.transport.auth import Authenticator, TokenSetup, connect_url, setup_tokens
from aetherd.transport.browser import add_browser_http
from aetherd.transport.proxy import add_preview_proxy
from aetherd.transport.routes import AUTH, DAEMON, add_routes

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
    add_routes(app)
    app.cleanup_ctx.append(_services_ctx)
    add_preview_proxy(app)  # section 13
    add_browser_http(app, settings)  # section 16
    app.on_shutdown.append(close_sockets)
    return app


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
    """Run the daemon until SIGTERM/SIGINT (or `stop`), then shut down gracefully."""
    tokens = setup_tokens(settings)
    activated = systemd.listen_fds()
    if activated:
        sock = activated[0]
        for extra in activated[1:]:
            extra.close()
        log.info("using the socket passed by socket activation")
    else:
        sock = _bind(settings)
    host, port = sock.getsockname()[:2]
    app = create_app(settings, tokens)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("aetherd.access"),
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = web.SockSite(runner, sock, shutdown_timeout=settings.shutdown_timeout)
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
        if tokens.tokens and (tokens.generated or sys.stdout.isatty()):
            # The one place a token is shown: stdout, never the log.
            print(
                f"aetherd: connect with {connect_url(settings, host, port, tokens.tokens[0])}",
                flush=True,
            )
        elif not settings.token and not settings.token_file:
            log.info("token is in %s", settings.token_path)
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
    log.info("stopped")
