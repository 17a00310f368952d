"""ConfigStore alone: load, validate, legacy file, atomic set, and real inotify watching."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from aetherd.config_model import (
    WorkspaceConfig,
    parse_legacy,
    parse_yaml,
    schema_text,
    validate_data,
    version_of,
)
from aetherd.errors import AetherError, ErrorCode
from aetherd.services.config import ConfigEvent, ConfigStore

DOCS_SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "config.schema.json"

WEB = "terminals:\n  - name: web\n    command: npm start\n    port: 3000\n"


class Recorder:
    """Collects store events and subscriber calls; waits for them with a bound."""

    def __init__(self, store: ConfigStore) -> None:
        self.events: asyncio.Queue[ConfigEvent] = asyncio.Queue()
        self.configs: list[WorkspaceConfig] = []
        store.listen(self.events.put_nowait)
        store.subscribe(self.configs.append)

    async def next(self, timeout: float = 10.0) -> ConfigEvent:
        return await asyncio.wait_for(self.events.get(), timeout)


@pytest.fixture
async def store_factory(make_settings):
    stores: list[ConfigStore] = []

    async def make(**overrides) -> ConfigStore:
        values = {"config_debounce": 0.05, "config_poll_interval": 0}
        values.update(overrides)
        store = ConfigStore(make_settings(**values))
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.stop()


def config_file(workspace: Path) -> Path:
    return workspace / ".aether" / "config.yaml"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- parsing ---------------------------------------------------------------------------


def test_unknown_key_is_an_error_with_its_line():
    parsed = parse_yaml("setup: make\nterminals:\n  - name: web\n    comand: x\n")
    assert not parsed.valid
    by_loc = {tuple(e["loc"]): e for e in parsed.errors}
    assert by_loc[("terminals", 0, "comand")]["line"] == 4
    assert by_loc[("terminals", 0, "comand")]["message"] == "unknown key 'comand'"
    assert by_loc[("terminals", 0, "command")]["message"] == "Field required"
    assert by_loc[("terminals", 0, "command")]["line"] == 3


def test_wrong_type_points_at_its_line():
    parsed = parse_yaml("env:\n  A: x\nports:\n  3000:\n    visibility: secret\n")
    assert parsed.errors == [
        {
            "loc": ["ports", 3000, "visibility"],
            "line": 5,
            "column": 5,
            "message": "Input should be 'private' or 'public'",
        }
    ]


def test_yaml_syntax_error_has_its_line():
    parsed = parse_yaml("setup: make\nterminals: [\n  {name: a\n")
    assert not parsed.valid
    assert parsed.errors[0]["line"] is not None and parsed.errors[0]["line"] >= 3
    assert parsed.errors[0]["message"].startswith("YAML syntax error")


def test_non_mapping_and_duplicates_are_errors():
    assert parse_yaml("- a\n").errors[0]["message"] == "the config must be a mapping of keys"
    dup = parse_yaml("terminals:\n  - {name: a, command: x}\n  - {name: a, command: y}\n")
    assert dup.errors == [
        {
            "loc": ["terminals", 1, "name"],
            "line": 3,
            "column": 6,
            "message": "duplicate terminal name 'a'",
        }
    ]


def test_duplicate_keys_are_errors_not_silently_last():
    parsed = parse_yaml("setup: a\nenv:\n  A: '1'\n  A: '2'\nsetup: b\n")
    assert parsed.errors == [
        {"loc": ["env", "A"], "line": 4, "column": 3, "message": "duplicate key 'A'"},
        {"loc": ["setup"], "line": 5, "column": 1, "message": "duplicate key 'setup'"},
    ]


def test_alias_bombs_and_recursive_aliases_are_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 8):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    bomb = parse_yaml("\n".join(lines) + "\n")  # 10**8 values once expanded
    assert bomb.errors[0]["message"] == "the document expands to more than 1000000 values"
    assert parse_yaml("a: &a [*a]\n").errors[0]["message"] == "recursive alias"
    # Aliases of reasonable size still work, merge keys included.
    merged = parse_yaml("terminals:\n  - &t {name: a, command: run}\n  - <<: *t\n    name: b\n")
    assert merged.valid and [t.command for t in merged.config.terminals] == ["run", "run"]


def test_full_model_and_env_scalars():
    text = (
        "setup: npm ci\nsetup_on_boot: echo hi\n" + WEB + "ports:\n  3000: {label: Web, "
        "visibility: public}\n  9229: {ignore: true}\nenv:\n  DEBUG: 1\n  FLAG: true\n"
        "agent: {provider: anthropic, model: m, permission_mode: ask}\nfiles:\n  ignore: ['*.log']\n"
    )
    parsed = parse_yaml(text)
    assert parsed.valid, parsed.errors
    config = parsed.config
    assert config.terminals[0].restart == "never" and config.terminals[0].autostart is True
    assert config.ports[3000].label == "Web" and config.ports[9229].ignore is True
    assert config.env == {"DEBUG": "1", "FLAG": "true"}
    assert config.agent.permission_mode == "ask"
    assert config.files.ignore == ["*.log"]


def test_legacy_json_reads_only_its_keys():
    parsed = parse_legacy(json.dumps({"setup": "make", "terminals": [], "somethingElse": 1}))
    assert parsed.valid and parsed.config.setup == "make"
    bad = parse_legacy('{\n  "terminals": [\n    {"name": "w", "command": 5}\n  ]\n}')
    assert bad.errors[0]["loc"] == ["terminals", 0, "command"] and bad.errors[0]["line"] == 3


def test_committed_schema_equals_the_generated_one():
    assert DOCS_SCHEMA.read_text() == schema_text(), (
        "regenerate: python -m aetherd.config_model > docs/config.schema.json"
    )
    schema = json.loads(schema_text())
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "setup",
        "setup_on_boot",
        "terminals",
        "ports",
        "env",
        "agent",
        "files",
    }


def test_schema_accepts_a_full_config_and_rejects_typos():
    import jsonschema
    import yaml

    schema = json.loads(schema_text())
    validator = jsonschema.Draft202012Validator(schema)
    full = yaml.safe_load(
        "setup: npm ci\nsetup_on_boot: make\nterminals:\n  - {name: web, command: x, cwd: app,"
        " env: {A: 1}, port: 3000, autostart: false, restart: on-failure}\n"
        "ports:\n  '3000': {label: Web, visibility: public, ignore: false}\nenv: {B: 'x'}\n"
        "agent: {provider: p, model: m, permission_mode: ask}\nfiles: {ignore: [dist]}\n"
    )
    assert list(validator.iter_errors(full)) == []
    assert parse_yaml(yaml.safe_dump(full)).valid
    for bad in (
        {"terminal": []},
        {"terminals": [{"name": "a", "command": "x", "restart": "sometimes"}]},
        {"ports": {"web": {}}},
        {"env": {"bad-name": "x"}},
        {"agent": {"modle": "x"}},
    ):
        assert list(validator.iter_errors(bad)), bad
        assert not validate_data(bad).valid, bad


# -- loading ---------------------------------------------------------------------------


async def test_missing_file_means_defaults(store_factory):
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    snap = store.snapshot()
    assert snap["config"] == WorkspaceConfig().model_dump(mode="json")
    assert snap["valid"] is True and snap["errors"] == [] and snap["raw"] == ""
    assert snap["version"] == version_of(b"") and snap["path"] == "/.aether/config.yaml"
    assert rec.configs == [WorkspaceConfig()]


async def test_loads_yaml_at_start_and_subscribers_get_it_once(store_factory, workspace):
    write(config_file(workspace), WEB)
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    assert [c.terminals[0].name for c in rec.configs] == ["web"]
    late: list[WorkspaceConfig] = []
    store.subscribe(late.append)
    assert late == [store.current]
    assert store.version == version_of(WEB.encode())


async def test_invalid_file_at_start_keeps_defaults_and_reports(store_factory, workspace):
    write(config_file(workspace), "setup: [1]\n")
    store = await store_factory()
    await store.start()
    snap = store.snapshot()
    assert snap["valid"] is False and snap["errors"][0]["loc"] == ["setup"]
    assert store.current == WorkspaceConfig()


async def test_legacy_json_when_no_yaml(store_factory, workspace):
    legacy = workspace / ".aether" / "environment.json"
    write(legacy, json.dumps({"setup_on_boot": "echo boot", "terminals": []}))
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    assert store.current.setup_on_boot == "echo boot"
    assert store.snapshot()["legacy"] is True
    assert store.snapshot()["path"] == "/.aether/environment.json"
    write(config_file(workspace), "setup_on_boot: echo yaml\n")  # the YAML file wins
    event = await rec.next()
    assert event.source == "disk" and event.config.setup_on_boot == "echo yaml"
    assert store.snapshot()["legacy"] is False


async def test_oversized_file_is_invalid(store_factory, workspace):
    write(config_file(workspace), "setup: " + "x" * 2000 + "\n")
    store = await store_factory(config_max_bytes=1024)
    await store.start()
    assert store.valid is False
    assert "larger than 1024 bytes" in store.snapshot()["errors"][0]["message"]


# -- watching the disk (real inotify; the poll is off so the watch alone must work) ------


async def test_in_place_edit_is_detected(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: one\n")
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    with path.open("r+") as handle:  # truncate and rewrite the same inode
        handle.truncate(0)
        handle.write("setup: two\n")
    event = await rec.next()
    assert (event.source, event.valid, event.config.setup) == ("disk", True, "two")
    assert event.version == version_of(b"setup: two\n")
    assert rec.configs[-1].setup == "two" and store.current.setup == "two"


async def test_rename_replace_is_detected_like_vim(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: one\n")
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    # vim's default (backupcopy=auto on a plain file): rename to a backup, write anew.
    os.rename(path, path.with_name("config.yaml~"))
    path.write_text("setup: two\n")
    os.unlink(path.with_name("config.yaml~"))
    event = await rec.next()
    assert event.config.setup == "two"
    # Editors that write a temporary file and rename it over the original.
    tmp = path.with_name(".config.yaml.swp")
    tmp.write_text("setup: three\n")
    os.replace(tmp, path)
    event = await rec.next()
    assert event.config.setup == "three" and event.source == "disk"


async def test_delete_and_recreate_keeps_watching(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: one\n")
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    path.unlink()
    event = await rec.next()
    assert event.valid is True and event.config == WorkspaceConfig()  # missing = defaults
    path.write_text("setup: again\n")
    event = await rec.next()
    assert event.config.setup == "again"
    # The whole directory goes away and comes back: the watch follows.
    shutil.rmtree(path.parent)
    event = await rec.next()
    assert event.config == WorkspaceConfig()
    write(path, "setup: third\n")
    event = await rec.next()
    assert event.config.setup == "third"
    path.write_text("setup: fourth\n")
    event = await rec.next()
    assert event.config.setup == "fourth"


async def test_directory_created_after_start_is_picked_up(store_factory, workspace):
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    write(config_file(workspace), "setup: late\n")
    event = await rec.next()
    assert event.config.setup == "late"


async def test_invalid_edit_keeps_last_good_config(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: good\n")
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    path.write_text(
        "setup: good\nterminals:\n  - name: x\n    command: y\n    restart: sometimes\n"
    )
    event = await rec.next()
    assert event.valid is False and event.source == "disk"
    assert event.errors[0]["loc"] == ["terminals", 0, "restart"] and event.errors[0]["line"] == 5
    assert event.config.setup == "good" and store.current.setup == "good"
    assert len(rec.configs) == 1  # subscribers hear only effective changes
    assert store.snapshot()["raw"].endswith("restart: sometimes\n")
    path.write_text("setup: fixed\n")
    event = await rec.next()
    assert event.valid is True and rec.configs[-1].setup == "fixed"


async def test_poll_catches_changes_without_a_watch(store_factory, workspace):
    store = await store_factory(config_poll_interval=0.05)
    rec = Recorder(store)
    await store.start()
    # Remove the inotify watches: only the poll can notice the change now.
    store._inotify.remove_all()
    store._watches.clear()
    write(config_file(workspace), "setup: polled\n")
    event = await rec.next()
    assert event.config.setup == "polled"


# -- set -------------------------------------------------------------------------------


async def test_set_raw_writes_atomically_keeps_mode_and_is_not_echoed_as_disk(
    store_factory, workspace
):
    path = config_file(workspace)
    write(path, "setup: one\n")
    path.chmod(0o600)
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    inode = path.stat().st_ino
    snap = await store.set(raw="setup: two\n", version=store.version)
    assert path.read_text() == "setup: two\n"
    assert path.stat().st_ino != inode  # renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert snap["version"] == version_of(b"setup: two\n") and snap["config"]["setup"] == "two"
    event = await rec.next()
    assert (event.source, event.config.setup) == ("client", "two")
    assert not list(path.parent.glob("*.tmp"))
    # The daemon's own write must not come back as a "disk" change: the next event is
    # the marker edit below, not an echo of the write above.
    path.write_text("setup: marker\n")
    event = await rec.next()
    assert (event.source, event.config.setup) == ("disk", "marker")


async def test_set_creates_the_directory_and_accepts_a_config_object(store_factory, workspace):
    store = await store_factory()
    rec = Recorder(store)
    await store.start()
    config = {
        "terminals": [{"name": "web", "command": "npm start"}],
        "ports": {"3000": {"label": "Web"}},
    }
    snap = await store.set(config=config, version=version_of(b""))
    written = config_file(workspace).read_text()
    assert parse_yaml(written).config == store.current
    assert store.current.ports[3000].label == "Web"
    assert snap["raw"] == written
    assert stat.S_IMODE(config_file(workspace).stat().st_mode) == 0o644
    assert (await rec.next()).source == "client"


async def test_set_with_a_stale_version_conflicts_and_leaves_the_file(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: one\n")
    store = await store_factory()
    await store.start()
    stale = store.version
    path.write_text("setup: edited in a terminal\n")  # not yet seen by the store
    with pytest.raises(AetherError) as info:
        await store.set(raw="setup: mine\n", version=stale)
    assert info.value.code is ErrorCode.CONFLICT
    assert info.value.extra["currentVersion"] == version_of(b"setup: edited in a terminal\n")
    assert path.read_text() == "setup: edited in a terminal\n"


async def test_set_invalid_is_refused_with_errors(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: one\n")
    store = await store_factory()
    await store.start()
    for raw, loc in (("setup: [\n", []), ("setup: 1\n", ["setup"]), ("setpu: x\n", ["setpu"])):
        with pytest.raises(AetherError) as info:
            await store.set(raw=raw)
        assert info.value.code is ErrorCode.INVALID_CONFIG
        assert info.value.extra["errors"][0]["loc"] == loc
        assert info.value.extra["errors"][0]["line"] is not None
    with pytest.raises(AetherError) as info:
        await store.set(config={"terminals": "nope"})
    assert info.value.code is ErrorCode.INVALID_CONFIG
    assert info.value.extra["errors"][0]["line"] is None  # an object has no lines
    with pytest.raises(AetherError) as info:
        await store.set(raw="setup: x\n", config={})
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert path.read_text() == "setup: one\n" and store.current.setup == "one"


async def test_validate_touches_nothing(store_factory, workspace):
    store = await store_factory()
    await store.start()
    assert await store.validate("setup: ok\n") == {"valid": True, "errors": []}
    result = await store.validate("terminals:\n  - name: a\n")
    assert result["valid"] is False and result["errors"][0]["line"] == 2
    assert not config_file(workspace).exists()


async def test_editor_save_is_debounced_into_one_change(store_factory, workspace):
    path = config_file(workspace)
    write(path, "setup: one\n")
    store = await store_factory(config_debounce=1.0)
    rec = Recorder(store)
    await store.start()
    # The file is missing for a moment between the rename and the new write; read
    # without a debounce, that moment would be reported as a change to the defaults.
    os.rename(path, path.with_name("config.yaml~"))
    await asyncio.sleep(0.02)
    path.write_text("setup: two\n")
    event = await rec.next()
    assert event.config.setup == "two"
    assert store.reloads == 1
    assert rec.configs == [WorkspaceConfig(setup="one"), WorkspaceConfig(setup="two")]


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


async def test_the_watch_is_one_inotify_fd_on_the_loop_closed_at_stop(store_factory, workspace):
    import threading

    from watchdog.utils import BaseThread

    before = {t for t in threading.enumerate() if isinstance(t, BaseThread)}
    store = await store_factory()
    await store.start()
    fd = store._inotify.fd
    assert _fd_target(fd) == "anon_inode:inotify"
    write(config_file(workspace), "setup: x\n")
    assert (await Recorder(store).next()).config.setup == "x"
    # No observer, emitter or reader thread: the loop reads the fd.
    assert {t for t in threading.enumerate() if isinstance(t, BaseThread)} - before == set()
    await store.stop()
    assert store._inotify is None
    assert _fd_target(fd) != "anon_inode:inotify"


async def test_set_onto_a_directory_is_refused(store_factory, workspace):
    config_file(workspace).mkdir(parents=True)
    store = await store_factory()
    await store.start()
    with pytest.raises(AetherError) as info:
        await store.set(raw="setup: x\n")
    assert info.value.code is ErrorCode.IS_DIRECTORY
    assert not list(config_file(workspace).parent.glob(".config.yaml.*"))


def test_the_parser_bounds_nesting_and_refuses_bad_text():
    for bomb in ("[" * 20_000, "{" * 20_000, "a: " + "[" * 65 + "]" * 65):
        parsed = parse_yaml(bomb)
        assert not parsed.valid
        assert parsed.errors[0]["message"] == "the document is nested deeper than 64 levels"
    assert (
        parse_yaml("a: " + "[" * 10 + "]" * 10, max_depth=8)
        .errors[0]["message"]
        .startswith("the document is nested deeper")
    )
    block = "".join(" " * i + f"k{i}:\n" for i in range(100)) + " " * 100 + "v\n"
    assert "nested deeper" in parse_yaml(block).errors[0]["message"]
    assert parse_yaml("env:\n  A: [1]\n").errors  # ordinary errors are unchanged
    assert parse_yaml("setup: echo [[ -f x ]]\n").valid
    surrogate = parse_yaml("setup: '\ud800'\n")
    assert surrogate.errors[0]["message"] == "not valid Unicode text (a lone surrogate)"
    assert "YAML syntax error" in parse_yaml("setup: \x01\n").errors[0]["message"]
    assert parse_legacy('{"setup": "\ud800"}').errors[0]["line"] == 1


async def test_store_refuses_surrogates_and_a_fifo_config(make_settings, workspace):
    (workspace / ".aether").mkdir()
    os.mkfifo(workspace / ".aether" / "config.yaml")
    store = ConfigStore(make_settings(config_poll_interval=0))
    await asyncio.wait_for(store.start(), 10)  # once: blocked for good on the FIFO
    try:
        assert store.valid is False
        assert "not a regular file" in store.snapshot()["errors"][0]["message"]
        for kwargs in ({"raw": "setup: \ud800\n"}, {"config": {"setup": "\ud800"}}):
            with pytest.raises(AetherError) as info:
                await store.set(**kwargs)
            assert info.value.code is ErrorCode.INVALID_CONFIG
        assert (workspace / ".aether" / "config.yaml").is_fifo()
    finally:
        await store.stop()
