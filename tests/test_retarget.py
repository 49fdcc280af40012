"""Retargeting, live (engines/retarget.py): each control changes what it names, and only that,
measured with mediapipe on what the engines make of it.

A scripted clip of Grace Hopper (streamer.samples' puppet) drives the astronaut: a neutral
start (the reference), then the head rolls 12 degrees and shifts while the mouth opens, a
blink, the mouth held open. The warp engine's output frames are meshed; for the diffusion
engine (the tiny model, on the CPU) the driving image that reaches its motion ControlNet is.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from engines import WarpOptions, create_engine
from engines.animator import Animator
from engines.face import FaceTracker, eye_opening, head_roll, mouth_opening
from engines.options import OptionError
from engines.retarget import NEUTRAL, RAMP_FRAMES, Retargeter, Retargeting
from streamer.samples import Pose, driving_clip

SIZE = 256
FPS = 25
FRAMES = 18
BLINK = (14, 15)
ROLL = 12.0


def script(t: float) -> Pose:
    i = round(t * FPS)
    if i < 4:
        return Pose()
    k = min((i - 4) / 6, 1.0)
    return Pose(roll_deg=ROLL * k, dx=20 * k, mouth=0.45 * k, blink=1.0 if i in BLINK else 0.0)


@pytest.fixture(scope="module")
def clip():
    """The driving frames and their meshes (tracked once: every run reuses them)."""
    frames = [frame for frame, _ in driving_clip("grace_hopper", frames=FRAMES, fps=FPS, size=(480, 360), script=script)]
    with FaceTracker(video=True) as tracker:
        marks = [tracker.detect(frame) for frame in frames]
    assert all(m is not None for m in marks)
    return frames, marks


@pytest.fixture(scope="module")
def eye():
    with FaceTracker(video=False) as tracker:
        yield tracker


def measure(tracker: FaceTracker, image: np.ndarray) -> tuple[float, float, float]:
    landmarks = tracker.detect(np.ascontiguousarray(image))
    assert landmarks is not None, "the frame must still show a face"
    return head_roll(landmarks), mouth_opening(landmarks), eye_opening(landmarks)


def warp_run(clip, eye, settings: Retargeting | None = None, change: dict | None = None) -> np.ndarray:
    """(frames, 3) roll, mouth, eyes of the warp engine's output; `change`: {frame: settings}."""
    frames, marks = clip
    animator = Animator(create_engine(WarpOptions(SIZE)), retargeting=settings or NEUTRAL)
    animator.set_sources([data.astronaut()])
    rows = []
    for i, (frame, lm) in enumerate(zip(frames, marks)):
        if change and i in change:
            animator.retarget(change[i])
        rows.append(measure(eye, animator.drive(frame, i / FPS, landmarks=lm).image))
    return np.array(rows)


@pytest.fixture(scope="module")
def as_driven(clip, eye):
    return warp_run(clip, eye)


# -- the settings -------------------------------------------------------------------------------------
def test_settings_are_validated_once_with_the_flag_or_field_named():
    assert NEUTRAL.neutral and not Retargeting(eyes="open").neutral
    for kwargs, named in (({"head_pose": 2.5}, "--head-pose"), ({"expression": -0.1}, "--expression"),
                          ({"mouth_open": float("nan")}, "--mouth-open"), ({"mouth_open": True}, "--mouth-open"),
                          ({"eyes": "shut"}, "--eyes")):
        with pytest.raises(OptionError, match=named):
            Retargeting(**kwargs)
    updated = NEUTRAL.updated({"type": "retarget", "head_pose": 0, "eyes": "open"})
    assert updated == Retargeting(head_pose=0.0, eyes="open")
    assert updated.updated({"mouth_open": 1.5}) == Retargeting(head_pose=0.0, mouth_open=1.5, eyes="open")
    for message, said in (({"head_pose": "0"}, "head_pose must be a number"), ({"head_pose": 10 ** 400}, "head_pose"),
                          ({"mouth_open": 4}, r"mouth_open must be in \[0, 3\]"), ({"smile": 1}, "unknown retarget field"),
                          ({"eyes": ["open"]}, "eyes must be one of"), ([1, 2], "JSON object")):
        with pytest.raises(ValueError, match=said):
            NEUTRAL.updated(message)


def test_neutral_controls_leave_the_mesh_untouched():
    rng = np.random.default_rng(0)
    reference = rng.normal(100, 20, (478, 3)).astype(np.float32)
    driving = reference + rng.normal(0, 2, (478, 3)).astype(np.float32)
    before = driving.copy()
    assert Retargeter().apply(driving, reference) is False
    assert np.array_equal(driving, before)


