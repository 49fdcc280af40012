"""`xportrait bench`: how fast an engine animates, measured the way the streamer runs it.

Per driving frame: face tracking (mediapipe, video mode), then alignment + engine step, as
in `engines.animator.Animator`. Prints fps, per-frame latency p50/p95 and per-stage means,
next to a baseline measured in the same run:

- warp engine: the textbook piecewise-affine warp (scikit-image's PiecewiseAffineTransform
  over the same moved mesh), on a few frames, to show what the rasterised map buys.

`--json` prints one JSON object for machines instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from engines import ENGINES, EngineError, create_engine
from engines.animator import Animator
from engines.face import NoFaceError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default="warp", choices=ENGINES, help="engine to measure (default: warp)")
    parser.add_argument("--size", type=int, default=512, help="square output resolution (default: 512)")
    parser.add_argument("--frames", type=int, default=300, help="driving frames to time (default: 300)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed frames first (default: 10)")
    parser.add_argument("--source", default="astronaut",
                        help="portrait: a bundled name (astronaut, grace_hopper) or an image path")
    parser.add_argument("--driving", help="driving video (default: a synthetic 640x480 clip of grace_hopper)")
    parser.add_argument("--baseline-frames", type=int, default=5,
                        help="frames for the slow baseline (0 skips it; default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _load_source(spec: str) -> np.ndarray:
    from .samples import PORTRAITS, portrait

    if spec in PORTRAITS:
        return portrait(spec)
    from PIL import Image

    with Image.open(spec) as im:
        return np.array(im.convert("RGB"))


def _driving_frames(path: str | None, count: int) -> list[np.ndarray]:
    """Decoded up front, so decoding is not timed; a short video is looped."""
    if path:
        from .video import read_frames

        frames = [f.image for _, f in zip(range(count), read_frames(path))]
    else:
        from .samples import driving_clip

        frames = [frame for frame, _pose in driving_clip("grace_hopper", frames=min(count, 250), fps=25)]
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


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(animator: Animator, frames: list[np.ndarray], warmup: int, fps: float = 25.0) -> dict:
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
        "latency_ms": {"p50": _percentile(total_ms, 50), "p95": _percentile(total_ms, 95)},
        "stages_ms": {"face": float(np.mean(face_ms)), "align+engine": float(np.mean(engine_ms)),
                      **{f"engine.{k}": float(np.mean(v)) for k, v in stages.items() if k != "engine"}},
        "frames_without_face": animator.frames_without_face,
    }


def warp_baseline(animator: Animator, frames: list[np.ndarray], count: int) -> dict:
    """scikit-image's PiecewiseAffineTransform + warp over the same vertices the engine moves."""
    from skimage.transform import PiecewiseAffineTransform, warp

    reenactor = animator.engine._reenactor  # the engine's own mesh, so both warp the same motion
    source = animator.sources[0].image
    times = []
    for i, frame in enumerate(frames[:count]):
        landmarks = animator.tracker.detect(frame)
        if landmarks is None:
            continue
        t0 = time.perf_counter()
        aligned = animator.align(landmarks)
        reenactor.render(aligned, animator.reference)  # moves the vertices (its warp is not used)
        # output -> source, as warp() wants
        transform = PiecewiseAffineTransform.from_estimate(reenactor._vertices, reenactor.src_vertices)
        warp(source, transform, output_shape=source.shape[:2], preserve_range=True).astype(np.uint8)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"name": "scikit-image PiecewiseAffineTransform warp", "frames": len(times),
            "ms_per_frame": float(np.mean(times)) if times else float("nan")}


def run(args: argparse.Namespace) -> int:
    if args.frames <= args.warmup:
        print("error: --frames must exceed --warmup", file=sys.stderr)
        return 2
    try:
        engine = create_engine(args.engine, args.size)
        animator = Animator(engine)
        animator.set_sources([_load_source(args.source)])
        frames = _driving_frames(args.driving, args.frames)
    except (EngineError, NoFaceError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "engine": args.engine,
        "size": args.size,
        "machine": machine_name(),
        "driving": args.driving or "synthetic grace_hopper 640x480",
        **measure(animator, frames, args.warmup),
    }
    if args.engine == "warp" and args.baseline_frames > 0:
        animator.recalibrate()
        result["baseline"] = warp_baseline(animator, frames, args.baseline_frames)
        result["speedup_vs_baseline"] = result["baseline"]["ms_per_frame"] / result["stages_ms"]["align+engine"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"engine {result['engine']} at {args.size}x{args.size} on {result['machine']}, driving: {result['driving']}")
    print(f"  {result['frames']} frames: {result['fps']:.1f} fps (face tracking + engine, one thread)")
    print(f"  latency per frame: p50 {result['latency_ms']['p50']:.1f} ms, p95 {result['latency_ms']['p95']:.1f} ms")
    for stage, ms in result["stages_ms"].items():
        print(f"  {stage:<16} {ms:7.2f} ms")
    if "baseline" in result:
        b = result["baseline"]
        print(f"  baseline ({b['name']}): {b['ms_per_frame']:.1f} ms/frame over {b['frames']} frames;"
              f" the engine is {result['speedup_vs_baseline']:.0f}x faster")
    return 0
