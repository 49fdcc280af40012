"""`xportrait cam`: the local webcam in, the avatar out as a camera that meeting apps and OBS list.

    camera (streamer/capture.py) -> engine, here or on a server -> Feed (streamer/sinks.py)
                                                                    -> virtual camera, PipeWire,
                                                                       preview window, file

Local (no --server): the engine runs on this machine (warp by default, the diffusion engine
on a local GPU) in the live pipeline that `serve` runs per session (streamer/pipeline.py):
tracking and the engine on their own threads, one-frame slots between them, so the newest
camera frame is the one animated and latency stays one engine step however slow it is.

Remote (--server URL): the camera goes over WebRTC to a running `xportrait serve` through the
streaming client's `Connection` (client/stream_client.py) and the avatar comes back into the
Feed. When the connection is lost (no frame for LOST_AFTER_S, or WebRTC says so) the Feed
keeps showing the last good frame, then the still portrait, while the client reconnects with
backoff; each step is said on stderr.

Keys, in the preview window or on the terminal: r recalibrate (the current pose becomes
neutral), n / p next / previous portrait, space pause (the still portrait), q quit; and the
retargeting controls (engines/retarget.py; --expression, --head-pose, --mouth-open and --eyes
set their start values): h steady head on / off, x neutral expression on / off, o keep eyes
open on / off, + / - mouth opening gain up / down, 0 every control back to as driven.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from engines import Engine, EngineError
from engines.retarget import NEUTRAL, RANGES, Retargeting

from .capture import Camera, CameraError, CameraInput, camera_input
from .governor import GovernorOptions
from .options import CAM_SWITCH, CAMERA_FPS, CAMERA_SIZE, HOLD_S, LOST_AFTER_S, CamOptions, add_engine_arguments, \
    add_governor_arguments, add_retarget_arguments, cam_options
from .sinks import (
    NAME,
    Feed,
    PipeWireSource,
    Preview,
    Recording,
    Sink,
    SinkError,
    VirtualCamera,
    pipewire_missing,
)

logger = logging.getLogger("xportrait.cam")

BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # waits between reconnection attempts; the last repeats
KEYS = {"r": "recalibrate", "n": "next", "]": "next", "p": "previous", "[": "previous", " ": "pause",
        "q": "quit", "esc": "quit", "\x1b": "quit", "\x03": "quit"}
# The retargeting controls' keys: each makes new settings from the current ones and the start values.
RETARGET_KEYS = {"h": "steady-head", "x": "neutral-expression", "o": "eyes-open", "+": "mouth-wider",
                 "=": "mouth-wider", "-": "mouth-narrower", "0": "as-driven"}
MOUTH_STEP = 0.25
KEY_HELP = ("keys: r recalibrate, n/p next/previous portrait, space pause, q quit; h steady head, "
            "x neutral expression, o eyes open, +/- mouth gain, 0 controls as driven")


class CamError(RuntimeError):
    """A failure to report to the user; `status` is the exit code."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    print(f"xportrait cam: {message}", file=sys.stderr, flush=True)


