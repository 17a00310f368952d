"""The path jail: every workspace path resolves inside the root, or INVALID_PATH.

Used by the files channel, the HTTP bulk transfer and the agent's tools alike, so
there is one definition of "inside the workspace".

Wire paths are root-relative with a leading `/`; relative paths resolve against
the root too. A path is accepted only if, after normalising `..` and resolving
every symlink (chains included), it is the root or lies below it. Error messages
echo only what the client sent, never where a symlink points.

The jail also carries the executor that runs the workspace's blocking file I/O
(`Jail.executor`), so that every service handed the jail runs its disk work in the
same bounded pool. The threat model is in docs/protocol.md ("The path jail").
"""

from __future__ import annotations

import os
from pathlib import Path

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.executors import BoundedExecutor

MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX on Linux


def _invalid(wire_path: str, why: str) -> AetherError:
    shown = wire_path if len(wire_path) <= 200 else wire_path[:200] + "…"
    return AetherError(ErrorCode.INVALID_PATH, f"invalid path {shown!r}: {why}")


class Jail:
    """Resolves wire paths against a root directory without ever leaving it."""

    def __init__(self, root: Path | str, executor: BoundedExecutor | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        self._root_str = str(self.root)
        self._executor = executor

    @property
    def executor(self) -> BoundedExecutor:
        """The pool for this workspace's file I/O (a small private one if none was given)."""
        if self._executor is None:
            self._executor = BoundedExecutor("file", 8)
        return self._executor

    def is_inside(self, real: str) -> bool:
        """True when the already-resolved `real` is the root or below it."""
        return real == self._root_str or real.startswith(self._root_str.rstrip("/") + "/")

    def _lexical(self, wire_path: str) -> str:
        """Join with the root and normalise `..` lexically; reject escapes and bad input."""
        if not isinstance(wire_path, str):
            raise _invalid(str(wire_path), "not a string")
        if "\x00" in wire_path:
            raise _invalid(wire_path.replace("\x00", "\\0"), "contains a NUL byte")
        try:
            # surrogateescape: names that are not UTF-8 on disk arrive as U+DC80..U+DCFF
            # (see rawPath). Any other lone surrogate names no file at all.
            encoded = wire_path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise _invalid(
                wire_path.encode("utf-8", "backslashreplace").decode("ascii", "replace"),
                "contains a lone surrogate (not valid Unicode text)",
            ) from None
        if len(encoded) > MAX_PATH_BYTES:
            raise _invalid(wire_path, f"longer than {MAX_PATH_BYTES} bytes")
        parts = [p for p in wire_path.split("/") if p not in ("", ".")]
        depth = 0
        for part in parts:
            if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise _invalid(wire_path, f"a name is longer than {MAX_NAME_BYTES} bytes")
            depth = depth - 1 if part == ".." else depth + 1
            if depth < 0:
                raise _invalid(wire_path, "escapes the workspace root")
        return os.path.normpath(os.path.join(self._root_str, *parts)) if parts else self._root_str

    def resolve(self, wire_path: str, *, follow_final: bool = True) -> Path:
        """The real path of `wire_path`, guaranteed inside the root.

        With `follow_final=False` the last component is not dereferenced: the result
        names a symlink itself (for delete, rename and lstat), while its parent
        directories are still fully resolved and checked.
        """
        joined = self._lexical(wire_path)
        if joined == self._root_str:
            return self.root
        if follow_final:
            real = os.path.realpath(joined)
        else:
            parent, name = os.path.split(joined)
            real = os.path.join(os.path.realpath(parent), name)
        if not self.is_inside(real):
            raise _invalid(wire_path, "resolves outside the workspace root")
        return Path(real)

    def is_root(self, real: Path) -> bool:
        """True when `real` is the workspace root itself."""
        return str(real) == self._root_str

    def to_wire(self, real: Path | str) -> str:
        """The wire form (`/a/b`) of a real path inside the root."""
        real_str = str(real)
        if real_str == self._root_str:
            return "/"
        if not self.is_inside(real_str):
            raise ValueError(f"{real_str!r} is outside the root")
        return real_str[len(self._root_str.rstrip("/")) :]