# -- each control, on the warp engine's output ----------------------------------------------------------
def test_head_pose_zero_holds_the_head_while_the_mouth_still_follows(clip, eye, as_driven):
    steady = warp_run(clip, eye, Retargeting(head_pose=0.0))
    roll, mouth = as_driven[:, 0], as_driven[:, 1]
    assert roll[-1] - roll[0] > 0.7 * ROLL  # as driven, the portrait rolls
    assert np.abs(steady[:, 0] - steady[0, 0]).max() < 2.0  # steady: within 2 degrees of the reference pose
    opened = slice(10, None)
    assert steady[opened, 1].min() > mouth[0] + 0.15  # the mouth still opens...
    assert np.abs(steady[opened, 1] - mouth[opened]).max() < 0.12  # ...as far as driven
    assert steady[BLINK[0], 2] < 0.6 * steady[0, 2]  # and blinks pass through


def test_expression_zero_gives_the_neutral_face_on_a_moving_head(clip, eye, as_driven):
    calm = warp_run(clip, eye, Retargeting(expression=0.0))
    neutral = as_driven[0]
    assert np.abs(calm[:, 1] - neutral[1]).max() < 0.03  # the mouth stays as at the reference
    assert np.abs(calm[:, 2] - neutral[2]).max() < 0.03  # so do the eyes, through the blink
    assert np.abs(calm[:, 0] - as_driven[:, 0]).max() < 2.0  # the head moves as driven


def test_eyes_open_keeps_the_eyes_open_through_a_blink(clip, eye, as_driven):
    kept = warp_run(clip, eye, Retargeting(eyes="open"))
    blink = list(BLINK)
    assert as_driven[blink, 2].max() < 0.5 * as_driven[0, 2]  # as driven, the blink shuts them
    assert kept[blink, 2].min() > 0.9 * as_driven[0, 2]
    assert np.abs(kept[:, 1] - as_driven[:, 1]).max() < 0.06  # the mouth as driven
    assert np.abs(kept[:, 0] - as_driven[:, 0]).max() < 1.5  # and the head


def test_mouth_open_gain_scales_the_opening_only(clip, eye, as_driven):
    closed = warp_run(clip, eye, Retargeting(mouth_open=0.0))
    half = warp_run(clip, eye, Retargeting(mouth_open=0.5))
    wider = warp_run(clip, eye, Retargeting(mouth_open=1.5))
    opened = slice(10, None)
    rest = as_driven[0, 1]  # the portrait's own mouth (a smile: parted lips)
    driven = (as_driven[opened, 1] - rest).mean()
    assert np.abs(closed[:, 1] - rest).max() < 0.03
    # Half the gain, half the opening in the mesh the engine gets; read back from the rendered
    # frame a small opening reads smaller still (the warp draws lips round it: 0.25 measured).
    assert 0.2 < (half[opened, 1] - rest).mean() / driven < 0.7
    # Wider still (mediapipe reads a mouth this wide short, where the jaw meets the collar).
    assert (wider[opened, 1] - rest).mean() > driven + 0.01
    for run in (closed, half, wider):
        assert np.abs(run[:, 0] - as_driven[:, 0]).max() < 1.5
        assert run[BLINK[0], 2] < 0.6 * run[0, 2]


def test_a_change_ramps_over_a_few_frames_never_jumps(clip, eye, as_driven):
    """Head pose 1 -> 0 at frame 12 (head rolled 12 degrees): the roll comes back over
    RAMP_FRAMES frames, at most 1/RAMP_FRAMES of the way each frame."""
    ramped = warp_run(clip, eye, change={12: Retargeting(head_pose=0.0)})
    roll = ramped[:, 0]
    assert np.array_equal(roll[:12], as_driven[:12, 0])  # bit-identical output until the change
    steps = np.abs(np.diff(roll[11:]))
    full = abs(as_driven[12, 0] - as_driven[0, 0])
    assert steps.max() < full / RAMP_FRAMES + 1.0
    left = 1 - (FRAMES - 12) / RAMP_FRAMES  # of the head's motion, after the last frame's step
    assert abs((roll[-1] - roll[0]) - left * full) < 1.5
    # The values themselves: one frame at a time.
    retargeter = Retargeter()
    retargeter.settings = Retargeting(head_pose=0.0, mouth_open=3.0, eyes="open")
    values = []
    reference = np.asarray(clip[1][0], np.float64)
    for _ in range(3 * RAMP_FRAMES):
        retargeter.apply(np.array(clip[1][-1]), reference)
        values.append(list(retargeter.current.values()))
    values = np.array(values)
    assert np.abs(np.diff(values, axis=0)).max() <= 1 / RAMP_FRAMES + 1e-12
    assert values[-1].tolist() == [1.0, 0.0, 3.0, 1.0, 1.0]


