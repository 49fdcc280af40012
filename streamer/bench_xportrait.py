"""`xportrait bench --engine xportrait`: the diffusion engine's cost, next to its baselines.

- offline: one temporal window, per sampler setting (seconds, frames/s, peak GPU memory),
  the released sampler (DDIM 31 evaluations + CFG 5) as the baseline;
- `--stream`: the live engine, eager and as a CUDA graph (and compiled, and with TAESD, when
  asked), against the naive baseline (frame after frame, S sequential steps, full VAE).

Cost does not depend on what the frames show, and GPU hosts may lack the face mesh and video
decoders: the portrait, resized and turned a little per frame, drives the engine directly.
The generic part (the warp engine, the CLI, the tables) is bench.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from engines import create_engine
from engines.base import DrivingFrame, EngineError, SourcePortrait

from .bench import load_source, machine_name, percentile
from .options import BenchOptions


def _cost_inputs(options: BenchOptions, count: int, fps: float) -> tuple[np.ndarray, list[DrivingFrame]]:
    """A portrait and `count` driving frames at the engine's size, no face mesh needed."""
    import cv2

    size = options.engine.size
    source = cv2.resize(load_source(options.source), (size, size), interpolation=cv2.INTER_AREA)
    landmarks = np.zeros((478, 3), np.float32)
    landmarks[:, :2] = size / 2  # the local patches' centres: the middle of the frame
    frames = [DrivingFrame(landmarks, landmarks, k / fps, tag=k,
                           image=cv2.warpAffine(source, cv2.getRotationMatrix2D((size / 2, size / 2), 2.0 * (k % 16), 1.0),
                                                (size, size)))
              for k in range(count)]
    return source, frames


def bench_offline(options: BenchOptions) -> dict:
    """The offline diffusion engine on one temporal window: seconds, frames/s and peak GPU
    memory per sampler setting, the released sampler (DDIM 31 steps + CFG 5) as baseline."""
    import torch

    from engines.xportrait.offline import XPortraitEngine
    from engines.xportrait.pipeline import SamplerSettings

    engine_options = options.engine
    first = create_engine(engine_options)
    window = first.settings.window
    source, frames = _cost_inputs(options, window, fps=25)
    cuda = first.device.type == "cuda"
    settings = [(f"lcm {n} steps", dataclasses.replace(SamplerSettings.lcm(n), seed=engine_options.seed, window=window))
                for n in options.offline_steps]
    if options.baseline_frames != 0:
        settings.append(("baseline: released ddim 30 (31 evaluations) + cfg 5",
                         dataclasses.replace(SamplerSettings.released(), window=window)))
    runs = []
    for i, (label, sampler) in enumerate([("warm-up", dataclasses.replace(SamplerSettings.lcm(1), window=window))]
                                         + settings):
        # One model, one engine per sampler setting.
        engine = XPortraitEngine(engine_options, model=first.model, settings=sampler)
        engine.prepare([SourcePortrait(source, np.zeros((478, 3), np.float32))])
        for frame in frames:
            engine.step(frame)
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
    return {"engine": "xportrait (offline, one window)", "size": engine_options.size, "dtype": str(first.dtype),
            "device": torch.cuda.get_device_name() if cuda else machine_name(),
            "weights": "RANDOM WEIGHTS" if first.random_weights else "real", "window": window, "runs": runs}


def stream_run(engine, frames: list[DrivingFrame], paced_fps: float | None = None, clock=time.perf_counter,
               sleep=time.sleep) -> dict:
    """The live engine over `frames`: back to back, or paced as a camera at `paced_fps` gives
    them (frame k due k / fps after the start; each step takes the newest frame due, older
    ones dropped as the pipeline's one-frame slot drops them, and waits when none is due).
    In->out: from a frame's arrival (its due time, paced) to the step that returned it.
    `steps_late`: camera frames between a frame's step and the step that returned it."""
    count, interval = len(frames), (1 / paced_fps if paced_fps else 0.0)
    arrived: dict = {}
    latency, steps, per_tick, late = [], [], [], []
    ticks = dropped = k = 0
    start = clock()
    while k < count:
        if paced_fps:
            now = clock() - start
            due = min(int(now * paced_fps + 1e-9), count - 1)  # the newest frame the camera has given
            if due < k:
                sleep(k * interval - now)
                continue
            dropped, k = dropped + due - k, due
        frame = frames[k]
        t0 = clock()
        arrived[frame.tag] = (start + k * interval if paced_fps else t0, len(steps))
        out = engine.step(frame)  # returns once the shown frame is on the host
        t1 = clock()
        steps.append((t1 - t0) * 1e3)
        ticks += engine.last_ticks
        per_tick.append(steps[-1] / engine.last_ticks)
        if out is not None:
            entered, step = arrived.pop(out.tag)
            latency.append((t1 - entered) * 1e3)
            late.append(len(steps) - 1 - step)
        k += 1
    elapsed = clock() - start
    return {"frames": len(steps), "paced_fps": paced_fps, "dropped": dropped, "fps": len(steps) / elapsed,
            "ticks_per_step": ticks / len(steps),
            "step_ms": {"p50": percentile(steps, 50), "p95": percentile(steps, 95)},
            "tick_ms": {"p50": percentile(per_tick, 50), "p95": percentile(per_tick, 95)},
            "latency_ms": {"p50": percentile(latency, 50), "p95": percentile(latency, 95)},
            "steps_late": {"p50": percentile(late, 50), "max": max(late, default=0)}}


