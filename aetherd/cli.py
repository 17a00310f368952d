"""The command line: `aetherd serve [flags]`. Bad settings exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from aetherd import __version__
from aetherd.errors import SettingsError
from aetherd.settings import Settings, env_name, field_names, flag_name, load_settings

RELOAD_CHECK = "AETHERD_RELOAD_CHECK"  # aetherd.reload.CHECK_ENV (not imported: start-up cost)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; one flag per setting, generated from the Settings model."""
    parser = argparse.ArgumentParser(prog="aetherd", description="The aetherd workspace daemon.")
    parser.add_argument("--version", action="version", version=f"aetherd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "init",
        help="run as a container's PID 1: start `aetherd serve ARGS`, reap orphans, forward signals",
        add_help=False,
    )
    commands.add_parser(
        "reload",
        help="re-execute the running daemon (new version, same pid); terminals keep running",
        add_help=False,
    )
    commands.add_parser(
        "schema", help="print the protocol's AsyncAPI 3.0 description (JSON) and exit"
    )
    from aetherd.client.cli import add_commands as add_client_commands

    add_client_commands(commands)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="YAML settings file (env AETHERD_SETTINGS; default /etc/aetherd/aetherd.yaml if present)",
    )
    for name in field_names():
        info = Settings.model_fields[name]
        if name == "agent_backends":
            serve.add_argument(
                "--agent-backend",
                flag_name(name),
                dest=name,
                action="append",
                default=None,
                metavar="NAME=COMMAND",
                help=f"{info.description} (env {env_name(name)})",
            )
            continue
        serve.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{info.description} (env {env_name(name)})",
        )
    return parser


def settings_for(argv: list[str]) -> Settings:
    """The settings `aetherd serve ARGV` would run with (SettingsError if they are bad)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise SettingsError(f"cannot parse the command line {argv!r}") from None
    flags = {name: getattr(args, name) for name in field_names()}
    return load_settings(flags, settings_file=args.settings)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aetherd` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "init":
        from aetherd.init import main as init_main

        return init_main(argv[1:])
    if argv and argv[0] == "reload":
        from aetherd.reload import reload_main

        return reload_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "schema":
        from aetherd.protocol.schema import protocol_document

        sys.stdout.write(protocol_document())
        return 0
    from aetherd.client.cli import COMMANDS as CLIENT_COMMANDS

    if args.command in CLIENT_COMMANDS:
        from aetherd.client.cli import run as run_client

        return run_client(args)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    flags = {name: getattr(args, name) for name in field_names()}
    try:
        settings = load_settings(flags, settings_file=args.settings)
        from aetherd.logs import setup_logging

        if os.environ.get(RELOAD_CHECK):
            from aetherd.reload import run_check

            return run_check(settings)
        setup_logging(settings.log_format, settings.log_level)
        from aetherd.app import serve

        reexec = asyncio.run(serve(settings))
        if reexec is not None:
            reexec.exec()  # returns only if execv failed
            return 1
    except SettingsError as exc:
        print(f"aetherd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
