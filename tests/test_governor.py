"""The quality governor (streamer/governor.py): it steps down under load, back up when the load
goes, never oscillates on a steady load, and every level it reaches renders frames, the warp
engine's and the diffusion engine's (the tiny model on the CPU) too.

Most tests drive the governor on a simulated clock (a model of the pipeline: the output rate
is what the per-frame cost allows of the camera's rate), so a ten-minute run takes
milliseconds; one runs a real Pipeline with a fake engine whose per-frame cost is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fakes import PortraitEngine

from engines.base import DrivingFrame, Governed, QualityLevel, Rendered, SourcePortrait
from engines.options import OptionError
from streamer.governor import Governor, GovernorOptions, governed_engine, make_levels
from streamer.options import governor_options

LEVELS = [QualityLevel("full"), QualityLevel("cheaper", 0.75), QualityLevel("cheapest", 0.5)]


class SimulatedPipeline:
    """A CPU engine's pipeline on a simulated clock: a frame costs `cost(level, t)` ms, the camera
    sends `camera_fps`; the engine takes the newest frame once it is free (the ones between
    drop), so the output rate is min(camera, 1000 / cost); a frame's latency is its wait, its
    cost, and its level's frames in flight."""

    def __init__(self, governor: Governor, cost, camera_fps: float = 30.0, latency_frames=None, jitter: float = 0.0,
                 seed: int = 0):
        self.governor, self.cost, self.camera_fps = governor, cost, camera_fps
        self.latency_frames = latency_frames or (lambda level: 0)
        self.rng = np.random.default_rng(seed)
        self.jitter = jitter
        self.t = 0.0
        self.arrival = 0  # the camera frame being rendered
        self.dropped = 0
        self.levels_seen: list[int] = []

    def run(self, seconds: float) -> None:
        interval = 1 / self.camera_fps
        end = self.t + seconds
        while self.t < end:
            level = self.governor.level
            ms = self.cost(level, self.t) * (1 + self.jitter * self.rng.uniform(-1, 1))
            done = self.t + ms / 1e3
            latency = (done - self.arrival * interval) * 1e3 + self.latency_frames(level) * interval * 1e3
            self.governor.observe(done, latency, ms)
            self.governor.decide(done, self.camera_fps, self.dropped)
            self.levels_seen.append(self.governor.level)
            newest = int(done / interval)  # the newest camera frame by then
            if newest > self.arrival:  # it waits: the engine takes it at once, frames between drop
                self.dropped += newest - self.arrival - 1
                self.arrival, self.t = newest, done
            else:  # the engine waits for the next frame
                self.arrival += 1
                self.t = self.arrival * interval


def fast_options(**kw) -> GovernorOptions:
    return GovernorOptions(**{"target_fps": 25.0, **kw})


def test_options_are_checked_once_and_name_the_flag():
    with pytest.raises(OptionError, match="--target-fps or --max-latency-ms"):
        GovernorOptions()
    with pytest.raises(OptionError, match="--target-fps must lie"):
        GovernorOptions(target_fps=-3)
    with pytest.raises(OptionError, match="--max-latency-ms must lie"):
        GovernorOptions(max_latency_ms=0)
    with pytest.raises(OptionError, match="steps up only after longer"):
        GovernorOptions(target_fps=25, up_after_s=1, down_after_s=2)
    assert governor_options(SimpleNamespace(target_fps=None, max_latency_ms=None)) is None  # off by default
    assert governor_options(SimpleNamespace(target_fps=30.0, max_latency_ms=None)).target_fps == 30.0


def test_a_light_load_keeps_the_best_level():
    governor = Governor(fast_options(), LEVELS)
    SimulatedPipeline(governor, lambda level, t: 20.0 * LEVELS[level].cost).run(120)
    assert governor.level == 0 and governor.changes == 0


