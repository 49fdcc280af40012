"""On a CUDA device (not part of the suite): the captured split tick with its main path at
stream priority 0 (the ControlNets' side streams' own) and at MAIN_PRIORITY (above them), in
one process, uncompiled (a capture takes seconds) or with --compile (the first capture
compiles, ~4 min cold; the later ones reuse it), alternating, each replay timed with CUDA
events. SD1.5 with random weights at 512² (or the tiny model), 4 steps, TAESD with random weights.

    python tests/gpu_stream_priority.py [--level-groups 2] [--repeat 2] [--compile] [--model-size tiny --size 64]

Prints the best and median replay per variant.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engines import LiveOptions, XPortraitOptions, create_engine
from engines.base import SourcePortrait
from engines.xportrait.stream import MAIN_PRIORITY


def replay_ms(graph: torch.cuda.CUDAGraph, rounds: int = 5, per_round: int = 12) -> tuple[float, float]:
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(per_round):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / per_round)
    return min(times), float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--level-groups", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--model-size", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    options = XPortraitOptions(size=args.size, model_size=args.model_size, random_weights=True,
                               live=LiveOptions(cuda_graph=False, tiny_decoder="random", level_groups=args.level_groups))
    begin = time.perf_counter()
    engine = create_engine(options)  # no graph yet: captured below, once per variant
    source = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    engine.prepare([SourcePortrait(source, np.zeros((478, 3), np.float32))])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: engine ready in "
          f"{time.perf_counter() - begin:.0f} s; {args.level_groups} passes a tick", flush=True)
    denoiser = engine.denoiser
    for _ in range(args.repeat):
        for priority in (0, MAIN_PRIORITY):
            begin = time.perf_counter()
            denoiser.capture(compile=args.compile, main_priority=priority)
            captured = time.perf_counter() - begin
            best, median = replay_ms(denoiser._graph)
            print(f"main path at priority {priority:2d}: replay best {best:.3f} ms, median {median:.3f} "
                  f"(captured in {captured:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