# -- flags ------------------------------------------------------------------------------------------
def _dimensions(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None
    if width < 64 or height < 64:
        raise argparse.ArgumentTypeError(f"at least 64x64, got {text!r}")
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--camera", help="the webcam: an index (0), a device (/dev/video0), a name (macOS, Windows), "
                                         "or a video file played as one (default: the first camera)")
    parser.add_argument("--camera-size", type=_dimensions, default=CAMERA_SIZE, metavar="WxH",
                        help="resolution asked of the camera (default 640x480)")
    parser.add_argument("--camera-fps", type=float, default=CAMERA_FPS, help="frame rate asked of the camera (default 30)")
    parser.add_argument("--loop", action="store_true", help="a video file as --camera starts over at its end")
    parser.add_argument("--portrait", action="append", default=[], metavar="NAME|IMAGE",
                        help="portrait to animate, repeatable (n/p switch between them; default: the bundled ones, "
                             "or the server's)")
    parser.add_argument("--server", metavar="URL", help="animate on a running `xportrait serve` (e.g. a GPU machine) "
                                                        "instead of this machine")
    parser.add_argument("--token", help="the server's access token")
    parser.add_argument("--mode", choices=("animate", "echo"), default="animate",
                        help="with --server: echo has the server send the camera back unanimated, to measure the "
                             "transport alone (default: animate)")
    parser.add_argument("--connect-timeout", type=float, default=15.0,
                        help="seconds to wait for the server's first frame (default 15)")
    parser.add_argument("--virtual-camera", choices=CAM_SWITCH, default="auto",
                        help="the virtual camera meeting apps list (v4l2loopback / OBS Virtual Camera; default auto)")
    parser.add_argument("--virtual-camera-device", metavar="DEVICE",
                        help="the virtual camera device to write to (Linux: e.g. /dev/video10; default: the one "
                             "labelled xportrait, else the first)")
    parser.add_argument("--pipewire", choices=CAM_SWITCH, default="auto",
                        help="a PipeWire camera source (Linux desktops; default auto)")
    parser.add_argument("--name", default=NAME, help=f"the PipeWire source's name (default {NAME})")
    parser.add_argument("--preview", action="store_true", help="show the avatar in a window (with the hot keys)")
    parser.add_argument("--record", metavar="FILE.mp4", help="also write the avatar to this MP4 file")
    parser.add_argument("--fps", type=float, default=30.0, help="the virtual camera's frame rate (default 30)")
    parser.add_argument("--hold", type=float, default=HOLD_S, metavar="S",
                        help=f"show the last frame this long when no new one comes, then the portrait (default {HOLD_S:g})")
    parser.add_argument("--lost-after", type=float, default=LOST_AFTER_S, metavar="S",
                        help=f"remote: reconnect after this long without a frame (default {LOST_AFTER_S:g})")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--report", help="write a JSON report (frames, fps, latency) here at the end")
    add_retarget_arguments(parser)  # the controls' start values; the keys change them
    add_engine_arguments(parser)  # --engine, --size (the virtual camera's too) and the diffusion engine's flags
    add_governor_arguments(parser)


# -- controls -----------------------------------------------------------------------------------------
class Controls:
    """The hot keys' commands, from the preview window and the terminal, for whoever drives the
    engine. Pause goes straight to the Feed; quit sets `quit`; the rest wait in `commands`
    (user actions, a handful a minute: a queue is right here) until the driver is between frames."""

    def __init__(self, feed: Feed | None = None, retargeting: Retargeting = NEUTRAL):
        self.feed = feed
        self.quit = threading.Event()
        self.commands: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.start_retargeting = self.retargeting = retargeting  # a "retarget" command sends `retargeting`

    def key(self, key: str) -> None:
        if key in RETARGET_KEYS:
            self.retargeting = retargeted(self.retargeting, RETARGET_KEYS[key], self.start_retargeting)
            say("controls: " + describe(self.retargeting))
            self.commands.put("retarget")
            return
        command = KEYS.get(key.lower() if len(key) == 1 else key)
        if command == "quit":
            self.quit.set()
        elif command == "pause" and self.feed is not None:
            self.feed.set_paused(not self.feed.paused)
            say("paused: the still portrait is showing" if self.feed.paused else "resumed")
        elif command is not None:
            self.commands.put(command)

    def pending(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.commands.get_nowait())
            except queue.Empty:
                return out


