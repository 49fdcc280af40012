"""The newest-frame pipeline on its own, as a local camera or a worker process would use it:
RGB arrays in, RGB arrays out, no WebRTC."""

from __future__ import annotations

import asyncio
import threading
import time

import cv2
import numpy as np
import pytest

from engines.face import NoFaceError
from engines.warp import WarpEngine
from streamer import samples
from streamer.pipeline import WORKER_PREFIX, AnimateStage, EchoStage, EnginePool, NoPortrait, Pipeline, PipelineClosed

FPS = 25


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return [frame for frame, _ in samples.driving_clip("astronaut", frames=FPS, fps=FPS)]


def pipeline_threads(within: float = 5.0) -> int:
    """The pipeline's threads still alive, waiting up to `within` seconds for them to end:
    close() lets each finish the job it holds (it does not join them), so on a loaded machine
    one may still be on its way out when close returns."""
    deadline = time.monotonic() + within
    while True:
        alive = sum(t.name.startswith(WORKER_PREFIX) for t in threading.enumerate())
        if alive == 0 or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


async def settle(pipeline: Pipeline, fed: int) -> None:
    """Wait until every fed frame was either processed or dropped."""
    stats = pipeline.stats
    for _ in range(400):
        if stats.frames_processed + stats.dropped_stale + stats.dropped_prepared + stats.errors >= fed:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"frames unaccounted for: {pipeline.snapshot()}")


def test_echo_keeps_only_the_newest_frame_and_returns_a_copy():
    async def main():
        pipeline = Pipeline(EchoStage(), name="echo-test")
        await pipeline.start()
        frames = [np.full((48, 64, 3), value, np.uint8) for value in (10, 20, 30)]
        for frame in frames:  # all at once: the first is taken, the middle one is replaced
            pipeline.feed(frame)
        outputs = []
        await settle(pipeline, 3)
        while pipeline.stats.frames_out < pipeline.stats.frames_processed:
            outputs.append(await pipeline.next_output())
        assert outputs[-1].frame.mean() == 30 and outputs[-1].frame is not frames[-1]  # a copy
        assert pipeline.stats.dropped_stale >= 1 and pipeline.stats.errors == 0
        with pytest.raises(NoPortrait):
            await pipeline.set_portrait(lambda: frames[0])
        await pipeline.close()
        with pytest.raises(PipelineClosed):
            await pipeline.next_output()

    asyncio.run(main())
    assert pipeline_threads() == 0


def test_animate_portraits_resolution_changes_and_the_engine_pool(clip):
    made: list[WarpEngine] = []

    def make() -> WarpEngine:
        made.append(WarpEngine(128))
        return made[-1]

    pool = EnginePool(make)
    astronaut, grace = samples.portrait("astronaut"), samples.portrait("grace_hopper")

    async def run_one() -> dict:
        pipeline = Pipeline(AnimateStage(pool, astronaut))
        await pipeline.start()
        crop = pipeline.stage.animator.sources[0].image.copy()
        outputs = []
        for index, frame in enumerate(clip[:10] + [cv2.resize(f, (320, 240)) for f in clip[10:20]]):
            pipeline.feed(frame)
            await settle(pipeline, index + 1)  # as a camera at its own pace: one frame at a time
            outputs.append((await pipeline.next_output()).frame)
        assert all(o.shape == (128, 128, 3) for o in outputs)
        assert pipeline.stats.resolution_changes == 1
        # A new portrait, loaded and meshed off the threads, swapped in between frames.
        image = await pipeline.set_portrait(lambda: grace)
        assert image is grace
        assert not np.array_equal(pipeline.stage.animator.sources[0].image, crop)
        with pytest.raises(NoFaceError):  # refused: the portrait stays
            await pipeline.set_portrait(lambda: np.full((200, 200, 3), 90, np.uint8))
        await pipeline.recalibrate()
        pipeline.feed(clip[0])
        assert (await pipeline.next_output()).frame.shape == (128, 128, 3)
        snapshot = pipeline.snapshot()
        await pipeline.close()
        return snapshot

    first = asyncio.run(run_one())
    assert first["errors"] == 0 and first["frames_out"] == 21
    assert first["resolution_changes"] == 2  # 640x480 -> 320x240 -> 640x480
    asyncio.run(run_one())
    assert len(made) == 1  # the second pipeline took the first one's engine back from the pool
    assert pipeline_threads() == 0
