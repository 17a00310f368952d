"""Searching the workspace: `search` (lines that match) and `find` (files by name).

Two engines give the same answers on the same tree (docs/protocol.md section 12):

- **ripgrep** (`rg` on PATH): `rg --files` lists the files to search (its own walker,
  in parallel, honouring `.gitignore`), then `rg --json` searches that list. Both run as
  asyncio subprocesses in their own process group, killed (and reaped) when the search
  is cancelled, times out or has what it needs.
- **python**: an `os.scandir` walk with the same rules (`aetherd.services.gitignore`),
  and Python's `re` line by line, in the bounded `search` executor.

What the two share is everything else, so it cannot differ: the query is checked and
compiled here (`compile_query`: the regex subset both dialects agree on), include and
exclude globs and `find`'s pattern are applied here to the listed files, and the
results are shaped, sorted (by path, component by component in byte order, then line)
and cut here (`TopN`, `shape_line`). ripgrep reports byte offsets; they become
character offsets (code points) before they leave.

The walk: hidden files are searched; symlinks are never followed (nor reported);
only regular files; the watcher's ignored names (`node_modules`, `.git`, ... plus its
configured globs) and the daemon's temp files are skipped at any depth below the
searched directory; `.gitignore` files apply from the workspace root down (none above
the root is read; `.ignore`, `.rgignore`, `.git/info/exclude` and the global
excludes file are not read); files over `search_max_file_size` are skipped. A file
holding a NUL byte anywhere is binary: counted in `filesSearched`, never matched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import stat as stat_mod
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aetherd.errors import AetherError, ErrorCode, SettingsError
from aetherd.metrics import Sample
from aetherd.services.executors import BoundedExecutor
from aetherd.services.fileio import TEMP_NEW, TEMP_PREFIX, UNLIMITED, os_error, read_regular
from aetherd.services.fs import raw_b64
from aetherd.services.gitignore import (
    IgnoreChain,
    IgnoreFile,
    Rule,
    gitignore_rule,
    parse_gitignore,
)
from aetherd.services.jail import Jail

__all__ = [
    "FindQuery",
    "PathFilter",
    "SearchLimits",
    "SearchQuery",
    "SearchService",
    "compile_query",
    "smart_case",
]

log = logging.getLogger("aetherd.search")

Engine = Literal["ripgrep", "python"]
TEXT_MAX = 500  # characters of a line in `text` (and of each context line)
TEXT_LEAD = 50  # characters shown before the first match when a long line is cut
MAX_RESULTS = 10_000
DEFAULT_RESULTS = 1000
ARGV_MIN, ARGV_MAX = 64 * 1024, 1536 * 1024  # bytes of file names handed to one `rg` run
ARGV_MARGIN = 128 * 1024  # of ARG_MAX, for ripgrep's flags and the kernel's own use
READ_CHUNK = 256 * 1024
STDERR_MAX = 8192

# Flags of every ripgrep run: no config file, hidden files, .gitignore only (with or
# without a .git directory, none above the root, no .ignore/.rgignore, no global or
# repository excludes), symlinks not followed (its default), errors not printed.
RG_WALK_FLAGS = (
    "--no-config",
    "--hidden",
    "--no-require-git",
    "--no-ignore-parent",
    "--no-ignore-dot",
    "--no-ignore-global",
    "--no-ignore-exclude",
    "--no-messages",
)
# Flags of the content search: raw bytes (no BOM sniffing or UTF-16 decoding, as the
# Python engine reads them), and reads rather than mmap, so a NUL anywhere is seen.
RG_SEARCH_FLAGS = ("--no-config", "--no-messages", "--json", "--encoding", "none", "--no-mmap")


@dataclass(frozen=True)
class SearchLimits:
    """What bounds a search (from settings)."""

    timeout: float = 30.0
    max_file_size: int = 32 * 1024 * 1024
    max_reply_chars: int = 4 * 1024 * 1024  # of `text` and context lines in one reply
    max_concurrent: int = 4


@dataclass(frozen=True)
class SearchQuery:
    """A `files/search` request, as the service takes it."""

    query: str
    path: str = "/"
    regex: bool = False
    case_sensitive: bool | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_results: int = DEFAULT_RESULTS
    context_lines: int = 0


@dataclass(frozen=True)
class FindQuery:
    """A `files/find` request."""

    pattern: str
    path: str = "/"
    max_results: int = DEFAULT_RESULTS


# -- the query ----------------------------------------------------------------------------

# Python's regex parser (re._parser since 3.11, sre_parse before): the syntax tree is how
# the subset both dialects agree on is checked.
sre_parse: Any = importlib.import_module(
    "re._parser" if sys.version_info >= (3, 11) else "sre_parse"
)

_ALLOWED_OPS = frozenset(
    {
        "LITERAL",
        "NOT_LITERAL",
        "ANY",
        "IN",
        "BRANCH",
        "SUBPATTERN",
        "MAX_REPEAT",
        "MIN_REPEAT",
        "AT",
    }
)
_ALLOWED_AT = frozenset({"AT_BEGINNING", "AT_END", "AT_BOUNDARY", "AT_NON_BOUNDARY"})
_ALLOWED_IN = frozenset({"LITERAL", "RANGE", "CATEGORY", "NEGATE"})
_BAD_FLAGS = re.VERBOSE | re.ASCII | re.LOCALE
_WHY = {
    "ASSERT": "lookahead and lookbehind are not supported",
    "ASSERT_NOT": "lookahead and lookbehind are not supported",
    "GROUPREF": "backreferences are not supported",
    "GROUPREF_EXISTS": "conditional groups are not supported",
    "ATOMIC_GROUP": "atomic groups are not supported",
    "POSSESSIVE_REPEAT": "possessive repeats are not supported",
    "AT_BEGINNING_STRING": r"\A is not supported (use ^)",
    "AT_END_STRING": r"\Z is not supported (use $)",
}


def _bad_query(why: str) -> AetherError:
    return AetherError(ErrorCode.INVALID_MESSAGE, f"invalid field 'query': {why}", field="query")


def _check_escapes(pattern: str) -> None:
    """Escapes and groups the two dialects read differently, refused before parsing."""
    i = 0
    depth = 0  # inside a character class
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt.isdigit():
                raise _bad_query(r"backreferences and octal escapes (\1, \0) are not supported")
            if nxt in "NZAzGpPhHkKRXQE":
                raise _bad_query(f"the escape \\{nxt} is not supported")
            i += 2
            continue
        if depth == 0 and pattern.startswith("(?#", i):
            raise _bad_query("comments (?#...) are not supported")
        if (
            depth == 0
            and pattern.startswith("(?<", i)
            and not pattern.startswith(("(?<=", "(?<!"), i)
        ):
            raise _bad_query("use (?P<name>...) for a named group")
        if c == "[":  # classes do not nest in Python: `[[]` is a class holding `[`
            if depth and pattern.startswith("[:", i):
                raise _bad_query("POSIX classes ([[:alpha:]]) are not supported")
            depth = 1
        elif c == "]" and depth:
            depth = 0
        elif c == "{" and depth == 0 and pattern.startswith("{,", i):
            raise _bad_query("a repeat needs its lower bound ({0,n})")
        i += 1


def _walk_tree(items: Iterable[Any]) -> None:
    for op, arg in items:
        name = str(op)
        if name not in _ALLOWED_OPS:
            raise _bad_query(_WHY.get(name, f"{name.lower()} is not supported"))
        if name == "AT":
            if str(arg) not in _ALLOWED_AT:
                raise _bad_query(_WHY.get(str(arg), f"{str(arg).lower()} is not supported"))
        elif name == "IN":
            for inner, _ in arg:
                if str(inner) not in _ALLOWED_IN:
                    raise _bad_query(f"{str(inner).lower()} in a class is not supported")
        elif name == "BRANCH":
            for branch in arg[1]:
                _walk_tree(branch)
        elif name == "SUBPATTERN":
            add_flags, del_flags = arg[1], arg[2]
            if (add_flags | del_flags) & _BAD_FLAGS:
                raise _bad_query("only the flags i, m and s are supported")
            _walk_tree(arg[3])
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            _walk_tree(arg[2])


def smart_case(query: str, regex: bool) -> bool:
    """Case-sensitive when the query has an upper-case letter (in a regex, not in an escape)."""
    if not regex:
        return any(c.isupper() for c in query)
    i = 0
    while i < len(query):
        c = query[i]
        if c == "\\":
            nxt = query[i + 1 : i + 2]
            i += 2
            if nxt in ("x", "u", "U"):
                while i < len(query) and query[i] in "0123456789abcdefABCDEF{}":
                    i += 1
            continue
        if c.isupper():
            return True
        i += 1
    return False


@dataclass(frozen=True)
class CompiledQuery:
    """The query, checked: the Python pattern and what ripgrep is given."""

    pattern: re.Pattern[str]  # for one line
    prefilter: re.Pattern[str]  # for a whole file: matches when some line does
    rg_args: tuple[str, ...]
    case_sensitive: bool


def compile_query(query: str, regex: bool, case_sensitive: bool | None) -> CompiledQuery:
    """Check the query against the subset both engines agree on; INVALID_MESSAGE otherwise."""
    if "\n" in query or "\r" in query:
        raise _bad_query("a query matches within one line: it cannot hold a line break")
    if "\x00" in query:
        raise _bad_query("a query cannot hold a NUL")
    sensitive = smart_case(query, regex) if case_sensitive is None else case_sensitive
    flags = 0 if sensitive else re.IGNORECASE
    source = query if regex else re.escape(query)
    if regex:
        _check_escapes(query)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "possible nested set" and friends: refused
            try:
                tree = sre_parse.parse(query, flags)
            except (re.error, FutureWarning, DeprecationWarning) as exc:
                raise _bad_query(str(exc)) from None
        if tree.state.flags & _BAD_FLAGS:
            raise _bad_query("only the flags i, m and s are supported")
        _walk_tree(tree)
        if tree.getwidth()[0] == 0:
            raise _bad_query("the pattern can match an empty string")
    try:
        pattern = re.compile(source, flags)
    except re.error as exc:  # pragma: no cover - parsed above
        raise _bad_query(str(exc)) from None
    rg = ["--case-sensitive" if sensitive else "--ignore-case"]
    if not regex:
        rg.append("--fixed-strings")
    rg += ["--regexp", query]
    prefilter = re.compile(source, flags | re.MULTILINE)
    return CompiledQuery(pattern, prefilter, tuple(rg), sensitive)


# -- paths, filters and order -------------------------------------------------------------


def sort_key(rel: str) -> tuple[bytes, ...]:
    """Paths in tree order: component by component, each in byte order."""
    return tuple(part.encode("utf-8", "surrogateescape") for part in rel.split("/"))


def _user_rule(glob: str, name: str) -> Rule:
    text = glob.strip()
    if not text or text.startswith("!"):
        raise AetherError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid field '{name}': {glob!r} is not a glob to match",
            field=name,
        )
    rule = gitignore_rule(text)
    if rule is None:
        raise AetherError(
            ErrorCode.INVALID_MESSAGE, f"invalid field '{name}': bad glob {glob!r}", field=name
        )
    return rule


def _matches_path_or_parent(rules: Sequence[Rule], rel: str) -> bool:
    parts = rel.split("/")
    for depth in range(len(parts), 0, -1):
        candidate = "/".join(parts[:depth])
        is_dir = depth < len(parts)
        for rule in rules:
            if (is_dir or not rule.dir_only) and rule.regex.match(candidate):
                return True
    return False


class PathFilter:
    """`include` and `exclude` globs, applied alike to what either engine listed.

    A glob without `/` matches a name at any depth; one with `/` matches the path from
    the root (a leading `/` is allowed); a trailing `/` matches directories only. A file
    is taken when it, or a directory above it, matches an include (or there is none), and
    neither it nor a directory above it matches an exclude.
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include = [_user_rule(g, "include") for g in include]
        self.exclude = [_user_rule(g, "exclude") for g in exclude]

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def keep(self, rel: str) -> bool:
        """Whether root-relative file `rel` passes."""
        if self.include and not _matches_path_or_parent(self.include, rel):
            return False
        return not (self.exclude and _matches_path_or_parent(self.exclude, rel))