def retargeted(settings: Retargeting, command: str, start: Retargeting) -> Retargeting:
    """The controls after one of RETARGET_KEYS' commands. A toggle goes to its 'on' value and
    back to the start value (or to as driven, when the start value was 'on')."""
    def toggle(name: str, on):
        back = getattr(start, name) if getattr(start, name) != on else getattr(NEUTRAL, name)
        return {name: back if getattr(settings, name) == on else on}

    if command == "steady-head":
        return Retargeting(**{**settings.as_dict(), **toggle("head_pose", 0.0)})
    if command == "neutral-expression":
        return Retargeting(**{**settings.as_dict(), **toggle("expression", 0.0)})
    if command == "eyes-open":
        return Retargeting(**{**settings.as_dict(), **toggle("eyes", "open")})
    if command in ("mouth-wider", "mouth-narrower"):
        low, high = RANGES["mouth_open"]
        step = MOUTH_STEP if command == "mouth-wider" else -MOUTH_STEP
        return Retargeting(**{**settings.as_dict(), "mouth_open": min(max(settings.mouth_open + step, low), high)})
    return NEUTRAL  # as-driven


def describe(settings: Retargeting) -> str:
    return (f"expression {settings.expression:g}, head pose {settings.head_pose:g}, "
            f"mouth open {settings.mouth_open:g}, eyes {settings.eyes}")


