"""How long frames wait for a device engine in the real newest-frame pipeline, as its step
nears the camera's interval (not part of the suite: a model for BENCHMARKS.md).

The stage stands in for the GPU engine: render sleeps STEP ms (the GIL released, as a CUDA
sync does), track sleeps 6 ms (the face mesh); frames are fed from the event loop at FPS, each
JITTER ms (standard deviation) off its due time, as frames over WebRTC arrive; the loop is kept
busy LOAD ms of every millisecond (aiortc's own work).

    python tests/sim_engine_wait.py --step 32.3 [--fps 30] [--jitter 3] [--load 0.3] [--seconds 10]

Prints the engine's busy share, the frames back, the p50 wait for the engine and in->out.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from engines.base import Rendered
from streamer.pipeline import Pipeline


class DeviceStage:
    takes_portrait = False
    tracks_faces = True
    waits_on_device = True
    frames_without_face = 0

    def __init__(self, step_ms: float):
        self.step_s, self.busy_s = step_ms / 1e3, 0.0
        self.image = np.zeros((8, 8, 3), np.uint8)

    def open(self) -> None: ...
    def realign(self) -> None: ...
    def recalibrate(self) -> None: ...
    def release(self, driving) -> None: ...
    def close(self) -> None: ...

    def track(self, rgb, moment, tag):
        time.sleep(0.006)
        return tag

    def render(self, tag) -> Rendered:
        begin = time.perf_counter()
        time.sleep(self.step_s)
        self.busy_s += time.perf_counter() - begin
        return Rendered(self.image, tag=tag)


async def run(args: argparse.Namespace) -> dict:
    stage = DeviceStage(args.step)
    pipeline = Pipeline(stage, name="sim")
    await pipeline.start()
    frame, rng = np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0)

    async def load():
        while True:
            begin = time.perf_counter()
            while time.perf_counter() - begin < args.load / 1e3:
                pass
            await asyncio.sleep(max(0.0, 1e-3 - args.load / 1e3))

    async def consume():
        while True:
            await pipeline.next_output()

    tasks = [asyncio.ensure_future(job()) for job in (load, consume)]
    start = time.perf_counter()
    for k in range(1, int(args.seconds * args.fps) + 1):
        due = start + k / args.fps + args.jitter * rng.standard_normal() / 1e3
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        pipeline.feed(frame)
    wall = time.perf_counter() - start
    stats = pipeline.snapshot()
    for task in tasks:
        task.cancel()
    await pipeline.close()
    return {"busy": stage.busy_s / wall, "frames": f"{stats['frames_out']}/{stats['frames_in']}",
            "wait_engine_ms": stats["stages_ms"]["wait_engine"], "in_out_ms": stats["latency_ms"]["p50"],
            "dropped": stats["dropped"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", type=float, required=True, help="the engine step, ms")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--jitter", type=float, default=3.0, help="arrival jitter, ms (standard deviation)")
    parser.add_argument("--load", type=float, default=0.3, help="event-loop work a millisecond, ms")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"step {args.step} ms at {args.fps} fps, jitter {args.jitter} ms:", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
