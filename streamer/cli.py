"""`xportrait`: one console script, one subcommand per job.

Each subcommand's module owns its arguments (`add_arguments(parser)`) and its work
(`run(args) -> exit code`), which first turns the flags into the command's options
(streamer/options.py); modules are imported only when their subcommand runs. An option that
breaks a rule is a usage error: the command's usage, the rule, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engines.options import OptionError

COMMANDS = {
    "animate": ("streamer.offline", "animate a portrait with a driving video, offline"),
    "serve": ("streamer.server", "serve the live WebRTC portrait animator"),
    "client": ("client.stream_client", "stream a video file to a running server as a webcam"),
    "bench": ("streamer.bench", "measure an engine's speed"),
    "export": ("export.cli", "export the streaming engine's modules to ONNX (and a manifest)"),
    "sample-clip": ("streamer.sample_clip", "write a driving clip made from a bundled portrait, to try animate"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xportrait")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each subcommand's (for its usage errors)."""
    parser = argparse.ArgumentParser(prog="xportrait", description="Real-time portrait animation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    commands = {}
    for name, (module, help_text) in COMMANDS.items():
        p = commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, commands = build_parser(argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except OptionError as e:
        commands[args.command].error(str(e))  # exits with status 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
