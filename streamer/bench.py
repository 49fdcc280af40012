"""`xportrait bench`: how fast an engine animates, measured the way the streamer runs it.

Per driving frame: face tracking (mediapipe, video mode), then alignment + engine step, as
in `engines.animator.Animator`. Prints fps, per-frame latency p50/p95 and per-stage means,
next to a baseline measured in the same run:

- warp engine: the textbook piecewise-affine warp (scikit-image's PiecewiseAffineTransform
  over the same moved mesh), on a few frames, to show what the rasterised map buys.
- diffusion engine: bench_xportrait.py (offline, one window; or `--stream`, the live engine).

`--json` prints one JSON object for machines instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from engines import EngineError, create_engine
from engines.face import NoFaceError

from .options import BenchOptions, add_engine_arguments, bench_options

FPS = 25.0  # the driving clip's rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=BenchOptions.frames,
                        help=f"driving frames in all, the first --warmup of them untimed (default: {BenchOptions.frames})")
    parser.add_argument("--warmup", type=int, default=BenchOptions.warmup,
                        help=f"untimed frames first (default: {BenchOptions.warmup})")
    parser.add_argument("--source", default=BenchOptions.source,
                        help="portrait: a bundled name (astronaut, grace_hopper) or an image path")
    parser.add_argument("--driving", help="driving video (default: a synthetic 640x480 clip of grace_hopper)")
    parser.add_argument("--baseline-frames", type=int, default=None,
                        help="frames for the slow baseline (0 skips it; default: 5, xportrait --stream 8; the "
                             "xportrait offline baseline is one window)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--stream", action="store_true",
                        help="xportrait: the live streaming engine (stream batch, CUDA graph) against the naive baseline")
    parser.add_argument("--fast-only", action="store_true",
                        help="xportrait --stream: time only the fastest configuration asked for (and the naive baseline)")
    parser.add_argument("--profile", metavar="DIR",
                        help="xportrait --stream: then profile the fastest run's tick without its graph (CUDA): a "
                             "kernel table by kind, and DIR/tick-profile.json and tick-trace.json")
    parser.add_argument("--paced-fps", type=float, metavar="FPS",
                        help="xportrait --stream: give the frames as a camera at FPS does (the newest due frame each "
                             "step, older ones dropped), so in->out latency is what a person on a call sees; "
                             "default: back to back")
    parser.add_argument("--offline-steps", default=",".join(map(str, BenchOptions.offline_steps)),
                        help="xportrait offline: LCM step counts to time on one window (default: %(default)s)")
    add_engine_arguments(parser)


def load_source(spec: str) -> np.ndarray:
    """A bundled portrait's name or an image file, read as `animate` reads its sources (the
    one loader: upright, transparency on white, bad files refused in words; ImageError). Not
    through offline.py, which needs PyAV: the bench runs where there is none."""
    from .images import source_image

    return source_image(spec)


def _driving_frames(path: str | None, count: int) -> list[np.ndarray]:
    """Decoded up front, so decoding is not timed; a short video is looped."""
    if path:
        from .video import read_frames

        frames = [f.image for _, f in zip(range(count), read_frames(path))]
    else:
        from .samples import driving_clip

        frames = [frame for frame, _pose in driving_clip("grace_hopper", frames=min(count, 250), fps=FPS)]
    return [frames[i % len(frames)] for i in range(count)]


def machine_name() -> str:
    """CPU model and core count (and the GPU, once an engine uses one)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(animator, frames: list[np.ndarray], warmup: int, fps: float = FPS) -> dict:
    """Drive the animator frame by frame; time tracking, engine and the whole frame."""
    for i, frame in enumerate(frames[:warmup]):
        animator.drive(frame, i / fps)
    engine_ms, face_ms, total_ms = [], [], []
    stages: dict[str, list[float]] = {}
    start = time.perf_counter()
    for i, frame in enumerate(frames[warmup:], start=warmup):
        t0 = time.perf_counter()
        landmarks = animator.tracker.detect(frame)
        t1 = time.perf_counter()
        animator.drive(frame, i / fps, landmarks=landmarks)
        t2 = time.perf_counter()
        face_ms.append((t1 - t0) * 1e3)
        engine_ms.append((t2 - t1) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
        for stage, ms in animator.engine.timings.last.items():
            stages.setdefault(stage, []).append(ms)
    elapsed = time.perf_counter() - start
    timed = len(frames) - warmup
    return {
        "frames": timed,
        "fps": timed / elapsed,
        "latency_ms": {"p50": percentile(total_ms, 50), "p95": percentile(total_ms, 95)},
        "stages_ms": {"face": float(np.mean(face_ms)), "align+engine": float(np.mean(engine_ms)),
                      **{f"engine.{k}": float(np.mean(v)) for k, v in stages.items() if k != "engine"}},
        "frames_without_face": animator.frames_without_face,
    }


def warp_baseline(animator, frames: list[np.ndarray], count: int) -> dict:
    """scikit-image's PiecewiseAffineTransform + warp over the same vertices the engine moves."""
    from skimage.transform import PiecewiseAffineTransform, warp

    reenactor = animator.engine.reenactor  # the engine's own mesh, so both warp the same motion
    source = animator.sources[0].image
    times = []
    for frame in frames[:count]:
        landmarks = animator.tracker.detect(frame)
        if landmarks is None:
            continue
        t0 = time.perf_counter()
        aligned = animator.align(landmarks)
        reenactor.render(aligned, animator.reference)  # moves the vertices (its warp is not used)
        # output -> source, as warp() wants
        transform = PiecewiseAffineTransform.from_estimate(reenactor.vertices, reenactor.src_vertices)
        warp(source, transform, output_shape=source.shape[:2], preserve_range=True).astype(np.uint8)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"name": "scikit-image PiecewiseAffineTransform warp", "frames": len(times),
            "ms_per_frame": float(np.mean(times)) if times else float("nan")}


