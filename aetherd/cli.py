"""The command line: `aetherd serve [flags]`. Bad settings exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
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
    add_serve_arguments(commands.add_parser("serve", help="run the daemon"))
    return parser


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags of `aetherd serve`: `--settings`, and one per setting."""
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


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """`aetherd serve ARGS` parsed without building the other commands: the daemon's
    start does not import the client package (docs/performance.md, Start-up)."""
    parser = argparse.ArgumentParser(prog="aetherd serve", description="Run the daemon.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "serve"
    return args


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
    if argv and argv[0] == "serve":
        return serve_main(parse_serve(argv[1:]))
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
    return serve_main(args)


def serve_main(args: argparse.Namespace) -> int:
    """Run the daemon with the parsed `serve` arguments."""
    flags = {name: getattr(args, name) for name in field_names()}
    try:
        settings = load_settings(flags, settings_file=args.settings)
        from aetherd.logs import setup_logging

        if os.environ.get(RELOAD_CHECK):
            from aetherd.reload import run_check

            return run_check(settings)
        setup_logging(settings.log_format, settings.log_level)
        from aetherd.app import serve
        from aetherd.eventloop import run

        reexec = run(serve(settings), settings.event_loop)
        if reexec is not None:
            reexec.exec()  # returns only if execv failed
            return 1
    except SettingsError as exc:
        print(f"aetherd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
