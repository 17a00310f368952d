"""Globs and `.gitignore` rules exactly as ripgrep reads them (its `ignore` and `globset` crates).

The search service has two engines that must agree: ripgrep, and a pure-Python walk.
This module is the Python side of the agreement, written against ripgrep 13's rules:

- A glob is globset's, with `literal_separator` and backslash escapes: `*` and `?`
  never match `/`; `[...]` (negated with `!` or `^`), `{a,b}` alternatives; `**` is
  recursive only as a whole component (`**/x`, `x/**`, `x/**/y`, `**`), elsewhere it
  is `*`.
- A `.gitignore` line (`gitignore_rule`): `#` comments, trailing white space trimmed
  (unless escaped as `\\ `), `!` negation, a leading `/` anchors, a trailing `/` means
  directories only, a pattern without any other `/` matches the name at any depth
  (`**/` is put in front), and `x/**` matches only what is inside `x`.
- In one file the last matching line wins; a directory-only line never matches a
  file. Nested files: the closest directory's file that has any matching line
  decides (`IgnoreChain`).

No dependency: `pathspec` implements git's wildmatch, whose `**`, `{}` and class rules
differ from ripgrep's in corner cases, and the two engines must not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "GlobError",
    "IgnoreChain",
    "IgnoreFile",
    "Rule",
    "escape_glob",
    "gitignore_rule",
    "glob_regex",
    "parse_gitignore",
]


class GlobError(ValueError):
    """A glob that globset would refuse (an unclosed `[` or `{`, a nested `{`)."""


_GLOB_SPECIAL = frozenset("\\*?[]{}!#")


def escape_glob(text: str) -> str:
    """`text` as a glob that matches exactly it (for directory names put in front of a rule)."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _class(glob: str, i: int) -> tuple[str, int]:
    """The regex of the class starting at `glob[i] == "["`, and the index after it."""
    j = i + 1
    negate = False
    if j < len(glob) and glob[j] in "!^":
        negate = True
        j += 1
    items: list[str] = []
    first = True
    while True:
        if j >= len(glob):
            raise GlobError("unclosed character class")
        c = glob[j]
        if c == "]" and not first:
            j += 1
            break
        first = False
        if c == "\\" and j + 1 < len(glob):
            c = glob[j + 1]
            j += 1
        # a range a-z (a `-` first or last is itself)
        if j + 2 < len(glob) and glob[j + 1] == "-" and glob[j + 2] != "]":
            end = glob[j + 2]
            if end == "\\" and j + 3 < len(glob):
                end = glob[j + 3]
                j += 1
            if ord(end) < ord(c):
                raise GlobError("invalid range in a character class")
            items.append(re.escape(c) + "-" + re.escape(end))
            j += 3
            continue
        items.append(re.escape(c))
        j += 1
    return "[" + ("^" if negate else "") + "".join(items) + "]", j


def _translate(glob: str, in_alternates: bool = False) -> tuple[str, int]:
    out: list[str] = []
    i = 0
    n = len(glob)
    while i < n:
        c = glob[i]
        if in_alternates and c in ",}":
            return "".join(out), i
        if c == "\\":
            if i + 1 < n:
                out.append(re.escape(glob[i + 1]))
                i += 2
            else:  # a trailing backslash: globset takes it literally
                out.append(re.escape("\\"))
                i += 1
        elif c == "*":
            if i + 1 < n and glob[i + 1] == "*":
                at_start = i == 0 or glob[i - 1] == "/"
                at_end = i + 2 == n or glob[i + 2] == "/"
                if at_start and at_end and not in_alternates:
                    if i == 0 and i + 2 == n:
                        out.append(".*")
                        i += 2
                    elif i == 0:  # `**/` prefix: any leading directories, or none
                        out.append("(?:/?|.*/)")
                        i += 3
                    elif i + 2 == n:  # `/**` suffix: the `/` is already out
                        out.pop()  # drop the escaped "/"
                        out.append("/.*")
                        i += 2
                    else:  # `/**/`: the `/` before is out; one `/` or any directories
                        out.pop()
                        out.append("(?:/|/.*/)")
                        i += 3
                    continue
                out.append("[^/]*")
                i += 2
                while i < n and glob[i] == "*":
                    i += 1
            else:
                out.append("[^/]*")
                i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            regex, i = _class(glob, i)
            out.append(regex)
        elif c == "{":
            if in_alternates:
                raise GlobError("nested alternates are not allowed")
            branches: list[str] = []
            i += 1
            while True:
                branch, i = _translate_branch(glob, i)
                branches.append(branch)
                if i >= n:
                    raise GlobError("unclosed alternates")
                if glob[i] == "}":
                    i += 1
                    break
                i += 1  # the ","
            out.append("(?:" + "|".join(branches) + ")")
        else:
            out.append(re.escape(c))
            i += 1
    if in_alternates:
        raise GlobError("unclosed alternates")
    return "".join(out), i