def test_it_steps_down_under_load_and_back_up_when_the_load_goes():
    heavy = lambda t: 5 <= t < 65  # noqa: E731
    cost = lambda level, t: (70.0 if heavy(t) else 20.0) * LEVELS[level].cost  # noqa: E731
    governor = Governor(fast_options(), LEVELS)
    sim = SimulatedPipeline(governor, cost)
    sim.run(5)
    assert governor.level == 0
    sim.run(10)  # 70 ms a frame at the best level, 52.5 at the next, 35 at the last: under 40 ms
    assert governor.level == 2, governor.reason
    assert governor.reason.startswith("down") and "fps" in governor.reason
    sim.run(50)
    assert governor.level == 2 and governor.changes == 2  # held: no trying a level that cannot fit
    sim.run(40)  # the load went at 65 s
    assert governor.level == 0, governor.reason
    assert governor.reason.startswith("up") and "budget" in governor.reason
    assert governor.changes == 4
    assert governor.snapshot()["name"] == "full" and governor.snapshot()["levels"] == ["full", "cheaper", "cheapest"]


def test_a_stream_too_slow_to_fill_a_window_is_still_governed():
    """Under 3 fps (a diffusion engine on a small GPU) a 2 s window never holds the frames a
    judgement needs: the window stretches to hold them, and the governor steps down."""
    governor = Governor(fast_options(), LEVELS)
    sim = SimulatedPipeline(governor, lambda level, t: 1600.0 * LEVELS[level].cost)  # 0.6 fps at the best
    sim.run(60)
    assert governor.level == 2 and governor.changes == 2, governor.reason
    assert governor.reason.startswith("down to cheapest: fps 0.8 under 25.0 (cost 1200.0 ms"), governor.reason
    assert governor.measured["drops_per_s"] > 10  # the camera's frames it could not take


