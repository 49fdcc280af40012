"""`xportrait animate`: the offline command, end to end, and the PyAV helpers under it.

Driving clips are made here from a real portrait (scikit-image's astronaut) whose head is
rolled by a scripted angle per frame; the animated portrait is matplotlib's Grace Hopper.
Clips are small (320x240, 25 fps, under 2 s) and the output is 256 px, to stay fast.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from engines.face import FaceTracker, head_roll
from streamer.cli import main
from streamer.video import VideoError, VideoWriter, probe, read_frames

FPS = 25
FRAMES = 40
SIZE = 256
WIDTH, HEIGHT = 320, 240
ROLL_DEGREES = 14.0  # the driving head's largest roll either way


# -- media ------------------------------------------------------------------------------------
def roll_angles(count: int = FRAMES) -> np.ndarray:
    """One full swing: upright, rolled one way, upright, rolled the other way."""
    return ROLL_DEGREES * np.sin(2 * np.pi * np.arange(count) / count)


def astronaut_frames(angles, blank=()) -> list[np.ndarray]:
    import skimage.data

    portrait = cv2.resize(skimage.data.astronaut(), (HEIGHT, HEIGHT), interpolation=cv2.INTER_AREA)
    canvas = np.full((HEIGHT, WIDTH, 3), (90, 90, 110), np.uint8)
    left = (WIDTH - HEIGHT) // 2
    canvas[:, left:left + HEIGHT] = portrait
    frames = []
    for i, angle in enumerate(angles):
        if i in blank:  # e.g. the camera covered for a moment
            frames.append(np.full_like(canvas, 128))
            continue
        turn = cv2.getRotationMatrix2D((WIDTH / 2, HEIGHT / 3), float(angle), 1.0)  # about the face
        frames.append(cv2.warpAffine(canvas, turn, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REPLICATE))
    return frames


def gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to((x * 0.6 + y * 0.4), (height, width, 3)).astype(np.uint8)


def write_clip(path: Path, frames, fps=FPS, audio: str | None = "aac") -> Path:
    """H.264 clip with a 440 Hz tone as long as the video in `audio` codec (None: silent)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if audio:
            sound = container.add_stream(audio, rate=44100)
            sound.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if audio:
            samples = round(44100 * len(frames) / fps)
            tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 44100)
            chunk = av.AudioFrame.from_ndarray((tone * 32767).astype(np.int16)[None], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 44100, 0
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import matplotlib.cbook

    folder = tmp_path_factory.mktemp("media")
    hopper = folder / "hopper.jpg"
    hopper.write_bytes(Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes())
    angles = roll_angles()
    return {
        "source": hopper,
        "angles": angles,
        "driving": write_clip(folder / "driving.mp4", astronaut_frames(angles)),
        "covered": write_clip(folder / "covered.mp4", astronaut_frames(angles[:20], blank=range(8, 12)), audio=None),
        "short": write_clip(folder / "short.mp4", astronaut_frames(angles[:8]), audio=None),
    }


def animate(capsys, *args) -> tuple[int, str, str]:
    code = main(["animate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def decode(path: Path) -> tuple[list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames]


def assert_one_line_error(code: int, err: str, *phrases: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xportrait animate: error: ")
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def assert_nothing_written(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".part")]


# -- the good path ------------------------------------------------------------------------------
def test_animate_follows_the_driving_head_and_keeps_timing_and_audio(media, tmp_path, capsys):
    out = tmp_path / "animated.mp4"
    code, stdout, err = animate(capsys, media["source"], media["driving"], "-o", out, "--size", SIZE)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["animated.mp4"]  # no partial file left

    info = probe(out)
    assert (info.width, info.height) == (SIZE, SIZE)
    assert info.fps == FPS and info.frames == FRAMES
    frames, times = decode(out)
    assert len(frames) == FRAMES
    _, driving_times = decode(media["driving"])
    assert times == pytest.approx(driving_times, abs=1e-3)  # the driving's frame times, kept
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        assert container.streams.video[0].codec_context.codec.canonical_name == "h264"

    # The audio is the driving's, copied packet for packet.
    def audio_packets(path):
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.codec.canonical_name == "aac"
            return [bytes(p) for p in container.demux(stream) if p.size]

    assert audio_packets(out) == audio_packets(media["driving"])

    # The portrait's head rolls as the driving head does (and not at all when upright).
    angles = media["angles"]
    upright, one_way, other_way = 0, int(np.argmax(angles)), int(np.argmin(angles))
    with FaceTracker(video=False) as tracker:
        roll = {i: head_roll(tracker.detect(frames[i])) for i in (upright, one_way, other_way)}
    assert abs(roll[one_way] - roll[other_way]) > ROLL_DEGREES  # the full swing is 2 x 14 degrees
    assert np.sign(roll[one_way] - roll[upright]) == -np.sign(roll[other_way] - roll[upright])
    assert np.abs(frames[one_way].astype(np.int16) - frames[upright]).mean() > 5

    assert f"{FRAMES} frames" in stdout
    assert "frames without a face: 0" in stdout
    assert "audio aac (copied)" in stdout
    assert "frames/s" in stdout


def test_faceless_driving_frames_hold_the_last_good_pose(media, tmp_path, capsys):
    out = tmp_path / "held.mp4"
    code, stdout, err = animate(capsys, media["source"], media["covered"], "-o", out,
                                "--size", SIZE, "--ref-frame", "0")
    assert code == 0, err
    frames, _ = decode(out)
    assert len(frames) == 20
    with av.open(str(out)) as container:
        assert not container.streams.audio  # the driving had none
    assert "frames without a face: 4" in stdout and "held" in stdout
    assert "reference frame 0" in stdout
    # Frames 8-11 had no face: they repeat frame 7's pose (up to H.264 noise), whereas
    # the head keeps moving in the frames that have one.
    last_good = frames[7].astype(np.int16)
    for held in frames[8:12]:
        assert np.abs(held - last_good).mean() < 1.5
    assert np.abs(frames[12].astype(np.int16) - last_good).mean() > 2


@pytest.mark.parametrize("suffix", ["jpg", "png"])  # JPEG decodes at reduced scale; PNG decodes in full
def test_huge_source_image_is_downscaled(suffix, media, tmp_path, capsys):
    huge = tmp_path / f"huge.{suffix}"
    portrait = np.asarray(Image.open(media["source"]).convert("RGB"))
    big = Image.fromarray(cv2.resize(portrait, (9000, 7000), interpolation=cv2.INTER_LINEAR))
    big.save(huge, **({"quality": 85} if suffix == "jpg" else {"compress_level": 1}))
    del big
    out = tmp_path / "from-huge.mp4"
    code, stdout, err = animate(capsys, huge, media["short"], "-o", out, "--size", SIZE)
    assert code == 0, err
    assert probe(out).frames == 8 and (probe(out).width, probe(out).height) == (SIZE, SIZE)


def test_several_sources_animate_the_first(media, tmp_path, capsys):
    import skimage.data

    astronaut = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(astronaut)
    first = {}
    for name, sources in {"hopper": [media["source"]], "hopper+astronaut": [media["source"], astronaut],
                          "astronaut+hopper": [astronaut, media["source"]]}.items():
        out = tmp_path / f"{name}.mp4"
        code, _, err = animate(capsys, *sources, media["short"], "-o", out, "--size", SIZE)
        assert code == 0, err
        first[name] = decode(out)[0][4].astype(np.int16)
    assert np.abs(first["hopper+astronaut"] - first["hopper"]).mean() < 2
    assert np.abs(first["astronaut+hopper"] - first["hopper"]).mean() > 20


# -- bad input: one line, exit 2, nothing left behind --------------------------------------------
def _truncated_png(path: Path, media) -> Path:
    Image.open(media["source"]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind, phrase", [
    ("text", "cannot read source image"),
    ("truncated", "cannot read source image"),
    ("missing", "source image not found"),
    ("no-face", "no face found in the source image"),
])
def test_bad_source_image(kind, phrase, media, tmp_path, capsys):
    source = tmp_path / f"source-{kind}.png"
    if kind == "text":
        source.write_text("this is not a picture\n")
    elif kind == "truncated":
        _truncated_png(source, media)
    elif kind == "no-face":
        Image.fromarray(gradient(640, 480)).save(source)
    out = tmp_path / "out.mp4"
    code, stdout, err = animate(capsys, source, media["short"], "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, phrase, source.name)
    assert_nothing_written(tmp_path, out)


def test_second_source_without_a_face_is_named(media, tmp_path, capsys):
    faceless = tmp_path / "gradient.png"
    Image.fromarray(gradient(400, 400)).save(faceless)
    out = tmp_path / "out.mp4"
    code, _, err = animate(capsys, media["source"], faceless, media["short"], "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, "no face found", "gradient.png")
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("kind, phrase", [
    ("garbage", "cannot read video"),
    ("missing", "video not found"),
    ("image-only-audio", "no video stream"),
])
def test_unreadable_driving_video(kind, phrase, media, tmp_path, capsys):
    driving = tmp_path / f"driving-{kind}.mp4"
    if kind == "garbage":
        driving.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    elif kind == "image-only-audio":
        with av.open(str(driving), "w") as container:
            sound = container.add_stream("aac", rate=44100)
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 4410), np.int16), format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 44100, 0
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    out = tmp_path / "out.mp4"
    code, _, err = animate(capsys, media["source"], driving, "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, phrase)
    assert_nothing_written(tmp_path, out)


def test_driving_video_without_any_face(media, tmp_path, capsys):
    driving = write_clip(tmp_path / "no-face.mp4", [np.roll(gradient(WIDTH, HEIGHT), 4 * i, axis=1) for i in range(10)])
    out = tmp_path / "out.mp4"
    code, _, err = animate(capsys, media["source"], driving, "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, "no face found in any of the 10 frames")
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("ref, phrase", [("8", "out of range"), ("3", "has no face")])
def test_bad_reference_frame(ref, phrase, media, tmp_path, capsys):
    driving = write_clip(tmp_path / "d.mp4", astronaut_frames(roll_angles(8), blank=[3]), audio=None)
    out = tmp_path / "out.mp4"
    code, _, err = animate(capsys, media["source"], driving, "-o", out, "--size", SIZE, "--ref-frame", ref)
    assert_one_line_error(code, err, phrase)
    assert_nothing_written(tmp_path, out)


def test_missing_output_directory(media, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "out.mp4"
    code, _, err = animate(capsys, media["source"], media["short"], "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, "output directory does not exist")
    assert not (tmp_path / "no").exists()


def test_output_never_overwrites_the_driving_video(media, tmp_path, capsys):
    driving = tmp_path / "clip.mp4"
    driving.write_bytes(media["short"].read_bytes())
    code, _, err = animate(capsys, media["source"], driving, "-o", driving, "--size", SIZE)
    assert_one_line_error(code, err, "overwrite an input")
    assert driving.read_bytes() == media["short"].read_bytes()


def test_bad_size_is_refused_by_the_parser(media, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["animate", str(media["source"]), str(media["short"]), "-o", str(tmp_path / "o.mp4"), "--size", "100"])
    assert exit_.value.code == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_interrupt_removes_the_partial_output(media, tmp_path, capsys, monkeypatch):
    from engines.animator import Animator

    drive = Animator.drive
    calls = []

    def drive_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            # Mid-run the video grows in a hidden file next to OUT; OUT does not exist yet.
            assert not out.exists()
            assert [p.name.startswith(".out.mp4.") for p in tmp_path.iterdir()] == [True]
            raise KeyboardInterrupt
        return drive(self, *args, **kwargs)

    monkeypatch.setattr(Animator, "drive", drive_then_interrupt)
    out = tmp_path / "out.mp4"
    code = main(["animate", str(media["source"]), str(media["driving"]), "-o", str(out), "--size", str(SIZE)])
    assert code == 130
    assert len(calls) == 5  # it was writing when interrupted
    assert list(tmp_path.iterdir()) == []


def test_real_command_line_reports_bad_input_in_one_line(media, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("not an image")
    out = tmp_path / "out.mp4"
    script = Path(sys.executable).with_name("xportrait")
    assert script.exists(), "the project's console script is not installed"
    result = subprocess.run([str(script), "animate", str(source), str(media["short"]), "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"xportrait animate: error: cannot read source image {source}: not an image format Pillow knows"]
    assert result.stdout == ""
    assert_nothing_written(tmp_path, out)


# -- streamer.video --------------------------------------------------------------------------------
def test_writer_keeps_an_odd_rate_and_reencodes_audio_mp4_cannot_hold(tmp_path):
    ntsc = Fraction(30000, 1001)
    frames = astronaut_frames(roll_angles(15))
    driving = write_clip(tmp_path / "pcm.mov", frames, fps=ntsc, audio="pcm_s16le")  # MP4 cannot hold PCM
    info = probe(driving)
    assert (info.width, info.height, info.fps, info.frames, info.audio_codec) == (WIDTH, HEIGHT, ntsc, 15, "pcm_s16le")

    decoded = list(read_frames(driving))
    assert [f.index for f in decoded] == list(range(15))
    assert decoded[0].image.shape == (HEIGHT, WIDTH, 3) and decoded[0].image.dtype == np.uint8
    out = tmp_path / "copy.mp4"
    with VideoWriter(out, WIDTH, HEIGHT, info.fps, time_base=info.time_base, audio_from=driving) as writer:
        for frame in decoded:
            writer.write(frame.image, frame.time)
        assert writer.audio is not None and not writer.audio.copied
    written = probe(out)
    assert (written.fps, written.frames, written.audio_codec) == (ntsc, 15, "aac")
    _, times = decode(out)
    assert times == pytest.approx([f.time for f in decoded], abs=1e-3)
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        seconds = sum(f.samples for f in container.decode(audio)) / audio.rate
    assert seconds == pytest.approx(15 / float(ntsc), abs=0.05)
    # The pixels survive the round trip (H.264 at crf 18 is close to lossless on this).
    assert np.abs(decode(out)[0][7].astype(np.int16) - decoded[7].image).mean() < 3


def test_constant_rate_clip_with_millisecond_stamps_keeps_its_exact_rate(media, tmp_path, capsys):
    # Matroska stamps frames in milliseconds: 29.97 fps becomes 0, 33, 67, 100 ms, ...
    ntsc = Fraction(30000, 1001)
    driving = write_clip(tmp_path / "ntsc.mkv", astronaut_frames(roll_angles(12)), fps=ntsc, audio=None)
    assert probe(driving).time_base == Fraction(1, 1000)
    out = tmp_path / "ntsc.mp4"
    code, _, err = animate(capsys, media["source"], driving, "-o", out, "--size", SIZE)
    assert code == 0, err
    info = probe(out)
    assert (info.fps, info.frames) == (ntsc, 12)
    assert decode(out)[1] == pytest.approx([i / float(ntsc) for i in range(12)], abs=1e-3)


def test_writer_refuses_odd_sizes_and_wrong_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", 321, 240, FPS)
    with VideoWriter(tmp_path / "ok.mp4", 64, 64, FPS) as writer:
        with pytest.raises(ValueError, match="64x64"):
            writer.write(np.zeros((32, 32, 3), np.uint8))
        writer.write(np.zeros((64, 64, 3), np.uint8))
        writer.write(np.full((64, 64, 3), 255, np.uint8))
    assert probe(tmp_path / "ok.mp4").frames == 2


def test_phone_video_stored_sideways_is_read_upright(tmp_path):
    upright = astronaut_frames(roll_angles(4))
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS, options={"crf": "12"})
        video.width, video.height, video.pix_fmt = HEIGHT, WIDTH, "yuv420p"  # stored portrait-wise
        video.set_display_rotation(-90)  # the display matrix: turn a quarter clockwise to show
        for frame in upright:
            sideways = np.ascontiguousarray(np.rot90(frame))
            container.mux(video.encode(av.VideoFrame.from_ndarray(sideways, format="rgb24")))
        container.mux(video.encode(None))
    info = probe(path)
    assert (info.width, info.height, info.frames) == (WIDTH, HEIGHT, 4)
    decoded = list(read_frames(path))
    assert decoded[2].image.shape == (HEIGHT, WIDTH, 3)
    error = np.abs(decoded[2].image.astype(np.int16) - upright[2]).mean()
    assert error < 3
    assert np.abs(decoded[2].image[::-1, ::-1].astype(np.int16) - upright[2]).mean() > 10 * error


def test_video_helpers_raise_video_error(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 not a video " * 1000)
    for bad in (garbage, tmp_path / "missing.mp4", tmp_path):
        with pytest.raises(VideoError):
            probe(bad)
        with pytest.raises(VideoError):
            list(read_frames(bad))