def bench_animator(options: BenchOptions) -> dict:
    """Any frame-by-frame engine behind the Animator, as the streamer drives it; the warp
    engine next to its textbook baseline."""
    from engines.animator import Animator

    engine = options.engine
    source = load_source(options.source)
    animator = Animator(create_engine(engine))
    animator.set_sources([source])
    frames = _driving_frames(options.driving, options.frames)
    result = {
        "engine": engine.name,
        "size": engine.size,
        "machine": machine_name(),
        "driving": options.driving or "synthetic grace_hopper 640x480",
        **measure(animator, frames, options.warmup),
    }
    baseline_frames = 5 if options.baseline_frames is None else options.baseline_frames
    if engine.name == "warp" and baseline_frames > 0:
        animator.recalibrate()
        result["baseline"] = warp_baseline(animator, frames, baseline_frames)
        result["speedup_vs_baseline"] = result["baseline"]["ms_per_frame"] / result["stages_ms"]["align+engine"]
    return result


def print_animator(result: dict) -> None:
    size = result["size"]
    print(f"engine {result['engine']} at {size}x{size} on {result['machine']}, driving: {result['driving']}")
    print(f"  {result['frames']} frames: {result['fps']:.1f} fps (face tracking + engine, one thread)")
    print(f"  latency per frame: p50 {result['latency_ms']['p50']:.1f} ms, p95 {result['latency_ms']['p95']:.1f} ms")
    for stage, ms in result["stages_ms"].items():
        print(f"  {stage:<16} {ms:7.2f} ms")
    if "baseline" in result:
        b = result["baseline"]
        print(f"  baseline ({b['name']}): {b['ms_per_frame']:.1f} ms/frame over {b['frames']} frames;"
              f" the engine is {result['speedup_vs_baseline']:.0f}x faster")


def run(args: argparse.Namespace) -> int:
    options = bench_options(args)
    if options.engine.name == "xportrait":
        from . import bench_xportrait

        bench, show = ((bench_xportrait.bench_stream, bench_xportrait.print_stream) if options.stream else
                       (bench_xportrait.bench_offline, bench_xportrait.print_offline))
    else:
        bench, show = bench_animator, print_animator
    try:
        result = bench(options)
    except (EngineError, NoFaceError, OSError, ValueError) as e:
        print(f"xportrait bench: error: {e}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0
