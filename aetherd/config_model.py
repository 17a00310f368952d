"""The workspace config's model and parser: pure functions, no I/O, no event loop.

`WorkspaceConfig` is the pydantic model of `.aether/config.yaml`; `config_schema()`
is its JSON Schema (served by the HTTP schema route, committed as
docs/config.schema.json). `parse_yaml` / `parse_legacy` / `validate_data` turn text or
an object into a `Parsed` (the config, or errors with YAML line and column).

The parser is bounded, because a config may come from anyone who can write the file
or send `config/set`: the caller caps the size (`config_max_bytes`), `max_depth`
caps nesting (`config_max_depth`; checked in the scanner for flow collections, so a
20 KB run of `[` is refused after `max_depth` characters instead of costing seconds of
CPU), and alias expansion is capped at `MAX_EXPANDED_NODES`.

The live store (reading, writing and watching the file) is `aetherd.services.config`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

LEGACY_KEYS = ("setup", "setup_on_boot", "terminals")
# A document of more nodes than this, once aliases are expanded, is refused before
# validation ("billion laughs": a 1 KiB file can name a billion nodes).
MAX_EXPANDED_NODES = 1_000_000
# Deepest nesting accepted by default (the setting config_max_depth).
DEFAULT_MAX_DEPTH = 64


# -- The model --------------------------------------------------------------------------


def _scalar_to_str(value: Any) -> Any:
    """Env values may be written as YAML numbers or booleans; they become strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


EnvValue = Annotated[
    str,
    BeforeValidator(_scalar_to_str),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]
EnvMap = dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], EnvValue]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    """Unknown keys are errors, so that typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class TerminalSpec(_Strict):
    """A terminal the workspace declares; autostarted ones run as session `boot:<name>`."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Unique name; the session id is boot:<name>",
    )
    command: str = Field(min_length=1, description="Shell command to run")
    cwd: str | None = Field(None, description="Working directory, relative to the workspace root")
    env: EnvMap = Field(
        default_factory=dict,
        description="Extra environment variables",
        json_schema_extra={"additionalProperties": False},
    )
    port: PortNumber | None = Field(
        None, description="Port the command serves; exported as PORT unless env sets it"
    )
    autostart: bool = Field(True, description="Start at daemon start")
    restart: Literal["never", "on-failure", "always"] = Field(
        "never", description="What to do when the command exits"
    )


class PortSpec(_Strict):
    """How one port is shown."""

    label: str | None = Field(None, max_length=200, description="Name shown for the port")
    visibility: Literal["private", "public"] = Field("private", description="Preview visibility")
    ignore: bool = Field(False, description="Never report this port")


class AgentBackendSpec(_Strict):
    """An agent that speaks the Agent Client Protocol on its stdio."""

    command: str = Field(
        min_length=1,
        description="The program; without `args`, a command line split like a shell would",
    )
    args: list[str] = Field(default_factory=list, description="Arguments of the program")
    env: EnvMap = Field(
        default_factory=dict,
        description="Added to the workspace env for this agent",
        json_schema_extra={"additionalProperties": False},
    )
    auth_method: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="ACP authenticate methodId sent after initialize (for example gemini-api-key)",
    )


BackendName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class AgentSpec(_Strict):
    """Defaults for the agent."""

    provider: str | None = Field(None, description="Provider name, for example anthropic")
    model: str | None = Field(None, description="Model name")
    permission_mode: str | None = Field(None, description="Default permission mode")
    backend: str | None = Field(
        None, description="Default backend: builtin (the default) or a declared one"
    )
    backends: dict[BackendName, AgentBackendSpec] = Field(
        default_factory=dict,
        description="ACP agent backends by name (not builtin)",
        json_schema_extra={"propertyNames": {"pattern": "^[A-Za-z0-9._-]{1,64}$"}},
    )


class FilesSpec(_Strict):
    """File watcher options."""

    ignore: list[str] = Field(default_factory=list, description="Extra ignore globs")


class WorkspaceConfig(_Strict):
    """The workspace config file (`.aether/config.yaml`). Every key is optional."""

    model_config = ConfigDict(extra="forbid", title="aetherd workspace config")

    setup: str | None = Field(None, description="Run once, the first time the daemon starts")
    setup_on_boot: str | None = Field(
        None, description="Run at every daemon start, in the session boot:setup"
    )
    terminals: list[TerminalSpec] = Field(default_factory=list)
    ports: dict[PortNumber, PortSpec] = Field(
        default_factory=dict,
        json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,5}$"}},
    )
    env: EnvMap = Field(
        default_factory=dict,
        description="Added to every terminal and agent command",
        json_schema_extra={"additionalProperties": False},
    )
    agent: AgentSpec = Field(default_factory=AgentSpec)
    files: FilesSpec = Field(default_factory=FilesSpec)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, generated from the model."""
    schema = WorkspaceConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The committed form of the schema (docs/config.schema.json)."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


# -- Parsing and validation ----------------------------------------------------------------


@dataclass
class Parsed:
    """The outcome of validating one text or object."""

    config: WorkspaceConfig | None
    errors: list[dict[str, Any]]

    @property
    def valid(self) -> bool:
        """True when there are no errors."""
        return self.config is not None and not self.errors


def version_of(data: bytes) -> str:
    """The version of a file's bytes (a missing file has the version of no bytes)."""
    return hashlib.sha256(data).hexdigest()[:32]


