"""Daemon settings: flags win over the environment, which wins over the settings file.

Every field of `Settings` is available three ways, generated from the model so a new
setting needs one line here and nothing else:

- the flag `--field-name`;
- the environment variable `AETHERD_FIELD_NAME`;
- the key `field_name` (or `field-name`) in the YAML settings file
  (`--settings FILE`, `AETHERD_SETTINGS`, default `/etc/aetherd/aetherd.yaml` when it exists).
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aetherd.errors import SettingsError

ENV_PREFIX = "AETHERD_"
DEFAULT_SETTINGS_FILE = Path("/etc/aetherd/aetherd.yaml")
PREVIEW_PLACEHOLDERS = frozenset({"port", "workspaceId", "workspacePrefix", "previewToken"})
MiB = 1024 * 1024
BACKEND_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/aetherd`, or `~/.local/share/aetherd`."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "aetherd"


class Settings(BaseModel):
    """Everything the daemon can be told. Each limit and timing lives here with its default."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # -- Section 9 of the protocol: the documented flags ---------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(3001, ge=0, le=65535, description="Port to listen on (0 picks a free one)")
    workspace_id: str = Field(
        "local",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="The workspace id served at /workspaces/{id}/",
    )
    root: Path = Field(default_factory=Path.cwd, description="Workspace root directory")
    data_dir: Path = Field(default_factory=default_data_dir, description="Daemon state directory")
    token: str | None = Field(None, description="Static access token")
    token_file: Path | None = Field(None, description="File holding a static access token")
    preview_url_template: str = Field(
        "http://localhost:{port}",
        description="Preview URL template: {port} {workspaceId} {workspacePrefix} {previewToken}",
    )
    preview_token: str = Field("", description="Value substituted for {previewToken}")
    ping_interval: float = Field(45.0, gt=0, description="Seconds between WebSocket pings")
    pong_timeout: float = Field(120.0, gt=0, description="Close after this long without a pong")
    write_timeout: float = Field(30.0, gt=0, description="Longest a single write may block")
    port_scan_interval: float = Field(0.5, gt=0, description="Seconds between port scans")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="text on a terminal, json otherwise, unless forced"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    event_loop: Literal["asyncio", "uvloop", "auto"] = Field(
        "asyncio", description="Event loop: asyncio's, uvloop, or auto (uvloop when installed)"
    )

    # -- JWT verification (optional) ------------------------------------------------------
    jwt_secret: str | None = Field(None, description="HS256 shared secret for JWT tokens")
    jwt_public_key_file: Path | None = Field(
        None,
        description="Public keys for JWT tokens: PEM (one or several keys) or a JWKS document",
    )
    jwt_key_reload_interval: float = Field(
        10.0,
        gt=0,
        description="Seconds between checks of jwt_public_key_file for a new key set",
    )
    jwt_max_keys: int = Field(
        32, ge=1, description="Public keys held from jwt_public_key_file at most"
    )
    jwt_audience: str | None = Field(None, description="Required `aud` claim of JWT tokens")
    jwt_workspace_claim: str | None = Field(
        None, description="JWT claim that must equal the workspace id (for example `wid`)"
    )

    # -- Connection limits ----------------------------------------------------------------
    max_message_size: int = Field(MiB, ge=1024, description="Largest client frame (1009 beyond)")
    send_queue_frames: int = Field(
        8192, ge=16, description="Frames queued for one client before it is dropped as too slow"
    )
    send_queue_bytes: int = Field(
        64 * MiB, ge=MiB, description="Bytes queued for one client before it is dropped as too slow"
    )
    max_inflight_requests: int = Field(
        32, ge=1, description="Concurrent slow requests per connection"
    )
    send_queue_pause_frames: int = Field(
        1024,
        ge=1,
        description="Stop reading a client's frames while this many wait to be sent to it",
    )
    send_queue_pause_bytes: int = Field(
        8 * MiB,
        ge=1024,
        description="Stop reading a client's frames while this many bytes wait to be sent to it",
    )
    stream_window_bytes: int = Field(
        65536,
        ge=0,
        description="Streamed output (terminal, process) sent ahead of the client's last "
        "answered ping; 0 = unpaced",
    )
    stream_window_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds without the pong of a window ping before the output of a client "
        "that has never answered one is unpaced",
    )
    max_connections: int = Field(256, ge=1, description="Simultaneous WebSocket connections")
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a connection may take to send a request head, or idle between requests",
    )
    max_pending_connections: int = Field(
        64, ge=1, description="Connections not yet authenticated; beyond, the oldest is closed"
    )
    accept_error_log_interval: float = Field(
        10.0, gt=0, description="Seconds between two log lines about failed accept() calls"
    )
    shutdown_timeout: float = Field(
        8.0, gt=0, description="Seconds the graceful shutdown may take before it is forced"
    )

    # -- Terminal channel (issue: terminal) ------------------------------------------------
    terminal_shell: str = Field(
        "bash", min_length=1, description="Shell of terminal sessions (looked up on PATH)"
    )
    terminal_max_sessions: int = Field(
        64, ge=1, description="Terminal sessions held at once (live and exited-retained)"
    )
    terminal_ring_bytes: int = Field(
        MiB, ge=4096, description="Scrollback ring per terminal session (grown lazily)"
    )
    terminal_max_pending_input: int = Field(
        MiB, ge=1024, description="Input bytes waiting for a PTY before LIMIT_EXCEEDED"
    )
    terminal_pause_bytes: int = Field(
        256 * 1024,
        ge=4096,
        description="Stop reading a PTY while every attached client is this far behind",
    )
    terminal_max_frame_bytes: int = Field(
        65536, ge=16, le=65536, description="Raw output bytes per terminal output frame"
    )
    terminal_read_budget: int = Field(
        256 * 1024, ge=4096, description="Bytes read from one PTY per event-loop wakeup"
    )
    terminal_kill_grace: float = Field(
        3.0, gt=0, description="Seconds between SIGHUP and SIGKILL when a session ends"
    )
    terminal_exited_retention: float = Field(
        600.0, gt=0, description="Seconds an exited, unattached session keeps its output"
    )

    # -- Reload and restarts (section 14) --------------------------------------------------
    runtime_dir: Path | None = Field(
        None,
        description="Private runtime directory for the reload handover (default "
        "$XDG_RUNTIME_DIR/aetherd, else DATA_DIR/run)",
    )
    terminal_ring_files: bool = Field(
        True,
        description="Mirror each terminal ring into a memory-mapped file under the runtime "
        "directory, so scrollback survives a crash",
    )
    init_max_restarts: int = Field(
        5, ge=0, description="Daemon restarts `aetherd init` allows per minute after a crash"
    )
    reload_check_timeout: float = Field(
        30.0, gt=0, description="Seconds the new code's check may take before a reload is refused"
    )

    # -- Process channel (issue 15) --------------------------------------------------------
    process_max: int = Field(
        64, ge=1, description="Live processes at once (exited ones are evicted oldest first)"
    )
    process_ring_bytes: int = Field(
        MiB, ge=4096, description="Output kept per process stream, stdout and stderr each"
    )
    process_wait_output_bytes: int = Field(
        MiB, ge=1024, description="Most bytes of each stream in a `wait: true` reply"
    )
    process_max_frame_bytes: int = Field(
        65536, ge=16, le=65536, description="Raw output bytes per process output frame"
    )
    process_read_budget: int = Field(
        256 * 1024, ge=4096, description="Bytes read from one process pipe per event-loop wakeup"
    )
    process_max_pending_input: int = Field(
        MiB, ge=1024, description="Input bytes waiting for a process's stdin before LIMIT_EXCEEDED"
    )
    process_kill_grace: float = Field(
        3.0, gt=0, description="Seconds between SIGTERM and SIGKILL (timeout, daemon stop)"
    )
    process_exit_drain: float = Field(
        1.0,
        gt=0,
        description="Seconds to wait for a process's pipes to close after it exited",
    )
    process_exited_retention: float = Field(
        600.0, gt=0, description="Seconds an exited process keeps its output and exit status"
    )

    # -- Files channel and watcher (issue: files) -----------------------------------------
    files_max_size: int = Field(
        100 * MiB, ge=1, description="Largest file read, written or uploaded (FILE_TOO_LARGE / 413)"
    )
    files_read_page: int = Field(
        4 * MiB, ge=1024, description="Most raw bytes in one files/read reply (larger files page)"
    )
    files_list_max_entries: int = Field(
        100_000, ge=1, description="Most entries files/list returns (LIMIT_EXCEEDED beyond)"
    )
    files_http_chunk: int = Field(
        MiB, ge=4096, description="Chunk size of HTTP bulk downloads and upload writes"
    )
    files_loop_read_max: int = Field(
        64 * 1024,
        ge=0,
        description="files/read of a cached regular file this small runs on the event loop"
        " (no thread hop; local file systems only); 0: always in a thread",
    )
    files_http_sendfile: bool = Field(
        True, description="Send HTTP downloads with sendfile(2) (else chunked reads in a thread)"
    )
    files_temp_max_age: float = Field(
        3600.0,
        gt=0,
        description="Seconds after which a dead writer's temp file is removed (when listed)",
    )
    file_io_threads: int = Field(
        16,
        ge=1,
        le=1024,
        description="Threads of the file I/O executor (files, HTTP transfers, agent tools, config)",
    )
    search_engine: Literal["auto", "ripgrep", "python"] = Field(
        "auto",
        description="Engine of files/search and files/find: ripgrep when on PATH (auto), or Python",
    )
    search_ripgrep: str = Field(
        "rg", min_length=1, description="The ripgrep program (name or path)"
    )
    search_timeout: float = Field(
        30.0, gt=0, description="Seconds one search or find may take (LIMIT_EXCEEDED beyond)"
    )
    search_max_file_size: int = Field(
        32 * MiB, ge=1, description="Files larger than this are not searched (bytes)"
    )
    search_max_reply_chars: int = Field(
        4 * MiB,
        ge=1024,
        description="Characters of line text (and context) in one search reply (truncated beyond)",
    )
    search_max_concurrent: int = Field(
        4, ge=1, le=256, description="Searches running at once; more wait (within their time limit)"
    )
    search_threads: int = Field(
        2, ge=1, le=256, description="Threads of the search executor (the Python engine)"
    )
    watcher_enabled: bool = Field(True, description="Watch the workspace and push files/change")
    watcher_debounce: float = Field(
        0.1, ge=0, description="Seconds events on one path are coalesced before they are sent"
    )
    watcher_max_watches: int = Field(
        65_536, ge=1, description="Most inotify watches the daemon places (resync watch_limit)"
    )
    watcher_queue_size: int = Field(
        65_536, ge=16, description="Raw events waiting for the debouncer before resync overflow"
    )
    watcher_max_events_per_second: int = Field(
        2000, ge=1, description="Change events sent per second before a burst becomes one resync"
    )
    watcher_move_grace: float = Field(
        0.05, ge=0, description="Seconds a rename's source waits for its destination event"
    )
    watcher_ignore: list[str] = Field(
        default_factory=list,
        description="Extra ignore globs (comma-separated), on top of the built-in directories",
    )

    @field_validator("watcher_ignore", mode="before")
    @classmethod
    def _split_ignores(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # -- Git channel (PROTOCOL.md section 11) --------------------------------------------
    git_binary: str = Field(
        "git", min_length=1, description="The git program: a name looked up on PATH, or a path"
    )
    git_timeout: float = Field(
        30.0, gt=0, description="Seconds one git command may run before its group is killed"
    )
    git_max_output: int = Field(
        16 * MiB, ge=4096, description="Bytes of one git command's output read at most"
    )
    git_max_concurrent: int = Field(
        8, ge=1, le=256, description="git commands running at once (others wait their turn)"
    )
    git_watch_debounce: float = Field(
        0.2, ge=0, description="Seconds HEAD/index/ref changes are gathered into one git/changed"
    )
    git_watch_max_dirs: int = Field(
        1024, ge=1, description="Directories under .git/refs watched at most for git/changed"
    )

    # -- Ports channel (issue: ports) -----------------------------------------------------
    port_kill_grace: float = Field(
        5.0, gt=0, description="Seconds between SIGTERM and SIGKILL when a port is killed"
    )
    port_ignore: tuple[int, ...] = Field(
        (), description="More ports never reported, comma-separated (22, 2222, 3001 always are)"
    )
    port_scan_source: Literal["auto", "netlink", "proc"] = Field(
        "auto", description="Listening sockets from netlink sock_diag or /proc/net/tcp"
    )
    port_max_tracked: int = Field(
        1024, ge=1, description="Listening ports tracked at most (the lowest numbers win)"
    )
    port_command_max_length: int = Field(
        4096, ge=16, description="Characters of a port's command line reported at most"
    )

    @field_validator("port_ignore", mode="before")
    @classmethod
    def _port_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part for part in value.replace(",", " ").split() if part)
        if isinstance(value, int):
            return (value,)
        return value

    @field_validator("port_ignore")
    @classmethod
    def _ports_in_range(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is out of range 1-65535")
        return value

    # -- Preview proxy and HTTP for browsers (issue 14) -----------------------------------
    preview_host: str = Field(
        "",
        description="Host form of the preview proxy, e.g. {port}-{workspacePrefix}.preview.example.com",
    )
    proxy_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds an upstream may go without progress before its headers (504)",
    )
    proxy_connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to connect to a workspace port (504 beyond)"
    )
    proxy_max_connections_per_port: int = Field(
        256, ge=1, description="Concurrent proxied requests and sockets per port (503 beyond)"
    )
    proxy_ws_max_message: int = Field(
        16 * MiB, ge=1024, description="Largest WebSocket message relayed by the preview proxy"
    )
    proxy_cookie_max_age: int = Field(
        86400, ge=60, description="Lifetime in seconds of the preview cookie set by ?token="
    )
    cors_origins: tuple[str, ...] = Field(
        (), description="Origins allowed to call the HTTP endpoints from a browser, comma-separated"
    )
    trusted_proxies: tuple[str, ...] = Field(
        ("127.0.0.0/8", "::1/128"),
        description="CIDRs whose X-Forwarded-For is believed, comma-separated",
    )

    @field_validator("cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"origin {origin!r} must look like https://host[:port]")
        return tuple(origin.rstrip("/") for origin in value)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR") from None
        return value

    @field_validator("preview_host")
    @classmethod
    def _preview_host(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"malformed pattern: {exc}") from None
        if fields.count("port") != 1:
            raise ValueError("the pattern must hold {port} exactly once")
        unknown = sorted({f for f in fields if f not in PREVIEW_PLACEHOLDERS})
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}")
        if "/" in value:
            raise ValueError("a host pattern has no path")
        return value

    # -- Agent channel (issue: agent) -----------------------------------------------------
    agent_provider: Literal["anthropic", "openai", "openrouter"] = Field(
        "anthropic", description="Default agent provider (a client's `settings` overrides it)"
    )
    agent_model: str | None = Field(None, description="Default model (else the provider's default)")
    agent_permission_mode: Literal["auto", "ask", "full"] = Field(
        "auto", description="Default agent permission mode"
    )
    anthropic_api_key: str | None = Field(
        None, description="Anthropic key (else ANTHROPIC_API_KEY)"
    )
    anthropic_base_url: str | None = Field(
        None, description="Anthropic API base URL (else ANTHROPIC_BASE_URL, else the public API)"
    )
    openai_api_key: str | None = Field(None, description="OpenAI key (else OPENAI_API_KEY)")
    openai_base_url: str | None = Field(
        None, description="OpenAI-compatible base URL incl. /v1 (else OPENAI_BASE_URL)"
    )
    openrouter_api_key: str | None = Field(
        None, description="OpenRouter key (else OPENROUTER_API_KEY)"
    )
    openrouter_base_url: str = Field(
        "https://openrouter.ai/api/v1", description="OpenRouter base URL"
    )
    agent_max_tokens: int = Field(8192, ge=1, description="max_tokens of one model response")
    agent_thinking_budget: int = Field(
        0, ge=0, description="Anthropic extended-thinking budget in tokens (0: off; >=1024 on)"
    )
    agent_max_turns: int = Field(50, ge=1, description="Model calls per task before it fails")
    agent_tool_timeout: float = Field(120.0, gt=0, description="Seconds one tool call may run")
    agent_tool_output_max: int = Field(
        32 * 1024, ge=256, description="Characters of a tool result returned to the model"
    )
    agent_tool_max_results: int = Field(
        500, ge=1, description="Entries returned by list_files, glob and grep"
    )
    agent_progress_interval: float = Field(
        0.1, gt=0, description="Seconds between bash output progress events of one tool call"
    )
    agent_context_tasks: int = Field(
        10,
        ge=0,
        description="Earlier tasks (prompt and final answer) given to the model as context",
    )
    agent_max_queued: int = Field(32, ge=1, description="Queued tasks before prompt is refused")
    agent_retry_attempts: int = Field(4, ge=0, description="Retries of a 429/5xx provider reply")
    agent_retry_base_delay: float = Field(1.0, ge=0, description="First retry delay (doubles)")
    agent_retry_max_delay: float = Field(30.0, ge=0, description="Longest retry delay")
    agent_stream_idle_timeout: float = Field(
        120.0, gt=0, description="Seconds without a byte from the provider before it fails"
    )
    agent_history_events: int = Field(
        10_000, ge=1, description="Stored events replayed on connect (older ones are paged)"
    )
    agent_history_bytes: int = Field(
        3 * MiB,
        ge=64 * 1024,
        description="Approximate bytes of one history frame (clients such as aiohttp "
        "refuse frames over 4 MiB by default)",
    )
    agent_commit_batch: int = Field(
        512, ge=1, description="Transcript events committed in one SQLite transaction at most"
    )

    # -- Agent backends over ACP (PROTOCOL.md section 17) --------------------------------
    agent_backends: dict[str, str] = Field(
        default_factory=dict,
        description="ACP agent backends, NAME=COMMAND (repeat --agent-backend; "
        "AETHERD_AGENT_BACKENDS separates pairs with ';')",
    )
    acp_max_line_bytes: int = Field(
        16 * MiB,
        ge=4096,
        description="Longest JSON-RPC line read from an agent's stdout (a longer one is dropped)",
    )
    acp_stderr_bytes: int = Field(
        64 * 1024, ge=1024, description="Bytes of an agent's stderr kept (its tail is reported)"
    )
    acp_cancel_grace: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds an agent has to end its turn after session/cancel before its "
        "process group is killed",
    )
    acp_start_timeout: float = Field(
        60.0, gt=0, description="Seconds an agent has to answer initialize and session/new"
    )
    acp_max_requests: int = Field(
        32, ge=1, description="Requests of one agent served at once (more are refused)"
    )

    @field_validator("agent_backends", mode="before")
    @classmethod
    def _backend_pairs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(";") if part.strip()]
        if isinstance(value, (list, tuple)):
            pairs: dict[str, str] = {}
            for item in value:
                name, sep, command = str(item).partition("=")
                if not sep:
                    raise ValueError(f"{str(item)[:80]!r} is not NAME=COMMAND")
                pairs[name.strip()] = command.strip()
            value = pairs
        if isinstance(value, dict):
            for name, command in value.items():
                if not BACKEND_NAME.match(str(name)) or name == "builtin":
                    raise ValueError(
                        f"backend name {str(name)[:80]!r}: 1 to 64 characters of "
                        "[A-Za-z0-9._-], not 'builtin'"
                    )
                if not str(command).strip():
                    raise ValueError(f"backend {name!r} has an empty command")
        return value

    # -- Config channel (issue: config) ---------------------------------------------------
    config_path: Path = Field(
        Path(".aether/config.yaml"),
        description="Workspace config file, relative to the root",
    )
    config_legacy_path: Path = Field(
        Path(".aether/environment.json"),
        description="Older JSON config read when the YAML file does not exist, relative to the root",
    )
    config_debounce: float = Field(
        0.15, gt=0, description="Quiet seconds after a config file event before it is re-read"
    )
    config_poll_interval: float = Field(
        5.0, ge=0, description="Seconds between safety stat checks of the config file (0: off)"
    )
    config_max_bytes: int = Field(MiB, ge=1024, description="Largest config file accepted")
    config_max_terminals: int = Field(64, ge=1, description="Most terminals a config may declare")
    config_max_depth: int = Field(
        64, ge=4, le=1000, description="Deepest nesting a config document may have (INVALID_CONFIG)"
    )
    boot_restart_delay: float = Field(
        1.0, gt=0, description="First delay before restarting a boot terminal (doubles each time)"
    )
    boot_restart_max_delay: float = Field(
        60.0, gt=0, description="Longest delay between restarts of a boot terminal"
    )
    boot_restart_reset: float = Field(
        30.0, gt=0, description="A boot terminal that ran this long starts its backoff afresh"
    )

    # -- Operations: metrics, systemd, idle action (issue: operations) --------------------
    metrics_enabled: bool = Field(True, description="Serve GET /metrics (Prometheus, no auth)")
    idle_action: str | None = Field(
        None, description="Shell command run once the workspace has been idle idle_action_after s"
    )
    idle_action_after: float = Field(600.0, gt=0, description="Idle seconds before idle_action")
    resources_interval: float = Field(
        5.0, gt=0, description="Seconds between activity/resources pushes to subscribed sockets"
    )

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path) -> Path:
        path = value.expanduser()
        if not path.exists():
            raise ValueError(f"workspace root {str(path)!r} does not exist")
        if not path.is_dir():
            raise ValueError(f"workspace root {str(path)!r} is not a directory")
        return path.resolve()

    @field_validator("data_dir")
    @classmethod
    def _data_dir_absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("config_path", "config_legacy_path")
    @classmethod
    def _relative_inside_root(cls, value: Path) -> Path:
        if value.is_absolute() or ".." in value.parts or not value.parts:
            raise ValueError("must be a path relative to the workspace root, without '..'")
        return value

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("token must not be empty")
        return value.strip() if value is not None else None

    @field_validator("token_file", "jwt_public_key_file")
    @classmethod
    def _file_readable(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
        return path

    @field_validator("preview_url_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"malformed template: {exc}") from None
        unknown = sorted({f for f in fields if f not in PREVIEW_PLACEHOLDERS})
        if unknown:
            known = ", ".join("{" + p + "}" for p in sorted(PREVIEW_PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; known: {known}")
        return value

    def preview_url(self, port: int) -> str:
        """The preview URL of `port`, from the template."""
        return self.preview_url_template.format(
            port=port,
            workspaceId=self.workspace_id,
            workspacePrefix=self.workspace_id[:8],
            previewToken=self.preview_token,
        )

    @property
    def runtime_path(self) -> Path:
        """The private runtime directory: `runtime_dir`, `$XDG_RUNTIME_DIR/aetherd`, or
        `data_dir/run`."""
        if self.runtime_dir is not None:
            return self.runtime_dir.expanduser().absolute()
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and Path(xdg).is_absolute():
            return Path(xdg) / "aetherd"
        return self.data_dir / "run"

    @property
    def token_path(self) -> Path:
        """Where the generated token is kept."""
        return self.data_dir / "token"


def field_names() -> list[str]:
    """Every setting's name, in declaration order."""
    return list(Settings.model_fields)


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a setting."""
    return "--" + field.replace("_", "-")


def read_settings_file(path: Path) -> dict[str, Any]:
    """Load a YAML settings file into a dict keyed by field name."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {str(path)!r}: {exc.strerror}") from None
    import yaml  # only with a settings file: a daemon started by flags never loads PyYAML

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {str(path)!r} must hold a mapping of settings")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given through `AETHERD_*` variables."""
    return {name: environ[env_name(name)] for name in field_names() if env_name(name) in environ}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    settings_file: Path | None = None,
) -> Settings:
    """Merge file < environment < flags and validate, raising SettingsError with one line."""
    environ = os.environ if environ is None else environ
    if settings_file is None and environ.get(ENV_PREFIX + "SETTINGS"):
        settings_file = Path(environ[ENV_PREFIX + "SETTINGS"])
    merged: dict[str, Any] = {}
    if settings_file is not None:
        merged.update(read_settings_file(settings_file))
    elif DEFAULT_SETTINGS_FILE.exists():
        merged.update(read_settings_file(DEFAULT_SETTINGS_FILE))
    merged.update(read_env(environ))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    # An empty string from the environment means "unset" for optional settings.
    merged = {k: v for k, v in merged.items() if not (v == "" and k in _OPTIONAL_FIELDS)}
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


_OPTIONAL_FIELDS = frozenset(
    name for name, info in Settings.model_fields.items() if info.default is None
)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad setting, the way a person would fix it."""
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "settings"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown setting {name!r}"
    return f"invalid setting {name} ({flag_name(name)} / {env_name(name)}): {message}"
