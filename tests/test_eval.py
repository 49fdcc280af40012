"""`engines.metrics` and `xportrait eval`: the figures mean what they say on clips whose motion
is known: a still driver gives no error, a driver that moves while the output stays frozen
gives a large one, and the warp engine following a roll shows it in degrees."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fakes import PortraitEngine

from engines import WarpOptions, create_engine
from engines.metrics import FEATURES, compare, evaluate, head_pose, shape_distance
from streamer.cli import main
from streamer.samples import Pose, driving_clip, portrait

SIZE = 256
FPS = 25


class FrozenEngine(PortraitEngine):
    """An engine whose output never moves: the source portrait, every frame."""

    name = "frozen"
    size = SIZE


def moving(t: float) -> Pose:
    """Roll to +-12 degrees and the mouth opening wide, twice over 1.6 s."""
    return Pose(roll_deg=12 * math.sin(2 * math.pi * t / 0.8), mouth=0.8 * math.sin(math.pi * t / 0.8) ** 2)


@pytest.fixture(scope="module")
def astronaut():
    return portrait("astronaut")


@pytest.fixture(scope="module")
def moving_clip():
    return [f for f, _ in driving_clip("grace_hopper", frames=40, fps=FPS, script=moving)]


def test_head_pose_recovers_a_known_rotation():
    rng = np.random.default_rng(1)
    face = rng.normal(size=(478, 3)) * 50 + 200
    for yaw, pitch, roll in ((10, 0, 0), (0, -8, 0), (0, 0, 15), (12, 5, -7)):
        y, p, r = np.radians([-yaw, -pitch, roll])
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
        rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
        turned = (face - 200) @ (rz @ ry @ rx).T * 1.3 + 210
        np.testing.assert_allclose(head_pose(turned, face), [yaw, pitch, roll], atol=1e-6)
    assert shape_distance(face * 2 + 5, face) < 1e-9  # pose and scale removed


def test_a_still_driver_gives_no_error(astronaut):
    still = [f for f, _ in driving_clip("grace_hopper", frames=24, fps=FPS, script=lambda t: Pose())]
    report = evaluate(create_engine(WarpOptions(size=SIZE)), [astronaut], still, FPS).report
    assert report["frames_compared"] == 24
    for axis, error in report["pose_error_deg"].items():
        assert error < 0.5, (axis, error)  # mediapipe's own wobble on still frames: ~0.1-0.3
    for feature, error in report["expression_error"].items():
        assert error < 0.03, (feature, error)
    assert report["jitter"]["still_frames"] >= 16
    assert report["jitter"]["output"] < 0.003
    assert report["background"]["mean_abs_diff"] < 0.5
    assert report["identity"]["source_share"] < 0.5  # the output keeps the astronaut's face


def test_a_frozen_output_gives_a_large_error_and_the_warp_a_small_one(astronaut, moving_clip):
    frozen = evaluate(FrozenEngine(), [astronaut], moving_clip, FPS).report
    warp = evaluate(create_engine(WarpOptions(size=SIZE)), [astronaut], moving_clip, FPS).report
    # The driver rolls +-12 degrees and opens its mouth to ~0.7 of its width.
    assert frozen["features"]["roll"]["driver_range"] > 20
    assert frozen["pose_error_deg"]["roll"] > 4.0
    assert frozen["expression_error"]["mouth"] > 0.1
    assert frozen["correlation"]["roll"] is None or abs(frozen["correlation"]["roll"]) < 0.5
    assert warp["pose_error_deg"]["roll"] < 2.0  # each output frame read on its own, at 256²: ~1.6
    assert warp["correlation"]["roll"] > 0.98
    assert warp["correlation"]["mouth"] > 0.9
    assert warp["expression_error"]["mouth"] < 0.5 * frozen["expression_error"]["mouth"]
    assert set(warp["correlation"]) == set(FEATURES)


def test_compare_checks_its_input(astronaut):
    lm = np.zeros((478, 3), np.float32)
    with pytest.raises(ValueError, match="driver frames"):
        compare([lm, lm], [lm], lm, 0)
    with pytest.raises(ValueError, match="no face"):
        compare([lm], [None], lm, 0)


def test_the_eval_command_writes_json_and_a_plot(tmp_path, capsys):
    report_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["eval", "astronaut", "puppet:grace_hopper", "--frames", "12", "--size", str(SIZE),
                 "--json", str(report_path), "--plot", str(plot_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["frames"] == 12 and report["engine"] == "warp"
    assert set(report["pose_error_deg"]) == {"yaw", "pitch", "roll"}
    assert {"mouth", "eye_right", "eye_left", "brows", "smile"} <= set(report["expression_error"])
    assert {"to_source", "to_driver"} <= set(report["identity"])
    assert "mean_abs_diff" in report["background"] and "output" in report["jitter"]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "roll" in capsys.readouterr().out


def test_eval_stream_runs_the_live_engine_with_its_options(capsys):
    """`--stream`: the live stream batch through the Animator, flushed (its frames come back late,
    matched by tag), with the live options it judges (here `--deep-levels 0` on the tiny model
    with random weights): every frame comes back, and the refusal is the output's missing face
    at the reference frame (random weights draw none), not a missing frame."""
    tiny = ["--engine", "xportrait", "--random-weights", "--model-size", "tiny", "--size", "64", "--device", "cpu",
            "--steps", "3"]
    assert main(["eval", "astronaut", "puppet:grace_hopper", "--frames", "6", *tiny, "--stream",
                 "--deep-levels", "0", "--level-groups", "3"]) == 2
    err = capsys.readouterr().err
    assert "no face found in the output at the reference frame" in err and "returned" not in err
    # Live options are the live engine's: without --stream, and for the warp engine, refused in words.
    for flags, message in ((tiny + ["--deep-levels", "0"],
                            "--deep-levels: only for the live engine (serve, bench --stream, eval --stream)"),
                           (["--stream"], "--stream: only for --engine xportrait")):
        with pytest.raises(SystemExit) as exited:
            main(["eval", "astronaut", "puppet:grace_hopper", "--frames", "6", *flags])
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_report_names_the_stream_it_judged():
    """With --stream the report says what the stream ran with (two configurations' figures side
    by side, e.g. --deep-levels against the whole walk, or two seeds); offline, nothing of it."""
    from engines import LiveOptions, XPortraitOptions
    from streamer.evaluate import full_report
    from streamer.options import EvalOptions

    figures = {"frames": 3}
    live = XPortraitOptions(size=64, steps=3, seed=5, random_weights=True,
                            live=LiveOptions(deep_levels=(0,), level_groups=3))
    report = full_report(EvalOptions(sources=("astronaut",), driving="puppet:grace_hopper", engine=live), figures)
    assert report["stream"] == {"steps": 3, "window": live.window, "seed": 5, "level_groups": 3, "deep_levels": [0],
                                "reuse_controls": False, "token_downsample": 1, "lookahead": 0,
                                "tiny_decoder": None}
    assert report["engine"] == "xportrait" and report["frames"] == 3 and report["sources"] == ["astronaut"]
    offline = XPortraitOptions(size=64, random_weights=True)
    offline = full_report(EvalOptions(sources=("astronaut",), driving="x.mp4", engine=offline), figures)
    assert "stream" not in offline and offline["driving"] == "x.mp4"


def test_the_eval_command_refuses_bad_input(tmp_path, capsys):
    assert main(["eval", "no-such.png", "puppet:grace_hopper"]) == 2
    assert "source image not found" in capsys.readouterr().err
    assert main(["eval", "astronaut", str(tmp_path / "missing.mp4")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["eval", "astronaut", "puppet:nobody"]) == 2
    assert "unknown portrait" in capsys.readouterr().err
    not_video = tmp_path / "x.mp4"
    not_video.write_text("not a video")
    assert main(["eval", "astronaut", str(not_video)]) == 2


def _report(error: float, jitter: float, faceless: int = 0) -> dict:
    """An eval report's judged figures (the rest of a report left out)."""
    return {"features": {"yaw": {"mae": error}, "mouth": {"mae": 2 * error}}, "identity": {"to_source": 0.1},
            "jitter": {"output": jitter}, "background": {"mean_abs_diff": 1.0}, "output_frames_without_face": faceless}


