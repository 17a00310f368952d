"""Properties of the file layer's input handling, checked with hypothesis (bounded runs).

Whatever text arrives as a path, a config or a Range header, the answer is a value or
a clean AetherError with a stable code, never another exception: an exception that
escapes a handler is a bug (issue 11).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aetherd.config_model import parse_legacy, parse_yaml
from aetherd.errors import AetherError, ErrorCode
from aetherd.services.fs import FileSystem
from aetherd.services.jail import Jail
from aetherd.transport.files_http import parse_range

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Paths made of the pieces that matter: separators, dots, NUL, surrogates (escapes of
# undecodable bytes and lone ones), names of the hostile workspace below, long names.
PIECES = st.sampled_from(
    [
        "/",
        "..",
        ".",
        "\x00",
        "\ud800",
        "\udce9",
        "\udfff",
        "a",
        "fifo",
        "out",
        "loop",
        "dir",
        "x" * 300,
        "é",
        "\u202e",
        "~",
        "\\",
        "*",
    ]
)
PATHS = st.one_of(st.text(max_size=64), st.lists(PIECES, max_size=12).map("".join))


def hostile_workspace(root: Path, outside: Path) -> None:
    (root / "dir").mkdir(exist_ok=True)
    (root / "a").write_text("a")
    for name, target in (("out", outside), ("loop", root / "loop"), ("dir/up", root)):
        if not os.path.lexists(root / name):
            os.symlink(target, root / name)
    if not os.path.lexists(root / "fifo"):
        os.mkfifo(root / "fifo")


@BOUNDED
@given(path=PATHS)
def test_the_jail_answers_a_path_inside_or_invalid_path(tmp_path_factory, path):
    root = tmp_path_factory.getbasetemp() / "jail-root"
    root.mkdir(exist_ok=True)
    hostile_workspace(root, tmp_path_factory.getbasetemp())
    jail = Jail(root)
    try:
        real = jail.resolve(path)
    except AetherError as err:
        assert err.code is ErrorCode.INVALID_PATH
        err.message.encode("utf-8")
        return
    assert jail.is_inside(str(real))


@BOUNDED
@given(path=PATHS, op=st.sampled_from(["read", "stat", "list", "write", "download"]))
def test_file_operations_never_raise_anything_but_aether_errors(tmp_path_factory, path, op):
    root = tmp_path_factory.getbasetemp() / "fs-root"
    root.mkdir(exist_ok=True)
    outside = tmp_path_factory.getbasetemp() / "outside.txt"
    outside.write_text("SECRET")
    hostile_workspace(root, outside)
    fs = FileSystem(Jail(root))

    async def call() -> None:
        if op == "read":
            await fs.read(path)
        elif op == "stat":
            await fs.stat(path)
        elif op == "list":
            await fs.list(path)
        elif op == "write":
            await fs.write(path, b"w", append=True)
        else:
            fd, _ = await fs.open_download(path)
            os.close(fd)

    try:
        asyncio.run(asyncio.wait_for(call(), 10))
    except AetherError as err:
        assert err.code is not ErrorCode.INTERNAL_ERROR, err
        err.message.encode("utf-8")
    finally:
        assert fs.jail.executor.shutdown(5) == []  # no call was left blocked
    assert outside.read_text() == "SECRET"
    assert (root / "fifo").is_fifo()


YAML_ALPHABET = st.sampled_from([*"[]{}:,-&*!|>'\"#?% \n\tab0\x01\ud800é", "<<", "  "])


@BOUNDED
@given(text=st.one_of(st.text(max_size=200), st.lists(YAML_ALPHABET, max_size=200).map("".join)))
def test_the_config_parser_returns_errors_never_raises(text):
    for parse in (parse_yaml, parse_legacy):
        parsed = parse(text, max_depth=16)
        assert parsed.valid or parsed.errors
        for error in parsed.errors:
            error["message"].encode("utf-8")
            assert error["line"] is None or error["line"] >= 1


@BOUNDED
@given(
    header=st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda a, b: f"bytes={a}-{b}",
            st.one_of(st.just(""), st.integers(0, 10**30).map(str), st.just("9" * 5000)),
            st.one_of(st.just(""), st.integers(0, 10**30).map(str), st.just("9" * 5000)),
        ),
    ),
    size=st.integers(0, 10**12),
)
def test_a_range_header_is_a_range_inside_the_file_or_refused(header, size):
    parsed = parse_range(header, size)
    if isinstance(parsed, tuple):
        start, end = parsed
        assert 0 <= start <= end < size
    else:
        assert parsed in (None, False)
