"""streamer.samples: the bundled portraits (gallery), the synthetic driving clips (puppet),
and the clip files streamer.video.write_video makes of them.

The clips are only useful as test and demo input if a face tracker sees in them what
their script says, so the main tests play each portrait's default clip through
mediapipe's face mesh (video mode, as the streamer uses it) and hold the measurements
against the ground truth. Observed when these tests were written (astronaut / grace_hopper):
roll error at most 1.2 / 1.2 degrees; translation error at most 1.4 / 2.7 px; mouth
opening 0.17 / 0.004 at rest and 0.50-0.72 / 0.70-0.73 with mouth=1; eye opening
0.36 / 0.29 at rest, 0.07-0.14 / 0.07-0.09 shut and 0.23 / 0.20 at half a blink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np
import pytest

from engines.face import FaceTracker, NoFaceError, eye_opening, head_box, head_roll, mouth_opening
from streamer.samples import (
    DEFAULT_SCRIPT_SECONDS,
    PORTRAITS,
    SCRIPT_SEGMENTS,
    Pose,
    default_script,
    driving_clip,
    portrait,
    puppet,
)
from streamer.video import write_video

FPS = 25


@dataclass
class Measured:
    time: np.ndarray  # s
    poses: list[Pose]
    roll: np.ndarray  # degrees
    mouth: np.ndarray
    eye: np.ndarray
    centre: np.ndarray  # (n, 2) head-box centre, px
    width: np.ndarray  # head-box width, px
    missing: int  # frames without a face

    def where(self, keep) -> np.ndarray:
        return np.array([keep(t, p) for t, p in zip(self.time, self.poses)])


def measure(clip) -> Measured:
    rows, missing = [], 0
    with FaceTracker(video=True) as tracker:
        for i, (frame, pose) in enumerate(clip):
            lm = tracker.detect(frame)
            if lm is None:
                missing += 1
                continue
            box = head_box(lm)
            rows.append((i / FPS, pose, head_roll(lm), mouth_opening(lm), eye_opening(lm), box.center, box.width))
    t, poses, roll, mouth, eye, centre, width = zip(*rows)
    return Measured(np.array(t), list(poses), np.array(roll), np.array(mouth), np.array(eye),
                    np.array(centre), np.array(width), missing)


@pytest.fixture(scope="module", params=PORTRAITS)
def measured(request) -> Measured:
    return measure(driving_clip(request.param, fps=FPS))


def segment(name: str):
    (start, end), = [(s, e) for n, s, e in SCRIPT_SEGMENTS if n == name]
    return lambda t, pose: start <= t < end


def test_every_frame_shows_a_face(measured):
    assert measured.missing == 0
    assert len(measured.poses) == round(DEFAULT_SCRIPT_SECONDS * FPS)


def test_measured_roll_follows_the_script(measured):
    scripted = np.array([p.roll_deg for p in measured.poses])
    assert np.abs(scripted).max() == pytest.approx(15, abs=0.1)
    # Observed at most 1.2 degrees off, rolling at up to 47 degrees/s.
    assert np.abs(measured.roll - scripted).max() < 2.0


def test_translation_moves_the_head_box_by_the_scripted_amount(measured):
    neutral = measured.where(segment("neutral"))
    moving = measured.where(segment("translate"))
    rest = measured.centre[neutral].mean(axis=0)
    scripted = np.array([(p.dx, p.dy) for p, m in zip(measured.poses, moving) if m])
    assert np.abs(scripted).max(axis=0) == pytest.approx((60, 30), abs=0.5)
    # Observed at most 2.7 px off while sweeping at up to 7.5 px a frame.
    assert np.abs(measured.centre[moving] - rest - scripted).max() < 4.0


def test_mouth_opening_rises_with_the_scripted_mouth(measured):
    neutral = measured.mouth[measured.where(segment("neutral"))]
    wide = measured.mouth[measured.where(lambda t, p: p.mouth > 0.99)]
    assert len(wide) >= 10
    # Lips 13/14 over corners 78/308: observed +0.33 to +0.55 (astronaut, whose smile
    # already parts her lips) and +0.7 (grace_hopper). Half of the smaller rise still
    # separates a wide-open mouth from a closed one without doubt.
    assert wide.min() - np.median(neutral) > 0.25
    act = measured.where(segment("mouth"))
    scripted = np.array([p.mouth for p, m in zip(measured.poses, act) if m])
    assert np.corrcoef(scripted, measured.mouth[act])[0, 1] > 0.9  # observed 0.96 / 0.999


def test_eye_opening_drops_with_the_scripted_blink(measured):
    neutral = np.median(measured.eye[measured.where(segment("neutral"))])
    shut = measured.eye[measured.where(lambda t, p: p.blink > 0.99)]
    half = measured.eye[measured.where(lambda t, p: abs(p.blink - 0.5) < 0.01)]
    assert len(shut) >= 2 and len(half) >= 1
    # Observed: shut at most 0.38 of the open value; mediapipe calls under 0.1 "shut".
    assert shut.max() < 0.5 * neutral
    assert np.median(shut) < 0.12
    # A half blink measures as half shut, not as open or shut (observed 0.23 / 0.20
    # between 0.09 and 0.36 / 0.29).
    assert np.median(shut) + 0.04 < half.mean() < neutral - 0.04


def test_a_custom_script_drives_scale_and_roll():
    def script(t: float) -> Pose:
        return Pose(roll_deg=-8.0, scale=1.0 if t < 0.4 else 1.2)

    m = measure(driving_clip("grace_hopper", frames=20, fps=FPS, script=script))
    assert m.missing == 0
    assert np.abs(m.roll + 8.0).max() < 2.0
    small, large = m.width[m.time < 0.4], m.width[m.time >= 0.6]
    assert np.median(large) / np.median(small) == pytest.approx(1.2, abs=0.03)


def test_frames_are_fresh_and_expressions_leave_no_trace():
    rig = puppet("astronaut")
    neutral = rig.render(Pose())
    rig.render(Pose(mouth=1.0, blink=1.0, roll_deg=12, dx=-20))
    again = rig.render(Pose())
    assert again is not neutral
    np.testing.assert_array_equal(again, neutral)
    opened = rig.render(Pose(mouth=1.0))
    # The mouth region darkens where the cavity is painted; the top of the frame stays put.
    assert np.abs(opened.astype(int) - neutral).sum(axis=2).max() > 100
    np.testing.assert_array_equal(opened[:100], neutral[:100])


def test_default_script_starts_and_ends_neutral():
    assert default_script(0.0) == Pose()
    end = default_script(DEFAULT_SCRIPT_SECONDS - 1e-6)
    assert max(abs(end.roll_deg), abs(end.dx), abs(end.dy), abs(end.scale - 1), end.mouth, end.blink) < 1e-3
    assert default_script(DEFAULT_SCRIPT_SECONDS + 1.5) == default_script(1.5)  # it loops
    assert SCRIPT_SEGMENTS[0][1] == 0 and SCRIPT_SEGMENTS[-1][2] == DEFAULT_SCRIPT_SECONDS
    assert all(a[2] == b[1] for a, b in zip(SCRIPT_SEGMENTS, SCRIPT_SEGMENTS[1:]))


def test_portraits_load_as_rgb():
    for name in PORTRAITS:
        image = portrait(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] >= 512 and image.flags.writeable


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown portrait 'mona'.*astronaut"):
        portrait("mona")
    with pytest.raises(ValueError, match="unknown portrait"):
        driving_clip("mona")
    with pytest.raises(NoFaceError):
        driving_clip(np.full((240, 320, 3), 128, np.uint8))
    for bad in (dict(mouth=1.5), dict(blink=-0.1), dict(scale=0.0), dict(dx=math.nan)):
        with pytest.raises(ValueError, match="Pose"):
            Pose(**bad)
    with pytest.raises(ValueError, match="size"):
        driving_clip("astronaut", size=(641, 480))
    with pytest.raises(ValueError, match="fps"):
        driving_clip("astronaut", fps=0)
    with pytest.raises(ValueError, match="frames"):
        driving_clip("astronaut", frames=-1)
    clip = driving_clip("astronaut", frames=2, script=lambda t: (0, 0))
    with pytest.raises(TypeError, match="Pose"):
        next(clip)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [f for f, _ in driving_clip("astronaut", frames=20, fps=FPS)]


@pytest.mark.parametrize("audio", [False, True])
def test_write_video_makes_a_decodable_h264_mp4(tmp_path, frames, audio):
    path = tmp_path / "clip.mp4"
    assert write_video(path, iter(frames), fps=FPS, tone_hz=440.0 if audio else None) == len(frames)
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert video.average_rate == FPS
        assert (video.width, video.height) == (640, 480)
        assert len(container.streams.audio) == (1 if audio else 0)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == len(frames)
    assert decoded[0].shape == frames[0].shape
    # H.264 at crf 18 plus 4:2:0 round trips: observed 2.0 mean abs error; swapped
    # channels or a wrong frame order would be tens.
    for i in (0, 10, 19):
        assert np.abs(decoded[i].astype(int) - frames[i]).mean() < 4
    if audio:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name == "aac" and stream.rate == 48000
            samples = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
        assert len(samples) / 48000 == pytest.approx(len(frames) / FPS, abs=0.05)
        assert 0.1 < np.abs(samples).max() < 0.3  # the 0.2 tone, not silence


def test_write_video_refuses_bad_frames_and_leaves_no_file(tmp_path, frames):
    path = tmp_path / "clip.mp4"
    with pytest.raises(ValueError, match="no frames"):
        write_video(path, [], fps=FPS)
    with pytest.raises(ValueError, match="even"):
        write_video(path, [np.zeros((101, 100, 3), np.uint8)], fps=FPS)
    with pytest.raises(ValueError, match="frame 2"):
        write_video(path, [frames[0], frames[1], frames[2][:240]], fps=FPS)
    with pytest.raises(ValueError, match="RGB uint8"):
        write_video(path, [frames[0].astype(np.float32)], fps=FPS)
    with pytest.raises(ValueError, match="fps"):
        write_video(path, frames, fps=-1)
    assert not path.exists()


def test_write_video_y4m_is_raw_420_for_chromium(tmp_path, frames):
    path = tmp_path / "clip.y4m"
    assert write_video(path, frames[:5], fps=FPS) == 5
    data = path.read_bytes()
    header, _, _ = data.partition(b"\n")
    tokens = header.split()
    assert tokens[0] == b"YUV4MPEG2"
    assert {b"W640", b"H480", b"F25:1"} <= set(tokens)
    # Chromium's parser accepts exactly C420, C420jpeg, C420mpeg2 and C420paldv.
    assert any(t in (b"C420", b"C420jpeg", b"C420mpeg2", b"C420paldv") for t in tokens)
    assert len(data) == len(header) + 1 + 5 * (len(b"FRAME\n") + 640 * 480 * 3 // 2)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5
    assert np.abs(decoded[3].astype(int) - frames[3]).mean() < 3


# -- xportrait sample-clip ---------------------------------------------------------------------
def test_sample_clip_command_writes_a_driving_clip_a_tracker_follows(tmp_path, capsys):
    from PIL import Image

    from streamer.cli import main

    out = tmp_path / "driving.webm"
    assert main(["sample-clip", str(out), "--portrait", "grace_hopper", "--seconds", "1.2", "--fps", "10",
                 "--size", "320x240"]) == 0
    assert "wrote" in capsys.readouterr().out
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    with FaceTracker(video=False) as tracker:
        assert tracker.detect(frames[0]) is not None
    # A portrait image of one's own works the same way; the face may be small in it.
    canvas = np.full((1080, 1920, 3), 200, np.uint8)
    canvas[500:1012, 1300:1812] = portrait("astronaut")
    Image.fromarray(canvas).save(tmp_path / "me.png")
    assert main(["sample-clip", str(tmp_path / "me.mp4"), "--portrait", str(tmp_path / "me.png"),
                 "--seconds", "0.4"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driving.webm", "me.mp4", "me.png"]


@pytest.mark.parametrize("args, phrase", [
    (["x.mp4", "--portrait", "nobody"], "name a bundled portrait: astronaut, grace_hopper"),
    (["x.mp4", "--portrait", "GRAY"], "no face found in"),
    (["x"], "extension chooses the format"),
])
def test_sample_clip_refuses_bad_input_in_one_line(args, phrase, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from streamer.cli import main

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(tmp_path / "GRAY", format="PNG")
    assert main(["sample-clip", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xportrait sample-clip: error: ") and phrase in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GRAY"]


@pytest.mark.parametrize("args, phrase", [(["--seconds", "0"], "--seconds"), (["--fps", "500"], "--fps"),
                                          (["--size", "63x64"], "--size"), (["--size", "big"], "WIDTHxHEIGHT")])
def test_sample_clip_options_are_usage_errors(args, phrase, tmp_path, capsys):
    from streamer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sample-clip", str(tmp_path / "x.mp4"), *args])
    assert exit_.value.code == 2 and phrase in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
