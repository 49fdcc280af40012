"""The local webcam through PyAV (libavdevice): v4l2 on Linux, AVFoundation on macOS, DirectShow
on Windows; or a video file played at its own rate through the same reader (demos, tests).

A reader thread pulls frames at the device's pace and keeps only the newest in a `Latest` slot:
whoever takes frames (the engine, the WebRTC sender) gets the newest one when it is ready for
it, and frames it was too slow for are dropped and counted, never queued. Frames stay PyAV
`VideoFrame`s (the device's own pixel format) until a consumer converts the one it takes, so a
dropped frame costs no conversion.

Every failure to open a camera is a `CameraError` whose message says what to do: no camera,
the camera busy (another app has it), no permission, a name that is not there.
"""

from __future__ import annotations

import errno
import glob
import os
import platform
import re
import threading
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

import av

T = TypeVar("T")

DEFAULT_SIZE = (640, 480)
DEFAULT_FPS = 30
# v4l2loopback's card label when none is given, and ours: never picked as "the first camera".
LOOPBACK_NAMES = ("dummy video device", "xportrait", "obs virtual camera", "v4l2loopback")
# What a --camera that is no device but a missing video file ends in (no camera is named so).
VIDEO_FILES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".y4m", ".gif", ".ts", ".flv", ".wmv", ".mpg")


class CameraError(RuntimeError):
    """A camera that cannot be opened or read, with what to do about it."""