def find_matcher(pattern: str) -> Callable[[str], bool]:
    """`find`'s pattern: a glob (it has `*?[{`), else a smart-case substring of the name."""
    text = pattern.strip()
    if any(c in text for c in "*?[{"):
        rule = gitignore_rule(text)
        if rule is None or rule.whitelist:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                f"invalid field 'pattern': bad glob {pattern!r}",
                field="pattern",
            )
        regex = rule.regex
        return lambda rel: regex.match(rel) is not None
    if any(c.isupper() for c in text):
        return lambda rel: text in rel.rpartition("/")[2]
    folded = text.casefold()
    return lambda rel: folded in rel.rpartition("/")[2].casefold()


def builtin_ignores(
    names: Iterable[str], name_globs: Iterable[str], path_globs: Iterable[str]
) -> list[str]:
    """The watcher's ignore rules and the daemon's temp files, as ignore globs (`!` stripped)."""
    out = [re.sub(r"([\\*?\[\]{}])", r"\\\1", name) for name in names]
    out += list(name_globs)
    out += ["/" + glob.lstrip("/") for glob in path_globs]
    out += [TEMP_PREFIX + "*" + TEMP_NEW, TEMP_PREFIX + "*.upd"]
    return out


# -- result shaping (both engines) ---------------------------------------------------------

