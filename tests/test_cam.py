"""`xportrait cam`: the camera through PyAV, the Feed's newest-frame and still-portrait rules, the
sinks up to the boundaries we cannot cross here, the PipeWire source end to end with a real
daemon and a real consumer, and remote mode against a real `xportrait serve`.

A video file stands in for the webcam through the same reader a device goes through (opened
by PyAV, frames at the file's own rate). The driving clips are streamer.samples' puppet of
Grace Hopper; the portrait animated is the astronaut, so the avatar is never the webcam picture.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib

import av
import cv2
import numpy as np
import pytest
from conftest import running_server

from engines.face import FaceTracker, head_roll
from streamer import samples
from streamer.cam import CamError, Controls, LocalAvatar, cam, open_sinks, still_of
from streamer.options import CamOptions
from streamer.video import write_video
from streamer.capture import Camera, CameraError, CameraInput, _open_error, camera_input
from streamer.sinks import MODPROBE, Feed, PipeWireSource, SinkError, VirtualCamera, virtual_camera_missing

FPS = 25
ROLL = 14.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255 ** 2 / max(mse, 1e-9))


def rolling_script(t: float) -> samples.Pose:
    """Neutral for a second (the calibration), then the head rolled one way, then the other."""
    t %= 4.0
    return samples.Pose() if t < 1.0 else samples.Pose(roll_deg=ROLL if t < 2.5 else -ROLL)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[str, list[np.ndarray], list[samples.Pose]]:
    """Four seconds of a webcam user (Grace Hopper) as raw y4m, the frames and their poses."""
    pairs = list(samples.driving_clip("grace_hopper", frames=4 * FPS, fps=FPS, script=rolling_script))
    path = tmp_path_factory.mktemp("cam") / "webcam.y4m"
    write_video(path, (frame for frame, _ in pairs), fps=FPS)
    return str(path), [frame for frame, _ in pairs], [pose for _, pose in pairs]


class Digest:
    """A sent frame, small: its checksum (equal frames) and every 8th pixel (what it shows)."""

    def __init__(self, rgb: np.ndarray):
        self.crc = zlib.crc32(rgb)
        self.thumb = rgb[::8, ::8].copy()

    def __eq__(self, other) -> bool:
        return self.crc == other.crc


class Recorder:
    """A sink that keeps what it is sent, with the time: a copy of each frame, its Digest
    (long runs), every other pixel ("halves"), or nothing."""

    name = "test sink"

    def __init__(self, keep: str = "images"):
        self.frames: list[tuple[float, np.ndarray | Digest | None]] = []
        self.keep = keep
        self.closed = False

    def send(self, rgb: np.ndarray) -> None:
        kept = rgb.copy() if self.keep == "images" else Digest(rgb) if self.keep == "digests" else \
            np.ascontiguousarray(rgb[::2, ::2]) if self.keep == "halves" else None
        self.frames.append((time.perf_counter(), kept))

    def close(self) -> None:
        self.closed = True


def options(camera: str, **changes) -> CamOptions:
    return CamOptions(**{"camera": camera, "portraits": ("astronaut",), "virtual_camera": "off", "pipewire": "off",
                         "fps": FPS, **changes})


def rolls(frames) -> list[float | None]:
    with FaceTracker(video=False) as tracker:
        out = []
        for frame in frames:
            landmarks = tracker.detect(frame)
            out.append(None if landmarks is None else head_roll(landmarks))
    return out


# -- capture ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_clip(clip, tmp_path_factory) -> tuple[str, list[np.ndarray]]:
    """The clip's first 1.2 s (30 frames), for the reader's own tests."""
    frames = clip[1][:30]
    path = tmp_path_factory.mktemp("cam") / "short.y4m"
    write_video(path, frames, fps=FPS)
    return str(path), frames


@pytest.mark.realtime
def test_the_camera_reader_delivers_a_file_at_its_own_rate_newest_first(short_clip):
    path, frames = short_clip
    source = camera_input(path)
    assert source.is_file and source.format is None
    with Camera(source) as camera:
        assert (camera.width, camera.height, camera.fps) == (640, 480, FPS)
        got, start = [], time.perf_counter()
        while (item := camera.frames.take(timeout=2)) is not None:
            got.append(item)
        elapsed = time.perf_counter() - start
    # The file's 1.2 s, not decoded as fast as PyAV can: frames come when their time comes.
    assert 1.1 < elapsed < 2.0, elapsed
    gaps = np.diff([item.at for item in got])
    assert np.median(gaps) == pytest.approx(1 / FPS, abs=0.01)
    assert camera.ended and camera.error is None and camera.read == len(frames)
    # A consumer this fast takes every frame, in order, and they are the clip's pictures.
    assert [item.index for item in got] == list(range(len(frames))) and camera.dropped == 0
    for item in got[::10]:
        assert psnr(item.frame.to_ndarray(format="rgb24"), frames[item.index]) > 30


@pytest.mark.realtime
def test_a_looped_file_keeps_its_pace_across_the_seam(short_clip):
    path, frames = short_clip
    with Camera(camera_input(path), loop=True) as camera:
        deadline = time.perf_counter() + 3.0
        while time.perf_counter() < deadline:
            camera.frames.take(timeout=1)
        read = camera.read
    assert 70 <= read <= 77, read  # ~3 s at 25 fps: through the end of the file twice, and on


def test_camera_inputs_per_os_and_clear_answers_when_there_is_none():
    linux = camera_input("/dev/video3", (1280, 720), 30, system="Linux")
    assert (linux.url, linux.format) == ("/dev/video3", "v4l2")
    assert linux.options == {"video_size": "1280x720", "framerate": "30"}
    assert camera_input("2", system="Linux").url == "/dev/video2"
    mac = camera_input(None, system="Darwin")
    assert (mac.url, mac.format) == ("0:none", "avfoundation")
    windows = camera_input("Integrated Camera", system="Windows")
    assert (windows.url, windows.format) == ("video=Integrated Camera", "dshow")
    if not any(name.startswith("video") for name in os.listdir("/dev")):
        with pytest.raises(CameraError, match=r"no camera found: no /dev/video\* capture device"):
            camera_input(None, system="Linux")
    # A video file that is not there is that, on every OS, not a camera to plug in.
    for system in ("Linux", "Darwin", "Windows"):
        with pytest.raises(CameraError, match=r"no video file at clips/webcam.mp4 \(--camera takes a camera"):
            camera_input("clips/webcam.mp4", system=system)
    # A device path that is not there goes through PyAV's real v4l2 demuxer.
    with pytest.raises(CameraError, match=r"no camera at /dev/video77: .* pick one with --camera"):
        Camera(camera_input("/dev/video77", system="Linux"))


def test_the_first_camera_is_never_a_virtual_one(tmp_path):
    """The default camera on Linux: the first capture node in number order, never a loopback
    device (ours, OBS's, an unnamed one) nor a webcam's metadata node."""
    from streamer.capture import _v4l2_candidates

    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    nodes = {"video0": ("xportrait", 0), "video1": ("Dummy video device (0x0000)", 0),
             "video2": ("Integrated Camera: Integrated C", 0), "video3": ("Integrated Camera: Integrated C", 1),
             "video10": ("OBS Virtual Camera", 0), "video11": ("HD Pro Webcam C920", 0)}
    dev.mkdir()
    for name, (label, index) in nodes.items():
        (dev / name).touch()
        (sysfs / name).mkdir(parents=True)
        (sysfs / name / "name").write_text(label + "\n")
        (sysfs / name / "index").write_text(f"{index}\n")
    assert _v4l2_candidates(str(dev), str(sysfs)) == [str(dev / "video2"), str(dev / "video11")]


@pytest.mark.parametrize("code, message", [
    (errno.EBUSY, r"the camera /dev/video0 is busy: another app \(a call, a browser tab, OBS\) is using it"),
    (errno.EACCES, r"no permission to open the camera /dev/video0: add yourself to the 'video' group"),
    (errno.ENODEV, r"no camera at /dev/video0"),
])
def test_a_busy_or_forbidden_camera_says_what_to_do(code, message):
    source = CameraInput("/dev/video0", "v4l2", {}, "/dev/video0")
    try:
        av.error.err_check(-code, "/dev/video0")  # the exception PyAV raises for that errno
    except av.FFmpegError as exc:
        assert isinstance(exc, OSError)
        error = _open_error(source, exc)
    assert isinstance(error, CameraError)
    assert __import__("re").search(message, str(error)), str(error)


# -- newest frame, the feed's rules -----------------------------------------------------------------
class SlowEngine:
    """The warp engine with a slow step (a sleep, as a loaded machine or a bigger engine would
    be); it notes how old each frame is when the step starts."""

    def __init__(self, delay: float):
        from engines.warp import WarpEngine

        self._engine = WarpEngine(size=512)
        self.delay = delay
        self.ages: list[float] = []
        for name in ("name", "size", "needs_driving_image", "waits_on_device", "prepare", "flush", "reset", "timings"):
            setattr(self, name, getattr(self._engine, name))

    def step(self, frame):
        self.ages.append(time.perf_counter() - frame.tag.arrived)  # the pipeline's input: its capture time
        time.sleep(self.delay)
        return self._engine.step(frame)


@pytest.mark.realtime
def test_a_slow_engine_drops_camera_frames_instead_of_queueing(clip):
    path, frames, _ = clip
    engine = SlowEngine(0.15)
    sink = Recorder(keep="nothing")
    avatar = LocalAvatar(engine, [samples.portrait("astronaut")], ["astronaut"], 512)
    feed = Feed([sink], 512, FPS, avatar.still)
    controls = Controls(feed)
    try:
        with Camera(camera_input(path)) as camera:
            asyncio.run(avatar.run(camera, feed, controls, until=time.perf_counter() + 3.0))
    finally:
        feed.close()
    steps = len(engine.ages)
    assert 5 <= steps <= 3.0 / 0.15 + 1, steps  # the engine's pace (less its start), not the camera's
    # The frames it had no time for were dropped (at the camera's slot or the pipeline's), not kept.
    dropped = camera.dropped + avatar.stats.dropped_stale + avatar.stats.dropped_prepared
    assert camera.read - steps - 3 <= dropped <= camera.read - steps and dropped > 2 * steps
    # Every step starts on a fresh frame (at most a frame interval plus a tracking old), never
    # on one that waited behind others, and the latency stays flat from start to end.
    assert max(engine.ages) < 1 / FPS + 0.1, engine.ages
    latency = np.asarray(feed.latency_ms)
    assert steps - 1 <= avatar.rendered <= steps  # the last step may be cut short by the end
    assert avatar.rendered - 1 <= len(latency) <= avatar.rendered
    assert latency.max() < 1000 * (0.15 + 1 / FPS + 0.15)
    assert abs(np.median(latency[-5:]) - np.median(latency[:5])) < 60
    assert sink.closed


class SlowToStart(SlowEngine):
    """The warp engine, slow to take its portrait (as a loaded machine, or a bigger engine)."""

    def __init__(self, delay: float):
        super().__init__(0.0)
        self.prepare = lambda sources: (time.sleep(delay), self._engine.prepare(sources))


@pytest.mark.realtime
def test_the_camera_is_read_once_the_engine_has_its_portrait(short_clip):
    """A file as the camera starts playing when the engine is ready, not while it starts: its
    first frames (the neutral pose the motion is measured from) are animated, not lost."""
    path, frames = short_clip
    sink = Recorder(keep="nothing")
    report = cam(options(path), sinks=[sink], engine=SlowToStart(1.5))  # longer than the 1.2-s clip
    assert report["frames_captured"] == len(frames)
    assert report["frames_out"] >= len(frames) // 2, report  # not the ~0 a camera read during the start leaves


@pytest.mark.realtime
def test_the_feed_repeats_the_last_frame_then_shows_the_still_and_pauses_to_the_still():
    still = np.full((512, 512, 3), 10, np.uint8)
    live = np.full((256, 256, 3), 200, np.uint8)  # another size: resized to the sinks'
    sink = Recorder()
    feed = Feed([sink], 512, 50, still, hold_s=0.5)
    try:
        time.sleep(0.2)
        feed.put(live, time.perf_counter())
        put_at = time.perf_counter()
        time.sleep(1.0)
        feed.set_paused(True)
        time.sleep(0.2)
        feed.put(live, time.perf_counter())  # paused: not shown
        time.sleep(0.2)
        feed.set_paused(False)
        feed.put(live, time.perf_counter())
        time.sleep(0.1)
    finally:
        feed.close()
    states = [state for _, state in feed.sent_at]
    times = [t for t, _ in feed.sent_at]
    shown = [int(image[0, 0, 0]) for _, image in sink.frames]
    assert all(image.shape == (512, 512, 3) for _, image in sink.frames)
    assert shown[0] == 10 and states[0] == "still"  # nothing live yet: the portrait, never black
    first_live = states.index("live")
    held = [i for i, s in enumerate(states) if s == "held"]
    still_after = [i for i, s in enumerate(states) if s == "still" and i > first_live]
    # The live frame goes out at once, then repeats at the rate (50 fps) for hold_s, then the still.
    assert times[first_live] - put_at < 0.02
    assert 20 <= len(held) <= 30 and all(shown[i] == 200 for i in held)  # 25 at 50 fps, give or take the clock
    assert times[still_after[0]] - put_at == pytest.approx(0.5, abs=0.05) and all(shown[i] == 10 for i in still_after)
    paused = [i for i, s in enumerate(states) if s == "paused"]
    assert len(paused) >= 15 and all(shown[i] == 10 for i in paused)
    assert states[-1] in ("live", "held") and shown[-1] == 200
    assert np.median(np.diff(times[held[0]:held[-1]])) == pytest.approx(0.02, abs=0.004)


@pytest.mark.realtime
def test_keys_on_the_terminal_pause_to_the_still_switch_portraits_and_quit(clip):
    """The control surface without a window: keys on stdin (a pipe here; a terminal is read the
    same way, one key at a time)."""
    path, _, _ = clip
    read_end, write_end = os.pipe()
    sink = Recorder(keep="digests")
    result: dict = {}
    opts = options(path, loop=True, portraits=("astronaut", "grace_hopper"), duration=60)
    with os.fdopen(read_end, "rb", buffering=0) as stdin:
        runner = threading.Thread(target=lambda: result.update(cam(opts, sinks=[sink], stdin=stdin)))
        started = time.perf_counter()
        runner.start()
        stills = {name: Digest(still_of(samples.portrait(name), 512)) for name in ("astronaut", "grace_hopper")}

        def showing(name: str, since: float) -> int:
            """Frames that are exactly that portrait's still (what pause shows)."""
            return sum(1 for t, d in sink.frames if t > since and d == stills[name])

        def moving(since: float) -> int:
            frames = [d for t, d in sink.frames if t > since]
            return sum(1 for a, b in zip(frames, frames[1:]) if a != b)

        wait_until(lambda: moving(0) > 10, 60, "the avatar")
        os.write(write_end, b" ")  # pause: the still portrait, at the output rate
        paused = time.perf_counter() + 0.3
        wait_until(lambda: showing("astronaut", paused) >= 10, 20, "the still portrait")
        os.write(write_end, b"n")  # the next portrait, still paused: its still
        switched = time.perf_counter()
        wait_until(lambda: showing("grace_hopper", switched) >= 10, 30, "the next portrait's still")
        os.write(write_end, b" ")  # resume: the new portrait moves
        resumed = time.perf_counter() + 0.3
        wait_until(lambda: moving(resumed) >= 10, 30, "the new portrait moving")
        assert showing("astronaut", resumed) == 0
        os.write(write_end, b"q\n")
        runner.join(30)
        os.close(write_end)
    assert not runner.is_alive() and result and time.perf_counter() - started < 60  # q, not --duration
    assert sink.closed


def test_the_key_reader_has_stopped_when_close_returns():
    """After close() the reader never touches the descriptor again: its number is the caller's
    to close, and the process may reuse it for the next file it opens (CI once saw a portrait's
    PNG read with 64 bytes missing, right after a cam test closed its stdin pipe)."""
    from streamer.cam import TerminalKeys

    read_end, write_end = os.pipe()
    keys: list[str] = []
    stdin = types.SimpleNamespace(fileno=lambda: read_end)  # the caller keeps the descriptor
    reader = TerminalKeys(keys.append, stdin)
    os.write(write_end, b"n")
    wait_until(lambda: keys == ["n"], 5, "the first key")
    time.sleep(0.05)  # the reader waits in select again
    reader.close()
    assert not [t for t in threading.enumerate() if t.name == "xportrait-keys"]
    os.write(write_end, b"later")
    time.sleep(0.3)
    assert keys == ["n"] and os.read(read_end, 64) == b"later"  # nothing read after close()
    reader.close()  # a second close is harmless
    os.close(read_end)
    os.close(write_end)


@pytest.mark.realtime
def test_r_makes_the_current_pose_the_neutral_one(tmp_path):
    """The camera's head level for 0.8 s, then rolled and held there: the avatar rolls with it;
    after r the held roll is the new neutral, and the avatar's head is level again."""
    def script(t: float) -> samples.Pose:
        return samples.Pose() if t < 0.8 else samples.Pose(roll_deg=ROLL)

    path = tmp_path / "webcam.y4m"
    write_video(path, (f for f, _ in samples.driving_clip("grace_hopper", frames=4 * FPS, fps=FPS, script=script)),
                fps=FPS)
    sink, controls, result = Recorder(keep="halves"), Controls(), {}
    runner = threading.Thread(target=lambda: result.update(cam(options(str(path)), sinks=[sink], controls=controls)))
    runner.start()
    try:
        wait_until(lambda: controls.feed is not None and controls.feed.fresh > 0, 60, "the avatar")
        start = time.perf_counter()  # the camera's first frame, give or take the latency
        time.sleep(max(0.0, start + 2.0 - time.perf_counter()))
        controls.key("r")
        pressed = time.perf_counter()
        runner.join(30)  # the end of the file
    finally:
        controls.quit.set()
        runner.join(30)
    assert result and not runner.is_alive()
    base, = rolls([cv2.resize(still_of(samples.portrait("astronaut"), 512), (256, 256), interpolation=cv2.INTER_AREA)])

    def measured(since: float, until: float) -> list[float]:
        return [r - base for r in rolls([f for t, f in sink.frames if since < t < until]) if r is not None]

    before, after = measured(start + 1.3, pressed), measured(pressed + 0.6, pressed + 1.6)
    assert len(before) >= 5 and len(after) >= 5, (len(before), len(after))
    assert np.median(before) > ROLL / 2, before  # rolled with the camera
    assert abs(np.median(after)) < 3, after  # the same roll, now the neutral: level


def start_xvfb(attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """An Xvfb on a free display. -displayfd: Xvfb picks the display and writes its number
    once it accepts connections. Two X servers starting at once (other tests, other jobs on
    the machine) can race for one display number: the loser exits, and is started again."""
    errors = []
    for _ in range(attempts):
        xvfb = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        number = xvfb.stdout.readline().strip()
        if number:
            return xvfb, ":" + number
        xvfb.kill()
        errors.append(xvfb.communicate()[1].strip()[-300:])
        time.sleep(0.5)
    pytest.fail("Xvfb did not start: " + " | ".join(errors))


@pytest.mark.realtime
def test_the_preview_window_shows_what_the_call_sees(clip, tmp_path):
    """`--preview` in a real X server (Xvfb), read back from its screen, with the README's
    `xportrait cam --portrait my-avatar.png --portrait astronaut` (an image file of one's own
    first): paused from the terminal, the window shows that portrait's still; n pressed in the
    window (a key event through the X server's XTEST, as a keyboard makes one), the next's; q
    in the window quits."""
    from Xlib import X, XK
    from Xlib import display as xdisplay
    from Xlib.ext import xtest

    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (`make pipewire` installs it as root)")
    xvfb, display = start_xvfb()
    producer = None
    try:
        env = {**os.environ, "DISPLAY": display}
        cv2.imwrite(str(tmp_path / "my-avatar.png"), cv2.cvtColor(samples.portrait("grace_hopper"), cv2.COLOR_RGB2BGR))
        producer = subprocess.Popen([sys.executable, "-m", "streamer", "cam", "--portrait", "my-avatar.png",
                                     "--portrait", "astronaut", "--camera", clip[0], "--loop", "--virtual-camera",
                                     "off", "--pipewire", "off", "--preview", "--duration", "60"], env=env,
                                    cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        stills = {name: cv2.resize(still_of(samples.portrait(name), 512), (256, 256), interpolation=cv2.INTER_AREA)
                  for name in ("grace_hopper", "astronaut")}

        def screen() -> np.ndarray:
            for _ in range(10):  # a grab can fail while a window is being mapped
                try:
                    with av.open(display, format="x11grab", options={"video_size": "800x600", "draw_mouse": "0"}) as grab:
                        return next(grab.decode(video=0)).to_ndarray(format="rgb24")
                except av.FFmpegError:
                    time.sleep(0.2)
            pytest.fail(f"cannot read the X server's screen at {display}")

        def match(name: str) -> float:
            shot = cv2.resize(screen(), (400, 300), interpolation=cv2.INTER_AREA)
            return float(cv2.matchTemplate(shot, stills[name], cv2.TM_CCOEFF_NORMED).max())

        def shows(name: str) -> float:
            deadline, best = time.monotonic() + 20, 0.0
            while time.monotonic() < deadline and (best := max(best, match(name))) < 0.95:
                time.sleep(0.3)
            return best

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and screen().max() == 0:  # the window is not up yet
            if producer.poll() is not None:
                pytest.fail(f"cam exited ({producer.returncode}) before its window showed: "
                            + producer.stderr.read().decode()[-2000:])
            time.sleep(0.5)
        if screen().max() == 0:  # say so, and what the cam said, rather than match a black screen
            producer.kill()
            pytest.fail("no window on the X server after 60 s; the cam said: " + producer.communicate()[1].decode()[-2000:])
        producer.stdin.write(b" ")  # pause from the terminal
        producer.stdin.flush()
        assert (best := shows("grace_hopper")) > 0.95, best  # my-avatar.png
        x = xdisplay.Display(display)
        window = next(w for w in x.screen().root.query_tree().children if "xportrait" in str(w.get_wm_name()))
        where = window.translate_coords(x.screen().root, 0, 0)
        size = window.get_geometry()
        xtest.fake_input(x, X.MotionNotify, x=size.width // 2 - where.x, y=size.height // 2 - where.y)

        def press(key: str) -> None:  # the pointer is on the window: the key goes to it
            code = x.keysym_to_keycode(XK.string_to_keysym(key))
            xtest.fake_input(x, X.KeyPress, code)
            xtest.fake_input(x, X.KeyRelease, code)
            x.sync()

        press("n")
        assert (best := shows("astronaut")) > 0.95, best
        press("q")
        assert producer.wait(30) == 0, producer.stderr.read().decode()[-2000:]
        x.close()
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
            producer.wait(10)
        xvfb.terminate()
        xvfb.wait(10)


# -- virtual camera ---------------------------------------------------------------------------------
class FakeDevice:
    """A pyvirtualcam backend (its documented extension point) standing in for the device."""

    opened: list["FakeDevice"] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.args = dict(width=width, height=height, fps=fps, fourcc=fourcc, device=device)
        self.frames: list[np.ndarray] = []
        self.closed = False
        FakeDevice.opened.append(self)

    def send(self, frame: np.ndarray) -> None:
        assert frame.ndim == 1 and frame.flags.c_contiguous  # what pyvirtualcam hands a backend
        self.frames.append(frame.reshape(self.args["height"], self.args["width"], 3).copy())

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return self.args["device"] or "/dev/video10"

    def native_fourcc(self):
        return None


@pytest.fixture
def fake_device():
    import pyvirtualcam

    pyvirtualcam.register_backend("xportrait-test", FakeDevice)
    FakeDevice.opened.clear()
    yield
    pyvirtualcam.camera.BACKENDS.pop("xportrait-test", None)


@pytest.mark.realtime
def test_the_virtual_camera_gets_the_avatar_through_pyvirtualcam(clip, fake_device, tmp_path):
    """And `--record` beside it: the file holds what the virtual camera was sent, at the times sent."""
    import pyvirtualcam

    from streamer.sinks import Recording
    from streamer.video import read_frames

    path, _, _ = clip
    camera = VirtualCamera(512, 512, FPS, device="/dev/video10", backend="xportrait-test")
    assert camera.name == "virtual camera /dev/video10"
    recording = Recording(str(tmp_path / "avatar.mp4"), 512, FPS)
    report = cam(options(path, virtual_camera="on"), sinks=[camera, recording])
    device, = FakeDevice.opened
    assert device.args["width"] == device.args["height"] == 512 and device.args["fps"] == FPS
    assert device.args["fourcc"] == pyvirtualcam.util.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)
    assert device.closed and report["frames_out"] > 20  # of 100 camera frames: > 5 fps even on a loaded machine
    assert len(device.frames) == report["frames_sent_to_sinks"]
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in device.frames)
    # It is the astronaut, and her head rolls with Grace Hopper's: still at first, then one way
    # and the other; in the neutral second it is the portrait itself.
    still = still_of(samples.portrait("astronaut"), 512)
    assert psnr(device.frames[0], still) > 40
    assert_follows_the_clip(device.frames[::3], still)
    recorded = list(read_frames(tmp_path / "avatar.mp4"))
    assert os.listdir(tmp_path) == ["avatar.mp4"] and len(recorded) == len(device.frames)
    assert min(psnr(r.image, f) for r, f in zip(recorded[::5], device.frames[::5])) > 30
    # At the times sent (repeats included): from the first still to the end, the run's length.
    times = [r.time for r in recorded]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert report["seconds"] - 0.5 < times[-1] < report["seconds"] + 3, (times[-1], report["seconds"])


def test_the_virtual_camera_writes_to_the_loopback_device_named_xportrait(tmp_path, fake_device):
    """Beside another loopback device (OBS's, or one loaded without a label) the avatar goes to
    the one the apps list as xportrait, as the README's modprobe line names it, whatever its
    number; --virtual-camera-device still picks one, and without an xportrait device it is
    pyvirtualcam's first."""
    from streamer import sinks

    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    for name, label in (("video0", "Integrated Camera"), ("video2", "OBS Virtual Camera"),
                        ("video7", "Dummy video device (0x0000)"), ("video10", "xportrait")):
        (dev / name).touch()
        (sysfs / name).mkdir(parents=True)
        (sysfs / name / "name").write_text(label + "\n")
    assert sinks.named_loopback("xportrait", str(dev), str(sysfs)) == str(dev / "video10")
    assert sinks.named_loopback("someone else", str(dev), str(sysfs)) is None
    found = sinks.named_loopback("xportrait", str(dev), str(sysfs))
    camera = VirtualCamera(64, 64, 30, backend="xportrait-test", system="Linux",
                           find=lambda: found)
    assert FakeDevice.opened[-1].args["device"] == str(dev / "video10") and camera.device == str(dev / "video10")
    VirtualCamera(64, 64, 30, device="/dev/video3", backend="xportrait-test", system="Linux", find=lambda: found)
    assert FakeDevice.opened[-1].args["device"] == "/dev/video3"
    VirtualCamera(64, 64, 30, backend="xportrait-test", system="Linux", find=lambda: None)
    assert FakeDevice.opened[-1].args["device"] is None
    VirtualCamera(64, 64, 30, backend="xportrait-test", system="Windows", find=lambda: found)
    assert FakeDevice.opened[-1].args["device"] is None  # OBS Virtual Camera: no device path


def assert_follows_the_clip(frames, still: np.ndarray) -> None:
    base, = rolls([still])
    measured = rolls(frames)
    found = [(frame, r - base) for frame, r in zip(frames, measured) if r is not None]
    assert len(found) >= 0.9 * len(frames)  # a face in (nearly) every frame
    relative = [r for _, r in found]
    assert max(relative) > ROLL / 2 and min(relative) < -ROLL / 2, relative
    neutral = [frame for frame, r in found if abs(r) < 1.5]
    assert neutral and np.median([psnr(frame, still) for frame in neutral]) > 22


def test_no_v4l2loopback_device_says_the_exact_modprobe_line(clip, capsys):
    assert MODPROBE == 'sudo modprobe v4l2loopback devices=1 video_nr=10 card_label="xportrait" exclusive_caps=1'
    if any(name.startswith("video") for name in os.listdir("/dev")):
        pytest.skip("this machine has /dev/video* devices")
    with pytest.raises(SinkError) as error:
        VirtualCamera(512, 512, 30, system="Linux")  # the real v4l2loopback backend: no device here
    assert MODPROBE in str(error.value) and "exclusive_caps=1 is what Chrome, Zoom and Meet need" in str(error.value)
    assert "pyvirtualcam said: 'v4l2loopback' backend: No v4l2 loopback device found" in str(error.value)
    # Asked for (on): the command stops with it. Under auto it is a note and other outputs go on.
    with pytest.raises(CamError, match="no v4l2loopback device"):
        open_sinks(options(clip[0], virtual_camera="on"), Controls(), system="Linux")
    with pytest.raises(CamError, match="nothing to send the avatar to:\nno v4l2loopback device"):
        open_sinks(options(clip[0], virtual_camera="auto"), Controls(), system="Linux")
    assert "OBS Virtual Camera" in virtual_camera_missing("Windows", None, "x")
    assert "camera extension" in virtual_camera_missing("Darwin", None, "x")


def test_the_command_line_says_so_too(clip, tmp_path, capsys):
    """The installed command's exit status and words; then the command line in this process
    (the same `main`, without a second interpreter's start)."""
    from streamer.cli import main

    if any(name.startswith("video") for name in os.listdir("/dev")):
        pytest.skip("this machine has /dev/video* devices")
    done = subprocess.run([sys.executable, "-m", "streamer", "cam", "--camera", clip[0], "--virtual-camera", "on",
                           "--pipewire", "off"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert MODPROBE in done.stderr
    assert main(["cam", "--virtual-camera", "off", "--pipewire", "off", "--record", str(tmp_path / "x.mp4")]) == 2
    assert "no camera found" in (err := capsys.readouterr().err), err
    assert os.listdir(tmp_path) == []


def test_a_recording_it_must_not_write_is_refused_before_anything_starts(clip, tmp_path, capsys):
    """`--record` is checked as `animate -o` is (streamer/output.py): a device, a missing
    folder, a format it cannot write or the camera file itself is refused at once, in one
    line and exit status 2, not found out at the first frame (or never)."""
    from streamer.cli import main

    path = clip[0]
    for target, said in (("/dev/null", "is a character device: only a new file or a regular file is written"),
                         (str(tmp_path / "missing" / "avatar.mp4"), "output directory does not exist"),
                         (str(tmp_path / "avatar.txt"), "cannot write '.txt' files"),
                         (path, "output would overwrite an input")):
        status = main(["cam", "--camera", path, "--portrait", "astronaut", "--virtual-camera", "off",
                       "--pipewire", "off", "--record", target, "--duration", "5"])
        err = capsys.readouterr().err
        assert status == 2 and "xportrait cam: --record: " in err and said in err, (target, err)
        assert "Traceback" not in err and "camera " not in err.split("--record")[0], err  # nothing started
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert os.listdir(tmp_path) == []  # no file, no leftover partial


# -- PipeWire, end to end ---------------------------------------------------------------------------
PIPEWIRE_TOOLS = ("pipewire", "wireplumber", "dbus-daemon", "gst-launch-1.0", "pw-cli")


@pytest.fixture(scope="module")
def pipewire():
    """A PipeWire daemon and its session manager on a private runtime dir and session bus."""
    missing = [tool for tool in PIPEWIRE_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"PipeWire is not installed ({', '.join(missing)} missing; `make pipewire` installs it as root)")
    runtime = tempfile.mkdtemp(prefix="xportrait-pw-")
    os.chmod(runtime, 0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime, "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus",
           "PIPEWIRE_RUNTIME_DIR": runtime, "DISPLAY": ""}
    env.pop("PIPEWIRE_REMOTE", None)
    processes = [subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address={env['DBUS_SESSION_BUS_ADDRESS']}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{runtime}/bus") and time.monotonic() < deadline:
            time.sleep(0.05)
        processes.append(subprocess.Popen(["pipewire"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while not os.path.exists(f"{runtime}/pipewire-0") and time.monotonic() < deadline:
            time.sleep(0.05)
        processes.append(subprocess.Popen(["wireplumber"], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        if not os.path.exists(f"{runtime}/pipewire-0"):
            pytest.skip("the PipeWire daemon did not start within 10 s")
        yield env
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(runtime, ignore_errors=True)


def wait_for_node(env: dict, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(["pw-cli", "ls", "Node"], env=env, capture_output=True, text=True, timeout=10).stdout
        if f'node.name = "{name}"' in listing:
            return
        time.sleep(0.2)
    pytest.fail(f"no PipeWire node {name!r} within {timeout:g} s")


@pytest.mark.realtime
def test_the_pipewire_source_carries_the_avatar_to_a_real_consumer(clip, pipewire):
    path, _, _ = clip
    producer = subprocess.Popen([sys.executable, "-m", "streamer", "cam", "--camera", path, "--loop",
                                 "--portrait", "astronaut", "--virtual-camera", "off", "--pipewire", "on",
                                 "--fps", str(FPS), "--duration", "30"],
                                env=pipewire, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_for_node(pipewire, "xportrait", 60)
        time.sleep(1.5)  # past the first, neutral second of the clip: the calibration
        count = 6 * FPS  # more than the 4 s loop (and its restart), whatever its phase: level, one way, the other
        consumer = subprocess.run(
            ["gst-launch-1.0", "-q", "pipewiresrc", "target-object=xportrait", f"num-buffers={count}", "!",
             "videoconvert", "!", "video/x-raw,format=RGB,width=512,height=512", "!", "fdsink", "fd=1"],
            env=pipewire, capture_output=True, timeout=60)
        assert consumer.returncode == 0, consumer.stderr.decode()
    finally:
        producer.send_signal(signal.SIGINT)
        try:
            _, stderr = producer.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            producer.kill()
            _, stderr = producer.communicate()
    assert producer.returncode == 0, stderr  # Ctrl-C is a clean quit
    assert "PipeWire source 'xportrait'" in stderr
    frames = np.frombuffer(consumer.stdout, np.uint8).reshape(-1, 512, 512, 3)
    assert len(frames) == count
    # The astronaut's head follows Grace Hopper's: level, rolled one way, then the other.
    assert_follows_the_clip(frames[::4], still_of(samples.portrait("astronaut"), 512))


def test_pipewire_missing_is_a_clear_answer(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no daemon socket there
    monkeypatch.delenv("PIPEWIRE_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("PIPEWIRE_REMOTE", raising=False)
    if shutil.which("gst-launch-1.0") is None:
        match = "sudo apt install gstreamer1.0-tools gstreamer1.0-pipewire"
    else:
        match = "no PipeWire daemon for this user"
    with pytest.raises(SinkError, match=match):
        PipeWireSource(64, 64, 30)


# -- remote -----------------------------------------------------------------------------------------
def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


TOKEN = "cam-test-token"


@pytest.mark.realtime
def test_remote_mode_holds_the_last_frame_shows_the_portrait_and_reconnects(clip, capfd):
    """The camera to a real `xportrait serve` and back; a wrong token is refused (401: stop),
    a second camera finds the server full (503: it retries); the server killed mid-stream and
    started again on the same port: the sink keeps the last good frame, then the still
    portrait, and the avatar comes back by itself, said on the terminal, with backoff. The
    retargeting keys go to the server's session, and to the new one after the reconnection."""
    import json
    import re
    import urllib.request

    from streamer.cam import BACKOFF_S

    path, _, _ = clip

    def session_controls(url: str) -> list[dict]:
        request = urllib.request.Request(f"{url}/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return [s["retargeting"] for s in json.load(response)["sessions"]]

    def waits(said: str, what: str) -> list[float]:
        return [float(w) for w in re.findall(what + r" in ([\d.]+) s", said)]

    backoff = [*BACKOFF_S, *[BACKOFF_S[-1]] * 20]
    # The stills go out exactly as made (never through a codec): a checksum tells them apart.
    still, grace = (Digest(still_of(samples.portrait(name), 512)) for name in ("astronaut", "grace_hopper"))
    sink = Recorder(keep="digests")
    controls = Controls()
    result: dict = {}
    errors: list[BaseException] = []

    def main():
        try:
            result.update(cam(opts, sinks=[sink], controls=controls))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    def is_still(digest: Digest) -> bool:
        """One of the two portraits' stills (the second after the switch to it)."""
        return digest == still or digest == grace

    def live_since(start: float) -> int:
        """Avatar frames (neither the still nor a repeat) sent after `start`."""
        frames = [(t, image) for t, image in sink.frames if t > start]
        return sum(1 for (_, a), (_, b) in zip(frames, frames[1:]) if not is_still(b) and a != b)

    runner = threading.Thread(target=main)
    serve_args = ("--idle-timeout", "3", "--token", TOKEN, "--max-sessions", "1")
    with running_server(*serve_args) as (server, url):
        port = url.rsplit(":", 1)[1]
        with pytest.raises(CamError, match=r"refused the offer \(401\).*pass the token the server was started with") \
                as refused:
            cam(options(path, server=url, token="wrong"), sinks=[Recorder(keep="nothing")])
        assert refused.value.status == 1
        opts = options(path, loop=True, server=url, token=TOKEN, hold=1.0, lost_after=2.0, connect_timeout=30,
                       portraits=("astronaut", "grace_hopper"))
        runner.start()
        try:
            wait_until(lambda: live_since(0) >= 10 or errors, 90, "the avatar from the server")
            assert not errors, errors
            # h: a steady head, in the server's session (its /stats says so).
            controls.key("h")
            wait_until(lambda: [c["head_pose"] for c in session_controls(url)] == [0.0], 20,
                       "the steady head in the server's session")
            # n: the server's next portrait (its gallery: astronaut, grace_hopper); paused, its still shows.
            capfd.readouterr()
            controls.key("n")
            said = []
            wait_until(lambda: said.append(capfd.readouterr().err) or "portrait: grace_hopper" in "".join(said), 30,
                       "the portrait switch")
            controls.key(" ")
            paused = time.perf_counter() + 0.3
            wait_until(lambda: sum(1 for t, d in sink.frames if t > paused and d == grace) >= 5, 20,
                       "the next portrait's still")
            controls.key(" ")
            # A second camera: the one session is taken. It says so and keeps trying.
            capfd.readouterr()
            second = Controls()
            threading.Timer(3.0, second.quit.set).start()  # refused at once: two tries (0.5 s, 1 s) take ~1.5 s
            busy = cam(options(path, server=url, token=TOKEN), sinks=[Recorder(keep="nothing")], controls=second)
            said = capfd.readouterr().err
            assert busy["connects"] == 0 and "the server refused the offer (503): server busy" in said, said
            tries = waits(said, "trying again")
            assert len(tries) >= 2 and tries == backoff[:len(tries)], said  # 0.5 s, then 1 s, ...
            # Live again (the second camera's start may have stalled this one past its hold),
            # then the server dies mid-stream.
            resumed = time.perf_counter()
            wait_until(lambda: live_since(resumed) >= 5 or errors, 60, "the avatar before the kill")
            server.kill()  # mid-stream, no goodbye
            killed = time.perf_counter()
            server.wait(10)
        except BaseException:
            controls.quit.set()
            runner.join(30)
            raise
    try:
        # Started again at once on the same port; it takes a while to come up meanwhile.
        with running_server("--port", port, *serve_args) as (_, again):
            assert again == url
            wait_until(lambda: live_since(killed + 2.5) >= 10 or errors, 90, "the avatar after the restart")
            # The new session got the controls in force (the steady head) without a key pressed.
            assert [c["head_pose"] for c in session_controls(again)] == [0.0]
    finally:
        controls.quit.set()
        runner.join(30)
    assert not errors, errors
    said = capfd.readouterr().err
    lost = said[said.index("connection lost"):]
    assert "the camera shows the last frame, then the portrait; reconnecting in 0.5 s" in lost, said
    assert "reconnected to " + url in lost, said
    for loss in lost.split("connection lost"):  # (a loaded machine may lose it once more: see below)
        retries = waits(loss, "reconnecting")
        assert retries == backoff[:len(retries)], said  # 0.5, 1, 2, 4, 4, ... s until it is back
    after = [(t, image) for t, image in sink.frames if t > killed]
    # The last good frame: the last avatar frame before the still (frames in flight at the kill
    # may still arrive just after it, and then the last of them is the one held).
    lost_at = next(i for i, (_, image) in enumerate(after) if is_still(image))
    last_good = next(image for _, image in reversed(sink.frames[:len(sink.frames) - len(after) + lost_at])
                     if not is_still(image))
    held = [t for t, image in after[:lost_at] if image == last_good]
    stills = [t for t, image in after if is_still(image)]
    back = [t for t, image in after if not is_still(image) and image != last_good]
    # The last good frame, repeated at the output rate for about hold_s, then the still portrait,
    # never black; then the avatar again.
    assert held and stills and back, (len(held), len(stills), len(back))
    assert held[-1] < stills[0] < back[-1]
    assert held[-1] - killed < 1.0 + 0.6 and len(held) >= 0.5 * FPS, (held[-1] - killed, len(held))
    assert all(image.thumb.mean() > 40 for _, image in after)
    # (A loaded machine may stall for the lost_after_s once more: then one more loss and reconnect.)
    assert result["losses"] >= 1 and result["connects"] == result["losses"] + 1, result
    assert result["frames_out"] >= 20 and result["mode"] == "remote animate"


# -- the README -------------------------------------------------------------------------------------
def test_the_readme_cam_commands_are_valid_command_lines():
    """The README's `xportrait cam` lines need a webcam, a kernel module or OBS: here each is
    parsed by the real command line (flags, values, the options object), not run."""
    import re
    import shlex
    from pathlib import Path

    from streamer.options import cam_options
    from streamer.cli import build_parser

    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    lines = re.findall(r"^\.venv/bin/xportrait (cam\b.*)$", text, flags=re.M)
    lines += [m for m in re.findall(r"`\.venv/bin/xportrait (cam\b[^`]*)`", text)]
    assert len(lines) >= 4, lines
    for line in lines:
        argv = shlex.split(line)
        parser = build_parser(argv)
        parser = parser[0] if isinstance(parser, tuple) else parser  # (the parser, its subcommands')
        opts = cam_options(parser.parse_args(argv))
        assert isinstance(opts, CamOptions), line
    assert MODPROBE.removeprefix("sudo ") in text
    # `make cam` is a target that installs the cam extra and runs this command.
    makefile = (readme.parent / "Makefile").read_text()
    assert "make cam" in text and re.search(r"^cam: \$\(VENV\)/\.installed-cam$", makefile, flags=re.M)
    assert "pip install -q -e '.[cam]'" in makefile and "$(BIN)/xportrait cam $(CAM_ARGS)" in makefile


def test_a_server_certificate_this_machine_does_not_trust_stops_with_what_to_do(clip, tmp_path):
    """A --self-signed server (its certificate made by streamer/tls.py, as serve makes it),
    reached over real TLS: retrying cannot help, so cam says what to do and stops."""
    from aiohttp import web

    from streamer.tls import self_signed, server_context

    cert, key = self_signed(["127.0.0.1"], tmp_path)
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/offer", lambda request: web.json_response({"error": "never reached"}, status=500))
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cert, key))
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    serving = threading.Thread(target=loop.run_forever, daemon=True)
    serving.start()
    try:
        with pytest.raises(CamError, match=r"certificate is not trusted here .*SSL_CERT_FILE=cert.pem") as error:
            cam(options(clip[0], server=f"https://127.0.0.1:{port}"), sinks=[Recorder(keep="nothing")])
        assert error.value.status == 1
        # What it says works: with the certificate trusted, TLS goes through (and this stand-in
        # server refuses the offer, which the command reports).
        done = subprocess.run([sys.executable, "-m", "streamer", "cam", "--camera", clip[0], "--server",
                               f"https://127.0.0.1:{port}", "--virtual-camera", "off", "--pipewire", "off",
                               "--record", str(tmp_path / "x.mp4")], env={**os.environ, "SSL_CERT_FILE": str(cert)},
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 1 and "refused the offer (500): never reached" in done.stderr, done.stderr[-2000:]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        serving.join(10)
        loop.close()