def module_calls(model, denoiser) -> dict[str, tuple]:
    """What the stream bench times module by module, eager, at a pass's shapes (the whole
    tick's without level groups): name -> (call, repeats)."""
    first = denoiser.groups[0]
    t = first.timesteps
    if denoiser.split:  # the split tick holds the hints' embeddings and the levels' time projections
        controls = lambda: (denoiser._pose_control(first.x, first.times, first.deep),
                            denoiser._local_control(first.x, first.times, first.deep))
    else:
        controls = lambda: model.controls(first.x, t, denoiser.pose, denoiser.local)
    if first.deep is None:
        unet = lambda: model.unet(first.x, t, model.text, 1, temporal_past=denoiser.temporal_rings(),
                                  reference=first.reference)
    else:  # deep levels: the pass's parts (the deep modules' rings hold only its deep entries)
        def unet():
            args = (first.times, first.reference, first.rings, first.deep)
            return denoiser._up(*denoiser._down(first.x, *args), first.times, controls(), *args[1:])
    return {
        "controlnets x2": (controls, 10),
        "unet + reference + temporal": (unet, 10),
        "vae decode (1 frame)": (lambda: model.decode(denoiser.leaving), 10),
        "reference net (per source, per level)": (lambda: model.reference_features([denoiser.entering], t[:1]), 3),
    }


ONE_BATCH = ", deep levels in one batch (baseline)"


