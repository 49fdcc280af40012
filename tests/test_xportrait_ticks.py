"""More than one stream tick per camera frame (`--ticks-per-frame 2|auto`).

The extra tick enters the same frame again (StreamingDenoiser.tick_again), so the live engine
is pinned to the offline causal definition over the clip with each frame repeated as the
engine entered it; each frame is shown once (its first copy to leave), and a frame is out in
fewer camera intervals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import LiveOptions, OptionError, XPortraitOptions, create_engine
from engines.base import DrivingFrame, SourcePortrait
from engines.face import local_patch_boxes
from engines.xportrait.live import TickPacer
from engines.xportrait.stream import control_hints, render_causal
from fixtures import one_torch_thread  # tests/ is on sys.path

RES = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def engine_for(steps: int, ticks, window: int = 4):
    options = XPortraitOptions(size=RES, random_weights=True, model_size="tiny", device="cpu", steps=steps,
                               window=window, live=LiveOptions(ticks_per_frame=ticks))
    engine = create_engine(options)
    rng = np.random.default_rng(5)
    engine.prepare([SourcePortrait(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))])
    return engine


def driving_frames(count: int, interval: float = 1 / 30) -> list[DrivingFrame]:
    """Random frames, each with its own eye/mouth patch centres, `interval` seconds apart."""
    rng = np.random.default_rng(6)
    frames = []
    for i in range(count):
        landmarks = np.zeros((478, 3), np.float32)
        landmarks[:, :2] = rng.uniform(RES / 4, 3 * RES / 4, 2)
        frames.append(DrivingFrame(landmarks, landmarks, i * interval, tag=i,
                                   image=rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)))
    return frames


def shown(engine, frames):
    """(tags returned per step, images), the flush's appended."""
    tags, images = [], []
    for frame in frames:
        rendered = engine.step(frame)
        tags.append(None if rendered is None else rendered.tag)
        if rendered is not None:
            images.append(rendered.image.copy())
    flushed = engine.flush()
    return tags + [r.tag for r in flushed], images + [r.image for r in flushed]


def test_the_live_engine_with_two_ticks_a_frame_equals_the_offline_definition_over_the_repeated_clip():
    """Each frame is shown once, one camera frame after it came in (not S - 1 = 2), and its
    pixels are its first copy's in the offline causal render of the clip, each frame twice."""
    engine = engine_for(steps=3, ticks=2)
    assert engine.latency_frames == 1
    frames = driving_frames(3)
    tags, images = shown(engine, frames)
    assert tags == [None, 0, 1, 2] and engine.last_ticks == 2

    # The offline definition: every frame entered twice, as the engine entered it.
    twice = [f for f in frames for _ in range(2)]
    image = torch.from_numpy(np.stack([f.image for f in twice]))
    boxes = torch.from_numpy(np.stack([local_patch_boxes(f.landmarks, RES) for f in twice]))
    latents = render_causal(engine.model, engine.denoiser.settings, engine._sources,
                            *control_hints(image, boxes, torch.float32))
    with torch.no_grad():
        pixels = engine.model.decode(latents[0::2]).permute(0, 2, 3, 1)  # the first copies
    expected = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    from engines.xportrait.runtime import RANDOM_WEIGHTS_LABEL, label_overlay

    outside = ~label_overlay(RES, RES, RANDOM_WEIGHTS_LABEL)[0][..., 0]
    for got, want in zip(images, expected):
        assert np.abs(got[outside].astype(int) - want[outside]).max() <= 1
    # Not vacuous: one tick a frame renders other pixels from the second frame on.
    once = engine_for(steps=3, ticks=1)
    tags_once, images_once = shown(once, frames)
    assert tags_once == [None, None, 0, 1, 2]
    assert np.array_equal(images_once[0], images[0])  # the first frame has no past either way
    assert np.abs(images_once[2].astype(int) - images[2]).mean() > 1
    with pytest.raises(RuntimeError, match="the last tick entered none"):  # after the flush's empty ticks
        engine.denoiser.tick_again()


class TickClock:
    """The engine on a clock that moves one unit for each tick it runs (and on a sleep):
    in->out in ticks, the same on any machine under any load."""

    def __init__(self, engine):
        self.engine, self.now = engine, 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)

    def step(self, frame):
        out = self.engine.step(frame)
        self.now += self.engine.last_ticks
        return out

    @property
    def last_ticks(self) -> int:
        return self.engine.last_ticks


def test_two_ticks_a_frame_halve_a_paced_frames_way_out():
    """A camera frame every 4 ticks (two fit): with 4 steps a frame is out one camera frame
    after its own, two ticks in (T + 2 = 6 ticks), instead of S - 1 = 3 frames and one tick
    (3T + 1 = 13). At T = 2 ticks: S = 4 ticks instead of 2S - 1 = 7."""
    from streamer.bench_xportrait import stream_run

    engine = engine_for(steps=4, ticks=1)
    runs = {}
    for ticks in (1, 2):
        engine.reset()
        engine.set_ticks_per_frame(ticks)
        clock = TickClock(engine)
        runs[ticks] = stream_run(clock, driving_frames(6, interval=4.0), paced_fps=1 / 4, clock=clock,
                                 sleep=clock.sleep)
    once, twice = runs[1], runs[2]
    assert once["steps_late"] == {"p50": 3, "max": 3} and twice["steps_late"] == {"p50": 1, "max": 1}
    assert once["dropped"] == twice["dropped"] == 0 and twice["ticks_per_step"] == 2
    assert once["latency_ms"] == {"p50": 13e3, "p95": 13e3}  # "ms": thousandths of a tick here
    assert twice["latency_ms"] == {"p50": 6e3, "p95": 6e3}


