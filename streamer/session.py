"""One live peer: its webcam track in, its animated track out, and the two threads that animate.

The event loop only moves frames. A reader task drains the incoming track as fast as aiortc
decodes it and keeps just the newest frame in a one-frame slot (an older frame still waiting
there is dropped and counted), so no queue can build up and latency stays flat however slow
the engine is.

The per-frame work is a two-stage pipeline with a thread per stage, so that frame n+1 is
tracked while frame n is in the engine (a GPU engine's step mostly waits on the device with
the GIL released; the face mesh is ~5 ms of CPU). Only engines that say so
(`waits_on_device`) overlap: for a CPU engine the prep stage takes the newest frame once the
engine stage is idle, because the two would only compete for the same cores:

  prep thread     colour conversion, face mesh, alignment, smoothing, the aligned driving
                  image (`Animator.track`)
  engine thread   the engine step (`Animator.render`), the conversion back to a video frame

Between them is a second one-frame slot: a prepared frame that the engine thread has not
taken when a newer one is ready is dropped and counted, never queued. So at most three
driving frames exist at once (being tracked, waiting, in the engine), and the Animator writes
them into three sets of buffers that it rotates: the prep thread never overwrites what the
engine is reading.

Each stage holds its own asyncio lock for the whole of a frame's trip through its thread,
hand-off included. What touches both halves of the Animator (building it, a new portrait,
recalibration) takes both locks, so it runs with both threads idle, on the engine thread,
and drops the frame waiting between them (it was made for the old portrait or reference).
Closing lets each thread finish the job it holds, then frees the Animator on the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from engines import Engine
from engines.animator import Animator
from engines.base import DrivingFrame, Rendered

from .stats import SessionStats

logger = logging.getLogger("xportrait.session")

MODES = ("animate", "echo")  # echo: the same path with face tracking and the engine bypassed
WORKER_PREFIX = "xportrait-session"  # the names of both of a session's threads start with this
PIPELINE_BUFFERS = 3  # driving frames alive at most: being tracked, waiting for the engine, in it
REPORT_INTERVAL_S = 0.5


class SessionClosed(RuntimeError):
    pass


def worker_threads() -> int:
    """How many session threads are alive (two per session once its frames flow; 0 once every
    session is freed)."""
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


@dataclass
class Prepared:
    """A frame out of the prep thread, on its way to the engine thread."""

    driving: DrivingFrame | Rendered  # a Rendered needs no engine step (echo, or no face seen yet)
    convert_in_ms: float
    face_ms: float
    ready_at: float  # time.perf_counter() when the prep thread finished it


def _nothing() -> None:
    """A job that proves a thread idle: its executor runs jobs in order, one at a time."""


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
        self._prep_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{WORKER_PREFIX}-{self.id}-prep")
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{WORKER_PREFIX}-{self.id}-engine")
        self._animator: Animator | None = None
        self._latest: tuple[VideoFrame, float] | None = None  # the newest input frame not yet prepared
        self._prepared: Prepared | None = None  # the newest prepared frame not yet in the engine
        self._input_ready = asyncio.Event()
        self._prepared_ready = asyncio.Event()
        self._preparing = asyncio.Lock()  # held by the prep stage while a frame is on its thread
        self._rendering = asyncio.Lock()  # held by the engine stage while a frame is on its thread
        self._engine_done = asyncio.Event()  # no prepared frame waits for, or is in, the engine
        self._engine_done.set()
        self._tasks: set[asyncio.Task] = {asyncio.ensure_future(self._report())}
        self._blackhole = MediaBlackhole()  # drains tracks we do not use (audio), so they cannot queue up
        self._closing: asyncio.Task | None = None

    # -- setup and commands -----------------------------------------------------------------------
    @staticmethod
    def _on(thread: Executor, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(thread, fn, *args)

    async def _between_frames(self, fn, *args):
        """Run `fn` on the engine thread while neither thread has a frame and none waits
        between them. Every change to the Animator besides the frames themselves goes here:
        the two locks are taken in this order, and a stage only ever holds its own."""
        async with self._preparing, self._rendering:
            if self.closed:
                raise SessionClosed(f"session {self.id} has ended")
            self._drop_prepared()
            return await self._on(self._engine_thread, fn, *args)

    def prepare(self, image: np.ndarray, name: str) -> asyncio.Future:
        """Start building this session's engine and animator with its first portrait, on the
        engine thread, ahead of any frame; await the result."""
        self.portrait = name
        if self.mode == "animate":
            return asyncio.ensure_future(self._between_frames(self._build, image))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    @property
    def _overlap(self) -> bool:
        """Track frame n+1 while frame n is in the engine: for engines that wait on a GPU."""
        return self._animator is not None and self._animator.engine.waits_on_device

    def _build(self, image: np.ndarray) -> None:
        animator = Animator(self._make_engine(), buffers=PIPELINE_BUFFERS)
        try:
            animator.set_sources([image])
        except BaseException:
            animator.close()
            raise
        self._animator = animator

    async def set_portrait(self, load: Callable[[], np.ndarray], name: str) -> tuple[int, int]:
        """Decode (`load`) and install a new portrait between frames. Raises what `load` or
        `Animator.set_sources` raise; the previous portrait stays then."""
        if self.mode != "animate":
            raise ValueError("this session runs in echo mode: it has no portrait")
        if self.closed:
            raise SessionClosed(f"session {self.id} has ended")
        # Decoding touches no Animator state, so it takes neither lock: it waits for the engine's
        # current step only, and the prep thread carries on meanwhile.
        image = await self._on(self._engine_thread, load)
        await self._between_frames(self._install, image)
        self.portrait = name
        return image.shape[1], image.shape[0]

    def _install(self, image: np.ndarray) -> None:
        self._animator.set_sources([image])

    def add_track(self, track: MediaStreamTrack) -> bool:
        """Take the peer's first video track as the webcam; drain anything else."""
        if track.kind == "video" and self.webcam is None:
            self.webcam = track
            self._tasks |= {asyncio.ensure_future(self._pump(track)), asyncio.ensure_future(self._prep_stage()),
                            asyncio.ensure_future(self._engine_stage())}
            return True
        self._blackhole.addTrack(track)
        self._tasks.add(asyncio.ensure_future(self._blackhole.start()))
        return False

    def on_message(self, message) -> None:
        """Data channel commands from the page: {"type": "recalibrate"}."""
        try:
            command = json.loads(message).get("type")
        except (ValueError, AttributeError, TypeError):
            return
        if command == "recalibrate" and self._animator is not None and not self.closed:
            task = asyncio.ensure_future(self._between_frames(self._animator.recalibrate))
            self._tasks.add(task)
            task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, SessionClosed):
            logger.error("session %s: a command failed", self.id, exc_info=error)

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
                self._input_ready.set()
        except MediaStreamError:
            self.request_close("the peer's video track ended")

    async def _prep_stage(self) -> None:
        stats = self.stats
        while True:
            await self._input_ready.wait()
            self._input_ready.clear()
            if not self._overlap:
                # A CPU engine: tracking beside its step would only compete for the same cores
                # (measured: same fps, twice the latency once 2 cores are busy), so the newest
                # frame is taken once the engine is done with the last one, as one thread would.
                await self._engine_done.wait()
            async with self._preparing:
                if self._latest is None:
                    continue
                frame, arrived = self._latest
                self._latest = None
                stats.stages["wait"].add((time.perf_counter() - arrived) * 1e3)
                try:
                    prepared = await self._on(self._prep_thread, self._prepare, frame, arrived)
                except Exception:
                    self.errors += 1
                    logger.exception("session %s: preparing a frame failed", self.id)
                    continue
                stats.stages["convert_in"].add(prepared.convert_in_ms)
                stats.stages["face"].add(prepared.face_ms)
                if self._animator is not None:
                    stats.frames_without_face = self._animator.frames_without_face
                self._drop_prepared()  # the engine thread is still busy: only the newest waits
                self._prepared = prepared
                self._engine_done.clear()
                self._prepared_ready.set()

    async def _engine_stage(self) -> None:
        stats = self.stats
        while True:
            await self._prepared_ready.wait()
            self._prepared_ready.clear()
            async with self._rendering:
                if self._prepared is None:
                    continue
                prepared, self._prepared = self._prepared, None
                stats.stages["wait_engine"].add((time.perf_counter() - prepared.ready_at) * 1e3)
                try:
                    result = await self._on(self._engine_thread, self._render, prepared.driving)
                except Exception:
                    self.errors += 1
                    logger.exception("session %s: rendering a frame failed", self.id)
                    continue
                finally:
                    self._engine_done.set()
                if result is None:  # the engine is holding frames in flight
                    continue
                out, arrived, engine_ms, convert_out_ms = result
                stats.frames_processed += 1
                stats.stages["engine"].add(engine_ms)
                stats.stages["convert_out"].add(convert_out_ms)
                self.output.put(out, arrived)

    def _drop_prepared(self) -> None:
        """Drop the frame waiting for the engine thread, if any, and give its buffers back."""
        if self._prepared is not None:
            self.stats.dropped_prepared += 1
            if self._animator is not None:
                self._animator.release(self._prepared.driving)
            self._prepared = None
            self._engine_done.set()

    def _prepare(self, frame: VideoFrame, arrived: float) -> Prepared:
        """Prep thread: one webcam frame in, what the engine thread needs for it out."""
        t0 = time.perf_counter()
        rgb = frame.to_ndarray(format="rgb24")
        t1 = time.perf_counter()
        tag = (frame.pts, frame.time_base, arrived)
        if self.mode == "echo":
            return Prepared(Rendered(rgb, tag), (t1 - t0) * 1e3, 0.0, t1)
        moment = float(frame.time) if frame.time is not None else t0
        driving = self._animator.track(rgb, moment, tag)
        t2 = time.perf_counter()
        return Prepared(driving, (t1 - t0) * 1e3, (t2 - t1) * 1e3, t2)

    def _render(self, driving: DrivingFrame | Rendered) -> tuple[VideoFrame, float, float, float] | None:
        """Engine thread: a prepared frame in; the output frame (with its input's pts) out,
        when one leaves the engine."""
        t0 = time.perf_counter()
        rendered = driving if self.mode == "echo" else self._animator.render(driving)
        t1 = time.perf_counter()
        if rendered is None:
            return None
        pts, time_base, arrived = rendered.tag
        out = VideoFrame.from_ndarray(rendered.image, format="rgb24")
        out.pts, out.time_base = pts, time_base
        t2 = time.perf_counter()
        return out, arrived, (t1 - t0) * 1e3, (t2 - t1) * 1e3

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
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.output.stop()
        self._latest = self._prepared = None
        await self._blackhole.stop()
        await self.pc.close()
        # Cancelling a stage's task does not stop the job its thread is running. Each thread
        # runs its jobs in order: once a no-op has run on the prep thread, nothing runs there
        # again; then the animator is freed on the engine thread, after whatever it was doing.
        # Each thread ends once its last job is done.
        prep_idle = self._on(self._prep_thread, _nothing)
        self._prep_thread.shutdown(wait=False)
        await prep_idle
        release = self._on(self._engine_thread, self._release)
        self._engine_thread.shutdown(wait=False)
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
