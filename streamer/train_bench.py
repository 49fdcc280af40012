"""Training benchmarks (issue 14). Not a test: run by hand, record in BENCHMARKS.md.

    python -m streamer.train_bench loader DATA [--stage motion] [--workers 0 2] [--samples 24]
        samples/s of the training loader with the control images rendered on the fly (in the
        workers) and read from a cache (built first if missing): which keeps a GPU fed.

    python -m streamer.train_bench gpu --out DIR [--data DIR [--cached-controls]] [--steps 6] [--curve-steps 300]
        On a CUDA GPU at SD size (512², RANDOM SD1.5 weights: labelled so): seconds per step and
        peak memory of every stage at 16 frames (the temporal stages; smaller clips where 16 do
        not fit, said so), gradient checkpointing on and off, bf16; then a run of
        --curve-steps steps of the temporal stage whose loss curve is written to DIR/curve.csv.
        Without --data it prepares synthetic talking-head clips from the bundled portraits.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path


def _loader(args) -> int:
    import torch

    from engines.xportrait.train.data import ClipSet
    from engines.xportrait.train.dataset import CACHE, SampleSpec, TrainingSamples, build_control_cache
    from engines.xportrait.train.stages import STAGES

    clips = ClipSet(args.data)
    stage = STAGES[args.stage]
    frames = args.frames or stage.frames
    if not (clips.root / CACHE).is_dir():
        t = time.perf_counter()
        n = build_control_cache(clips)
        print(f"control cache: {n} frames in {time.perf_counter() - t:.1f} s")
    rows = []
    for cached in (False, True):
        for workers in args.workers:
            samples = TrainingSamples(clips, SampleSpec(frames=frames, cached=cached), seed=0, length=args.samples)
            loader = torch.utils.data.DataLoader(samples, batch_size=1, num_workers=workers)
            it = iter(loader)
            next(it)  # workers started, first sample out
            t = time.perf_counter()
            count = 1
            for _ in it:
                count += 1
            rate = (count - 1) / (time.perf_counter() - t)
            rows.append({"controls": "cached" if cached else "on the fly", "workers": workers, "frames": frames,
                         "size": clips.size, "samples_per_s": round(rate, 2), "frames_per_s": round(rate * frames, 1)})
            print(json.dumps(rows[-1]))
    return 0


def _synthetic_data(out: Path, size: int) -> Path:
    from engines.xportrait.train.data import ClipSet, PrepareOptions, prepare
    from engines.xportrait.train.dataset import build_control_cache
    from streamer.samples import driving_clip
    from streamer.video import write_video

    videos = []
    for name in ("astronaut", "grace_hopper"):
        path = out / f"{name}.mp4"
        write_video(path, (f for f, _ in driving_clip(name, frames=120, size=(960, 720))))
        videos.append(path)
    prepare(videos, out / "data", PrepareOptions(size=size))
    build_control_cache(ClipSet(out / "data"))
    return out / "data"


def _gpu(args) -> int:
    import torch

    from engines.xportrait.train.config import build_config
    from engines.xportrait.train.trainer import TrainError, train

    if not torch.cuda.is_available():
        print("train_bench gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else _synthetic_data(out, 512)
    cached = args.cached_controls or not args.data  # the synthetic set comes with its control cache
    device = torch.cuda.get_device_name()
    results = []

    def run(stage, frames, checkpointing, steps, folder, **extra):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        config = build_config(None, stage=stage, data=str(data), base="random", out=str(folder), steps=steps,
                              mixed_precision="bf16", gradient_checkpointing=checkpointing, workers=args.workers,
                              frames=frames if stage in ("temporal", "causal") else None, save=False,
                              log_every=10, lr=1e-5, warmup_steps=0, cached_controls=cached, **extra)
        return train(config, progress=False)

    for stage in args.stages:
        for checkpointing in (True, False):
            frame_options = [16, 12, 8, 4] if stage in ("temporal", "causal") else [1]
            for frames in frame_options:
                try:
                    result = run(stage, frames, checkpointing, args.warmup + args.steps,
                                 out / f"{stage}-{frames}-{'ckpt' if checkpointing else 'nockpt'}",
                                 **({"window": 16} if stage == "causal" else {}))
                except torch.cuda.OutOfMemoryError:
                    results.append({"stage": stage, "frames": frames, "checkpointing": checkpointing, "oom": True})
                    print(json.dumps(results[-1]), flush=True)
                    continue
                timed = result["losses"][args.warmup:]
                results.append({"stage": stage, "frames": frames, "checkpointing": checkpointing,
                                "s_per_step": round(statistics.median(r["seconds"] for r in timed), 3),
                                "peak_gib": round(max(r["peak_gib"] for r in result["losses"]), 1),
                                "note": "" if frames == frame_options[0] else f"{frame_options[0]} frames did not fit"})
                print(json.dumps(results[-1]), flush=True)
                break
    curve = None
    if args.curve_steps:
        try:
            result = run(args.curve_stage, None, True, args.curve_steps, out / "curve")
            curve = out / "curve.csv"
            curve.write_text("step,loss,lr,seconds\n" + "".join(
                f"{r['step']},{r['loss']:.6f},{r['lr']:.3g},{r['seconds']:.3f}\n" for r in result["losses"]))
            print(f"loss curve: {curve} (first {result['losses'][0]['loss']:.4f}, last {result['losses'][-1]['loss']:.4f})")
        except TrainError as e:
            print(f"curve run failed: {e}", file=sys.stderr)
    summary = {"device": device, "resolution": 512, "weights": "RANDOM SD1.5 weights", "precision": "bf16",
               "results": results, "curve": str(curve) if curve else None}
    (out / "bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamer.train_bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    loader = sub.add_parser("loader", help="loader throughput, control images on the fly vs cached")
    loader.add_argument("data")
    loader.add_argument("--stage", default="motion", choices=("motion", "temporal", "causal"))
    loader.add_argument("--frames", type=int)
    loader.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    loader.add_argument("--samples", type=int, default=24)
    gpu = sub.add_parser("gpu", help="seconds per step and peak memory of each stage on a CUDA GPU")
    gpu.add_argument("--out", required=True)
    gpu.add_argument("--data")
    gpu.add_argument("--stages", nargs="+", default=["appearance", "motion", "temporal", "causal"])
    gpu.add_argument("--warmup", type=int, default=2)
    gpu.add_argument("--steps", type=int, default=4)
    gpu.add_argument("--workers", type=int, default=8)
    gpu.add_argument("--curve-steps", type=int, default=300)
    gpu.add_argument("--curve-stage", default="temporal")
    gpu.add_argument("--cached-controls", action="store_true",
                     help="read --data's control cache (`prepare-data --control-cache`): no face models needed")
    args = parser.parse_args(argv)
    return _loader(args) if args.what == "loader" else _gpu(args)


if __name__ == "__main__":
    sys.exit(main())
