"""`xportrait eval SOURCE [SOURCE ...] DRIVING`: how well an engine follows the driver.

Animates the portrait with the driving clip (any engine, through the Animator, as `animate`
does), tracks the face mesh of driver and output frame by frame and reports head-pose error
per axis (degrees), expression errors and correlations (mouth, each eye, brows, smile), how
much of the source's face shape the output keeps against the driver's, jitter where the
driver holds still and how still the background stays (engines.metrics).

DRIVING is a video file, or `puppet:NAME` for a bundled portrait's synthetic clip
(streamer.samples: roll, translation, mouth, blinks). `--json PATH` writes the report for
machines (`-` for stdout), `--plot PATH` a PNG of driver against output curves for people.
Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from engines import EngineError, create_engine

from .options import EVAL_MAX_FRAMES, add_engine_arguments, eval_options

PROG = "xportrait eval"
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="portrait image(s) or bundled names (astronaut, grace_hopper); the first is animated")
    parser.add_argument("driving", metavar="DRIVING",
                        help="driving video, or puppet:NAME for a bundled portrait's synthetic clip")
    parser.add_argument("--frames", type=int, default=None,
                        help=f"evaluate the first N frames (default: all, at most {EVAL_MAX_FRAMES})")
    parser.add_argument("--ref-frame", type=int, default=None, metavar="INDEX",
                        help="driving frame standing for the portrait's pose (default: the closest to it)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="PATH.png", help="write driver against output curves as a PNG")
    parser.add_argument("--stream", action="store_true",
                        help="--engine xportrait as serve runs it, the live stream batch, so that its options "
                             "(--deep-levels, --level-groups, --lookahead ...) are judged (default: offline windows)")
    add_engine_arguments(parser)  # --engine, --size and the diffusion engine's flags


class InputError(ValueError):
    pass


def _load_source(spec: str):
    """An image file or a bundled portrait's name, as `animate` reads them."""
    from .images import ImageError, source_image

    try:
        return source_image(spec)
    except ImageError as e:
        raise InputError(str(e)) from None


def _driving(spec: str, limit: int | None) -> tuple[list, float]:
    """The driving frames (RGB arrays) and their rate."""
    count = EVAL_MAX_FRAMES if limit is None else limit
    if spec.startswith("puppet:"):
        from engines.face import NoFaceError

        from .samples import driving_clip

        name = spec.split(":", 1)[1]
        try:
            clip = driving_clip(name, frames=None if limit is None else limit, fps=25.0)
        except (ValueError, NoFaceError) as e:
            raise InputError(f"driving {spec}: {e}") from None
        return [frame for frame, _pose in clip], 25.0
    from .video import VideoError, probe, read_frames

    try:
        info = probe(spec)
        frames = [f.image for _, f in zip(range(count), read_frames(spec))]
    except VideoError as e:
        raise InputError(str(e)) from None
    if not frames:
        raise InputError(f"the driving video {spec} has no frames")
    return frames, float(info.fps)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def summary(report: dict) -> str:
    """The report as a few lines for people."""
    lines = [f"{report['frames']} frames ({report['frames_compared']} compared), reference frame "
             f"{report['reference_frame']}, output frames without a face: {report['output_frames_without_face']}"]
    lines.append("feature      error    corr   driver range")
    for name, f in report["features"].items():
        unit = " deg" if name in ("yaw", "pitch", "roll") else ""
        lines.append(f"{name:<11} {_fmt(f['mae']):>6}{unit:<4} {_fmt(f['corr'], 2):>5}   {_fmt(f['driver_range'])}")
    ident = report["identity"]
    lines.append(f"identity: shape distance to source {_fmt(ident['to_source'])}, to driver {_fmt(ident['to_driver'])} "
                 f"(face heights; source share {_fmt(ident['source_share'], 2)}, lower keeps more of the source)")
    jit = report["jitter"]
    lines.append(f"jitter on {jit['still_frames']} still frames: output {_fmt(jit['output'], 4)}, "
                 f"driver {_fmt(jit['driver'], 4)} (face heights per frame)")
    bg = report.get("background") or {}
    lines.append(f"background: mean abs change {_fmt(bg.get('mean_abs_diff'), 2)} levels, "
                 f"{_fmt(100 * bg['changed_share'] if bg.get('changed_share') is not None else None, 2)}% of pixels "
                 f"changed > 8 levels ({bg.get('pixels', 0)} background pixels)")
    return "\n".join(lines)


def full_report(options, figures: dict) -> dict:
    """What ran (engine, size, inputs; with --stream the stream's settings, for comparing one
    configuration's figures with another's) and the figures."""
    engine = options.engine
    report = {"engine": engine.name, "size": engine.size, "sources": list(options.sources), "driving": options.driving,
              **figures}
    live = getattr(engine, "live", None)
    if live is not None:
        report["stream"] = {"steps": engine.stream_steps, "window": engine.window, "seed": engine.seed,
                            "level_groups": live.level_groups, "deep_levels": list(live.deep_levels),
                            "reuse_controls": live.reuse_controls, "token_downsample": live.token_downsample,
                            "lookahead": live.lookahead,
                            "tiny_decoder": live.tiny_decoder}
    return report


def run(args: argparse.Namespace) -> int:
    options = eval_options(args)
    name = options.engine.name
    from engines.face import NoFaceError
    from engines.metrics import evaluate, plot

    try:
        sources = [_load_source(s) for s in options.sources]
        frames, fps = _driving(options.driving, options.frames)
        if options.ref_frame is not None and options.ref_frame >= len(frames):
            raise InputError(f"--ref-frame {options.ref_frame} is out of range: the clip has {len(frames)} frames")
        try:
            engine = create_engine(options.engine)
        except EngineError as e:  # missing weights or backend, a bad combination of options: as animate says it
            raise InputError(f"engine {name!r}: {e}") from None
        comparison = evaluate(engine, sources, frames, fps, reference=options.ref_frame)
    except (InputError, NoFaceError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EngineError as e:
        print(f"{PROG}: error: engine {name!r}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    report = full_report(options, comparison.report)
    try:
        if options.plot:
            plot(comparison, options.plot, fps, title=f"{name}: {options.sources[0]} driven by {options.driving}")
        if options.json == "-":
            print(json.dumps(report, indent=2))
        else:
            if options.json:
                with open(options.json, "w") as f:
                    json.dump(report, f, indent=2)
            print(summary(report))
    except OSError as e:
        print(f"{PROG}: error: cannot write output: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
