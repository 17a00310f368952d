"""Which tool calls need a person's approval, per permission mode.

- `full`: nothing.
- `ask`: every write (`write_file`, `edit_file`) and every `bash` command.
- `auto` (default): only destructive commands: recursive deletes outside temporary
  folders, force pushes, hard resets, `git clean -f`, forced branch deletes,
  `find -delete`, `mkfs`, `dd of=`, `shred`, and the same inside `bash -c`,
  `sh -c`, `eval`, `sudo`, `xargs`.

The command is split into simple commands with `shlex` (on `;`, `&&`, `||`, `|`,
`&`, newlines, parentheses); a command shlex cannot parse (unbalanced quotes) is
judged destructive when a conservative regex finds a suspicious word in it.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

MODES = ("auto", "ask", "full")
WRITE_TOOLS = frozenset({"write_file", "edit_file", "bash"})
TEMP_PREFIXES = ("/tmp/", "/var/tmp/", "/dev/shm/")
SEPARATORS = frozenset({";", "&&", "||", "|", "&", "(", ")", "|&", ";;", "\n"})
WRAPPERS = frozenset({"sudo", "doas", "nohup", "time", "env", "command", "exec", "nice", "xargs"})
SHELLS = frozenset({"bash", "sh", "zsh", "dash"})
FALLBACK = re.compile(
    r"\brm\s+-\w*[rR]|\brm\s+--recursive|\bgit\s+push\b.*(\s-f\b|--force|\s\+)"
    r"|\bgit\s+reset\b.*--hard|\bgit\s+clean\b.*-\w*f|\bmkfs\b|\bdd\b.*\bof=|\bshred\b"
)


def _commands(command: str) -> list[list[str]]:
    lexer = shlex.shlex(command.replace("\n", " ; "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS or set(token) <= set(";&|()"):
            out.append([])
        else:
            out[-1].append(token)
    return [argv for argv in out if argv]


def _is_temp(target: str) -> bool:
    tmpdir = os.environ.get("TMPDIR", "").rstrip("/")
    path = os.path.normpath(target) + "/"
    prefixes = TEMP_PREFIXES + ((tmpdir + "/",) if tmpdir else ())
    return any(path.startswith(p) and path != p for p in prefixes)


def _destructive_argv(argv: list[str], depth: int) -> str | None:
    # Skip variable assignments and wrappers (sudo rm -rf ...).
    while argv and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]) or _base(argv[0]) in WRAPPERS):
        argv = argv[1:]
        while argv and argv[0].startswith("-") and not argv[0].startswith("--"):
            argv = argv[1:]  # wrapper options such as `sudo -E`
    if not argv:
        return None
    name = _base(argv[0])
    args = argv[1:]
    if name in SHELLS or name == "eval":
        script = None
        if name == "eval":
            script = " ".join(args)
        elif "-c" in args and args.index("-c") + 1 < len(args):
            script = args[args.index("-c") + 1]
        if script and depth < 4:
            return destructive_command(script, depth + 1)
        return None
    if name == "rm":
        flags = [a for a in args if a.startswith("-") and a != "--"]
        recursive = any(
            a in ("--recursive",) or (not a.startswith("--") and ("r" in a or "R" in a))
            for a in flags
        )
        targets = [a for a in args if not a.startswith("-")]
        # No target at all (`xargs rm -rf`): the targets come from elsewhere; ask.
        if recursive and (not targets or any(not _is_temp(t) for t in targets)):
            return "recursive delete outside a temporary folder"
        return None
    if name == "git":
        sub = [a for a in args if not a.startswith("-")]
        verb = sub[0] if sub else ""
        if verb == "push" and (
            any(a in ("-f", "--force", "--force-with-lease", "--mirror") for a in args)
            or any(a.startswith("--force") for a in args)
            or any(a.startswith("+") for a in sub[1:])
            or "--delete" in args
            or "-d" in args
        ):
            return "force push"
        if verb == "reset" and "--hard" in args:
            return "hard reset"
        if verb == "clean" and any(
            a == "--force" or (a.startswith("-") and not a.startswith("--") and "f" in a)
            for a in args
        ):
            return "git clean --force"
        if verb == "branch" and ("-D" in args or ("--delete" in args and "--force" in args)):
            return "forced branch delete"
        if verb == "checkout" and ("--" in args or "-f" in args or "--force" in args):
            return "discarding local changes"
        if verb == "restore" and not any(a == "--staged" for a in args):
            return "discarding local changes"
        return None
    if name == "find" and ("-delete" in args or ("-exec" in args and "rm" in args)):
        return "find -delete"
    if name.startswith("mkfs") or name in ("shred", "wipefs"):
        return f"{name} destroys data"
    if name == "dd" and any(a.startswith("of=") for a in args):
        return "dd writing to a file or device"
    return None


def _base(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def destructive_command(command: str, depth: int = 0) -> str | None:
    """Why `command` is destructive, or None."""
    try:
        commands = _commands(command)
    except ValueError:
        return "unparseable command with a destructive word" if FALLBACK.search(command) else None
    for argv in commands:
        reason = _destructive_argv(argv, depth)
        if reason:
            return reason
    return None


def approval_reason(mode: str, tool: str, args: dict[str, Any]) -> str | None:
    """Why tool call `tool(args)` needs approval in `mode`, or None when it may run."""
    if mode == "full":
        return None
    if mode == "ask":
        if tool in WRITE_TOOLS:
            return "ask mode: every write and command needs approval"
        return None
    if tool == "bash" and isinstance(args.get("command"), str):
        return destructive_command(args["command"])
    return None


def describe(tool: str, args: dict[str, Any], reason: str) -> str:
    """A one-line description of a call for the permission request."""
    if tool == "bash":
        what = f"run `{str(args.get('command'))[:300]}`"
    elif tool in ("write_file", "edit_file"):
        what = f"{'write' if tool == 'write_file' else 'edit'} {args.get('path')}"
    else:
        what = f"{tool} {args}"
    return f"{what} ({reason})"
