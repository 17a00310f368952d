"""Settings precedence (flags > env > file > defaults) and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from aetherd.errors import SettingsError
from aetherd.settings import Settings, default_data_dir, load_settings


def test_defaults(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    settings = load_settings({}, environ={}, settings_file=None)
    assert settings.host == "127.0.0.1" and settings.port == 3001
    assert settings.workspace_id == "local" and settings.root == tmp_path.resolve()
    assert settings.data_dir == Path.home() / ".local" / "share" / "aetherd"
    assert (settings.ping_interval, settings.pong_timeout, settings.write_timeout) == (45, 120, 30)
    assert settings.port_scan_interval == 0.5
    assert settings.preview_url_template == "http://localhost:{port}"
    assert settings.preview_url(5173) == "http://localhost:5173"


def test_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "aetherd"


def test_precedence_flags_over_env_over_file(tmp_path: Path):
    file = tmp_path / "aetherd.yaml"
    file.write_text("port: 1111\nhost: 0.0.0.0\nworkspace-id: from-file\nping_interval: 5\n")
    env = {
        "AETHERD_PORT": "2222",
        "AETHERD_WORKSPACE_ID": "from-env",
        "AETHERD_ROOT": str(tmp_path),
    }
    settings = load_settings({"port": "3333"}, environ=env, settings_file=file)
    assert settings.port == 3333  # flag
    assert settings.workspace_id == "from-env"  # env over file
    assert settings.host == "0.0.0.0"  # file
    assert settings.ping_interval == 5.0
    settings = load_settings({}, environ=env, settings_file=file)
    assert settings.port == 2222


def test_settings_file_from_environment(tmp_path: Path):
    file = tmp_path / "s.yaml"
    file.write_text(f"root: {tmp_path}\nworkspace_id: envfile\n")
    settings = load_settings({}, environ={"AETHERD_SETTINGS": str(file)})
    assert settings.workspace_id == "envfile"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"port": "70000"}, "invalid setting port"),
        ({"port": "abc"}, "invalid setting port"),
        ({"root": "/does/not/exist"}, "does not exist"),
        ({"token_file": "/does/not/exist"}, "cannot read"),
        ({"preview_url_template": "https://{port}-{nope}.x"}, "unknown placeholder {nope}"),
        ({"ping_interval": "0"}, "invalid setting ping_interval"),
        ({"log_format": "xml"}, "invalid setting log_format"),
        ({"workspace_id": "a/b"}, "invalid setting workspace_id"),
        ({"token": "   "}, "token must not be empty"),
    ],
)
def test_bad_values_are_one_clear_line(tmp_path: Path, flags, fragment):
    flags = {"root": str(tmp_path), **flags}
    with pytest.raises(SettingsError) as info:
        load_settings(flags, environ={}, settings_file=None)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_bad_settings_file(tmp_path: Path):
    file = tmp_path / "bad.yaml"
    file.write_text("port: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings({}, environ={}, settings_file=file)
    file.write_text("bogus_key: 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'bogus_key'"):
        load_settings({"root": str(tmp_path)}, environ={}, settings_file=file)


def test_preview_template_placeholders(tmp_path: Path):
    settings = Settings(
        root=tmp_path,
        workspace_id="abcdef123456",
        preview_url_template="https://{port}-{workspacePrefix}-{previewToken}.preview.example.com/{workspaceId}",
        preview_token="tk",
    )
    assert settings.preview_url(3000) == "https://3000-abcdef12-tk.preview.example.com/abcdef123456"