def _translate_branch(glob: str, i: int) -> tuple[str, int]:
    regex, consumed = _translate(glob[i:], in_alternates=True)
    return regex, i + consumed


def glob_regex(glob: str) -> re.Pattern[str]:
    """The compiled regex that fully matches the paths `glob` matches (GlobError if bad)."""
    regex, _ = _translate(glob)
    return re.compile(r"(?s:" + regex + r")\Z")


@dataclass(frozen=True)
class Rule:
    """One `.gitignore` line (or one override glob), compiled."""

    regex: re.Pattern[str]
    whitelist: bool  # a `!` line
    dir_only: bool  # a trailing `/`
    glob: str  # the glob as matched (after `**/` and `/*` were added)


def gitignore_rule(line: str) -> Rule | None:
    """One line of a `.gitignore` as ripgrep reads it; None for a blank, a comment or a bad glob."""
    if line.startswith("#"):
        return None
    if not line.endswith("\\ "):
        line = line.rstrip()
    if not line:
        return None
    whitelist = False
    absolute = False
    if line.startswith(("\\!", "\\#")):
        line = line[1:]
        absolute = line.startswith("/")
    else:
        if line.startswith("!"):
            whitelist = True
            line = line[1:]
        if line.startswith("/"):
            line = line[1:]
            absolute = True
    dir_only = False
    if line.endswith("/"):
        dir_only = True
        line = line[:-1]
        if line.endswith("\\"):
            line = line[:-1]
    glob = line
    if not absolute and "/" not in line and not (glob.startswith("**/") or glob == "**"):
        glob = "**/" + glob
    if glob.endswith("/**"):
        glob += "/*"
    try:
        regex = glob_regex(glob)
    except GlobError:
        return None
    return Rule(regex, whitelist, dir_only, glob)


def parse_gitignore(text: str) -> list[Rule]:
    """Every rule of a `.gitignore` file's text, in order."""
    if text.startswith("\ufeff"):
        text = text[1:]
    rules = []
    for line in text.split("\n"):
        rule = gitignore_rule(line)
        if rule is not None:
            rules.append(rule)
    return rules


@dataclass(frozen=True)
class IgnoreFile:
    """The rules of one `.gitignore`, in the directory `base` (root-relative, `""` for the root)."""

    base: str
    rules: tuple[Rule, ...]

    def decide(self, rel: str, is_dir: bool) -> bool | None:
        """True: ignored; False: whitelisted (`!`); None: no line matches. `rel` is root-relative."""
        if self.base:
            if not rel.startswith(self.base + "/"):
                return None
            rel = rel[len(self.base) + 1 :]
        for rule in reversed(self.rules):
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(rel):
                return not rule.whitelist
        return None

    def rebased(self) -> list[str]:
        """The rules as lines of one ignore file read from the root (ripgrep's `--ignore-file`).

        Used for the `.gitignore` files above a searched subdirectory: ripgrep reads only
        those inside the directory it walks, and no longer reads any above the root.
        """
        prefix = "/" + (escape_glob(self.base) + "/" if self.base else "")
        lines = []
        for rule in self.rules:
            glob = rule.glob
            if glob.startswith("**/") and prefix == "/":
                text = glob  # unanchored at the root: as it was
            else:
                text = prefix + glob
            lines.append(("!" if rule.whitelist else "") + text + ("/" if rule.dir_only else ""))
        return lines


class IgnoreChain:
    """The `.gitignore` files that apply in one directory, the closest last."""

    __slots__ = ("files",)

    def __init__(self, files: tuple[IgnoreFile, ...] = ()) -> None:
        self.files = files

    def add(self, file: IgnoreFile) -> IgnoreChain:
        """This chain with `file` (a deeper directory's) added."""
        return IgnoreChain((*self.files, file))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """Whether root-relative `rel` is ignored: the closest file with a matching line decides."""
        for file in reversed(self.files):
            decided = file.decide(rel, is_dir)
            if decided is not None:
                return decided
        return False