_SURROGATES = {code: 0xFFFD for code in range(0xDC80, 0xDD00)}


def _wire(text: str) -> str:
    """Undecodable bytes (surrogate escapes) as U+FFFD, one for one, so offsets hold."""
    return text.translate(_SURROGATES)


def _display(line: str) -> str:
    return line[:-1] if line.endswith("\r") else line


def shape_line(
    rel: str,
    number: int,
    line: str,
    spans: list[tuple[int, int]],
    before: list[str] | None,
    after: list[str] | None,
) -> dict[str, Any]:
    """One match: `line` (no `\\n`, surrogate-escaped), `spans` as character offsets in it."""
    shown = _display(line)
    length = len(shown)
    spans = [(s, min(e, length)) for s, e in spans if s < length and min(e, length) > s] or [
        (min(spans[0][0], length), min(spans[0][0], length))
    ]
    start = 0
    if length > TEXT_MAX and spans[0][1] > TEXT_MAX:
        start = max(0, min(spans[0][0] - TEXT_LEAD, length - TEXT_MAX))
    text = shown[start : start + TEXT_MAX]
    ranges = []
    for s, e in spans:
        s2, e2 = max(s - start, 0), min(e - start, len(text))
        if e2 > s2:
            ranges.append({"start": s2, "end": e2})
    match: dict[str, Any] = {
        "path": "/" + rel,
        "line": number,
        "column": spans[0][0] + 1,
        "text": _wire(text),
        "textOffset": start,
        "ranges": ranges,
    }
    raw = raw_b64("/" + rel)
    if raw is not None:
        match["path"] = _wire("/" + rel)
        match["rawPath"] = raw
    if before is not None:
        match["before"] = [_wire(_display(t)[:TEXT_MAX]) for t in before]
        match["after"] = [_wire(_display(t)[:TEXT_MAX]) for t in after or []]
    return match


