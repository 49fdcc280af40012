"""On a CUDA device (not part of the suite: the suite's machine has none): a quality level made
on a thread of its own, its CUDA graph captured (and with --compile, compiled) there, while
the engine's own thread keeps stepping its captured graph. Checks, with the tiny model:
  - the frames stepped meanwhile equal those of an engine left alone (bit for bit);
  - the level made, once set, renders what a fresh engine of its settings renders;
  - the engine's thread was never held for the making (its slowest step is printed).

    python tests/gpu_check_levels.py [--compile] [--size 64]

Exit 0 when every check holds; the figures are printed.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np

from engines import LiveOptions, XPortraitOptions, create_engine
from engines.base import DrivingFrame, SourcePortrait


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model-size", default="tiny")
    args = parser.parse_args()
    res = args.size

    def options(steps: int) -> XPortraitOptions:
        return XPortraitOptions(size=res, random_weights=True, model_size=args.model_size, steps=steps, window=4,
                                live=LiveOptions(compile=args.compile))

    rng = np.random.default_rng(0)
    source = [SourcePortrait(rng.integers(0, 256, (res, res, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))]
    landmarks = np.full((478, 3), res / 2, np.float32)
    frames = [DrivingFrame(landmarks, landmarks, i / 25, tag=i,
                           image=rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for i in range(12)]

    def run(engine, clip=frames) -> list[np.ndarray]:
        return [r.image.copy() for r in (engine.step(f) for f in clip) if r is not None]

    started = time.perf_counter()
    engine = create_engine(options(4))
    engine.prepare(source)
    print(f"engine ready in {time.perf_counter() - started:.1f} s (captured: {engine.denoiser.captured})", flush=True)
    alone = run(engine)
    engine.reset()
    maker = threading.Thread(target=engine.make_quality, args=(2,), name="xportrait-levels")
    began = time.perf_counter()
    maker.start()
    stepped, slowest, steps = [], 0.0, 0
    while maker.is_alive():  # the stream keeps going while level 2 is made
        engine.reset()
        t0 = time.perf_counter()
        stepped = run(engine)
        slowest = max(slowest, (time.perf_counter() - t0) / len(frames))
        steps += len(frames)
    maker.join()
    made_s = time.perf_counter() - began
    engine.reset()
    stepped_after = run(engine)
    print(f"level 2 made in {made_s:.1f} s while the engine stepped {steps} frames "
          f"(slowest clip {slowest * 1e3:.1f} ms a frame)", flush=True)
    ok = engine.quality_ready(2) and len(stepped) == len(alone)
    ok &= all(np.array_equal(a, b) for a, b in zip(stepped, alone))
    ok &= all(np.array_equal(a, b) for a, b in zip(stepped_after, alone))
    print(f"frames stepped while making equal the engine alone: {ok}", flush=True)
    if not ok and len(stepped) == len(alone):
        print("  max abs difference:", max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(stepped, alone)))
    engine.set_quality(2)
    made = run(engine)
    fresh = create_engine(options(2))
    fresh.prepare(source)
    want = run(fresh)
    same = len(made) == len(want) == len(frames) - 1 and all(np.array_equal(a, b) for a, b in zip(made, want))
    print(f"the level made renders what a fresh 2-step engine renders: {same}", flush=True)
    if not same and len(made) == len(want):
        print("  max abs difference:", max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(made, want)))
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
