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


# -- output formats, output paths, signals, chatter ----------------------------------------------
@pytest.mark.parametrize("suffix, format_name, codec, audio", [
    (".gif", "gif", "gif", None),  # GIF holds no audio
    (".avi", "avi", "mpeg4", "pcm_s16le"),
    (".webm", "matroska,webm", "vp9", "opus"),
    (".mkv", "matroska,webm", "h264", "aac"),
])
def test_output_container_follows_the_extension(suffix, format_name, codec, audio, media, tmp_path, capsys):
    out = tmp_path / f"animated{suffix}"
    clip = "driving" if audio else "short"  # the short clip is silent; GIF's palettes are slow to make
    code, stdout, err = animate(capsys, media["source"], media[clip], "-o", out, "--size", SIZE)
    assert code == 0, err
    with av.open(str(out)) as container:
        assert container.format.name == format_name
        assert container.streams.video[0].codec_context.name == codec
        assert [s.codec_context.name for s in container.streams.audio] == ([audio] if audio else [])
    frames, times = decode(out)
    assert len(frames) == probe(media[clip]).frames and frames[0].shape == (SIZE, SIZE, 3)
    assert times[1] - times[0] == pytest.approx(1 / FPS, abs=1e-3)
    with FaceTracker(video=False) as tracker:  # a face, the portrait's, in every format
        assert tracker.detect(frames[len(frames) // 2]) is not None
    if audio:
        assert f"audio {audio} (re-encoded)" in stdout or f"audio {audio} (copied)" in stdout


@pytest.mark.parametrize("name", ["out", "out.txt", "out.mp3"])
def test_output_without_a_video_extension_is_refused(name, media, tmp_path, capsys):
    out = tmp_path / name
    code, _, err = animate(capsys, media["source"], media["short"], "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, "extension chooses the format", ".mp4", ".gif", ".webm", ".avi")
    assert_nothing_written(tmp_path, out)


def test_output_is_never_a_device_or_fifo_and_they_are_not_replaced(media, tmp_path, capsys):
    import os
    import stat

    null = tmp_path / "null.mp4"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    for target, what in ((null, "a character device"), (fifo, "a FIFO"), (Path("/dev/null"), "a character device")):
        code, _, err = animate(capsys, media["source"], media["short"], "-o", target, "--size", SIZE)
        assert_one_line_error(code, err, what, "never replaced")
    assert stat.S_ISCHR(os.stat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null.mp4", "pipe.mp4"]  # no partial file


def test_output_through_a_symbolic_link_writes_the_file_it_names(media, tmp_path, capsys):
    real = tmp_path / "real.mp4"
    real.write_bytes(b"old")
    link = tmp_path / "link.mp4"
    link.symlink_to(real)
    code, _, err = animate(capsys, media["source"], media["short"], "-o", link, "--size", SIZE)
    assert code == 0, err
    assert link.is_symlink() and probe(real).frames == 8


def test_a_bundled_portrait_name_is_a_source(media, tmp_path, capsys):
    out = tmp_path / "astronaut.mp4"
    code, stdout, err = animate(capsys, "astronaut", media["short"], "-o", out, "--size", SIZE)
    assert code == 0, err
    frames, _ = decode(out)
    with FaceTracker(video=False) as tracker:
        assert tracker.detect(frames[0]) is not None


def test_group_shot_source_animates_the_largest_face_and_says_so(media, tmp_path, capsys):
    import skimage.data

    hopper = np.asarray(Image.open(media["source"]).convert("RGB"))
    group = np.full((700, 1400, 3), 200, np.uint8)
    group[100:612, 20:532] = skimage.data.astronaut()  # face ~100 px
    small = cv2.resize(hopper, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)  # face ~70 px
    group[300:300 + small.shape[0], 900:900 + small.shape[1]] = small
    source = tmp_path / "group.png"
    Image.fromarray(group).save(source)
    out = tmp_path / "group.mp4"
    code, _, err = animate(capsys, source, media["short"], "-o", out, "--size", SIZE)
    assert code == 0, err
    assert "note: 2 faces in" in err and "animating the largest" in err
    # The astronaut (the larger face) is the one animated: the first (upright) frame is her crop.
    from engines.face import prepare_source

    first = decode(out)[0][0].astype(np.int16)
    astronaut = np.abs(first - prepare_source(skimage.data.astronaut(), SIZE).image).mean()
    grace = np.abs(first - prepare_source(hopper, SIZE).image).mean()
    assert astronaut < 12 and grace > 3 * astronaut, (astronaut, grace)


def _long_faceless_clip(path: Path, seconds: float, fps: int = 10) -> Path:
    frames = [np.roll(gradient(64, 64), i % 64, axis=1) for i in range(int(seconds * fps))]
    return write_clip(path, frames, fps=fps, audio=None)


def test_faceless_driving_clip_is_refused_once_its_first_seconds_show_no_face(media, tmp_path, capsys):
    from streamer.offline import FACE_SEARCH_S

    driving = _long_faceless_clip(tmp_path / "faceless.mp4", seconds=3 * FACE_SEARCH_S)
    out = tmp_path / "out.mp4"
    code, _, err = animate(capsys, media["source"], driving, "-o", out, "--size", SIZE)
    assert_one_line_error(code, err, f"no face found in the first {FACE_SEARCH_S:g} s", "trim")
    # It stopped at FACE_SEARCH_S: 30 s at 10 fps is frame 301 of 900.
    assert f"({int(FACE_SEARCH_S * 10) + 1} frames)" in err
    assert_nothing_written(tmp_path, out)


def _xportrait(*args) -> list[str]:
    return [sys.executable, "-m", "streamer", *map(str, args)]


NATIVE_CHATTER = ("W0000", "I0000", "E0000", "Feedback manager", "XNNPACK", "TensorFlow Lite", "absl::InitializeLog",
                  "landmark_projection")


def test_sigterm_mid_run_removes_the_partial_file(media, tmp_path):
    import signal
    import time

    driving = write_clip(tmp_path / "long.mp4", astronaut_frames(roll_angles(200)), audio=None)
    out = tmp_path / "out.mp4"
    process = subprocess.Popen(_xportrait("animate", media["source"], driving, "-o", out, "--size", SIZE),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]:  # pass 2 has begun
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # a few frames into the file
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]


def test_no_native_chatter_reaches_the_terminal(media, tmp_path):
    # Refusals after the face models loaded (where mediapipe's chatter used to precede the one
    # line); a good run is checked on a terminal in the progress-bar test below.
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(gray)
    runs = {
        "no face in the source": ([gray, media["short"]], 2),
        "no face in the second source": ([media["source"], gray, media["short"]], 2),
    }
    # Side by side (each is mostly its interpreter's start-up and the face models' load).
    started = {what: subprocess.Popen(_xportrait("animate", *args, "-o", tmp_path / f"out-{i}.mp4", "--size", SIZE),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, (what, (args, _)) in enumerate(runs.items())}
    try:
        results = {what: (process, *process.communicate(timeout=120)) for what, process in started.items()}
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    for what, (args, expected) in runs.items():
        process, stdout, stderr = results[what]
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert result.returncode == expected, (what, result.stderr)
        assert not [line for line in result.stderr.splitlines() if any(c in line for c in NATIVE_CHATTER)], \
            (what, result.stderr)
        if expected:
            assert len(result.stderr.strip().splitlines()) == 1, (what, result.stderr)


def test_progress_bars_from_the_first_frame_on_a_terminal(media, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 wide
    process = subprocess.Popen(_xportrait("animate", media["source"], media["driving"], "-o", tmp_path / "o.mp4",
                                          "--size", SIZE), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=120) == 0
    text = seen.decode(errors="replace")
    assert "tracking faces" in text and f"{FRAMES}/{FRAMES}" in text
    assert "animating" in text
    assert "tracking faces:   0%" in text  # the bar is up before the first frame is tracked
    assert not any(c in text for c in NATIVE_CHATTER), text