def _size(match: dict[str, Any]) -> int:
    return (
        len(match["text"])
        + sum(len(t) for t in match.get("before", ()))
        + sum(len(t) for t in match.get("after", ()))
    )


Fetch = Callable[[], list[dict[str, Any]]]
_Held = tuple[tuple[bytes, ...], int, Fetch]


class TopN:
    """The first `limit` matches in (path, line) order, kept in bounded memory.

    Files arrive in any order (ripgrep searches in parallel). Whenever twice the limit
    is held, the files are sorted and cut; after a cut, a file that sorts after the last
    one kept cannot contribute and `wants` says so, so its lines need not be decoded.
    A file is held as its count of matches and a `fetch` that shapes them, called only
    for the files kept at the end.
    """

    def __init__(self, limit: int, max_chars: int) -> None:
        self.limit = limit
        self.max_chars = max_chars
        self.files: list[_Held] = []
        self.count = 0
        self.cut: tuple[bytes, ...] | None = None
        self.more = False

    def wants(self, key: tuple[bytes, ...]) -> bool:
        """False when a file at `key` is sure to be cut."""
        return self.cut is None or key < self.cut

    def skipped(self) -> None:
        """A file with matches was not taken (`wants` said no)."""
        self.more = True

    def add(self, key: tuple[bytes, ...], matches: list[dict[str, Any]]) -> None:
        """Take one file's matches (in line order)."""
        self.add_lazy(key, len(matches), lambda: matches)

    def add_lazy(self, key: tuple[bytes, ...], count: int, fetch: Fetch) -> None:
        """Take one file's `count` matches, which `fetch()` gives in line order."""
        if count <= 0:
            return
        if not self.wants(key):
            self.more = True
            return
        self.files.append((key, count, fetch))
        self.count += count
        if self.count >= 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        self.files.sort(key=lambda item: item[0])
        kept: list[_Held] = []
        total = 0
        for key, count, fetch in self.files:
            if total >= self.limit:
                self.more = True
                break
            if total + count > self.limit:
                count = self.limit - total
                self.more = True
            kept.append((key, count, fetch))
            total += count
        self.files = kept
        self.count = total
        if total >= self.limit and kept:
            self.cut = kept[-1][0]

    def result(self) -> tuple[list[dict[str, Any]], bool]:
        """The matches in order, and whether any were left out (count or reply size)."""
        self._trim()
        out: list[dict[str, Any]] = []
        chars = 0
        for _, count, fetch in self.files:
            for match in fetch()[:count]:
                chars += _size(match)
                if chars > self.max_chars and out:
                    return out, True
                out.append(match)
        return out, self.more


def _context(lines: dict[int, str], number: int, n: int) -> tuple[list[str], list[str]]:
    before = [lines[k] for k in range(max(1, number - n), number) if k in lines]
    after = []
    for k in range(number + 1, number + n + 1):
        if k not in lines:
            break
        after.append(lines[k])
    return before, after


# -- the Python engine --------------------------------------------------------------------


class _Cancelled(Exception):
    pass


