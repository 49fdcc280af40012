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

from engines import ENGINES, EngineError, add_engine_arguments, create_engine, engine_options
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
    parser.add_argument("--offline-steps", default="4,8",
                        help="xportrait offline: LCM step counts to time on one window (default: 4,8)")
    add_engine_arguments(parser)


def _load_source(spec: str) -> np.ndarray:
    if not Path(spec).exists():
        from .samples import portrait

        return portrait(spec)  # a bundled name, or a ValueError naming them
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


def bench_xportrait_offline(args: argparse.Namespace) -> dict:
    """The offline diffusion engine on one temporal window: seconds, frames/s and peak GPU
    memory per sampler setting, the released sampler (DDIM 31 steps + CFG 5) as baseline."""
    import torch

    from engines.xportrait.pipeline import SamplerSettings, XPortraitPipeline

    import cv2

    from engines.base import DrivingFrame, SourcePortrait

    # Cost does not depend on what the frames show, and GPU hosts may lack the face mesh and
    # video decoders: the portrait, resized, and turned a little per frame drives the window.
    engine = create_engine("xportrait", args.size, **engine_options(args))
    size = args.size
    source = cv2.resize(_load_source(args.source), (size, size), interpolation=cv2.INTER_AREA)
    engine.prepare([SourcePortrait(source, np.zeros((478, 3), np.float32))])
    window = engine.settings.window
    landmarks = np.zeros((478, 3), np.float32)
    landmarks[:, :2] = size / 2  # the local patches' centres: the middle of the frame
    frames = [cv2.warpAffine(source, cv2.getRotationMatrix2D((size / 2, size / 2), 2.0 * k, 1.0), (size, size))
              for k in range(window)]
    cuda = engine.device.type == "cuda"
    settings = [(f"lcm {n} steps", SamplerSettings(**{**SamplerSettings.lcm(int(n)).__dict__, "seed": args.seed}))
                for n in args.offline_steps.split(",") if n.strip()]
    if args.baseline_frames != 0:
        settings.append(("baseline: released ddim 30 (31 evaluations) + cfg 5", SamplerSettings.released()))
    runs = []
    for i, (label, sampler) in enumerate([("warm-up", SamplerSettings.lcm(1))] + settings):
        engine.pipeline = XPortraitPipeline(engine.model, sampler)
        for k, frame in enumerate(frames):
            engine.step(DrivingFrame(landmarks, landmarks, k / 25, image=frame, tag=k))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rendered = engine.flush()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if i == 0:
            continue
        runs.append({"sampler": label, "frames": len(rendered), "seconds": seconds, "fps": len(rendered) / seconds,
                     "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
    return {"engine": "xportrait (offline, one window)", "size": args.size, "dtype": str(engine.dtype),
            "device": torch.cuda.get_device_name() if cuda else machine_name(),
            "weights": "RANDOM WEIGHTS" if engine.random_weights else "real", "window": window, "runs": runs}


def _cost_inputs(args: argparse.Namespace, count: int):
    """A portrait and `count` driving frames at the engine's size, with no face mesh or video
    decoder needed (GPU hosts may have neither): cost does not depend on what frames show."""
    import cv2

    from engines.base import DrivingFrame

    size = args.size
    source = cv2.resize(_load_source(args.source), (size, size), interpolation=cv2.INTER_AREA)
    landmarks = np.zeros((478, 3), np.float32)
    landmarks[:, :2] = size / 2  # the local patches' centres: the middle of the frame
    frames = [DrivingFrame(landmarks, landmarks, k / 30, tag=k,
                           image=cv2.warpAffine(source, cv2.getRotationMatrix2D((size / 2, size / 2), 2.0 * (k % 16), 1.0),
                                                (size, size)))
              for k in range(count)]
    return source, frames


def bench_xportrait_stream(args: argparse.Namespace) -> dict:
    """The live engine, eager and as a CUDA graph, and the naive baseline, in one run."""
    import torch

    from engines.base import SourcePortrait
    from engines.xportrait.engine import XPortraitStreamEngine, pick_device, to_tensor
    from engines.xportrait.stream import StreamSettings, render_causal

    from export.backend import live_engine_options

    options = {k: v for k, v in live_engine_options(args).items()
               if k not in ("sampler", "guidance", "tiny_decoder", "compile", "stream")}
    if args.profile:  # checked before the long run
        if pick_device(options.get("device")).type != "cuda":
            raise EngineError("--profile needs a CUDA GPU (it profiles the tick's kernels)")
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    source, frames = _cost_inputs(args, args.frames)
    portrait = SourcePortrait(source, np.zeros((478, 3), np.float32))
    runs = []
    # --compile and --tiny-decoder add variants; the eager and graph runs are the baselines.
    variants = [("stream batch, eager", False, False, None), ("stream batch, CUDA graph", True, False, None)]
    if args.compile:
        variants.append(("stream batch, torch.compile + CUDA graph", True, True, None))
    if args.tiny_decoder:
        variants.append(("... + TAESD decoder", True, args.compile, args.tiny_decoder))
    if args.fast_only:
        variants = variants[-1:]
    for label, graph, compiled, decoder in variants:
        built = time.perf_counter()
        engine = XPortraitStreamEngine(args.size, cuda_graph=graph, compile=compiled, tiny_decoder=decoder, **options)
        cuda = engine.device.type == "cuda"
        if graph and not engine.cuda_graph:
            label = "stream batch (no GPU: eager again)"
        engine.prepare([portrait])  # capture (and compilation) happen here
        startup_s = time.perf_counter() - built
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for frame in frames[: args.warmup]:
            engine.step(frame)
        engine.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        entered: dict = {}
        latency, ticks = [], []
        sync()
        start = time.perf_counter()
        for frame in frames[args.warmup:]:
            t0 = time.perf_counter()
            entered[frame.tag] = t0
            out = engine.step(frame)  # returns once the leaving frame is on the host
            t1 = time.perf_counter()
            ticks.append((t1 - t0) * 1e3)
            if out is not None:
                latency.append((t1 - entered.pop(out.tag)) * 1e3)
        sync()
        elapsed = time.perf_counter() - start
        runs.append({"engine": label, "startup_s": startup_s, "frames": len(ticks), "fps": len(ticks) / elapsed,
                     "tick_ms": {"p50": _percentile(ticks, 50), "p95": _percentile(ticks, 95)},
                     "latency_ms": {"p50": _percentile(latency, 50), "p95": _percentile(latency, 95)},
                     "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # progress, in case the run is cut short
    profiled = None
    if args.profile:  # the last run's engine: the fastest configuration asked for
        from dataclasses import asdict

        from .tickprofile import profile_ticks

        profiled = asdict(profile_ticks(engine.denoiser, args.profile))
    # Per module, eager, at the stream batch's shapes (CUDA events).
    model, dtype, device = engine.model, engine.dtype, engine.device
    denoiser = engine.denoiser
    modules = {}
    if device.type == "cuda":
        def timed(fn, repeat=10):
            fn()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize()
            return begin.elapsed_time(end) / repeat
        with torch.no_grad():
            t = denoiser.timesteps
            modules["controlnets x2"] = timed(lambda: model.controls(denoiser.x, t, denoiser.pose, denoiser.local))
            modules["unet + reference + temporal"] = timed(lambda: model.unet(
                denoiser.x, t, model.text, 1, temporal_past=denoiser.temporal_rings()))
            modules["vae decode (1 frame)"] = timed(lambda: model.decode(denoiser.leaving))
            modules["reference net (per source, per level)"] = timed(
                lambda: model.reference_features([denoiser.entering], t[:1]), repeat=3)
    result = {"engine": "xportrait (live)", "size": args.size, "dtype": str(dtype),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else machine_name(),
              "weights": "RANDOM WEIGHTS" if engine.random_weights else "real", "lcm_steps": denoiser.settings.steps,
              "window": denoiser.settings.window, "lookahead": denoiser.settings.lookahead, "runs": runs,
              "modules_ms": modules}
    if profiled is not None:
        result["profile"] = profiled
    # The naive baseline: frame after frame, S sequential batch-1 steps, full VAE decode each.
    count = min(8 if args.baseline_frames is None else args.baseline_frames, len(frames))
    if count <= 0:
        return result
    sources = to_tensor([source], device, dtype)
    driving = to_tensor([f.image for f in frames[:count]], device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    settings = StreamSettings(steps=denoiser.settings.steps, window=denoiser.settings.window, seed=args.seed)
    render_causal(model, settings, sources, driving[:2], driving[:2])  # warm-up
    sync()
    t0 = time.perf_counter()
    latents = render_causal(model, settings, sources, driving, driving)
    for z in latents:
        model.decode(z[None])
    sync()
    naive_ms = (time.perf_counter() - t0) * 1e3 / count
    best = max(r["fps"] for r in runs)
    result["baseline"] = {"name": "naive: frame by frame, eager, S sequential steps, full VAE", "frames": count,
                          "ms_per_frame": naive_ms, "fps": 1e3 / naive_ms}
    result["speedup_vs_baseline"] = best / (1e3 / naive_ms)
    return result


def _print_stream(result: dict, args: argparse.Namespace) -> None:
    print(f"{result['engine']} at {args.size}x{args.size}, {result['dtype']} on {result['device']}, weights: "
          f"{result['weights']}, {result['lcm_steps']} LCM steps in flight, temporal window {result['window']}"
          + (f", look-ahead {result['lookahead']}" if result["lookahead"] else ""))
    for r in result["runs"]:
        peak = f", peak {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
        print(f"  {r['engine']:<28} {r['fps']:7.1f} fps; tick p50 {r['tick_ms']['p50']:.1f} ms; frame in->out "
              f"p50 {r['latency_ms']['p50']:.1f} / p95 {r['latency_ms']['p95']:.1f} ms{peak}")
    for name, ms in result["modules_ms"].items():
        print(f"  {name:<40} {ms:7.2f} ms (eager)")
    if "profile" in result:
        from .tickprofile import TickProfile, format_profile

        print("\n".join(format_profile(TickProfile(**result["profile"]))))
    if "baseline" in result:
        b = result["baseline"]
        print(f"  baseline ({b['name']}): {b['fps']:.2f} fps; best engine run is {result['speedup_vs_baseline']:.1f}x")


def _print_offline(result: dict, args: argparse.Namespace) -> None:
    print(f"{result['engine']} at {args.size}x{args.size}, {result['dtype']} on {result['device']}, "
          f"weights: {result['weights']}, window {result['window']} frames")
    for r in result["runs"]:
        peak = f", peak GPU memory {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
        print(f"  {r['sampler']:<52} {r['seconds']:8.2f} s  {r['fps']:7.2f} frames/s{peak}")


def run(args: argparse.Namespace) -> int:
    if args.profile and not (args.engine == "xportrait" and args.stream):
        print("error: --profile is for --engine xportrait --stream (the live tick)", file=sys.stderr)
        return 2
    if args.engine == "xportrait":
        measure, show = (bench_xportrait_stream, _print_stream) if args.stream else (bench_xportrait_offline, _print_offline)
        try:
            result = measure(args)
        except (EngineError, NoFaceError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            show(result, args)
        return 0
    if args.frames <= args.warmup:
        print("error: --frames must exceed --warmup", file=sys.stderr)
        return 2
    try:
        engine = create_engine(args.engine, args.size, **engine_options(args))
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
    baseline_frames = 5 if args.baseline_frames is None else args.baseline_frames
    if args.engine == "warp" and baseline_frames > 0:
        animator.recalibrate()
        result["baseline"] = warp_baseline(animator, frames, baseline_frames)
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