def test_the_bar_is_another_seeds_spread_figure_by_figure():
    from streamer.evaluate import judge

    plain, other = _report(1.0, 0.010), _report(1.3, 0.012)
    within = judge({"lossy": _report(1.2, 0.009), "plain": plain, "another seed": other})
    assert within["within"] and within["judged"] == 6
    assert within["figures"]["yaw error"] == {"lossy": 1.2, "plain": 1.0, "another seed": 1.3, "within": True,
                                              "lossy_off": pytest.approx(0.2), "seed_off": pytest.approx(0.3)}
    over = judge({"lossy": _report(1.2, 0.013), "plain": plain, "another seed": other})  # jitter: 0.003 > 0.002
    assert not over["within"] and over["figures"]["jitter"]["within"] is False
    assert [n for n, r in over["figures"].items() if r["within"] is False] == ["jitter"]
    # A figure one run cannot give (no still frames: no jitter) is not judged, and fails nothing.
    unjudged = judge({"lossy": _report(1.2, float("nan")), "plain": plain, "another seed": other})
    assert unjudged["within"] and unjudged["judged"] == 5 and unjudged["figures"]["jitter"]["within"] is None
    # More frames lost than another seed loses is over the bar too.
    assert not judge({"lossy": _report(1.0, 0.010, 2), "plain": plain, "another seed": other})["within"]