class Latest(Generic[T]):
    """A one-item slot: `put` replaces what is there (counting it as dropped if nobody took it),
    `take` waits for an item newer than the last one taken. Thread-safe; never a queue."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: T | None = None
        self._taken = True
        self.seq = 0  # items put so far
        self.dropped = 0  # items replaced before anybody took them
        self.closed = False

    def put(self, item: T) -> None:
        with self._cond:
            if not self._taken:
                self.dropped += 1
            self._item, self._taken = item, False
            self.seq += 1
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> T | None:
        """The newest item not taken yet; None after `timeout` seconds or once closed."""
        with self._cond:
            if self._cond.wait_for(lambda: not self._taken or self.closed, timeout) and not self._taken:
                self._taken = True
                return self._item
            return None

    def peek(self) -> T | None:
        """The newest item, taken or not (it stays in the slot)."""
        with self._cond:
            return self._item

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


@dataclass
class Captured:
    frame: av.VideoFrame  # as the device delivered it (yuyv422, mjpeg-decoded yuvj422p, nv12, ...)
    index: int  # frames read from the device so far, this one included, minus one
    at: float  # time.perf_counter() when the reader got it


@dataclass(frozen=True)
class CameraInput:
    """What `av.open` gets: a device (or file) URL, the input format, and its options."""

    url: str
    format: str | None  # None: a file, demuxed by its own format and paced at its frame rate
    options: dict
    label: str  # for messages

    @property
    def is_file(self) -> bool:
        return self.format is None


def _v4l2_candidates(dev: str = "/dev", sysfs: str = "/sys/class/video4linux") -> list[str]:
    """Capture nodes in /dev/video* order, loopback devices (ours among them) left out."""
    found = []
    for path in sorted(glob.glob(os.path.join(dev, "video*")), key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0)):
        node = os.path.join(sysfs, os.path.basename(path))
        try:
            with open(os.path.join(node, "name")) as f:
                name = f.read().strip().lower()
        except OSError:
            name = ""
        if any(label in name for label in LOOPBACK_NAMES):
            continue
        try:  # a UVC camera has a second node for metadata (index 1): only index 0 captures
            with open(os.path.join(node, "index")) as f:
                if f.read().strip() not in ("", "0"):
                    continue
        except OSError:
            pass
        found.append(path)
    return found


def _dshow_first() -> str:
    from av.device import enumerate_input_devices

    try:
        devices = [d for d in enumerate_input_devices("dshow") if "video" in d.media_types]
    except (av.FFmpegError, ValueError) as exc:
        raise CameraError(f"cannot list the cameras (DirectShow): {exc}; name one with --camera") from None
    devices = [d for d in devices if not any(label in d.description.lower() for label in LOOPBACK_NAMES)]
    if not devices:
        raise CameraError("no camera found (DirectShow lists none): plug one in, or name one with --camera")
    return devices[0].description


def camera_input(camera: str | None, size: tuple[int, int] = DEFAULT_SIZE, fps: float = DEFAULT_FPS,
                 system: str | None = None) -> CameraInput:
    """Where `--camera` points on this OS: None is the first camera; a number is that camera's
    index; a name or a device path is itself; an existing regular file is a video file."""
    system = system or platform.system()
    if camera is not None and os.path.isfile(camera):
        return CameraInput(camera, None, {}, camera)
    if camera is not None and os.path.splitext(camera)[1].lower() in VIDEO_FILES:
        raise CameraError(f"no video file at {camera} (--camera takes a camera or a video file to play as one)")
    options = {"video_size": f"{size[0]}x{size[1]}", "framerate": f"{fps:g}"}
    if system == "Linux":
        if camera is None:
            candidates = _v4l2_candidates()
            if not candidates:
                raise CameraError("no camera found: no /dev/video* capture device (plug one in, check `ls /dev/video*`, "
                                  "or pass --camera /dev/videoN)")
            camera = candidates[0]
        elif camera.isdigit():
            camera = f"/dev/video{camera}"
        return CameraInput(camera, "v4l2", options, camera)
    if system == "Darwin":
        index = camera if camera is not None else "0"
        return CameraInput(f"{index}:none", "avfoundation", {**options, "pixel_format": "nv12"}, f"camera {index}")
    if system == "Windows":
        name = _dshow_first() if camera is None else camera
        return CameraInput(f"video={name}", "dshow", options, name)
    raise CameraError(f"no camera input for {system}; pass a video file with --camera")


def _open_error(source: CameraInput, exc: BaseException) -> CameraError:
    code = getattr(exc, "errno", None)
    if code == errno.EBUSY:
        return CameraError(f"the camera {source.label} is busy: another app (a call, a browser tab, OBS) is using "
                           "it; close that app or pick another camera with --camera")
    if code in (errno.EACCES, errno.EPERM):
        return CameraError(f"no permission to open the camera {source.label}: add yourself to the 'video' group "
                           "(sudo usermod -aG video $USER, then log in again)")
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO) or isinstance(exc, FileNotFoundError):
        return CameraError(f"no camera at {source.label}: it is not plugged in or has another name "
                           "(`ls /dev/video*` on Linux); pick one with --camera")
    if code == errno.EINVAL and source.format is not None:
        return CameraError(f"the camera {source.label} does not offer {source.options.get('video_size')} at "
                           f"{source.options.get('framerate')} fps: try --camera-size 640x480 --camera-fps 30")
    hint = "" if source.is_file else " (if other apps can use it, try another --camera-size or --camera-fps)"
    return CameraError(f"cannot open the camera {source.label}: {getattr(exc, 'strerror', None) or exc}{hint}")


class Camera:
    """A reader thread on one camera input, the newest frame in `frames`. A context manager.

    Opening happens in the constructor, so a missing or busy camera fails at once; reading
    starts then, or with `start()` when `start=False` (once whoever takes the frames is ready:
    a file then plays from its first frame). A file is read at its frame rate (as a device
    delivers frames) and, with `loop`, starts over at its end; a device that stops
    delivering, or a file that ends, closes `frames` and sets `error` or `ended`.
    """

    def __init__(self, source: CameraInput, loop: bool = False, start: bool = True):
        self.source = source
        self.loop = loop
        try:
            self._container = av.open(source.url, format=source.format, options=source.options)
        except (av.FFmpegError, OSError) as exc:
            raise _open_error(source, exc) from None
        if not self._container.streams.video:
            self._container.close()
            raise CameraError(f"{source.label} has no video stream")
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else DEFAULT_FPS
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        self.frames: Latest[Captured] = Latest()
        self.read = 0
        self.ended = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xportrait-camera", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start reading (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()

    @property
    def dropped(self) -> int:
        return self.frames.dropped

    def _decoded(self):
        """Frames forever (a looped file), or until the device or file ends."""
        while True:
            yield from self._container.decode(video=0)
            if not (self.loop and self.source.is_file):
                return
            self._container.seek(0)

    def _run(self) -> None:
        start = None
        offset = 0.0  # seconds of file already played, for loops
        last_time = 0.0
        try:
            for frame in self._decoded():
                if self._stop.is_set():
                    return
                if self.source.is_file:  # a device's pace: each frame when its time comes
                    moment = float(frame.time) if frame.time is not None else self.read / self.fps
                    if moment + offset < last_time:  # the file started over
                        offset = last_time + 1 / self.fps
                    last_time = moment + offset
                    now = time.perf_counter()
                    if start is None:
                        start = now - last_time
                    if start + last_time > now and self._stop.wait(start + last_time - now):
                        return
                self.frames.put(Captured(frame, self.read, time.perf_counter()))
                self.read += 1
            self.ended = True
        except (av.FFmpegError, OSError) as exc:
            self.error = f"the camera {self.source.label} stopped: {getattr(exc, 'strerror', None) or exc}"
        finally:
            self.frames.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)  # a device read returns within a frame interval
        self.frames.close()
        if not self._thread.is_alive():  # never close the container under a read in progress
            self._container.close()

    def __enter__(self) -> "Camera":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
