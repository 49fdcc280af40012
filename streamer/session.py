"""One live peer: its webcam track in, its animated track out, and the worker that animates.

The event loop only moves frames. A reader task drains the incoming track as fast as aiortc
decodes it and keeps just the newest frame in a one-frame slot (an older frame still waiting
there is dropped and counted), so no queue can build up and latency stays flat however slow
the engine is. The per-frame work (face tracking, the engine, colour conversions) runs on
the session's own worker thread, a single-thread executor that also owns the Animator:
everything that touches it (sources, recalibration, closing) is serialised there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from engines import Engine
from engines.animator import Animator

from .stats import SessionStats

logger = logging.getLogger("xportrait.session")

MODES = ("animate", "echo")  # echo: the same path with face tracking and the engine bypassed
WORKER_PREFIX = "xportrait-session"  # worker thread names start with this
REPORT_INTERVAL_S = 0.5


class SessionClosed(RuntimeError):
    pass


def worker_threads() -> int:
    """How many session worker threads are alive (0 once every session is freed)."""
    return sum(t.name.startswith(WORKER_PREFIX) for t in threading.enumerate())


class AvatarTrack(MediaStreamTrack):
    """The frames going back to the peer: always the newest rendered one, never a queue.

    aiortc's sender calls `recv`, encodes and sends the frame, then calls `recv` again; so
    the time from one `recv` returning to the next one starting is that frame's encode and
    send time, and the frame's latency (decoded input to sent output) is known there too.
    """

    kind = "video"

    def __init__(self, stats: SessionStats):
        super().__init__()
        self._stats = stats
        self._frame: VideoFrame | None = None
        self._arrived = 0.0
        self._ready = asyncio.Event()
        self._handed_at: float | None = None  # when the previous frame went to the encoder
        self._handed_arrival = 0.0

    def put(self, frame: VideoFrame, arrived: float) -> None:
        if self._frame is not None:
            self._stats.dropped_output += 1
        self._frame, self._arrived = frame, arrived
        self._ready.set()

    async def recv(self) -> VideoFrame:
        now = time.perf_counter()
        if self._handed_at is not None:
            self._stats.stages["encode_send"].add((now - self._handed_at) * 1e3)
            self._stats.latency.add((now - self._handed_arrival) * 1e3)
            self._handed_at = None
        while self._frame is None:
            if self.readyState != "live":
                raise MediaStreamError
            await self._ready.wait()
            self._ready.clear()
        frame, self._frame = self._frame, None
        stats = self._stats
        stats.frames_out += 1
        self._handed_at = time.perf_counter()
        self._handed_arrival = self._arrived
        stats.fps_out.tick(self._handed_at)
        if stats.output_pts_origin is None:
            stats.output_pts_origin = frame.pts
        return frame

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wake a waiting recv so that it ends


class Session:
    def __init__(self, pc: RTCPeerConnection, mode: str, make_engine: Callable[[], Engine],
                 on_closed: Callable[["Session"], None], idle_timeout: float, connect_timeout: float,
                 return_engine: Callable[[Engine], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.id = secrets.token_hex(6)
        self.pc = pc
        self.mode = mode
        self.portrait = ""
        self.stats = SessionStats()
        self.output = AvatarTrack(self.stats)
        self.channel = None  # the peer's data channel, for live stats
        self.webcam: MediaStreamTrack | None = None
        self.closed = False
        self.close_reason = ""
        self.errors = 0
        self._make_engine = make_engine
        self._return_engine = return_engine
        self._on_closed = on_closed
        self._idle_timeout, self._connect_timeout = idle_timeout, connect_timeout
        self._created = time.perf_counter()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{WORKER_PREFIX}-{self.id}")
        self._animator: Animator | None = None
        self._latest: tuple[VideoFrame, float] | None = None  # the newest undelivered input frame
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = [asyncio.ensure_future(self._report())]
        self._blackhole = MediaBlackhole()  # drains tracks we do not use (audio), so they cannot queue up
        self._closing: asyncio.Task | None = None

    # -- setup ----------------------------------------------------------------------------------
    def _in_worker(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def prepare(self, image: np.ndarray, name: str) -> asyncio.Future:
        """Start building this session's engine and animator with its first portrait, on the
        worker thread, ahead of any frame; await the result."""
        self.portrait = name
        if self.mode == "animate":
            return self._in_worker(self._build, image)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _build(self, image: np.ndarray) -> None:
        animator = Animator(self._make_engine())
        try:
            animator.set_sources([image])
        except BaseException:
            animator.close()
            raise
        self._animator = animator

    async def set_portrait(self, load: Callable[[], np.ndarray], name: str) -> tuple[int, int]:
        """Decode (`load`) and install a new portrait on the worker thread, between frames.
        Raises what `load` or `Animator.set_sources` raise; the previous portrait stays then."""
        if self.mode != "animate":
            raise ValueError("this session runs in echo mode: it has no portrait")
        if self.closed:
            raise SessionClosed(f"session {self.id} has ended")

        def install() -> tuple[int, int]:
            image = load()
            self._animator.set_sources([image])
            return image.shape[1], image.shape[0]

        size = await self._in_worker(install)
        self.portrait = name
        return size

    def add_track(self, track: MediaStreamTrack) -> bool:
        """Take the peer's first video track as the webcam; drain anything else."""
        if track.kind == "video" and self.webcam is None:
            self.webcam = track
            self._tasks += [asyncio.ensure_future(self._pump(track)), asyncio.ensure_future(self._process())]
            return True
        self._blackhole.addTrack(track)
        self._tasks.append(asyncio.ensure_future(self._blackhole.start()))
        return False

    def on_message(self, message) -> None:
        """Data channel commands from the page: {"type": "recalibrate"}."""
        try:
            command = json.loads(message).get("type")
        except (ValueError, AttributeError, TypeError):
            return
        if command == "recalibrate" and self._animator is not None and not self.closed:
            self._in_worker(self._animator.recalibrate)

    # -- per frame --------------------------------------------------------------------------------
    async def _pump(self, track: MediaStreamTrack) -> None:
        stats = self.stats
        try:
            while True:
                frame = await track.recv()
                now = time.perf_counter()
                stats.frames_in += 1
                stats.fps_in.tick(now)
                stats.last_input_at = now
                if self._latest is not None:
                    stats.dropped_stale += 1
                self._latest = (frame, now)
                self._wake.set()
        except MediaStreamError:
            self.request_close("the peer's video track ended")

    async def _process(self) -> None:
        stats = self.stats
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._latest is None:
                continue
            frame, arrived = self._latest
            self._latest = None
            stats.stages["wait"].add((time.perf_counter() - arrived) * 1e3)
            try:
                result = await self._in_worker(self._render, frame, arrived)
            except Exception:
                self.errors += 1
                logger.exception("session %s: a frame failed", self.id)
                continue
            if result is None:  # the engine is holding frames in flight
                continue
            out, out_arrived, convert_in, face, engine, convert_out = result
            stats.frames_processed += 1
            for stage, ms in (("convert_in", convert_in), ("face", face), ("engine", engine),
                              ("convert_out", convert_out)):
                stats.stages[stage].add(ms)
            if self._animator is not None:
                stats.frames_without_face = self._animator.frames_without_face
            self.output.put(out, out_arrived)

    def _render(self, frame: VideoFrame, arrived: float):
        """Worker thread: one webcam frame in, one output frame (with its input's pts) out."""
        t0 = time.perf_counter()
        rgb = frame.to_ndarray(format="rgb24")
        t1 = time.perf_counter()
        tag = (frame.pts, frame.time_base, arrived)
        face_ms = 0.0
        if self._animator is None:  # echo
            image = rgb
        else:
            moment = float(frame.time) if frame.time is not None else t0
            rendered = self._animator.drive(rgb, moment, tag)
            face_ms = self._animator.face_ms
            if rendered is None:
                return None
            image, tag = rendered.image, rendered.tag
        t2 = time.perf_counter()
        out = VideoFrame.from_ndarray(image, format="rgb24")
        out.pts, out.time_base = tag[0], tag[1]
        t3 = time.perf_counter()
        return out, tag[2], (t1 - t0) * 1e3, face_ms, (t2 - t1) * 1e3 - face_ms, (t3 - t2) * 1e3

    # -- reporting, timeouts ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"id": self.id, "mode": self.mode, "portrait": self.portrait,
                "connection": self.pc.connectionState, "errors": self.errors, **self.stats.snapshot()}

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            now = time.perf_counter()
            if self.stats.frames_in == 0 and now - self._created > self._connect_timeout:
                self.request_close(f"no webcam frame within {self._connect_timeout:g} s of the offer")
                return
            last = self.stats.last_input_at
            if last is not None and now - last > self._idle_timeout:
                self.request_close(f"no webcam frame for {self._idle_timeout:g} s")
                return
            if self.channel is not None and self.channel.readyState == "open":
                self.channel.send(json.dumps({"type": "stats", **self.snapshot()}))

    # -- teardown -----------------------------------------------------------------------------------
    def request_close(self, reason: str) -> asyncio.Task:
        """Close from anywhere (callbacks, the session's own tasks); idempotent."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self.close(reason))
        return self._closing

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        logger.info("session %s closed: %s", self.id, reason)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.output.stop()
        self._latest = None
        await self._blackhole.stop()
        await self.pc.close()
        # The animator is freed on its own thread, after any frame in progress; then the thread ends.
        release = self._in_worker(self._release)
        self._executor.shutdown(wait=False)
        try:
            await release
        except Exception:
            logger.exception("session %s: releasing the animator failed", self.id)
        self._on_closed(self)

    def _release(self) -> None:
        if self._animator is not None:
            self._animator.close()
            if self._return_engine is not None:
                self._return_engine(self._animator.engine)
            self._animator = None
