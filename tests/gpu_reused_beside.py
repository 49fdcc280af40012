"""On a CUDA device (not part of the suite): `--deep-levels 0` with the reused entries' first and
last levels beside the deep walk (on a stream of their own) against the same tick in one batch,
and the whole walk, in one process: the frames each captured tick renders from the same
driving frames (beside against after: the same frames within fp16 rounding), then each graph's
replay timed with CUDA events, the variants alternating. SD1.5 with random weights at 512² (or
the tiny model), 4 steps, TAESD with random weights; uncompiled (captures take seconds) or with
--compile (the first capture of each part compiles it, minutes cold).

    python tests/gpu_reused_beside.py [--compile] [--level-groups 1] [--repeat 2] [--model-size tiny --size 64]

Prints per variant the frames' difference from the first variant's and the best and median replay;
exits 1 if beside and one batch differ by more than TOLERANCE of the largest value (session 17 on the H200:
2.4e-3, about 2.5 fp16 steps there, from other cuBLAS tiles at the smaller batches; the whole walk's differ
by 8.5e-2, and rows crossed between entries by O(1)).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gpu_stream_priority import replay_ms

from engines import LiveOptions, XPortraitOptions, create_engine
from engines.base import SourcePortrait

VARIANTS = {"deep 0, reused beside": dict(deep_levels=(0,), reused_beside=True),
            "deep 0, one batch": dict(deep_levels=(0,), reused_beside=False),
            "whole walk": dict(deep_levels=())}
TOLERANCE = 1e-2


def rendered(denoiser, frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The clean latents of these frames, from an empty stream (drained)."""
    denoiser.reset()
    out = []
    for i in range(frames.shape[0] + denoiser.entries - 1):
        leaving = denoiser.tick(frames[i] if i < frames.shape[0] else None, boxes if i < frames.shape[0] else None)
        if leaving is not None:
            out.append(leaving[0].float().clone())
    return torch.cat(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--level-groups", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--model-size", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    frames = torch.from_numpy(rng.integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)).cuda()
    s = args.size
    boxes = torch.tensor([[s // 5, s // 5, s * 2 // 5, s // 3], [s * 3 // 5, s // 5, s * 4 // 5, s // 3],
                          [s * 3 // 10, s * 3 // 5, s * 7 // 10, s * 4 // 5]], device="cuda")
    denoisers, frames_of = {}, {}
    for name, variant in VARIANTS.items():
        begin = time.perf_counter()
        options = LiveOptions(cuda_graph=False, tiny_decoder="random", level_groups=args.level_groups, **variant)
        engine = create_engine(XPortraitOptions(size=s, model_size=args.model_size, random_weights=True, live=options))
        engine.prepare([SourcePortrait(source, np.zeros((478, 3), np.float32))])
        denoiser = denoisers[name] = engine.denoiser
        denoiser.capture(compile=args.compile)
        frames_of[name] = rendered(denoiser, frames, boxes)
        first = next(iter(frames_of.values()))
        diff = (frames_of[name] - first).abs().max().item() / first.abs().max().item()
        print(f"{name}: ready and captured in {time.perf_counter() - begin:.0f} s "
              f"(reused beside: {denoiser.reused_beside}); frames' max difference from the first variant's, "
              f"relative to its largest value: {diff:.2e}", flush=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.level_groups} passes a tick, "
          f"{'compiled' if args.compile else 'uncompiled'}", flush=True)
    for _ in range(args.repeat):
        for name, denoiser in denoisers.items():
            best, median = replay_ms(denoiser._graph)
            print(f"{name:<34} replay best {best:.3f} ms, median {median:.3f}", flush=True)
    beside, batch = frames_of["deep 0, reused beside"], frames_of["deep 0, one batch"]
    diff = (beside - batch).abs().max().item() / batch.abs().max().item()
    if diff > TOLERANCE:
        print(f"FAIL: beside and one batch differ by {diff:.2e} of the largest value (> {TOLERANCE:.0e})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
