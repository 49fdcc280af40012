"""Where `xportrait cam` puts the avatar: a virtual camera that meeting apps list, a PipeWire
video source, a preview window, a file; and the `Feed` that drives them all.

- `VirtualCamera`: pyvirtualcam, i.e. a v4l2loopback device on Linux, OBS Virtual Camera on
  Windows and macOS. Zoom, Meet, Teams, Chrome and OBS list it as a camera.
- `PipeWireSource`: a PipeWire node (media.class Video/Source, media.role Camera) named
  "xportrait": no kernel module, no root; current browsers and OBS read cameras through PipeWire.
  It is a `gst-launch-1.0 fdsrc ! rawvideoparse ! videoconvert ! pipewiresink` child fed raw RGB
  frames on a pipe: PyGObject from PyPI needs GLib 2.80 (Debian 12 has 2.74) and ships no
  Linux wheels, Debian's python3-gi is built for Debian's own Python, and GStreamer's command
  line is the same pipeline with nothing to compile.
- `Preview`: an OpenCV window (with the hot keys), `Recording`: an H.264 MP4.

The `Feed` has one thread. It sends each new avatar frame to every sink as soon as it arrives
(newest only: a frame that arrives while the sinks are busy replaces the one waiting), and when
none arrives it repeats the last one at the output rate, so a meeting app never sees the camera
stall; after `hold_s` without a new frame (the engine gone, the connection lost) and while
paused, it sends the still portrait instead, never black and never a frozen face.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from typing import Callable, Protocol

import cv2
import numpy as np

from .options import HOLD_S  # the last good frame is shown this long without a new one, then the still

logger = logging.getLogger("xportrait.cam")

NAME = "xportrait"  # what people see in their apps' camera lists
MODPROBE = f'sudo modprobe v4l2loopback devices=1 video_nr=10 card_label="{NAME}" exclusive_caps=1'


class SinkError(RuntimeError):
    """A sink that cannot be opened (or has stopped), with what to do about it."""


class Sink(Protocol):
    name: str

    def send(self, rgb: np.ndarray) -> None:
        """Show one (size, size, 3) uint8 RGB frame; the array is reused after this returns."""

    def close(self) -> None: ...


# -- virtual camera (pyvirtualcam) -------------------------------------------------------------------
def virtual_camera_missing(system: str, device: str | None, detail: str) -> str:
    """What to do when pyvirtualcam finds no device to write to, per OS."""
    if system == "Linux":
        where = f" at {device}" if device else ""
        return (f"no v4l2loopback device{where}: meeting apps read the avatar from one. Install and load it:\n"
                "  sudo apt install v4l2loopback-dkms        # Fedora: akmod-v4l2loopback, Arch: v4l2loopback-dkms\n"
                f"  {MODPROBE}\n"
                "(exclusive_caps=1 is what Chrome, Zoom and Meet need to list it; video_nr=10 makes it /dev/video10, "
                "pass --virtual-camera-device /dev/video10 if you have several)\n"
                f"pyvirtualcam said: {detail}")
    return ("no OBS Virtual Camera: install OBS Studio 28 or newer (https://obsproject.com), "
            + ("then start its virtual camera once (Start Virtual Camera) so macOS installs the camera extension, "
               "and stop it again; " if system == "Darwin" else "which registers the virtual camera; ")
            + "if OBS itself is running its virtual camera, stop it there. Apps list it as \"OBS Virtual Camera\".\n"
            f"pyvirtualcam said: {detail}")


def named_loopback(label: str = NAME, dev: str = "/dev", sysfs: str = "/sys/class/video4linux") -> str | None:
    """The video device whose name (v4l2loopback's card_label) is `label`, if there is one."""
    paths = sorted(glob.glob(os.path.join(dev, "video*")), key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))
    for path in paths:
        try:
            with open(os.path.join(sysfs, os.path.basename(path), "name")) as f:
                if f.read().strip() == label:
                    return path
        except OSError:
            continue
    return None