def test_auto_ticks_twice_where_the_frame_interval_leaves_room_and_once_where_it_does_not():
    frames = driving_frames(3, interval=1000.0)  # a frame every 1000 s: a second tick always fits
    engine = engine_for(steps=3, ticks="auto")
    ticks, spare = [], []
    for frame in frames:
        engine.step(frame)
        ticks.append(engine.last_ticks)
        spare.append(engine.timings.last["spare"])
    assert ticks == [1, 2, 2]  # the first frame: no interval known yet
    # The second tick's time is room the interval had, not the frame's cost (the governor's).
    assert spare[0] == 0 and 0 < spare[1] < engine.timings.last["engine"]
    assert engine.latency_frames == 2  # auto's word to the governor: the most it can be (one tick)
    engine.reset()
    ticks = []
    for frame in driving_frames(3, interval=1e-6):  # a frame every microsecond: never
        engine.step(frame)
        ticks.append(engine.last_ticks)
    assert ticks == [1, 1, 1]


def test_the_pacer_reads_the_camera_interval_from_frame_times_and_discounts_a_late_start():
    pacer = TickPacer(margin=0.0)
    pacer.start(0.0, now=100.0)
    assert not pacer.another(now=100.010)  # no interval known yet
    pacer.start(1 / 30, now=100.0 + 1 / 30)
    assert pacer.another(now=100.0 + 1 / 30 + 0.010)  # 10 ms used, 10 ms more fits in 33
    assert not pacer.another(now=100.0 + 1 / 30 + 0.025)  # 25 ms used: the slowest recent tick (15) does not
    # Frame 3 was dropped: a gap of two intervals does not make room for a longer step.
    pacer.start(3 / 30, now=100.0 + 3 / 30)
    assert not pacer.another(now=100.0 + 3 / 30 + 0.020)  # 20 ms used, 20 more: over 33 ms, not over 67
    pacer = TickPacer(margin=0.0)
    for k in range(3):
        pacer.start(k / 30, now=100.0 + k / 30)
        pacer.another(now=100.0 + k / 30 + 0.010)
    pacer.start(3 / 30, now=100.0 + 3 / 30 + 0.020)  # the engine took this frame 20 ms late
    assert not pacer.another(now=100.0 + 3 / 30 + 0.030)  # 10 + 10 ms fit in 33, not in the 13 left
    pacer.reset()
    pacer.start(50.0, now=200.0)  # a new stream: its times start elsewhere
    assert not pacer.another(now=200.010)


def test_ticks_per_frame_is_one_two_or_auto():
    with pytest.raises(OptionError, match="--ticks-per-frame must be one of 1, 2, auto, got 3"):
        LiveOptions(ticks_per_frame=3)
    engine = engine_for(steps=2, ticks=1)
    with pytest.raises(OptionError, match="--ticks-per-frame"):
        engine.set_ticks_per_frame(0)
    assert engine.options.live.ticks_per_frame == 1


def test_the_command_line_takes_ticks_per_frame_for_the_live_engine_only(capsys):
    from streamer.cli import build_parser, main
    from streamer.options import bench_options, serve_options

    def parsed(*argv):
        parser, _ = build_parser(list(argv))
        return parser.parse_args(list(argv))

    tiny = ("--engine", "xportrait", "--random-weights", "--model-size", "tiny", "--size", "64")
    assert serve_options(parsed("serve", *tiny, "--ticks-per-frame", "auto", "--token", "")).engine.live == \
        LiveOptions(ticks_per_frame="auto")
    bench = bench_options(parsed("bench", *tiny, "--stream", "--ticks-per-frame", "2", "--paced-fps", "30"))
    assert bench.engine.live.ticks_per_frame == 2 and bench.paced_fps == 30
    for argv, message in [
        (["bench", *tiny, "--ticks-per-frame", "2"], "--ticks-per-frame: only for the live engine"),
        (["bench", *tiny, "--stream", "--ticks-per-frame", "3"], "--ticks-per-frame must be one of 1, 2, auto"),
        (["bench", *tiny, "--stream", "--ticks-per-frame", "often"], "argument --ticks-per-frame: 1, 2 or auto"),
        (["bench", *tiny, "--paced-fps", "30"], "--paced-fps is for --engine xportrait --stream"),
        (["bench", *tiny, "--stream", "--paced-fps", "0"], "--paced-fps must be positive, got 0.0"),
        (["export", "--to", "g", "--random-weights", "--ticks-per-frame", "2"], "--ticks-per-frame: not for export"),
    ]:
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2 and message in capsys.readouterr().err, argv


def test_the_stream_bench_paces_the_clip_and_times_one_tick_a_frame_beside_two(capsys):
    import json

    from streamer.cli import main

    assert main(["bench", "--engine", "xportrait", "--stream", "--random-weights", "--model-size", "tiny", "--size",
                 "64", "--steps", "2", "--frames", "5", "--warmup", "1", "--fast-only", "--baseline-frames", "0",
                 "--paced-fps", "1000", "--ticks-per-frame", "2", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["ticks_per_frame"] for r in runs] == [2, 1]  # the asked schedule, then the baseline on the same engine
    assert runs[1]["engine"].endswith("1 tick a frame (baseline)")
    for run in runs:
        # A camera at 1000 fps outruns a CPU tick: the newest frame is taken, the others dropped.
        assert run["paced_fps"] == 1000 and run["frames"] + run["dropped"] == 4 and run["dropped"] > 0
    assert runs[0]["ticks_per_step"] == 2 and runs[0]["steps_late"]["max"] == 0  # S = 2: out on its own frame
    assert runs[1]["steps_late"] == {"p50": 1, "max": 1}