def test_eval_judge_runs_the_lossy_stream_the_plain_one_and_another_seed(monkeypatch, capsys, tmp_path):
    """`--judge`: three runs of the same clip, the options as given, without the lossy ones,
    and without them at the next seed; the verdict in words, in the JSON, and in the exit
    status (3 over the bar). Here the engine and figures are stand-ins (random weights draw
    no face to measure), so the figures are the runs' options, as measured they would be."""
    import streamer.evaluate as evaluate_module
    from engines import metrics

    made = []
    monkeypatch.setattr(evaluate_module, "create_engine", lambda options: made.append(options) or options)

    def figures(engine, sources, frames, fps, reference=None):
        lossy = engine.live.token_downsample > 1
        return metrics.Comparison(None, None, _report(1.0 + 0.1 * (engine.seed - 5) + lossy * shift, 0.01))

    monkeypatch.setattr(metrics, "evaluate", figures)
    argv = ["eval", "astronaut", "puppet:grace_hopper", "--frames", "4", "--engine", "xportrait", "--random-weights",
            "--model-size", "tiny", "--size", "64", "--device", "cpu", "--steps", "3", "--seed", "5", "--stream",
            "--deep-levels", "0", "--token-downsample", "2", "--judge"]
    shift = 0.05
    assert main(argv + ["--json", str(tmp_path / "r.json")]) == 0
    assert [(o.seed, o.live.deep_levels, o.live.token_downsample) for o in made] == [(5, (0,), 2), (5, (), 1),
                                                                                     (6, (), 1)]
    out = capsys.readouterr().out
    assert "within the bar: 6 figures judged" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["judge"]["within"] and saved["lossy"]["stream"]["token_downsample"] == 2
    assert saved["plain"]["stream"]["deep_levels"] == [] and saved["another seed"]["stream"]["seed"] == 6
    shift = 0.2  # further from the plain stream than the next seed (0.1)
    assert main(argv) == 3
    assert "OVER the bar" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--judge"], "--judge compares the live stream's options: give --stream too"),
    (["--stream", "--judge"], "--judge judges a lossy option (--deep-levels, --reuse-controls, --token-downsample)"),
])
def test_eval_judge_needs_the_stream_and_a_lossy_option(capsys, flags, message):
    tiny = ["--engine", "xportrait", "--random-weights", "--model-size", "tiny", "--size", "64", "--device", "cpu"]
    with pytest.raises(SystemExit) as exited:
        main(["eval", "astronaut", "puppet:grace_hopper", "--frames", "4", *tiny, *flags])
    assert exited.value.code == 2 and message in capsys.readouterr().err