class VirtualCamera:
    """The avatar as a camera device (pyvirtualcam). `backend` picks a pyvirtualcam backend by
    name (None: the OS's own); tests register a fake one with `pyvirtualcam.register_backend`.
    On Linux without a `device`, the loopback device labelled xportrait (`find`) when there is
    one, not merely the first (OBS's, say), so that what the apps list as xportrait shows it."""

    def __init__(self, width: int, height: int, fps: float, device: str | None = None, backend: str | None = None,
                 system: str | None = None, find: Callable[[], str | None] = named_loopback):
        try:
            import pyvirtualcam
        except ImportError:
            raise SinkError("the virtual camera needs pyvirtualcam: pip install 'xportrait[cam]'") from None
        if device is None and (system or platform.system()) == "Linux":
            device = find()
        try:
            self._camera = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                               device=device, backend=backend)
        except RuntimeError as exc:
            raise SinkError(virtual_camera_missing(system or platform.system(), device, str(exc).strip())) from None
        self.device = self._camera.device
        self.name = f"virtual camera {self.device}"

    def send(self, rgb: np.ndarray) -> None:
        self._camera.send(rgb)

    def close(self) -> None:
        self._camera.close()


# -- PipeWire -----------------------------------------------------------------------------------------
def pipewire_socket() -> str | None:
    """The PipeWire daemon's socket for this user, if one is listening there."""
    remote = os.environ.get("PIPEWIRE_REMOTE", "pipewire-0")
    runtime = os.environ.get("PIPEWIRE_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    path = remote if os.path.isabs(remote) else (os.path.join(runtime, remote) if runtime else None)
    return path if path and os.path.exists(path) else None


def pipewire_missing() -> str | None:
    """Why a PipeWire source cannot be made here (None: it can)."""
    if shutil.which("gst-launch-1.0") is None or shutil.which("gst-inspect-1.0") is None:
        return ("the PipeWire source needs GStreamer's command line and PipeWire plugin: "
                "sudo apt install gstreamer1.0-tools gstreamer1.0-pipewire gstreamer1.0-plugins-base")
    if subprocess.run(["gst-inspect-1.0", "pipewiresink"], capture_output=True, timeout=30).returncode != 0:
        return "GStreamer has no pipewiresink: sudo apt install gstreamer1.0-pipewire"
    if pipewire_socket() is None:
        return ("no PipeWire daemon for this user (no pipewire-0 socket in $XDG_RUNTIME_DIR): on a desktop "
                "session it runs by itself (systemctl --user start pipewire wireplumber)")
    return None


class PipeWireSource:
    """A PipeWire video source named `name`, fed through a gst-launch-1.0 child."""

    START_S = 1.0  # a child that cannot connect (no daemon, a bad element) exits within this

    def __init__(self, width: int, height: int, fps: float, name: str = NAME):
        if (why := pipewire_missing()) is not None:
            raise SinkError(why)
        rate = f"{round(fps * 1000)}/1000"
        props = (f"props,media.class=Video/Source,media.role=Camera,node.name={name},"
                 f"node.description={name},media.name={name}")
        self.command = ["gst-launch-1.0", "-q", "fdsrc", "fd=0", f"blocksize={width * height * 3}", "!",
                        "rawvideoparse", f"width={width}", f"height={height}", "format=rgb", f"framerate={rate}", "!",
                        "videoconvert", "!",
                        "pipewiresink", "mode=provide", "sync=false", f"client-name={name}", f"stream-properties={props}"]
        self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        try:
            self._process.wait(self.START_S)
        except subprocess.TimeoutExpired:
            pass
        else:
            error = self._process.stderr.read().decode(errors="replace").strip()
            raise SinkError(f"the PipeWire source did not start: {error or 'gst-launch-1.0 exited'}")
        self.name = f"PipeWire source {name!r}"
        self.node = name

    def send(self, rgb: np.ndarray) -> None:
        try:
            self._process.stdin.write(memoryview(np.ascontiguousarray(rgb)).cast("B"))
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            error = self._process.stderr.read().decode(errors="replace").strip() if self._process.poll() is not None \
                else ""
            raise SinkError(f"the PipeWire source stopped{': ' + error if error else ''}") from None

    def close(self) -> None:
        try:
            self._process.stdin.close()  # end of stream: gst-launch drains and exits
        except OSError:
            pass
        try:
            self._process.wait(3)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(3)
        self._process.stderr.close()


# -- preview, recording -------------------------------------------------------------------------------
def preview_missing(system: str | None = None) -> str | None:
    if (system or platform.system()) == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "--preview needs a desktop (no DISPLAY or WAYLAND_DISPLAY): the keys on the terminal work without it"
    return None


class Preview:
    """An OpenCV window showing what the other sinks get; its keys go to `on_key`.
    Closing the window counts as the quit key."""

    TITLE = "xportrait (r recalibrate, n/p portrait, space pause, q quit)"

    def __init__(self, on_key: Callable[[str], None]):
        if (why := preview_missing()) is not None:
            raise SinkError(why)
        self.name = "preview window"
        self._on_key = on_key
        self._bgr: np.ndarray | None = None
        self._opened = False

    def send(self, rgb: np.ndarray) -> None:
        if self._bgr is None or self._bgr.shape != rgb.shape:
            self._bgr = np.empty_like(rgb)
        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR, dst=self._bgr)
        if not self._opened:  # a plain window: no toolbar, no status bar
            cv2.namedWindow(self.TITLE, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            self._opened = True
        cv2.imshow(self.TITLE, self._bgr)
        key = cv2.waitKey(1)
        if key >= 0:
            self._on_key("esc" if key == 27 else " " if key == 32 else chr(key & 0xFF))
        elif cv2.getWindowProperty(self.TITLE, cv2.WND_PROP_VISIBLE) < 1:
            self._on_key("q")

    def close(self) -> None:
        if self._opened:
            cv2.destroyWindow(self.TITLE)
            cv2.waitKey(1)


class Recording:
    """The avatar as a video file (H.264 MP4, or what the extension chooses), each frame at
    the time it was sent. The path is checked as `animate -o`'s is (streamer/output.py): a new
    or regular file, never a device, a missing folder or one of the inputs; it grows under a
    hidden name and takes its own on close."""

    def __init__(self, path: str, size: int, fps: float, inputs: tuple[str, ...] = ()):
        from .output import OutputPathError, atomic_output, check_output
        from .video import VideoWriter

        try:
            out, container = check_output(path, inputs)
        except OutputPathError as exc:
            raise SinkError(f"--record: {exc}") from None
        self.name = f"recording {path}"
        self._file = contextlib.ExitStack()
        partial = self._file.enter_context(atomic_output(out))
        try:
            self._writer = VideoWriter(partial, size, size, fps, preset="veryfast", container=container)
        except BaseException as exc:
            self._file.__exit__(type(exc), exc, exc.__traceback__)  # the partial file goes
            raise
        self._start: float | None = None

    def send(self, rgb: np.ndarray) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        self._writer.write(rgb, now - self._start)

    def close(self) -> None:
        try:
            self._writer.close()
        except BaseException as exc:
            self._file.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._file.close()  # complete: renamed to its name


# -- the feed -----------------------------------------------------------------------------------------
class Feed:
    """The avatar's one way out to every sink, on its own thread.

    `put` hands over a new frame (any size; copied, and resized to the sinks' when it differs);
    the thread sends it at once, or repeats the last one every 1/fps when nothing new comes:
    the last good frame for `hold_s`, then the still portrait. Paused, it sends the still.
    A sink that fails is closed and left out, and said so; `on_error` hears about it.
    """

    def __init__(self, sinks: list[Sink], size: int, fps: float, still: np.ndarray, hold_s: float = HOLD_S,
                 on_error: Callable[[Sink, Exception], None] | None = None):
        self.sinks = list(sinks)
        self.size, self.interval, self.hold_s = size, 1.0 / fps, hold_s
        self._on_error = on_error
        self._cond = threading.Condition()
        self._incoming = np.zeros((size, size, 3), np.uint8)  # written by put, under the lock
        self._showing = np.zeros((size, size, 3), np.uint8)  # the last live frame, read by the thread
        self._fresh = False  # a frame waits in _incoming
        self._fresh_at: float | None = None  # its capture time
        self._last_live: float | None = None  # when the last live frame came in
        self.paused = False
        self.state = "starting"
        self.sent = self.fresh = self.replaced = 0
        self.first_fresh_at: float | None = None  # when the first and the last new frame went out
        self.last_fresh_at: float | None = None
        self.latency_ms: deque[float] = deque(maxlen=2000)  # capture to sinks, per fresh frame
        self.latency_at: deque[float] = deque(maxlen=2000)  # when each of those was measured
        self.sent_at: deque[tuple[float, str]] = deque(maxlen=2000)  # (time, state) per frame sent
        self.set_still(still)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="xportrait-feed", daemon=True)
        self._thread.start()

    def _fit(self, image: np.ndarray, out: np.ndarray) -> None:
        if image.shape[:2] == out.shape[:2]:
            np.copyto(out, image)
        else:
            cv2.resize(image, (self.size, self.size), dst=out, interpolation=cv2.INTER_LINEAR)

    @property
    def fps(self) -> float:
        """New frames per second out, from the first to the last."""
        if self.fresh < 2 or self.last_fresh_at <= self.first_fresh_at:
            return 0.0
        return (self.fresh - 1) / (self.last_fresh_at - self.first_fresh_at)

    def set_still(self, image: np.ndarray) -> None:
        still = np.empty((self.size, self.size, 3), np.uint8)  # a new array: one being sent stays intact
        self._fit(image, still)
        with self._cond:
            self._still = still
            self._cond.notify()

    def put(self, image: np.ndarray, captured_at: float | None) -> None:
        """A new avatar frame whose driving frame was captured at `captured_at` (perf_counter;
        None when not known: it is sent all the same, its latency is not counted)."""
        with self._cond:
            if self._fresh:
                self.replaced += 1  # the sinks were still busy with the previous one
            self._fit(image, self._incoming)
            self._fresh, self._fresh_at = True, captured_at
            self._last_live = time.perf_counter()
            self._cond.notify()

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify()

    def _run(self) -> None:
        last_sent = -np.inf
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        break
                    now = time.perf_counter()
                    due = last_sent + self.interval
                    if self._fresh and not self.paused:
                        break
                    if now >= due:
                        break
                    self._cond.wait(due - now)
                if self._stop:
                    break
                now = time.perf_counter()
                captured_at = None
                if self.paused:
                    self._fresh = False
                    state, image = "paused", self._still
                elif self._fresh:
                    self._incoming, self._showing = self._showing, self._incoming
                    captured_at, self._fresh = self._fresh_at, False
                    self.fresh += 1
                    self.first_fresh_at = self.first_fresh_at or now
                    self.last_fresh_at = now
                    state, image = "live", self._showing
                elif self._last_live is not None and now - self._last_live < self.hold_s:
                    state, image = "held", self._showing
                else:
                    state, image = "still", self._still
                self.state = state
            # put writes only _incoming, never _showing; set_still replaces _still with a new array.
            for sink in list(self.sinks):
                try:
                    sink.send(image)
                except Exception as exc:  # noqa: BLE001 - one broken sink must not stop the others
                    self._drop(sink, exc)
            if captured_at is not None:  # capture to every sink done
                done = time.perf_counter()
                self.latency_ms.append((done - captured_at) * 1e3)
                self.latency_at.append(done)
            last_sent = now
            self.sent += 1
            self.sent_at.append((now, state))
        for sink in self.sinks:  # on this thread: a preview window belongs to the thread that made it
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                logger.error("closing %s failed: %s", sink.name, exc)

    def _drop(self, sink: Sink, exc: Exception) -> None:
        logger.error("%s failed, left out from now on: %s", sink.name, exc)
        self.sinks.remove(sink)
        try:
            sink.close()
        except Exception:  # noqa: BLE001
            pass
        if self._on_error is not None:
            self._on_error(sink, exc)

    def close(self) -> None:
        """Stop the thread; it closes every sink on its way out."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)
