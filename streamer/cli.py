"""`xportrait`: one console script, one subcommand per job.

Each subcommand's module owns its arguments (`add_arguments(parser)`) and its work
(`run(args) -> exit code`); modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "animate": ("streamer.offline", "animate a portrait with a driving video, offline"),
    "serve": ("streamer.server", "serve the live WebRTC portrait animator"),
    "client": ("client.stream_client", "stream a video file to a running server as a webcam"),
    "bench": ("streamer.bench", "measure an engine's speed"),
    "export": ("export.cli", "export the streaming engine's modules to ONNX (and a manifest)"),
    "eval": ("streamer.evaluate", "measure how well an engine follows a driving clip (pose, expressions, identity)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xportrait", description="Real-time portrait animation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