class TerminalKeys:
    """Keys typed on the terminal, one at a time (no Enter) when stdin is one; lines of keys when
    it is a pipe. End of input is not a quit (a service with stdin on /dev/null keeps running).
    close() returns once the reader has stopped: it never reads the descriptor afterwards (whose
    number the caller may close and the process reuse for another file)."""

    def __init__(self, on_key: Callable[[str], None], stream=None):
        self._on_key = on_key
        self._stream = stream if stream is not None else sys.stdin
        self._saved = None
        self._thread = None
        self._stop = threading.Event()
        try:
            self._fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        if self._fd is None:
            return
        windows = platform.system() == "Windows"
        if not windows and os.isatty(self._fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        self._wake = None if windows else os.pipe()  # close() ends the reader's select at once
        self._thread = threading.Thread(target=self._run, name="xportrait-keys", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._wake is None:
            if os.isatty(self._fd):
                import msvcrt

                while not self._stop.wait(0.05):
                    while msvcrt.kbhit():
                        self._on_key(msvcrt.getwch())
            return
        import select

        while True:
            try:
                ready, _, _ = select.select([self._fd, self._wake[0]], [], [])
                if self._stop.is_set() or self._wake[0] in ready:
                    return
                data = os.read(self._fd, 64)
            except (OSError, ValueError):
                return
            if not data:
                return
            for ch in data.decode(errors="ignore"):
                if ch not in "\r\n":
                    self._on_key(ch)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            if self._wake is not None:
                os.write(self._wake[1], b"x")
            if self._thread is not threading.current_thread():
                self._thread.join()
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
            self._thread = None
        if self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None


class _QuitOnSignals:
    """Ctrl-C and SIGTERM quit cleanly (outputs closed, the terminal restored, the report
    written); a second one while closing interrupts at once."""

    def __init__(self, controls: Controls):
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if controls.quit.is_set():
                raise KeyboardInterrupt
            controls.quit.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, handler)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# -- portraits ----------------------------------------------------------------------------------------
def load_portrait(spec: str) -> np.ndarray:
    """A bundled portrait by name, or an image file."""
    from . import samples

    if spec in samples.PORTRAITS:
        return samples.portrait(spec)
    from .images import ImageError, read_image

    try:
        return read_image(spec, "portrait")
    except ImageError as exc:
        raise CamError(f"--portrait {spec}: {exc} (bundled ones: {', '.join(samples.PORTRAITS)})") from None


def still_of(image: np.ndarray, size: int) -> np.ndarray:
    """The portrait as the engine frames it (the head box crop): what paused shows."""
    from engines.face import FaceTracker, NoFaceError, prepare_source

    with FaceTracker(video=False) as tracker:
        try:
            return prepare_source(image, size, tracker).image
        except NoFaceError:
            raise CamError("no face found in the portrait: pick one with a clearly visible face") from None


# -- sinks --------------------------------------------------------------------------------------------
def open_sinks(opts: CamOptions, controls: Controls, system: str | None = None,
               virtual_camera: Callable[..., Sink] = VirtualCamera) -> list[Sink]:
    """Every sink the options ask for; a missing one fails when asked for ("on"), is said and
    skipped under "auto". No sink at all is an error."""
    system = system or platform.system()
    sinks: list[Sink] = []
    notes = []
    if opts.virtual_camera != "off":
        try:
            sinks.append(virtual_camera(opts.size, opts.size, opts.fps, device=opts.virtual_camera_device))
        except SinkError as exc:
            if opts.virtual_camera == "on":
                raise CamError(str(exc)) from None
            notes.append(str(exc))
    if opts.pipewire == "on" or (opts.pipewire == "auto" and system == "Linux"):
        why = pipewire_missing()
        if why is None:
            try:
                sinks.append(PipeWireSource(opts.size, opts.size, opts.fps, name=opts.name))
            except SinkError as exc:
                why = str(exc)
        if why is not None:
            if opts.pipewire == "on":
                for sink in sinks:
                    sink.close()
                raise CamError(why)
            notes.append(why)
    if opts.record:
        inputs = tuple(p for p in (opts.camera, *opts.portraits) if p)  # never written over
        try:
            sinks.append(Recording(opts.record, opts.size, opts.fps, inputs))
        except SinkError as exc:
            for sink in sinks:
                sink.close()
            raise CamError(str(exc)) from None
    if opts.preview:
        try:
            sinks.insert(0, Preview(controls.key))
        except SinkError as exc:
            for sink in sinks:
                sink.close()
            raise CamError(str(exc)) from None
    if not sinks:
        raise CamError("nothing to send the avatar to:\n" + "\n".join(notes) +
                       "\n(or pass --preview / --record FILE.mp4)")
    for note in notes:
        say(f"note: {note}")
    return sinks


# -- local engine -------------------------------------------------------------------------------------
class LocalAvatar:
    """The engine on this machine, through the live pipeline (streamer/pipeline.py) that `serve`
    runs per session: the newest camera frame in, tracked and rendered on the pipeline's two
    threads, the newest avatar frame out to the Feed."""

    def __init__(self, engine: Engine, images: list[np.ndarray], names: list[str], size: int,
                 governor: GovernorOptions | None = None):
        from .pipeline import EnginePool

        self.governor = governor  # --target-fps / --max-latency-ms

        self.images, self.names, self.index = images, names, 0
        self.pool = EnginePool(lambda: engine)  # this one engine, for the pipeline to take
        self.still = still_of(images[0], size)  # proves the first portrait has a face, early
        self.rendered = 0
        self.stats = None
        self.pipeline = None

    async def run(self, camera: Camera, feed: Feed, controls: Controls, until: float) -> None:
        from .pipeline import AnimateStage, Pipeline

        loop = asyncio.get_running_loop()
        stage = AnimateStage(self.pool, self.images[0], controls.retargeting)
        pipeline = Pipeline(stage, name="cam", governor=self.governor)
        self.stats = pipeline.stats
        self.pipeline = pipeline  # its governor's level, for the report
        await pipeline.start()
        camera.start()  # the engine has its portrait: the camera's first frames are animated
        reader = ThreadPoolExecutor(1, thread_name_prefix="xportrait-cam-reader")

        async def pump() -> None:
            while True:
                captured = await loop.run_in_executor(reader, camera.frames.take, 0.2)
                if captured is None:
                    if camera.frames.closed:
                        return
                    continue
                if feed.paused:
                    continue  # the still portrait is showing: no engine work
                frame = captured.frame
                frame.pts = None  # the capture time drives the filters (a looped file's restart, too)
                pipeline.feed(frame, captured.at)

        async def drain() -> None:
            while True:
                output = await pipeline.next_output()
                feed.put(output.frame, output.arrived)
                self.rendered += 1

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(drain())]
        changes = 0  # the governor's moves said so far
        try:
            while not controls.quit.is_set() and time.perf_counter() < until and not tasks[0].done():
                for command in controls.pending():
                    await self._command(command, pipeline, stage, feed, controls)
                if pipeline.governor is not None and (quality := pipeline.governor.snapshot())["changes"] > changes:
                    changes = quality["changes"]
                    say(f"quality: {quality['reason']}")  # e.g. "down to coarse map: latency 59 ms over 45 ms"
                await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await pipeline.close()
            reader.shutdown(wait=False)

    async def _command(self, command: str, pipeline, stage, feed: Feed, controls: Controls) -> None:
        from engines.face import NoFaceError

        if command == "retarget":
            pipeline.retarget(controls.retargeting)
        elif command == "recalibrate":
            await pipeline.recalibrate()
            say("recalibrated: the next frame is the neutral pose")
        elif command in ("next", "previous") and len(self.images) > 1:
            index = (self.index + (1 if command == "next" else -1)) % len(self.images)
            try:
                await pipeline.set_portrait(lambda: self.images[index])
            except NoFaceError:
                say(f"no face in portrait {self.names[index]}: keeping {self.names[self.index]}")
                return
            self.index = index
            feed.set_still(stage.animator.sources[0].image)
            say(f"portrait: {self.names[index]}")