@dataclass
class _Walk:
    """What both walkers need: the root, the rules, the limits."""

    jail: Jail
    start: str  # root-relative directory, "" for the root
    ignores: list[Rule]
    max_file_size: int | None  # None: no limit (find lists files of any size)
    cancel: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled

    def read_gitignore(self, rel_dir: str) -> IgnoreFile | None:
        real = (
            os.path.join(str(self.jail.root), rel_dir, ".gitignore")
            if rel_dir
            else os.path.join(str(self.jail.root), ".gitignore")
        )
        try:
            data, _ = read_regular(self.jail, real, real, 1024 * 1024)
        except AetherError:
            return None
        rules = parse_gitignore(data.decode("utf-8", "surrogateescape"))
        return IgnoreFile(rel_dir, tuple(rules)) if rules else None

    def parent_files(self) -> list[IgnoreFile]:
        """The `.gitignore` files of the root and every directory down to `start` (excluded)."""
        files = []
        parts = self.start.split("/") if self.start else []
        for depth in range(len(parts)):
            found = self.read_gitignore("/".join(parts[:depth]))
            if found is not None:
                files.append(found)
        return files

    def overridden(self, rel: str, is_dir: bool) -> bool:
        for rule in self.ignores:
            if (is_dir or not rule.dir_only) and rule.regex.match(rel):
                return True
        return False

    def files(self) -> list[str]:
        """Every file to search, root-relative (the Python walker)."""
        root = str(self.jail.root)
        out: list[str] = []
        stack: list[tuple[str, IgnoreChain]] = [
            (self.start, IgnoreChain(tuple(self.parent_files())))
        ]
        while stack:
            self.check()
            directory, chain = stack.pop()
            try:
                with os.scandir(os.path.join(root, directory) if directory else root) as it:
                    entries = list(it)
            except OSError:
                continue
            if any(e.name == ".gitignore" for e in entries):
                found = self.read_gitignore(directory)
                if found is not None:
                    chain = chain.add(found)
            for entry in entries:
                rel = f"{directory}/{entry.name}" if directory else entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat_mod.S_ISDIR(st.st_mode)
                if not is_dir and not stat_mod.S_ISREG(st.st_mode):
                    continue  # symlinks, FIFOs, sockets, devices
                if self.overridden(rel, is_dir) or chain.ignored(rel, is_dir):
                    continue
                if is_dir:
                    stack.append((rel, chain))
                elif self.max_file_size is None or st.st_size <= self.max_file_size:
                    out.append(rel)
        return out


def _python_search(
    walk: _Walk,
    files: list[str],
    compiled: CompiledQuery,
    top: TopN,
    context_lines: int,
) -> None:
    pattern = compiled.pattern
    root = str(walk.jail.root)
    for rel in files:
        walk.check()
        key = sort_key(rel)
        if not top.wants(key) and top.more:
            continue  # sorts after every match kept, and truncation is already known
        real = os.path.join(root, rel)
        try:
            data, _ = read_regular(walk.jail, real, real, walk.max_file_size or UNLIMITED)
        except AetherError:
            continue
        if walk.max_file_size is not None and len(data) > walk.max_file_size:
            continue  # grew since it was listed
        if b"\x00" in data:
            continue
        text = data.decode("utf-8", "surrogateescape")
        if compiled.prefilter.search(text) is None:
            continue
        if not top.wants(key):
            top.skipped()
            continue
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        matches = []
        for index, line in enumerate(lines):
            spans = [(m.start(), m.end()) for m in pattern.finditer(line)]
            if not spans:
                continue
            before = after = None
            if context_lines:
                lo = max(0, index - context_lines)
                before = lines[lo:index]
                after = lines[index + 1 : index + 1 + context_lines]
            matches.append(shape_line(rel, index + 1, line, spans, before, after))
        top.add(key, matches)


# -- the ripgrep engine -------------------------------------------------------------------


def _json_text(node: dict[str, Any]) -> bytes:
    if "text" in node:
        return str(node["text"]).encode("utf-8", "surrogateescape")
    return base64.b64decode(node.get("bytes", ""))


def _strip_dot(path: bytes) -> bytes:
    return path[2:] if path.startswith(b"./") else path


