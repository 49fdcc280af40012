"""Level groups (`--level-groups G`): a tick steps the S levels in G passes of S / G frames each.

The frames are the ones one pass renders (stream.py's tests pin the denoiser to the offline causal
definition); here the live engine, its quality ladder, the command line and the bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines import LiveOptions, XPortraitOptions, create_engine
from engines.base import SourcePortrait
from engines.options import OptionError
from fixtures import one_torch_thread  # tests/ is on sys.path
from test_xportrait_ticks import RES, driving_frames, shown


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def engine_for(steps: int, groups: int, window: int = 4):
    options = XPortraitOptions(size=RES, random_weights=True, model_size="tiny", device="cpu", steps=steps,
                               window=window, live=LiveOptions(level_groups=groups))
    engine = create_engine(options)
    rng = np.random.default_rng(5)
    engine.prepare([SourcePortrait(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))])
    return engine


def test_two_level_groups_show_the_same_frames_two_camera_frames_sooner():
    """4 steps in 2 passes: each frame out one camera frame after its own (S / G - 1 = 1),
    not S - 1 = 3, with the pixels one pass renders."""
    frames = driving_frames(6)
    grouped, plain = engine_for(steps=4, groups=2), engine_for(steps=4, groups=1)
    assert (grouped.latency_frames, plain.latency_frames) == (1, 3)
    tags, images = shown(grouped, frames)
    plain_tags, plain_images = shown(plain, frames)
    assert tags == [None, 0, 1, 2, 3, 4, 5]
    assert plain_tags == [None, None, None, 0, 1, 2, 3, 4, 5]
    assert len(images) == len(plain_images) == 6
    for got, want in zip(images, plain_images):
        assert np.abs(got.astype(int) - want).max() <= 1  # fp32 in another batch size: rounding at most
    # Not vacuous: the frames differ from one another (each shows its own driving frame).
    assert np.abs(images[0].astype(int) - images[3]).mean() > 1


def test_as_many_groups_as_steps_show_each_frame_on_its_own_step():
    engine = engine_for(steps=2, groups=2)
    assert engine.latency_frames == 0 and engine.denoiser.entries == 1
    tags, _ = shown(engine, driving_frames(3))
    assert tags == [0, 1, 2]


def test_the_quality_ladder_has_each_step_count_in_the_most_groups_that_divide_it_then_in_one_pass():
    """Lower latency first, then the same frames cheaper (one pass of S), then fewer steps."""
    engine = engine_for(steps=4, groups=2)
    levels = engine.quality_levels()
    assert [q.name for q in levels] == ["4 steps in 2 passes", "4 steps", "3 steps", "2 steps in 2 passes", "2 steps"]
    assert [q.latency_frames for q in levels] == [1, 3, 2, 0, 1]
    costs = [q.cost for q in levels]
    assert costs[0] == 1.0 and costs == sorted(costs, reverse=True)  # each rung down is predicted cheaper
    assert costs[1] == pytest.approx(1 / 1.16)
    engine.set_quality(3)
    assert engine.latency_frames == 0 and engine.denoiser.settings.level_groups == 2
    tags, _ = shown(engine, driving_frames(2))
    assert tags == [0, 1]
    engine.set_quality(1)
    assert engine.latency_frames == 3 and engine.denoiser.settings.level_groups == 1


@pytest.mark.parametrize("make, message", [
    (lambda: LiveOptions(level_groups=0), "--level-groups must be at least 1, got 0"),
    (lambda: LiveOptions(level_groups=2, ticks_per_frame=2), "--level-groups and --ticks-per-frame do not combine"),
    (lambda: LiveOptions(level_groups=2, lookahead=1), "--level-groups and --lookahead do not combine"),
    (lambda: XPortraitOptions(random_weights=True, steps=3, live=LiveOptions(level_groups=2)),
     "--level-groups must divide --steps (3 steps in 2 groups)"),
])
def test_level_groups_refuse_what_they_cannot_do(make, message):
    with pytest.raises(OptionError) as error:
        make()
    assert message in str(error.value)


def test_the_command_line_takes_level_groups_for_the_live_engine_only(capsys):
    from streamer.cli import build_parser, main
    from streamer.options import serve_options

    tiny = ("--engine", "xportrait", "--random-weights", "--model-size", "tiny", "--size", "64")
    parser, _ = build_parser(["serve"])
    args = parser.parse_args(["serve", *tiny, "--level-groups", "2", "--token", ""])
    assert serve_options(args).engine.live == LiveOptions(level_groups=2)
    for argv, message in [
        (["bench", *tiny, "--level-groups", "2"], "--level-groups: only for the live engine"),
        (["serve", "--level-groups", "2"], "--level-groups: only for --engine xportrait"),
        (["bench", *tiny, "--stream", "--level-groups", "3"], "--level-groups must divide --steps (4 steps in 3"),
        (["bench", *tiny, "--stream", "--level-groups", "two"], "argument --level-groups: invalid int value"),
    ]:
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2 and message in capsys.readouterr().err, argv


def test_the_stream_bench_times_level_groups_beside_one_group(capsys):
    from streamer.cli import main

    assert main(["bench", "--engine", "xportrait", "--stream", "--random-weights", "--model-size", "tiny", "--size",
                 "64", "--steps", "2", "--frames", "5", "--warmup", "1", "--fast-only", "--baseline-frames", "0",
                 "--level-groups", "2", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["level_groups"] for r in runs] == [2, 1]  # the asked engine, then the baseline's own
    assert runs[1]["engine"].endswith("1 level group (baseline)")
    assert runs[0]["steps_late"] == {"p50": 0, "max": 0}  # 2 steps in 2 passes: out on its own step
    assert runs[1]["steps_late"] == {"p50": 1, "max": 1}