# -- the command --------------------------------------------------------------------------------------
def _percentiles(values) -> dict:
    if not len(values):
        return {"p50": None, "p95": None}
    array = np.asarray(values)
    return {"p50": round(float(np.percentile(array, 50)), 1), "p95": round(float(np.percentile(array, 95)), 1)}


def _windows(times, values, start: float, width_s: float = 5.0) -> list[dict]:
    """Latency percentiles per `width_s` of the run: flat means nothing queues up."""
    windows: dict[int, list[float]] = {}
    for at, ms in zip(times, values):
        windows.setdefault(int((at - start) // width_s), []).append(ms)
    return [{"from_s": k * width_s, "frames": len(v), **_percentiles(v)} for k, v in sorted(windows.items())]


def cam(opts: CamOptions, sinks: list[Sink] | None = None, controls: Controls | None = None,
        engine: Engine | None = None, stdin=None) -> dict:
    """Run until quit (`controls.quit`), --duration or the end of a camera file; return the
    report. `sinks` (default: the options' own) and a local `engine` (default: the options'
    engine) may be given ready-made."""
    system = platform.system()
    try:
        source: CameraInput = camera_input(opts.camera, opts.camera_size, opts.camera_fps, system)
    except CameraError as exc:
        raise CamError(str(exc)) from None
    remote = opts.server is not None
    if remote:
        names = list(opts.portraits) or _server_gallery(opts)  # for the still portrait from the start
        images = None
    else:
        from .samples import PORTRAITS

        names = list(opts.portraits or PORTRAITS)
        images = [load_portrait(name) for name in names]
    controls = controls or Controls(retargeting=opts.retargeting)
    if sinks is None:
        sinks = open_sinks(opts, controls, system)
    feed = None
    closing: list = []
    try:
        if remote:
            cache: dict[str, np.ndarray | None] = {}

            def still(name: str) -> np.ndarray | None:
                if name not in cache:
                    cache[name] = _remote_still(opts, name)
                return cache[name]

            from .cam_remote import RemoteAvatar

            avatar = RemoteAvatar(opts, still, names)
            first = still(names[0]) if names else None
            start_still = first if first is not None else np.full((opts.size, opts.size, 3), 96, np.uint8)
        else:
            if engine is None:
                from engines import create_engine

                try:
                    engine = create_engine(opts.engine)
                except EngineError as exc:
                    raise CamError(str(exc)) from None
            avatar = LocalAvatar(engine, images, names, opts.size, opts.governor)
            start_still = avatar.still
        try:  # opened now (a busy camera says so at once), read once the engine has its portrait
            camera = Camera(source, loop=opts.loop, start=False)
        except CameraError as exc:
            raise CamError(str(exc)) from None
        closing.append(camera)
        feed = Feed(sinks, opts.size, opts.fps, start_still, hold_s=opts.hold,
                    on_error=lambda sink, exc: say(f"{sink.name} stopped ({exc}); the other outputs carry on"))
        controls.feed = feed
        keys = TerminalKeys(controls.key, stdin)
        closing.append(keys)
        closing.append(_QuitOnSignals(controls))
        where = f"{opts.server}" if remote else f"{opts.engine.name} engine on this machine"
        say(f"camera {source.label} ({camera.width}x{camera.height} at {camera.fps:g} fps) -> {where} -> "
            + ", ".join(sink.name for sink in sinks))
        say(KEY_HELP)
        started = time.perf_counter()
        until = started + opts.duration if opts.duration else float("inf")
        asyncio.run(avatar.run(camera, feed, controls, until))
        if camera.error:
            say(camera.error)
        elapsed = time.perf_counter() - started
    finally:
        if feed is not None:
            feed.close()
        else:
            for sink in sinks:
                sink.close()
        for thing in reversed(closing):
            thing.close()
    report = {
        "mode": f"remote {opts.mode}" if remote else "local",
        "engine": None if remote else opts.engine.name,
        "server": opts.server,
        "camera": source.label,
        "seconds": round(elapsed, 2),
        "frames_captured": camera.read,
        "frames_dropped_at_camera": camera.dropped,
        "frames_out": feed.fresh,
        "fps_out": round(feed.fps, 2),
        "frames_sent_to_sinks": feed.sent,
        "latency_ms": _percentiles(feed.latency_ms),
        "latency_ms_per_window": _windows(feed.latency_at, feed.latency_ms, started),
        "sinks": [sink.name for sink in sinks],
    }
    if remote:
        server = avatar.server_stats
        report.update(connects=avatar.connects, losses=avatar.losses,
                      server={key: server.get(key) for key in ("mode", "fps_in", "fps_out", "dropped", "latency_ms",
                                                              "stages_ms")})
    elif avatar.stats is not None:
        stats = avatar.stats.snapshot()
        report.update(pipeline={key: stats[key] for key in ("frames_processed", "dropped_stale", "dropped_prepared",
                                                              "frames_without_face", "errors", "stages_ms")},
                      quality=avatar.pipeline.governor.snapshot() if avatar.pipeline.governor else None)
    return report


def _server_gallery(opts: CamOptions) -> list[str]:
    """The server's portraits (GET /portraits), or [] when it cannot be asked now."""
    import urllib.request

    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{opts.server}/portraits", headers=headers),
                                    timeout=5) as response:
            return [entry["name"] for entry in json.load(response)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _remote_still(opts: CamOptions, name: str) -> np.ndarray | None:
    """The still portrait for a server's portrait: the same picture cropped here when it is a
    bundled one or a file; else the server's thumbnail; None when neither can be had."""
    from . import samples

    try:
        if name in samples.PORTRAITS or Path(name).is_file():
            return still_of(load_portrait(name), opts.size)
        import urllib.request

        import cv2

        with urllib.request.urlopen(f"{opts.server}/portraits/{name}", timeout=5) as response:
            data = np.frombuffer(response.read(), np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        return still_of(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), opts.size) if image is not None else None
    except (CamError, OSError):
        return None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    opts = cam_options(args)  # an OptionError is a usage error (exit status 2)
    try:
        report = cam(opts)
    except CamError as exc:
        print(f"xportrait cam: {exc}", file=sys.stderr)
        return exc.status
    except EngineError as exc:
        print(f"xportrait cam: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if opts.report:
        Path(opts.report).write_text(text + "\n")
    say(f"{report['frames_out']} frames out at {report['fps_out']} fps, camera to outputs p50 "
        f"{report['latency_ms']['p50']} ms")
    return 0