def _char_spans(line: bytes, subs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    spans = []
    ascii_only = line.isascii()
    for sub in subs:
        start, end = int(sub["start"]), int(sub["end"])
        if end <= start:
            continue
        if ascii_only:
            spans.append((start, end))
        else:
            s = len(line[:start].decode("utf-8", "surrogateescape"))
            spans.append((s, s + len(line[start:end].decode("utf-8", "surrogateescape"))))
    return spans


def _decode_line(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    return text[:-1] if text.endswith("\n") else text


def _rg_file(rel: str, events: list[dict[str, Any]], context_lines: int) -> list[dict[str, Any]]:
    """One file's `match` and `context` events as shaped matches."""
    lines: dict[int, str] = {}
    found: list[tuple[int, bytes, list[dict[str, Any]]]] = []
    for event in events:
        data = event["data"]
        raw = _json_text(data["lines"])
        number = int(data["line_number"])
        lines[number] = _decode_line(raw)
        if event["type"] == "match":
            found.append((number, raw, data.get("submatches") or []))
    out = []
    for number, raw, subs in found:
        spans = _char_spans(raw, subs)
        if not spans:
            continue
        before = after = None
        if context_lines:
            before, after = _context(lines, number, context_lines)
        out.append(shape_line(rel, number, lines[number], spans, before, after))
    return out


_BEGIN = b'{"type":"begin"'
_END = b'{"type":"end"'
_NL_END = b"\n" + _END


class RgJson:
    """ripgrep's `--json` stream, fed in chunks; each finished file goes to a `TopN`.

    Only the files that can still count are decoded: once `TopN.wants` says no for a
    file, its lines are jumped over to its `end` message without being split or parsed
    (a JSON string never holds a raw newline, so `\n{"type":"end"` only starts a
    message). A file whose `end` carries a `binary_offset` held a NUL: it is dropped.
    """

    def __init__(self, top: TopN, context_lines: int) -> None:
        self.top = top
        self.context_lines = context_lines
        self.pending = b""
        self.skipping = False
        self.rel = ""
        self.key: tuple[bytes, ...] = ()
        self.events: list[bytes] = []
        self.matches = 0  # match lines of the current file
        self.summary = False

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream."""
        buf = self.pending + chunk if self.pending else chunk
        pos = 0
        while True:
            if self.skipping and not buf.startswith(_END, pos):
                found = buf.find(_NL_END, pos)
                if found < 0:
                    last = buf.rfind(b"\n", pos)
                    if last >= 0:
                        pos = last + 1  # whole lines of a skipped file: gone
                    break
                pos = found + 1
            newline = buf.find(b"\n", pos)
            if newline < 0:
                break
            self._line(buf[pos:newline])
            pos = newline + 1
        self.pending = buf[pos:]

    def _line(self, line: bytes) -> None:
        if line.startswith(_BEGIN):
            data = json.loads(line)["data"]
            self.rel = _strip_dot(_json_text(data["path"])).decode("utf-8", "surrogateescape")
            self.key = sort_key(self.rel)
            self.skipping = not self.top.wants(self.key)
            self.events = []
            self.matches = 0
        elif line.startswith(_END):
            end = json.loads(line)["data"]
            if end.get("binary_offset") is not None:
                pass  # a NUL somewhere: binary, never matched
            elif self.skipping:
                self.top.skipped()
            else:
                events, rel, context = self.events, self.rel, self.context_lines

                def fetch() -> list[dict[str, Any]]:
                    return _rg_file(rel, [json.loads(e) for e in events], context)

                self.top.add_lazy(self.key, self.matches, fetch)
            self.matches = 0
            self.skipping = False
            self.events = []
        elif line.startswith(b'{"type":"match"'):
            if not self.skipping:
                self.events.append(line)
                self.matches += 1
        elif line.startswith(b'{"type":"context"'):
            if not self.skipping:
                self.events.append(line)
        elif line.endswith(b'"type":"summary"}'):  # its keys come sorted: "data" first
            self.summary = True


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class _Rg:
    """ripgrep runs for one search, each killed and reaped however the search ends."""

    def __init__(self, binary: str, cwd: str) -> None:
        self.binary = binary
        self.cwd = cwd

    async def _spawn(self, args: Sequence[str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=READ_CHUNK,
        )

    async def _finish(self, proc: asyncio.subprocess.Process) -> tuple[int, str]:
        assert proc.stderr is not None
        err = await proc.stderr.read(STDERR_MAX)
        code = await proc.wait()
        return code, err.decode("utf-8", "replace").strip()

    async def files(self, walk_args: Sequence[str]) -> list[str]:
        """`rg --files -0`: the files to search, root-relative."""
        proc = await self._spawn(["--files", "--null", *walk_args])
        try:
            assert proc.stdout is not None
            chunks = []
            while True:
                chunk = await proc.stdout.read(READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
            code, err = await self._finish(proc)
        finally:
            _kill(proc)
            await proc.wait()
        if code not in (0, 1) and (code != 2 or err):  # 2 alone: a file vanished, unreadable
            raise AetherError(ErrorCode.INTERNAL_ERROR, f"ripgrep failed listing files: {err}")
        data = b"".join(chunks)
        return [
            _strip_dot(part).decode("utf-8", "surrogateescape")
            for part in data.split(b"\0")
            if part
        ]

    async def search(self, args: Sequence[str], top: TopN, context_lines: int) -> None:
        """`rg --json ARGS`; each file's matches go to `top` when its `end` arrives."""
        proc = await self._spawn(args)
        try:
            assert proc.stdout is not None
            stream = RgJson(top, context_lines)
            while True:
                chunk = await proc.stdout.read(READ_CHUNK)
                if not chunk:
                    break
                stream.feed(chunk)
                await asyncio.sleep(0)  # a flood of output never holds the loop
            summary = stream.summary
            code, err = await self._finish(proc)
        finally:
            _kill(proc)
            await proc.wait()
        if code not in (0, 1) and not summary:  # 2 with a summary: some file was unreadable
            if "regex" in err.lower():
                raise _bad_query(err.splitlines()[-1] if err else "ripgrep refused the pattern")
            raise AetherError(ErrorCode.INTERNAL_ERROR, f"ripgrep failed: {err[:500]}")


def _argv_budget() -> int:
    """Bytes of file names one `rg` command line may carry: ARG_MAX less the environment."""
    try:
        arg_max = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):  # pragma: no cover - Linux has it
        arg_max = 128 * 1024
    env = sum(len(k) + len(v) + 2 + 8 for k, v in os.environ.items())
    return max(ARGV_MIN, min(ARGV_MAX, arg_max - env - ARGV_MARGIN))


def _chunks(paths: Sequence[str], budget: int) -> Iterable[Sequence[str]]:
    start = 0
    size = 0
    for i, path in enumerate(paths):
        cost = len(path.encode("utf-8", "surrogateescape")) + 11  # "./", NUL, the pointer
        if size + cost > budget and i > start:
            yield paths[start:i]
            start, size = i, 0
        size += cost
    if start < len(paths):
        yield paths[start:]


# -- the service --------------------------------------------------------------------------


class SearchService:
    """`search` and `find` over the workspace. Public coroutines return wire-ready dicts."""

    def __init__(
        self,
        jail: Jail,
        executor: BoundedExecutor,
        limits: SearchLimits | None = None,
        *,
        engine: Literal["auto", "ripgrep", "python"] = "auto",
        rg_binary: str = "rg",
        ignore_rules: Callable[[], tuple[Iterable[str], Iterable[str], Iterable[str]]]
        | None = None,
    ) -> None:
        self.jail = jail
        self.executor = executor
        self.limits = limits or SearchLimits()
        self.rg_path = shutil.which(rg_binary) if engine != "python" else None
        if engine == "ripgrep" and self.rg_path is None:
            raise SettingsError(f"search_engine is ripgrep, but {rg_binary!r} is not on PATH")
        self.engine: Engine = "ripgrep" if self.rg_path else "python"
        self._ignore_rules = ignore_rules
        self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        self.searches = 0
        self.cancelled = 0
        self.timeouts = 0

    # -- shared plumbing
    def _ignore_globs(self) -> list[str]:
        if self._ignore_rules is None:
            from aetherd.services.watcher import DEFAULT_IGNORED

            return builtin_ignores(DEFAULT_IGNORED, (), ())
        names, name_globs, path_globs = self._ignore_rules()
        return builtin_ignores(names, name_globs, path_globs)

    def _start(self, wire_path: str) -> str:
        real = self.jail.resolve(wire_path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise os_error(exc, wire_path) from None
        if not stat_mod.S_ISDIR(st.st_mode):
            raise AetherError(ErrorCode.NOT_DIRECTORY, f"{_wire(wire_path)}: not a directory")
        wire = self.jail.to_wire(real)
        return wire.lstrip("/")

    def _walk(self, wire_path: str, max_file_size: int | None) -> _Walk:
        rules = []
        for glob in self._ignore_globs():
            rule = gitignore_rule(glob)
            if rule is not None:
                rules.append(rule)
        return _Walk(self.jail, self._start(wire_path), rules, max_file_size)

    async def _bounded(self, work: Callable[[], Any], cancel: threading.Event) -> Any:
        """Run `work()` under the concurrency cap and the time limit."""
        self.searches += 1
        try:
            async with self._slots:
                return await asyncio.wait_for(work(), self.limits.timeout)
        except asyncio.TimeoutError:
            cancel.set()
            self.timeouts += 1
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"the search took longer than {self.limits.timeout:g} s; narrow it",
            ) from None
        except asyncio.CancelledError:
            cancel.set()
            self.cancelled += 1
            raise

    @contextlib.asynccontextmanager
    async def _rg_walk_args(self, walk: _Walk) -> AsyncIterator[list[str]]:
        """ripgrep's flags for the walk of `walk` (and its start directory, last).

        For a subdirectory, the `.gitignore` files above it (from the root down) are
        rebased into one temp ignore file, which lives as long as the context.
        """
        args = list(RG_WALK_FLAGS)
        if walk.max_file_size is not None:
            args += ["--max-filesize", str(walk.max_file_size)]
        for glob in self._ignore_globs():
            args += ["--glob", "!" + glob]
        temp: str | None = None
        try:
            if walk.start:
                parents = await self.executor.run(walk.parent_files)
                lines = [line for file in parents for line in file.rebased()]
                if lines:
                    fd, temp = tempfile.mkstemp(prefix="aetherd-search-", suffix=".ignore")
                    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
                        out.write("\n".join(lines) + "\n")
                    args += ["--ignore-file", temp]
                args.append("./" + walk.start)
            yield args
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

    # -- search
    async def search(self, query: SearchQuery, engine: Engine | None = None) -> dict[str, Any]:
        """Matching lines: `{matches, truncated, filesSearched, engine}`."""
        compiled = compile_query(query.query, query.regex, query.case_sensitive)
        filters = PathFilter(query.include, query.exclude)
        walk = self._walk(query.path, self.limits.max_file_size)
        limit = max(1, min(query.max_results, MAX_RESULTS))
        top = TopN(limit, self.limits.max_reply_chars)
        use = engine or self.engine
        if use == "ripgrep" and self.rg_path is None:
            raise AetherError(ErrorCode.INTERNAL_ERROR, "ripgrep is not installed")

        async def run_rg() -> int:
            assert self.rg_path is not None
            rg = _Rg(self.rg_path, str(self.jail.root))
            args = [*RG_SEARCH_FLAGS, *compiled.rg_args]
            if query.context_lines:
                args += ["--context", str(query.context_lines)]
            async with self._rg_walk_args(walk) as walk_args:
                if not filters:
                    # One run walks and searches; a second one lists the same walk, only
                    # to count `filesSearched` (ripgrep's JSON counts only files with a
                    # match). They run side by side.
                    listing = asyncio.ensure_future(rg.files(walk_args))
                    try:
                        await rg.search([*args, *walk_args], top, query.context_lines)
                        return len(await listing)
                    finally:
                        if not listing.done():
                            listing.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await listing
                # Include/exclude globs narrow the listed files here, then ripgrep
                # searches the names it is given (as many as fit in one command line).
                files = [f for f in await rg.files(walk_args) if filters.keep(f)]
            for chunk in _chunks(files, _argv_budget()):
                await rg.search([*args, "--", *("./" + p for p in chunk)], top, query.context_lines)
            return len(files)

        def run_python() -> int:
            files = walk.files()
            files = [f for f in files if filters.keep(f)] if filters else files
            files.sort(key=sort_key)  # in order: once enough are held, the rest is skipped
            _python_search(walk, files, compiled, top, query.context_lines)
            return len(files)

        async def work() -> int:
            if use == "ripgrep":
                return await run_rg()
            try:
                return await self.executor.run(run_python)
            except _Cancelled:  # pragma: no cover - the awaiting task is gone by then
                raise asyncio.CancelledError from None

        searched = await self._bounded(work, walk.cancel)
        matches, truncated = top.result()
        return {
            "matches": matches,
            "truncated": truncated,
            "filesSearched": searched,
            "engine": use,
        }

    # -- find
    async def find(self, query: FindQuery, engine: Engine | None = None) -> dict[str, Any]:
        """Files whose name or path matches: `{paths, truncated}` in tree order."""
        matcher = find_matcher(query.pattern)
        walk = self._walk(query.path, None)
        limit = max(1, min(query.max_results, MAX_RESULTS))
        use = engine or self.engine

        async def work() -> list[str]:
            if use == "ripgrep":
                assert self.rg_path is not None
                async with self._rg_walk_args(walk) as walk_args:
                    return await _Rg(self.rg_path, str(self.jail.root)).files(walk_args)
            return await self.executor.run(walk.files)

        files = await self._bounded(work, walk.cancel)
        found = sorted((f for f in files if matcher(f)), key=sort_key)
        paths = ["/" + f for f in found[:limit]]
        out: dict[str, Any] = {"paths": [_wire(p) for p in paths], "truncated": len(found) > limit}
        raws = [raw_b64(p) for p in paths]
        if any(r is not None for r in raws):
            out["rawPaths"] = raws
        return out

    def metrics(self) -> Iterator[Sample]:
        """Searches and finds started, cancelled (client gone) and timed out; the engine."""
        labels: dict[str, str] = {"engine": self.engine}
        yield Sample(
            "aetherd_search_total",
            "Searches and finds started",
            self.searches,
            labels,
            kind="counter",
        )
        yield Sample(
            "aetherd_search_cancelled_total",
            "Searches cancelled (the client went away)",
            self.cancelled,
            labels,
            kind="counter",
        )
        yield Sample(
            "aetherd_search_timeouts_total",
            "Searches stopped by search_timeout",
            self.timeouts,
            labels,
            kind="counter",
        )