def bench_stream(options: BenchOptions) -> dict:
    """The live engine, eager and as a CUDA graph, and the naive baseline, in one run."""
    import torch

    from engines.xportrait.runtime import to_tensor
    from engines.xportrait.stream import StreamSettings, lossy_noise_error, render_causal

    from .options import engine_factory

    from engines.xportrait.runtime import pick_device

    engine_options, live = options.engine, options.engine.live
    if engine_options.model_size == "sd15" and pick_device(engine_options.device).type != "cuda":
        # Minutes of CPU for figures that say nothing about the live engine: refuse at once.
        raise EngineError("the live engine's bench at SD size needs a CUDA GPU (on a CPU: --model-size tiny)")
    if options.profile:
        if pick_device(engine_options.device).type != "cuda":
            raise EngineError("--profile needs a CUDA GPU (it profiles the tick's kernels)")
        from pathlib import Path

        Path(options.profile).mkdir(parents=True, exist_ok=True)  # before the long run
    source, frames = _cost_inputs(options, options.frames, fps=options.paced_fps or 30)
    portrait = SourcePortrait(source, np.zeros((478, 3), np.float32))
    runs = []
    # --compile and --tiny-decoder add variants; the eager and graph runs are the baselines.
    plain = dataclasses.replace(live, compile=False, autotune=False, tiny_decoder=None)
    variants = [("stream batch, eager", dataclasses.replace(plain, cuda_graph=False)),
                ("stream batch, CUDA graph", plain)]
    if live.compile:
        variants.append(("stream batch, torch.compile + CUDA graph",
                         dataclasses.replace(plain, compile=True, autotune=live.autotune)))
    if live.tiny_decoder:
        variants.append(("... + TAESD decoder", dataclasses.replace(plain, compile=live.compile, autotune=live.autotune,
                                                                     tiny_decoder=live.tiny_decoder)))
    if options.fast_only:
        variants = variants[-1:]
    # With more than one tick a frame, the fastest configuration once more at one tick: the baseline, same engine.
    ticks = live.ticks_per_frame
    runs_of = [(label, variant, ticks, "") for label, variant in variants]
    if ticks != 1:
        runs_of.append((*variants[-1], 1, ", 1 tick a frame (baseline)"))
    if live.level_groups > 1:  # likewise one pass a tick: another batch, so another engine (and graph)
        label, variant = variants[-1]
        runs_of.append((label, dataclasses.replace(variant, level_groups=1), 1, ", 1 level group (baseline)"))
    if live.token_downsample > 1:  # likewise every token: what downsampling the keys saves (the rest as asked)
        label, variant = variants[-1]
        runs_of.append((label, dataclasses.replace(variant, token_downsample=1), 1, ", every token (baseline)"))
    if live.deep_levels:  # likewise every level walked whole: the frames the deep features' reuse approximates
        label, variant = variants[-1]
        alone = live.token_downsample == 1  # (with it, the every-token run stands for these two)
        if alone and live.reuse_controls:  # and the ControlNets walked at every level, what reusing them saves
            runs_of.append((label, dataclasses.replace(variant, reuse_controls=False), 1,
                            ", ControlNets at every level (baseline)"))
        elif alone and live.reused_beside and pick_device(engine_options.device).type == "cuda":  # and in one walk
            runs_of.append((label, dataclasses.replace(variant, reused_beside=False), 1, ONE_BATCH))
        runs_of.append((label, dataclasses.replace(variant, deep_levels=(), reuse_controls=False, token_downsample=1),
                        1, ", every level whole (baseline)"))
    engine, made, asked = None, None, None
    for label, variant, run_ticks, suffix in runs_of:
        if suffix == ONE_BATCH and not asked.denoiser.reused_beside:
            continue  # no pass walks its reused entries beside (e.g. 0,2): the run asked for was the one batch
        if made is not variant:
            built = time.perf_counter()
            engine, made = engine_factory(dataclasses.replace(engine_options, live=variant))(), variant
            cuda = engine.device.type == "cuda"
            engine.prepare([portrait])  # capture (and compilation) happen here
            startup_s = time.perf_counter() - built
        if variant.cuda_graph and not engine.cuda_graph:
            label = "stream batch (no GPU: eager again)"
        label += suffix
        asked = asked if suffix else engine
        engine.set_ticks_per_frame(run_ticks)  # a host-side schedule: the same batch and graph
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for frame in frames[: options.warmup]:
            engine.step(frame)
        engine.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        timed = stream_run(engine, frames[options.warmup:], options.paced_fps)
        sync()
        runs.append({"engine": label, "ticks_per_frame": run_ticks, "level_groups": variant.level_groups,
                     "deep_levels": list(variant.deep_levels), "reuse_controls": variant.reuse_controls,
                     "token_downsample": variant.token_downsample,
                     "reused_beside": engine.denoiser.reused_beside,
                     "startup_s": startup_s, **timed,
                     "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # progress, in case the run is cut short
    profiled = None
    engine = asked  # the fastest configuration asked for, not a baseline
    if options.profile:
        from .tickprofile import profile_ticks

        profiled = dataclasses.asdict(profile_ticks(engine.denoiser, options.profile))
    # Per module, eager, at the stream batch's shapes (CUDA events).
    model, dtype, device = engine.model, engine.dtype, engine.device
    denoiser = engine.denoiser
    modules = {}
    if device.type == "cuda" and isinstance(model, torch.nn.Module):
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
            modules = {name: timed(call, repeat) for name, (call, repeat) in module_calls(model, denoiser).items()}
    settings = denoiser.settings
    result = {"engine": "xportrait (live)", "size": engine_options.size, "dtype": str(dtype),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else machine_name(),
              "weights": "RANDOM WEIGHTS" if engine.random_weights else "real", "lcm_steps": settings.steps,
              "window": settings.window, "lookahead": settings.lookahead, "runs": runs, "modules_ms": modules}
    if profiled is not None:
        result["profile"] = profiled
    torch_model = isinstance(model, torch.nn.Module)
    if (settings.deep_levels or settings.token_downsample > 1) and torch_model:
        # The lossy options' error on the predicted noise against the plain walk at the engine's
        # dtype, on the first frames (with random weights it says nothing of a trained model's).
        n = min(8, len(frames))
        clip = to_tensor([f.image for f in frames[:n]], device, dtype)
        errors = lossy_noise_error(model, settings, to_tensor([source], device, dtype), clip, clip)
        result["noise_error"] = {"deep_levels": list(settings.deep_levels), "reuse_controls": settings.reuse_controls,
                                 "token_downsample": settings.token_downsample, "frames": n,
                                 "relative_l2_per_level": errors}
    # The naive baseline: frame after frame, S sequential batch-1 steps, full VAE decode each.
    count = min(8 if options.baseline_frames is None else options.baseline_frames, len(frames))
    if count <= 0:
        return result
    if not torch_model:  # the naive baseline is the torch model's; graphs run the stream only
        result["baseline_skipped"] = f"--backend {live.backend}: the naive baseline runs the torch model"
        return result
    sources = to_tensor([source], device, dtype)
    driving = to_tensor([f.image for f in frames[:count]], device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    naive = StreamSettings(steps=settings.steps, window=settings.window, seed=engine_options.seed)
    render_causal(model, naive, sources, driving[:2], driving[:2])  # warm-up
    sync()
    t0 = time.perf_counter()
    latents = render_causal(model, naive, sources, driving, driving)
    for z in latents:
        model.decode(z[None])
    sync()
    naive_ms = (time.perf_counter() - t0) * 1e3 / count
    best = max(r["fps"] for r in runs)
    result["baseline"] = {"name": "naive: frame by frame, eager, S sequential steps, full VAE", "frames": count,
                          "ms_per_frame": naive_ms, "fps": 1e3 / naive_ms}
    result["speedup_vs_baseline"] = best / (1e3 / naive_ms)
    return result


def _lossy(run: dict) -> list[str]:
    """The lossy options a run (or its noise error) names."""
    side = run.get("token_downsample", 1)
    return ([f"deep at levels {','.join(map(str, run['deep_levels']))}"] if run.get("deep_levels") else []) \
        + (["controls reused"] if run.get("reuse_controls") else []) \
        + ([f"keys of {side}x{side} tokens"] if side > 1 else [])


def print_stream(result: dict) -> None:
    size = result["size"]
    print(f"{result['engine']} at {size}x{size}, {result['dtype']} on {result['device']}, weights: "
          f"{result['weights']}, {result['lcm_steps']} LCM steps in flight, temporal window {result['window']}"
          + (f", look-ahead {result['lookahead']}" if result["lookahead"] else ""))
    for r in result["runs"]:
        peak = f", peak {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
        paced = (f" (paced {r['paced_fps']:g} fps, {r['dropped']} dropped)" if r["paced_fps"] else "")
        ticks = f"; {r['ticks_per_step']:.2f} ticks a frame" if r["ticks_per_frame"] != 1 else ""
        ticks += f"; {r['level_groups']} passes a tick" if r.get("level_groups", 1) > 1 else ""
        ticks += f"; {', '.join(_lossy(r))}" if _lossy(r) else ""
        ticks += " (reused entries beside the deep walk)" if r.get("reused_beside") else ""
        print(f"  {r['engine']:<28} {r['fps']:7.1f} fps{paced}; tick p50 {r['tick_ms']['p50']:.1f} ms{ticks}; "
              f"frame in->out p50 {r['latency_ms']['p50']:.1f} / p95 {r['latency_ms']['p95']:.1f} ms{peak}")
    for name, ms in result["modules_ms"].items():
        print(f"  {name:<40} {ms:7.2f} ms (eager)")
    if "profile" in result:
        from .tickprofile import TickProfile, format_profile

        print("\n".join(format_profile(TickProfile(**result["profile"]))))
    if "noise_error" in result:
        e = result["noise_error"]
        per_level = ", ".join(f"level {k}: {v:.4f}" for k, v in enumerate(e["relative_l2_per_level"]))
        print(f"  lossy options ({', '.join(_lossy(e))}): predicted noise against the plain walk, relative L2 over "
              f"{e['frames']} frames: {per_level}")
    if "baseline_skipped" in result:
        print(f"  baseline skipped: {result['baseline_skipped']}")
    if "baseline" in result:
        b = result["baseline"]
        print(f"  baseline ({b['name']}): {b['fps']:.2f} fps; best engine run is {result['speedup_vs_baseline']:.1f}x")


def print_offline(result: dict) -> None:
    size = result["size"]
    print(f"{result['engine']} at {size}x{size}, {result['dtype']} on {result['device']}, "
          f"weights: {result['weights']}, window {result['window']} frames")
    for r in result["runs"]:
        peak = f", peak GPU memory {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
        print(f"  {r['sampler']:<52} {r['seconds']:8.2f} s  {r['fps']:7.2f} frames/s{peak}")
