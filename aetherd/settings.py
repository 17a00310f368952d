"""Daemon settings: flags win over the environment, which wins over the settings file.

Every field of `Settings` is available three ways, generated from the model so a new
setting needs one line here and nothing else:

- the flag `--field-name`;
- the environment variable `AETHERD_FIELD_NAME`;
- the key `field_name` (or `field-name`) in the YAML settings file
  (`--settings FILE`, `AETHERD_SETTINGS`, default `/etc/aetherd/aetherd.yaml` when it exists).
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aetherd.errors import SettingsError

ENV_PREFIX = "AETHERD_"
DEFAULT_SETTINGS_FILE = Path("/etc/aetherd/aetherd.yaml")
PREVIEW_PLACEHOLDERS = frozenset({"port", "workspaceId", "workspacePrefix", "previewToken"})
MiB = 1024 * 1024


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

    # -- JWT verification (optional) ------------------------------------------------------
    jwt_secret: str | None = Field(None, description="HS256 shared secret for JWT tokens")
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key (RSA or EC) for RS256/ES256 JWT tokens"
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
    max_connections: int = Field(256, ge=1, description="Simultaneous WebSocket connections")
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

    # -- Files channel and watcher (issue: files) -----------------------------------------

    # -- Ports channel (issue: ports) -----------------------------------------------------

    # -- Agent channel (issue: agent) -----------------------------------------------------

    # -- Config channel (issue: config) ---------------------------------------------------

    # -- Operations: metrics, systemd, idle action (issue: operations) --------------------

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
