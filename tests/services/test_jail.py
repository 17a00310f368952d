"""The path jail: everything resolves inside the root, or INVALID_PATH without leaking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.jail import Jail


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Jail, Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside-secret-dir"
    (root / "src").mkdir(parents=True)
    outside.mkdir()
    (outside / "passwd").write_text("secret")
    (root / "src" / "a.txt").write_text("a")
    os.symlink(outside, root / "escape")  # absolute symlink out
    os.symlink("../../outside-secret-dir/passwd", root / "src" / "rel-escape")
    os.symlink(root / "escape", root / "chain")  # chain: chain -> escape -> outside
    os.symlink("src", root / "inside-link")  # a symlink that stays inside
    return Jail(root), root, outside


def _invalid(jail: Jail, path: str, **kwargs) -> AetherError:
    with pytest.raises(AetherError) as info:
        jail.resolve(path, **kwargs)
    assert info.value.code is ErrorCode.INVALID_PATH
    if "outside-secret-dir" not in path:  # only what the client sent is ever echoed
        assert "outside-secret-dir" not in info.value.message
    return info.value


def test_paths_resolve_relative_to_root(tree):
    jail, root, _ = tree
    assert jail.resolve("/") == root
    assert jail.resolve("") == root
    assert jail.resolve("/src/a.txt") == root / "src" / "a.txt"
    assert jail.resolve("src/a.txt") == root / "src" / "a.txt"
    assert jail.resolve("/src/../src/./a.txt") == root / "src" / "a.txt"
    assert jail.resolve("/inside-link/a.txt") == root / "src" / "a.txt"
    assert jail.resolve("/new/file") == root / "new" / "file"
    assert jail.to_wire(root / "src" / "a.txt") == "/src/a.txt"
    assert jail.to_wire(root) == "/"


@pytest.mark.parametrize(
    "path", ["..", "/..", "../outside-secret-dir/passwd", "/src/../../x", "a/../../b"]
)
def test_dotdot_escapes(tree, path):
    _invalid(tree[0], path)


def test_absolute_paths_are_root_relative(tree, tmp_path: Path):
    jail, root, outside = tree
    # "/etc/passwd" means <root>/etc/passwd, never the host's file.
    assert jail.resolve("/etc/passwd") == root / "etc" / "passwd"
    assert jail.resolve(str(outside / "passwd")) == root / str(outside / "passwd").lstrip("/")


@pytest.mark.parametrize(
    "path", ["/escape", "/escape/passwd", "/chain/passwd", "/src/rel-escape", "/chain"]
)
def test_symlinks_out_are_refused(tree, path):
    _invalid(tree[0], path)


def test_symlinked_parent_directory(tree):
    jail, root, _ = tree
    _invalid(jail, "/escape/new-file")
    # The link itself may be named (to delete it), but not what lies behind it.
    assert jail.resolve("/escape", follow_final=False) == root / "escape"
    _invalid(jail, "/escape/passwd", follow_final=False)


def test_nul_and_long_paths(tree):
    jail = tree[0]
    err = _invalid(jail, "/src/a.txt\x00.png")
    assert "NUL" in err.message
    _invalid(jail, "/" + "a" * 256)
    _invalid(jail, "/" + "/".join(["abcdefgh"] * 600))


def test_non_utf8_names_round_trip(tree):
    jail, root, _ = tree
    raw = os.fsencode(str(root)) + b"/caf\xe9.txt"
    with open(raw, "wb") as handle:
        handle.write(b"x")
    name = os.fsdecode(b"caf\xe9.txt")  # surrogate-escaped str, as os.listdir gives
    resolved = jail.resolve("/" + name)
    assert os.path.exists(resolved)
    assert jail.to_wire(resolved) == "/" + name


def test_root_is_recognised(tree):
    jail = tree[0]
    assert jail.is_root(jail.resolve("/src/.."))
    assert not jail.is_root(jail.resolve("/src"))


def test_lone_surrogates_are_invalid_paths(tmp_path):
    jail = Jail(tmp_path)
    for path in ("/\ud800", "/a/\udfff/b", "\ud83d"):
        with pytest.raises(AetherError) as info:
            jail.resolve(path)
        assert info.value.code is ErrorCode.INVALID_PATH
        assert "lone surrogate" in info.value.message
        info.value.message.encode("utf-8")
    # Undecodable bytes of real names (surrogate escapes) are fine.
    assert jail.resolve("/caf\udce9") == Path(jail.root) / "caf\udce9"