def _error(loc: list[Any], message: str, node: Any = None) -> dict[str, Any]:
    line, column = _locate(node, loc) if node is not None else (None, None)
    return {"loc": loc, "line": line, "column": column, "message": message}


def _locate(node: Any, loc: list[Any]) -> tuple[int | None, int | None]:
    from aetherd.config_yaml import locate

    return locate(node, loc)


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return f"unknown key {str(err['loc'][-1])!r}" if err["loc"] else "unknown key"
    return str(err["msg"]).removeprefix("Value error, ")


def _surrogate_locs(data: Any, limit: int = 10) -> list[list[Any]]:
    """Where strings (keys or values) hold a lone surrogate, which no file or process takes."""
    found: list[list[Any]] = []
    stack: list[tuple[Any, list[Any]]] = [(data, [])]
    while stack and len(found) < limit:
        value, loc = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                found.append(loc)
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, loc))
                if not isinstance(key, str):
                    stack.append((item, [*loc, key]))
                    continue
                shown = key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                stack.append((item, [*loc, shown]))
        elif isinstance(value, list):
            stack.extend((item, [*loc, index]) for index, item in enumerate(value))
    return found


def validate_data(data: Any, node: Any = None, *, max_terminals: int = 64) -> Parsed:
    """Validate a decoded document; `node` (composed YAML) gives errors their line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return Parsed(None, [_error([], "the config must be a mapping of keys", node)])
    bad = _surrogate_locs(data)
    if bad:
        message = "not valid Unicode text (a lone surrogate)"
        return Parsed(None, [_error(loc, message, node) for loc in bad])
    try:
        config = WorkspaceConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = [p for p in err["loc"] if p != "[key]"]
            errors.append(_error(loc, _message(err), node))
        return Parsed(None, errors)
    errors = []
    if len(config.terminals) > max_terminals:
        errors.append(_error(["terminals"], f"at most {max_terminals} terminals", node))
    seen: set[str] = set()
    for index, terminal in enumerate(config.terminals):
        if terminal.name in seen:
            message = f"duplicate terminal name {terminal.name!r}"
            errors.append(_error(["terminals", index, "name"], message, node))
        seen.add(terminal.name)
    return Parsed(None, errors) if errors else Parsed(config, [])


def decode_config(data: bytes) -> tuple[str | None, dict[str, Any] | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return None, {"loc": [], "line": line, "column": None, "message": "not valid UTF-8"}


def _text_problem(text: str) -> dict[str, Any] | None:
    """An error when `text` cannot be UTF-8 (a lone surrogate), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1
        message = "not valid Unicode text (a lone surrogate)"
        return {"loc": [], "line": line, "column": None, "message": message}
    return None


def parse_yaml(text: str, *, max_terminals: int = 64, max_depth: int = DEFAULT_MAX_DEPTH) -> Parsed:
    """Parse and validate YAML config text; errors point at YAML lines.

    PyYAML is imported here, on the first config seen (aetherd.config_yaml): a
    workspace without one never loads it.
    """
    from aetherd.config_yaml import parse_yaml as parse

    return parse(text, max_terminals=max_terminals, max_depth=max_depth)


def parse_legacy(
    text: str, *, max_terminals: int = 64, max_depth: int = DEFAULT_MAX_DEPTH
) -> Parsed:
    """Read the older `.aether/environment.json`: only setup, setup_on_boot and terminals."""
    problem = _text_problem(text)
    if problem is not None:
        return Parsed(None, [problem])
    try:
        data = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        message = f"JSON syntax error: {getattr(exc, 'msg', exc)}"
        return Parsed(None, [{"loc": [], "line": line, "column": column, "message": message}])
    except RecursionError as exc:
        return Parsed(None, [{"loc": [], "line": None, "column": None, "message": str(exc)}])
    import yaml

    from aetherd.config_yaml import compose

    node = None
    with contextlib.suppress(yaml.YAMLError, ValueError, RecursionError):
        node = compose(text, max_depth)[0]  # JSON is (nearly) YAML: the nodes give lines
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if key in LEGACY_KEYS}
    return validate_data(data, node, max_terminals=max_terminals)


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text for a config object, keys in the order given."""
    if not data:
        return ""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    where = f"line {first['line']}: " if first.get("line") else ""
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid config: {where}{loc + ': ' if loc else ''}{first['message']}{more}"


if __name__ == "__main__":  # python -m aetherd.config_model > docs/config.schema.json
    print(schema_text(), end="")