@pytest.mark.parametrize("base_ms", [36.0, 45.0, 52.0, 60.0, 75.0])
def test_a_steady_load_never_oscillates(base_ms):
    """Whatever the steady load, one move per rung at most, then it stays: ten minutes with 20 %
    jitter on every frame's cost, around the target and its hysteresis band."""
    governor = Governor(fast_options(), LEVELS)
    sim = SimulatedPipeline(governor, lambda level, t: base_ms * LEVELS[level].cost, jitter=0.2, seed=int(base_ms))
    sim.run(600)
    assert governor.changes <= 2, governor.reason
    changes_late = sum(a != b for a, b in zip(sim.levels_seen[len(sim.levels_seen) // 10:],
                                              sim.levels_seen[len(sim.levels_seen) // 10 + 1:]))
    assert changes_late == 0


def test_a_ladder_that_misjudges_its_costs_is_learnt_not_oscillated_on():
    """The engine claims its cheaper rung saves 5 % but it saves half: the governor measures the
    ratio at its first move. When the load then eases to where the blend of claim and measure
    still predicts room, the step up fails once; its step down measures the ratio again, and
    from then on the governor stays."""
    real = [1.0, 0.5]
    ladder = [QualityLevel("full"), QualityLevel("cheaper", 0.95)]
    governor = Governor(fast_options(), ladder)
    SimulatedPipeline(governor, lambda level, t: 60.0 * real[level], jitter=0.1).run(600)
    assert governor.level == 1 and governor.changes == 1
    governor = Governor(fast_options(), ladder)
    sim = SimulatedPipeline(governor, lambda level, t: (60.0 if t < 30 else 50.0) * real[level], jitter=0.1)
    sim.run(600)
    assert governor.level == 1 and governor.changes <= 3, governor.reason


def test_a_latency_limit_trades_frames_in_flight():
    """Diffusion-like levels: 4, 3, 2 steps hold 3, 2, 1 frames in flight; at a 25 fps camera
    a 100 ms limit needs 2 steps (150 and 102.5 ms at 4 and 3 steps, 55 ms at 2)."""
    levels = [QualityLevel("4 steps", 1.0, 3), QualityLevel("3 steps", 0.75, 2), QualityLevel("2 steps", 0.5, 1)]
    governor = Governor(GovernorOptions(max_latency_ms=100), levels)
    sim = SimulatedPipeline(governor, lambda level, t: 30.0 * levels[level].cost, camera_fps=25,
                            latency_frames=lambda level: levels[level].latency_frames)
    sim.run(120)
    assert governor.level == 2 and governor.changes == 2
    assert "latency" in governor.reason and "over 100 ms" in governor.reason


# -- a real pipeline with a fake engine --------------------------------------------------------------
class FakeEngine(PortraitEngine):
    """Sleeps `cost_ms * levels[level].cost` per frame; records the level each frame was made at.
    A level other than the best takes `make_s` to make (a diffusion level's compile)."""

    name = "fake"

    def __init__(self, cost_ms: float, make_s: float = 0.0, level: int = 0):
        super().__init__(size=16)
        self.cost_ms, self.make_s = cost_ms, make_s
        self.level = level
        self.made = {level}
        self.made_on: list[str] = []  # the thread each level was made on
        self.rendered_at: list[int] = []
        self.image = np.zeros((16, 16, 3), np.uint8)

    def quality_levels(self):
        return LEVELS

    def make_quality(self, level: int) -> None:
        if level not in self.made:
            time.sleep(self.make_s)
            self.made_on.append(threading.current_thread().name)
            self.made.add(level)

    def quality_ready(self, level: int) -> bool:
        return level in self.made

    def set_quality(self, level: int) -> None:
        self.make_quality(level)
        self.level = level

    def step(self, frame):
        time.sleep(self.cost_ms * LEVELS[self.level].cost / 1e3)
        self.rendered_at.append(self.level)
        self.image[:] = 40 * (self.level + 1)
        return Rendered(self.image, frame.tag)

    def prepare(self, sources): ...


class FakeStage:
    """The pipeline's stage around the fake engine (no face tracking)."""

    takes_portrait, tracks_faces, waits_on_device, frames_without_face = False, False, False, 0

    def __init__(self, engine: FakeEngine):
        self.animator = SimpleNamespace(engine=engine)

    def open(self): ...
    def track(self, rgb, moment, tag):
        zeros = np.zeros((478, 3), np.float32)
        return DrivingFrame(zeros, zeros, moment, tag=tag)
    def render(self, driving): return self.animator.engine.step(driving)
    def release(self, driving): ...
    def realign(self): ...
    def close(self): ...


@contextlib.asynccontextmanager
async def streaming(pipeline, on_output=lambda output: None, fps: float = 30.0):
    """For the block: a camera feeding the pipeline a blank frame at `fps`, and a consumer
    handing each output to `on_output` (the governor measures frames as they are handed out).
    The pipeline is closed at the block's end."""
    frame = np.zeros((16, 16, 3), np.uint8)

    async def camera():
        while not pipeline.closed:
            pipeline.feed(frame)
            await asyncio.sleep(1 / fps)

    async def consume():
        while True:
            on_output(await pipeline.next_output())

    tasks = [asyncio.ensure_future(camera()), asyncio.ensure_future(consume())]
    try:
        yield
    finally:
        await pipeline.close()
        for task in tasks:
            task.cancel()


def eventually(condition, timeout: float = 5.0) -> bool:
    """Waits (off the event loop) until `condition()` holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.realtime
def test_the_pipeline_governs_a_fake_engine_down_and_back_up_and_every_level_renders():
    from streamer.pipeline import Pipeline, worker_threads

    engine = FakeEngine(cost_ms=90.0)  # 90, 67.5, 45 ms a frame: only the last makes 20 fps
    assert isinstance(engine, Governed) and governed_engine(FakeStage(engine)) is engine
    options = GovernorOptions(target_fps=20, window_s=0.8, down_after_s=0.4, up_after_s=1.2)

    async def main():
        pipeline = Pipeline(FakeStage(engine), governor=options)
        await pipeline.start()
        assert pipeline.governor is not None and pipeline.governor.level == 0
        outputs: list[int] = []
        async with streaming(pipeline, lambda out: outputs.append(int(out.frame[0, 0, 0]) // 40 - 1)):
            deadline = time.monotonic() + 8
            while pipeline.governor.level != 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            down = pipeline.snapshot()["quality"]
            await asyncio.sleep(1.0)  # a window at the cheapest level, under the load
            engine.cost_ms = 20.0  # the load goes
            deadline = time.monotonic() + 10
            while pipeline.governor.level != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            up = pipeline.snapshot()["quality"]
        return down, up, outputs

    down, up, outputs = asyncio.run(main())
    assert eventually(lambda: worker_threads() == 0)  # each thread ends after its last job
    assert down["level"] == 2 and down["name"] == "cheapest" and down["reason"].startswith("down"), down
    assert up["level"] == 0 and up["reason"].startswith("up"), up
    assert set(engine.rendered_at) == {0, 1, 2}  # set between frames, on the engine thread
    assert set(outputs) == {0, 1, 2}  # and frames of every level came out


@pytest.mark.realtime
def test_a_session_that_needs_no_other_level_is_not_slowed_by_making_one():
    """Making a level costs the stream (minutes of compile on the GIL): while a session streams
    and its governor needs no cheaper level, none is made (a better one it has room for waits
    too); the session ended, the rest are."""
    from streamer.pipeline import Pipeline

    engine = FakeEngine(cost_ms=5.0, make_s=0.2)  # a light load: the governor stays at the best

    async def main():
        pipeline = Pipeline(FakeStage(engine), governor=GovernorOptions(target_fps=20, window_s=0.8,
                                                                         down_after_s=0.4, up_after_s=1.2))
        await pipeline.start()
        async with streaming(pipeline):
            await asyncio.sleep(2.5)  # room above for longer than up_after_s
            level = pipeline.governor.level
            assert pipeline.snapshot()["quality"]["waiting_for"] == ("full" if level > 0 else None)
            return set(engine.made), level

    made_while_streaming, level = asyncio.run(main())
    assert made_while_streaming == {0} and level == 0
    assert eventually(lambda: engine.made == {0, 1, 2})

    # Started at a lower level (a --tiny-decoder engine), with room above: the better level is
    # wanted (/stats says so), but made only once the session ends.
    engine = FakeEngine(cost_ms=5.0, make_s=0.2, level=1)
    made_while_streaming, level = asyncio.run(main())
    assert made_while_streaming == {1} and level == 1
    assert eventually(lambda: engine.made == {0, 1, 2})


def test_a_governed_server_is_ready_before_its_other_levels_are_made():
    """`serve --target-fps`: prepare() runs a frame at the engine's level and returns; the
    other levels are made afterwards, while the server serves."""
    from streamer import samples
    from streamer.pipeline import EnginePool
    from streamer.server import Config, Server

    engine = FakeEngine(cost_ms=1.0, make_s=0.5)
    server = Server(Config(governor=GovernorOptions(target_fps=20)), EnginePool(lambda: engine))
    server.prepare({"astronaut": samples.portrait("astronaut")})
    assert engine.made == {0}  # ready to serve: the levels below are still being made
    assert eventually(lambda: engine.made == {0, 1, 2}) and engine.made_on == ["xportrait-levels"] * 2


def test_an_ungoverned_pipeline_reports_no_quality():
    from streamer.pipeline import EchoStage, Pipeline

    async def main():
        pipeline = Pipeline(EchoStage(), governor=fast_options())  # echo has no engine to govern
        await pipeline.start()
        try:
            return pipeline.governor, pipeline.snapshot()["quality"]
        finally:
            await pipeline.close()

    assert asyncio.run(main()) == (None, None)


# -- the real engines' levels -------------------------------------------------------------------------
def test_every_warp_level_renders_the_portrait():
    from engines.animator import Animator
    from engines.warp import WarpEngine
    from streamer import samples

    engine = WarpEngine(256)
    animator = Animator(engine)
    animator.set_sources([samples.portrait("astronaut")])
    clip = [frame for frame, _ in samples.driving_clip("astronaut", frames=6, fps=25)]
    try:
        images = []
        for level in range(len(engine.quality_levels())):
            engine.set_quality(level)
            for i, frame in enumerate(clip):
                out = animator.drive(frame, i / 25)
            images.append(out.image.astype(np.float32).copy())
        engine.set_quality(0)
        for i, frame in enumerate(clip):
            again = animator.drive(frame, (len(clip) + i) / 25).image.astype(np.float32)
    finally:
        animator.close()
    for image in images:
        assert image.shape == (256, 256, 3) and image.std() > 20  # a picture
    assert np.abs(images[1] - images[0]).mean() < 3  # a coarser map: nearly the same frame
    assert np.abs(images[2] - images[1]).mean() > np.abs(images[1] - images[0]).mean()  # no matte: the background moves
    assert np.abs(again - images[0]).mean() < 1.5  # back at the best level: the best level's frame


@pytest.fixture(scope="module")
def one_thread():
    from fixtures import one_torch_thread

    with one_torch_thread():
        yield


TINY_RES = 64  # the tiny diffusion model's frames in these tests


def random_stream(seed: int, frames: int, portraits: int = 1):
    """Random portraits (each a one-source list, as prepare() takes) and random driving frames
    at TINY_RES, the face's landmarks centred."""
    rng = np.random.default_rng(seed)

    def picture() -> np.ndarray:
        return rng.integers(0, 256, (TINY_RES, TINY_RES, 3), dtype=np.uint8)

    sources = [[SourcePortrait(picture(), np.zeros((478, 3), np.float32))] for _ in range(portraits)]
    landmarks = np.full((478, 3), TINY_RES / 2, np.float32)
    return sources, [DrivingFrame(landmarks, landmarks, i / 25, tag=i, image=picture()) for i in range(frames)]


def rendered(engine, frames) -> list[tuple[int, np.ndarray]]:
    """(tag, image) of each frame that leaves the engine while `frames` are stepped."""
    out = []
    for frame in frames:
        leaving = engine.step(frame)
        if leaving is not None:
            out.append((leaving.tag, leaving.image.copy()))
    return out


def test_every_diffusion_level_renders_the_frames_a_stream_of_its_settings_does(one_thread):
    """The tiny model on the CPU: at each level (look-ahead, then 4, 3, 2 LCM steps) the engine
    renders exactly what an engine made with that level's settings renders, after that
    level's frames in flight; moving back to a level already made reuses its stream batch."""
    from engines import LiveOptions, XPortraitOptions, create_engine

    def options(steps: int, lookahead: int) -> XPortraitOptions:
        return XPortraitOptions(size=TINY_RES, random_weights=True, model_size="tiny", device="cpu", steps=steps,
                                window=4, live=LiveOptions(lookahead=lookahead))

    (source,), frames = random_stream(3, 5)

    def run(engine) -> list[tuple[int, np.ndarray]]:
        return rendered(engine, frames)

    engine = create_engine(options(4, 1))
    engine.prepare(source)
    levels = engine.quality_levels()
    assert [level.name for level in levels] == ["4 steps + look-ahead 1", "4 steps", "3 steps", "2 steps"]
    assert [level.latency_frames for level in levels] == [4, 3, 2, 1]
    settings = [(4, 1), (4, 0), (3, 0), (2, 0)]
    for level, (steps, lookahead) in enumerate(settings):
        engine.set_quality(level)
        assert engine.latency_frames == steps - 1 + lookahead
        got = run(engine)
        assert [tag for tag, _ in got] == list(range(len(frames) - engine.latency_frames))
        assert all(image.std() > 1 for _, image in got)  # rendered, not blank
        if level == 0:
            continue  # the options' own batch
        fresh = create_engine(options(steps, lookahead))
        fresh.prepare(source)
        want = run(fresh)
        assert [tag for tag, _ in got] == [tag for tag, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert np.array_equal(a, b)
    batch = engine.denoiser
    engine.set_quality(3)
    assert engine.denoiser is batch  # already made: no rebuild
    engine.set_quality(0)
    assert engine.denoiser is not batch and run(engine)[0][0] == 0  # the best level's batch, empty again


def test_a_diffusion_level_is_made_on_another_thread_while_the_engine_steps(one_thread, monkeypatch):
    """The tiny model on the CPU: make_quality on a thread of its own while the portrait changes
    and the engine steps. The frames stepped meanwhile are those of an engine alone; the level
    made renders what an engine of its settings renders for the portrait given *during* its
    making (it was prepared for the old one, and is prepared again)."""
    from engines import LiveOptions, XPortraitOptions, create_engine
    from engines.xportrait import stream

    def options(steps: int) -> XPortraitOptions:
        return XPortraitOptions(size=TINY_RES, random_weights=True, model_size="tiny", device="cpu", steps=steps,
                                window=4, live=LiveOptions())

    (old, new), frames = random_stream(5, 5, portraits=2)

    def run(engine) -> list[np.ndarray]:
        return [image for _, image in rendered(engine, frames)]

    engine = create_engine(options(4))
    engine.prepare(old)
    assert [level.name for level in engine.quality_levels()] == ["4 steps", "3 steps", "2 steps"]
    inside, go = threading.Event(), threading.Event()
    prepare = stream.StreamingDenoiser.prepare

    def held(self, sources):  # the maker's first prepare waits until the portrait has changed
        if threading.current_thread().name == "maker" and not go.is_set():
            inside.set()
            go.wait(10)
        return prepare(self, sources)

    monkeypatch.setattr(stream.StreamingDenoiser, "prepare", held)
    maker = threading.Thread(target=engine.make_quality, args=(2,), name="maker")
    maker.start()
    assert inside.wait(10) and not engine.quality_ready(2)
    engine.prepare(new)
    go.set()
    stepped = run(engine)  # while the maker prepares level 2
    maker.join(60)
    assert engine.quality_ready(2) and engine.denoiser is engine._denoisers[0]  # made, not moved to
    engine.set_quality(2)
    made = run(engine)
    for steps, got in ((4, stepped), (2, made)):
        fresh = create_engine(options(steps))
        fresh.prepare(new)
        want = run(fresh)
        assert len(got) == len(want) == len(frames) - (steps - 1)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), steps


def test_cam_leaves_the_governor_to_the_server_it_streams_to():
    from streamer.options import CamOptions

    with pytest.raises(OptionError, match="--target-fps, --max-latency-ms: the engine runs on the server"):
        CamOptions(server="http://127.0.0.1:8080", governor=fast_options())
    assert CamOptions(governor=fast_options()).governor.target_fps == 25.0


def test_cam_governs_its_local_engine(tmp_path, capsys):
    """`cam --target-fps`: the local pipeline runs the governor on the warp engine's ladder,
    and says each move on the terminal."""
    from engines.warp import WarpEngine
    from streamer import samples
    from streamer.cam import Controls, LocalAvatar
    from streamer.capture import Camera, camera_input
    from streamer.sinks import Feed
    from streamer.video import write_video

    path = tmp_path / "camera.mp4"
    write_video(path, (f for f, _ in samples.driving_clip("astronaut", frames=50, fps=25)), fps=25)
    avatar = LocalAvatar(WarpEngine(256), [samples.portrait("astronaut")], ["astronaut"], 256,
                         governor=GovernorOptions(max_latency_ms=1))  # out of reach: it must step down
    feed = Feed([], 256, 25, avatar.still)
    try:
        with Camera(camera_input(str(path)), loop=True) as camera:
            asyncio.run(avatar.run(camera, feed, Controls(feed), until=time.perf_counter() + 5.0))
    finally:
        feed.close()
    quality = avatar.pipeline.governor.snapshot()
    assert quality["levels"] == ["full", "coarse map", "coarse map, no matte"]
    assert quality["level"] >= 1 and quality["reason"].startswith("down"), (quality, avatar.rendered)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("xportrait cam: quality: ")]
    assert len(said) == quality["changes"] and said[-1] == f"xportrait cam: quality: {quality['reason']}", said


def test_with_a_tiny_decoder_the_full_vae_is_the_rung_above_it(one_thread):
    """--tiny-decoder: the engine starts decoding with it (as asked); the governor's best rung
    decodes with the full VAE, and the tiny decoder is the first rung down. Each renders what
    an engine made with that decoder renders."""
    from engines import LiveOptions, XPortraitOptions, create_engine

    def options(tiny: bool) -> XPortraitOptions:
        return XPortraitOptions(size=TINY_RES, random_weights=True, model_size="tiny", device="cpu", steps=2,
                                window=4, live=LiveOptions(tiny_decoder="random" if tiny else None))

    (source,), frames = random_stream(4, 3)

    def run(engine) -> list[np.ndarray]:
        return [image for _, image in rendered(engine, frames)]

    engine = create_engine(options(tiny=True))
    engine.prepare(source)
    assert [level.name for level in engine.quality_levels()] == ["2 steps, full VAE", "2 steps, tiny decoder"]
    started = run(engine)  # no governor: the tiny decoder, as the options ask
    plain, tiny = create_engine(options(tiny=False)), create_engine(options(tiny=True))
    plain.prepare(source), tiny.prepare(source)
    want_vae, want_tiny = run(plain), run(tiny)
    assert len(started) == 2 and all(np.array_equal(a, b) for a, b in zip(started, want_tiny))
    engine.set_quality(0)
    got = run(engine)
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, want_vae))
    assert not np.array_equal(got[0], started[0])  # another decoder: another picture


def test_levels_are_made_on_their_own_thread_nearest_first_and_each_slow_one_is_logged(monkeypatch, caplog):
    """A governed diffusion engine compiles each level (minutes on a cold compile cache): the
    levels not ready are made on a thread of their own, once per engine, the cheaper ones first
    (nearest first), then the better; each slow one is logged as it is ready, and the GIL
    changes hands quickly meanwhile (the stream's threads wait less for it)."""
    import logging

    from streamer import governor

    levels = LEVELS + [QualityLevel("last", 0.3)]

    class Ladder:
        def __init__(self, made, fails=None):
            self.made, self.fails, self.order, self.switch = set(made), fails, [], []

        def quality_levels(self):
            return levels

        def quality_ready(self, level):
            return level in self.made

        def make_quality(self, level):
            self.switch.append(sys.getswitchinterval())
            if level == self.fails:
                raise RuntimeError("out of memory")  # logged; the governor never goes there
            self.order.append(level)
            self.made.add(level)

    monkeypatch.setattr(governor, "SLOW_LEVEL_S", 0.0)
    before = sys.getswitchinterval()
    engine = Ladder(made={1}, fails=2)  # a --tiny-decoder engine: its own level is the second
    with caplog.at_level(logging.INFO, logger="xportrait.governor"):
        maker = make_levels(engine)
        assert make_levels(engine) is maker  # once per engine
        maker.thread.join(5)
    assert engine.switch == pytest.approx([governor.MAKING_SWITCH_S] * 3) and sys.getswitchinterval() == before
    assert engine.order == [3, 0] and engine.made == {0, 1, 3}  # the cheaper ones (one failed), then the better
    assert maker.failed == {2}  # a governor passes over it
    said = [r.getMessage().split(" ready")[0] for r in caplog.records]
    assert said == ["quality level 3 of 4 (cheapest) could not be made", "quality level 4 of 4 (last)",
                    "quality level 1 of 4 (full)"], said
    caplog.clear()
    monkeypatch.setattr(governor, "SLOW_LEVEL_S", 60.0)  # quick levels say nothing
    make_levels(Ladder(made={0})).thread.join(5)
    assert caplog.records == []


def test_the_governor_moves_only_to_levels_that_are_made():
    """Under load, a level still being made is waited for (and /stats says so); the move comes
    as soon as it is made. Started at the best level made so far, it steps up to the best only
    once that is made."""
    made = {1}
    governor = Governor(GovernorOptions(target_fps=25), LEVELS, start=1, ready=made.__contains__)
    assert governor.level == 1 and governor.reason == "start: the best level made so far"
    sim = SimulatedPipeline(governor, lambda level, t: 60.0 * LEVELS[level].cost, camera_fps=25)  # 45 ms at 1: short
    sim.run(10)
    snap = governor.snapshot()
    assert governor.level == 1 and governor.changes == 0 and snap["waiting_for"] == "cheapest", snap
    assert snap["ready"] == [False, True, False]
    made.add(2)
    sim.run(1.0)
    assert governor.level == 2 and governor.reason.startswith("down to cheapest")
    sim.cost = lambda level, t: 20.0 * LEVELS[level].cost  # the load goes: room above, not made
    sim.run(20)
    assert governor.level == 1 and governor.snapshot()["waiting_for"] == "full"
    made.add(0)
    sim.run(20)
    assert governor.level == 0 and governor.snapshot()["waiting_for"] is None


def test_a_level_that_could_not_be_made_is_passed_over_both_ways():
    """A rung that failed to be made (out of memory while compiling, say) is neither waited for
    nor moved to: under load the governor goes past it to the next rung, and back up past it
    when the rung above is predicted to fit (the two rungs' cost ratios multiplied)."""
    failed = {1}
    governor = Governor(fast_options(), LEVELS, failed=failed.__contains__)
    sim = SimulatedPipeline(governor, lambda level, t: 56.0 * LEVELS[level].cost)  # 56 ms at full, 28 at cheapest
    sim.run(10)
    snap = governor.snapshot()
    assert governor.level == 2 and governor.changes == 1 and snap["waiting_for"] is None, snap
    assert governor.reason.startswith("down to cheapest: fps"), governor.reason
    assert snap["failed"] == [False, True, False]
    sim.cost = lambda level, t: 12.0 * LEVELS[level].cost  # the load goes: full predicted at 12 of 40 ms
    sim.run(20)
    assert governor.level == 0 and governor.changes == 2, governor.reason
    assert governor.reason.startswith("up to full: room: full predicted 12.0 ms"), governor.reason


@pytest.mark.realtime
def test_a_governed_pipeline_starts_at_once_while_its_levels_are_made():
    """The levels below take 1.5 s each to make: frames flow at the best level meanwhile,
    the governor waits for the rung down (made on another thread), then moves."""
    from streamer.pipeline import Pipeline

    engine = FakeEngine(cost_ms=90.0, make_s=1.5)
    options = GovernorOptions(target_fps=20, window_s=0.8, down_after_s=0.4, up_after_s=1.2)

    async def main():
        pipeline = Pipeline(FakeStage(engine), governor=options)
        began = time.perf_counter()
        await pipeline.start()
        started_s = time.perf_counter() - began
        outputs, waited, making = [], [], []

        def seen(_):
            outputs.append(time.perf_counter() - began)
            quality = pipeline.snapshot()["quality"]
            if quality["waiting_for"]:
                waited.append(quality["waiting_for"])
            making.append(quality["making"])

        async with streaming(pipeline, seen):
            deadline = time.monotonic() + 8
            while pipeline.governor.level != 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # Still streaming: the level shows ready a moment before the maker says it is done.
            deadline = time.monotonic() + 2
            while (idle := pipeline.snapshot()["quality"]["making"]) is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return started_s, outputs, waited, making, idle is None

    started_s, outputs, waited, making, idle = asyncio.run(main())
    assert started_s < 0.5  # no level made before the first frame
    assert sum(t < 1.0 for t in outputs) >= 5  # frames while the rung down is being made
    assert engine.made_on == ["xportrait-levels"] * 2  # made off the engine's thread
    assert "cheaper" in waited  # the governor wanted it before it was made
    assert "cheaper" in making and idle  # /stats said it was being made, then that none is
    assert set(engine.rendered_at) == {0, 1, 2}
