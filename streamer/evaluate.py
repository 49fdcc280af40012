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

`--judge` (with `--stream` and a lossy live option: --deep-levels, --reuse-controls,
--token-downsample) applies the bar for a lossy option: the same clip through the stream with
those options, without them, and without them at the next seed; each figure of the first may
differ from the plain stream's by no more than the next seed's does (every seed's output is
an equally valid one). Exit status 3 where a figure is further off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from engines import EngineError, create_engine

from .options import EVAL_MAX_FRAMES, add_engine_arguments, eval_options

PROG = "xportrait eval"
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_OVER_BAR = 3  # --judge: a lossy option's figure further from the plain stream's than another seed's


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
    parser.add_argument("--judge", action="store_true",
                        help="with --stream and a lossy option (--deep-levels, --reuse-controls, --token-downsample): "
                             "also the stream without them, at --seed and the next seed; each figure may differ from "
                             "the plain stream's by no more than the next seed's does (exit status 3 if not)")
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


JUDGED = ("lossy", "plain", "another seed")  # --judge's runs


def judged_engines(engine) -> dict:
    """--judge's three runs of the live engine: its options as given, without the lossy ones,
    and without them at the next seed."""
    plain = dataclasses.replace(engine, live=dataclasses.replace(engine.live, deep_levels=(), reuse_controls=False,
                                                                 token_downsample=1))
    return dict(zip(JUDGED, (engine, plain, dataclasses.replace(plain, seed=engine.seed + 1))))


def judged_figures(report: dict) -> dict[str, float | None]:
    """The figures the bar compares: each feature's error, the identity kept, the output's
    jitter where the driver holds still, the background's change, the frames without a face."""
    figures = {f"{name} error": f["mae"] for name, f in report["features"].items()}
    figures["identity (to source)"] = report["identity"]["to_source"]
    figures["jitter"] = report["jitter"]["output"]
    figures["background change"] = (report.get("background") or {}).get("mean_abs_diff")
    figures["frames without a face"] = report["output_frames_without_face"]
    return figures


def _number(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def judge(reports: dict[str, dict]) -> dict:
    """The bar over --judge's reports (by JUDGED's names): per figure the three values, the
    lossy stream's and the other seed's distance from the plain stream, and whether the first
    is within the second (None where a figure is missing: not judged). Within the bar where no
    judged figure is over."""
    lossy, plain, other = (judged_figures(reports[name]) for name in JUDGED)
    rows = {}
    for name, base in plain.items():
        row = {"lossy": lossy[name], "plain": base, "another seed": other[name], "within": None}
        if _number(base) and _number(lossy[name]) and _number(other[name]):
            row["lossy_off"], row["seed_off"] = abs(lossy[name] - base), abs(other[name] - base)
            row["within"] = row["lossy_off"] <= row["seed_off"]
        rows[name] = row
    return {"figures": rows, "within": all(row["within"] is not False for row in rows.values()),
            "judged": sum(row["within"] is not None for row in rows.values())}


def judge_summary(verdict: dict) -> str:
    lines = ["figure                   lossy    plain  another seed   lossy off  seed off"]
    for name, row in verdict["figures"].items():
        mark = {True: "within", False: "OVER", None: "not judged"}[row["within"]]
        lines.append(f"{name:<22} {_fmt(row['lossy']):>7}  {_fmt(row['plain']):>7}  {_fmt(row['another seed']):>12}   "
                     f"{_fmt(row.get('lossy_off')):>9} {_fmt(row.get('seed_off')):>9}  {mark}")
    verdict_line = "within the bar" if verdict["within"] else "OVER the bar"
    lines.append(f"{verdict_line}: {verdict['judged']} figures judged against another seed's spread")
    return "\n".join(lines)


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
        runs = judged_engines(options.engine) if options.judge else {"": options.engine}
        comparisons = {}
        for label, engine_options in runs.items():  # one engine at a time (one GPU's memory)
            try:
                engine = create_engine(engine_options)
            except EngineError as e:  # missing weights or backend, a bad combination of options: as animate says it
                raise InputError(f"engine {name!r}: {e}") from None
            comparisons[label] = evaluate(engine, sources, frames, fps, reference=options.ref_frame)
            del engine
    except (InputError, NoFaceError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EngineError as e:
        print(f"{PROG}: error: engine {name!r}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    reports = {label: full_report(dataclasses.replace(options, engine=runs[label], judge=False), c.report)
               for label, c in comparisons.items()}
    if options.judge:
        verdict = judge(reports)
        report, text = {"judge": verdict, **reports}, judge_summary(verdict)
    else:
        report = reports[""]
        text = summary(report)
    comparison = next(iter(comparisons.values()))  # the options as given
    try:
        if options.plot:
            plot(comparison, options.plot, fps, title=f"{name}: {options.sources[0]} driven by {options.driving}")
        if options.json == "-":
            print(json.dumps(report, indent=2))
        else:
            if options.json:
                with open(options.json, "w") as f:
                    json.dump(report, f, indent=2)
            print(text)
    except OSError as e:
        print(f"{PROG}: error: cannot write output: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OVER_BAR if options.judge and not report["judge"]["within"] else 0