# -- the diffusion engine: the driving image its ControlNets see ----------------------------------------
DIFFUSION_SIZE = 128


def _hints(engine) -> list[np.ndarray]:
    """Every pose hint the motion ControlNet is given from now on, as uint8 images."""
    seen = []

    def hook(module, args):
        hint = args[3]
        seen.extend(((hint.float().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy())

    engine.model.pose_controlnet.register_forward_pre_hook(hook)
    return seen


def _diffusion_run(clip, settings: Retargeting, frames: int):
    import torch

    from engines import LiveOptions, XPortraitOptions
    from fixtures import one_torch_thread

    engine = create_engine(XPortraitOptions(size=DIFFUSION_SIZE, random_weights=True, model_size="tiny", device="cpu",
                                            steps=1, window=2, live=LiveOptions()))
    hints = _hints(engine)
    given = []
    step = engine.step
    engine.step = lambda frame: (given.append(frame.image.copy()), step(frame))[1]
    animator = Animator(engine, retargeting=settings)
    animator.set_sources([data.astronaut()])
    with one_torch_thread(), torch.no_grad():
        for i, (frame, lm) in enumerate(zip(*clip)):
            if i >= frames:
                break
            animator.drive(frame, i / FPS, landmarks=lm)
    return given, hints


def _camera(clip, frames: int) -> list[np.ndarray]:
    """The aligned camera frames as the Animator makes them today (frame 0 is the reference)."""
    from engines.face import alignment_affine, head_box, prepare_source

    images, marks = clip
    source = prepare_source(data.astronaut(), DIFFUSION_SIZE)
    affine = alignment_affine(head_box(source.landmarks), head_box(marks[0]))
    return [cv2.warpAffine(image, affine, (DIFFUSION_SIZE, DIFFUSION_SIZE), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE) for image in images[:frames]]


def test_the_diffusion_engine_sees_the_camera_itself_while_the_controls_are_neutral(clip):
    given, hints = _diffusion_run(clip, NEUTRAL, 3)
    for image, expected in zip(given, _camera(clip, 3), strict=True):  # bit-identical: F never ran
        assert np.array_equal(image, expected)
    assert any(np.abs(h.astype(int) - given[-1]).max() <= 1 for h in hints)


def test_the_diffusion_engine_gets_its_driving_image_reposed_by_F(clip, eye):
    """Head pose 0 and eyes open: the image the motion ControlNet reads holds the head at the
    reference pose and keeps the eyes open through the blink, while the mouth opens."""
    last = BLINK[0] + 1
    given, hints = _diffusion_run(clip, Retargeting(head_pose=0.0, eyes="open"), last)
    up = lambda image: cv2.resize(image, (3 * DIFFUSION_SIZE,) * 2, interpolation=cv2.INTER_CUBIC)  # noqa: E731
    posed = np.array([measure(eye, up(image)) for image in given])
    camera = np.array([measure(eye, up(image)) for image in _camera(clip, last)])
    assert camera[-2, 0] - camera[0, 0] > 0.7 * ROLL  # the camera's head rolls...
    assert np.abs(posed[:, 0] - posed[0, 0]).max() < 2.5  # ...the re-posed one holds still
    assert posed[-2, 1] > camera[0, 1] + 0.15  # its mouth opens
    assert camera[-1, 2] < 0.6 * camera[0, 2] and posed[-1, 2] > 0.85 * posed[0, 2]  # the blink, and none
    # What the ControlNet reads is that image.
    for image in given[-3:]:
        assert any(np.abs(h.astype(int) - image).max() <= 1 for h in hints)


# -- the data channel -------------------------------------------------------------------------------------
@pytest.mark.realtime
def test_the_data_channel_sets_the_controls_and_answers_a_bad_message_with_an_error():
    """A program on the data channel: a retarget message changes the controls it names (the
    reply and /stats say the values in force), a bad one is answered with what is wrong, the
    controls stay as they were and the session keeps streaming; an echo session has none."""
    import asyncio
    import json

    from live_helpers import FPS as LIVE_FPS
    from live_helpers import Peer, Webcam, freed, running, until
    from streamer.server import Config, Server

    pictures = [frame for frame, _ in driving_clip("astronaut", frames=LIVE_FPS, fps=LIVE_FPS)]
    server = Server(Config(max_sessions=2, idle_timeout=3.0, connect_timeout=5.0))
    server.prepare()

    def replies(peer, kind):
        return [m for m in peer.stats if m["type"] == kind]

    async def main():
        async with running(server) as http:
            peer = Peer(Webcam(lambda i: pictures[i % len(pictures)], 10 * LIVE_FPS))
            assert (await peer.offer(http)).status == 200
            session = server.sessions[peer.session]
            await until(lambda: replies(peer, "stats") and session.stats.frames_processed >= 3, 30)
            peer.channel.send(json.dumps({"type": "retarget", "head_pose": 0, "eyes": "open"}))
            await until(lambda: replies(peer, "retargeting"), 10)
            assert replies(peer, "retargeting")[-1] == {"type": "retargeting", "expression": 1.0, "head_pose": 0.0,
                                                        "mouth_open": 1.0, "eyes": "open"}
            for bad, said in (({"head_pose": 9}, "head_pose must be in [0, 2], got 9"),
                              ({"mouth_open": "wide"}, "mouth_open must be a number"),
                              ({"grin": 1}, "unknown retarget field 'grin'")):
                peer.channel.send(json.dumps({"type": "retarget", **bad}))
                await until(lambda: any(said in m["message"] for m in replies(peer, "error")), 10)
            assert all(m["command"] == "retarget" for m in replies(peer, "error"))
            async with http.get("/stats") as response:
                listed = (await response.json())["sessions"][0]
            assert listed["retargeting"] == {"expression": 1.0, "head_pose": 0.0, "mouth_open": 1.0, "eyes": "open"}
            processed = session.stats.frames_processed
            await until(lambda: session.stats.frames_processed >= processed + 5, 10)  # still streaming
            assert session.stats.errors == 0 and not session.closed

            echo = Peer(Webcam(lambda i: pictures[i % len(pictures)], 10 * LIVE_FPS))
            assert (await echo.offer(http, mode="echo")).status == 200
            await until(lambda: replies(echo, "stats"), 30)
            echo.channel.send(json.dumps({"type": "retarget", "expression": 0}))
            await until(lambda: replies(echo, "error"), 10)
            assert "echo mode" in replies(echo, "error")[0]["message"]
            for p in (peer, echo):
                await p.close()
            assert await freed(server)

    asyncio.run(main())


# -- the command line: animate's flags, cam's flags and keys ------------------------------------------------
def test_animate_and_cam_take_the_controls_as_flags():
    import argparse

    from streamer import cam, offline
    from streamer.options import animate_options, cam_options

    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    args = parser.parse_args(["astronaut", "clip.mp4", "-o", "out.mp4", "--head-pose", "0", "--eyes", "open"])
    assert animate_options(args).retargeting == Retargeting(head_pose=0.0, eyes="open")
    parser = argparse.ArgumentParser()
    cam.add_arguments(parser)
    assert cam_options(parser.parse_args(["--mouth-open", "1.5"])).retargeting == Retargeting(mouth_open=1.5)
    with pytest.raises(OptionError, match="--expression must be in"):
        cam_options(parser.parse_args(["--expression", "5"]))


def test_cam_keys_toggle_the_controls_from_their_start_values():
    from streamer.cam import Controls

    start = Retargeting(head_pose=0.0, mouth_open=2.0)
    controls = Controls(retargeting=start)
    for key, expected in (("h", Retargeting(mouth_open=2.0)), ("h", start),
                          ("x", Retargeting(expression=0.0, head_pose=0.0, mouth_open=2.0)),
                          ("o", Retargeting(expression=0.0, head_pose=0.0, mouth_open=2.0, eyes="open")),
                          ("+", Retargeting(expression=0.0, head_pose=0.0, mouth_open=2.25, eyes="open")),
                          ("0", NEUTRAL), ("-", Retargeting(mouth_open=0.75))):
        controls.key(key)
        assert controls.retargeting == expected, key
    assert controls.pending() == ["retarget"] * 7
    for _ in range(20):
        controls.key("-")
    assert controls.retargeting.mouth_open == 0.0  # held at the end of its range


@pytest.mark.realtime
def test_cam_starts_with_a_steady_head_and_h_lets_it_move(tmp_path):
    """`xportrait cam --head-pose 0`, then the h key on the terminal: the avatar's head holds
    still while the camera's rolls (and its mouth still talks), then follows it."""
    import os
    import threading
    import time

    from streamer.cam import cam
    from streamer.options import CamOptions
    from streamer.video import write_video

    def rolled(t: float) -> Pose:
        return Pose() if t % 2.0 < 0.6 else Pose(roll_deg=ROLL, mouth=0.4)

    path = tmp_path / "webcam.y4m"
    write_video(path, (f for f, _ in driving_clip("grace_hopper", frames=2 * FPS, fps=FPS, script=rolled)), fps=FPS)

    class Sink:
        name = "test sink"

        def __init__(self):
            self.frames: list[tuple[float, np.ndarray]] = []

        def send(self, rgb):
            self.frames.append((time.perf_counter(), rgb[::2, ::2].copy()))

        def close(self):
            pass

    def measured(sink, since: float) -> np.ndarray:
        """(frames, 2) roll and mouth opening of what the sink got since then."""
        with FaceTracker(video=False) as tracker:
            found = [tracker.detect(np.ascontiguousarray(f)) for t, f in list(sink.frames) if t > since]  # a copy: it grows
        return np.array([(head_roll(lm), mouth_opening(lm)) for lm in found if lm is not None])

    sink = Sink()
    opts = CamOptions(engine=WarpOptions(SIZE), camera=str(path), loop=True, portraits=("astronaut",),
                      virtual_camera="off", pipewire="off", fps=FPS, duration=40,
                      retargeting=Retargeting(head_pose=0.0))
    read_end, write_end = os.pipe()
    result: dict = {}
    with os.fdopen(read_end, "rb", buffering=0) as stdin:
        runner = threading.Thread(target=lambda: result.update(cam(opts, sinks=[sink], stdin=stdin)))
        runner.start()
        try:
            deadline = time.monotonic() + 30
            while not sink.frames and time.monotonic() < deadline:
                time.sleep(0.1)
            started = time.perf_counter()
            time.sleep(2.2)  # a loop of the clip: neutral, then rolled
            steady = measured(sink, started)
            os.write(write_end, b"h")
            pressed = time.perf_counter() + 0.5
            time.sleep(2.7)
            moving = measured(sink, pressed)
        finally:
            os.write(write_end, b"q")
            runner.join(30)
            os.close(write_end)
    assert not runner.is_alive() and result
    assert len(steady) > 10 and len(moving) > 10
    assert np.ptp(steady[:, 1]) > 0.15  # live frames (the mouth talks), not the still portrait
    assert np.ptp(steady[:, 0]) < 3.0  # the head held while the camera's rolled 12 degrees
    assert np.ptp(moving[:, 0]) > 0.7 * ROLL  # after h it follows


def test_animate_with_a_steady_head_writes_a_clip_whose_head_holds_still(clip, eye, tmp_path):
    """`xportrait animate astronaut clip.mp4 -o out.mp4 --head-pose 0` on the scripted clip."""
    from streamer.cli import main
    from streamer.video import read_frames, write_video

    driving = tmp_path / "clip.mp4"
    write_video(driving, iter(clip[0]), fps=FPS)
    out = tmp_path / "out.mp4"
    assert main(["animate", "astronaut", str(driving), "-o", str(out), "--size", str(SIZE), "--ref-frame", "0",
                 "--head-pose", "0"]) == 0
    frames = read_frames(str(out))
    rolls = [measure(eye, frame.image)[0] for frame in frames]
    assert len(rolls) == FRAMES
    assert max(rolls) - min(rolls) < 2.5  # the driver rolled 12 degrees


def test_the_diffusion_engine_gets_the_neutral_face_on_a_moving_head_with_expression_zero(clip, eye):
    last = BLINK[0] + 1
    given, _ = _diffusion_run(clip, Retargeting(expression=0.0), last)
    up = lambda image: cv2.resize(image, (3 * DIFFUSION_SIZE,) * 2, interpolation=cv2.INTER_CUBIC)  # noqa: E731
    posed = np.array([measure(eye, up(image)) for image in given])
    camera = np.array([measure(eye, up(image)) for image in _camera(clip, last)])
    assert camera[-2, 1] > camera[0, 1] + 0.15 and camera[-1, 2] < 0.6 * camera[0, 2]  # the camera talks, blinks
    assert np.abs(posed[:, 1] - camera[0, 1]).max() < 0.05  # the re-posed mouth stays as at the reference
    assert posed[-1, 2] > 0.85 * camera[0, 2]  # and its eyes through the blink
    assert np.abs(posed[:, 0] - camera[:, 0]).max() < 2.5  # while its head rolls with the camera's
