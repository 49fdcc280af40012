"""The newest-frame pipeline: webcam frames in, animated frames out, and nothing of a transport.

    pipeline = Pipeline(AnimateStage(pool, portrait))    # or EchoStage()
    await pipeline.start()                               # builds the stage on its engine thread
    pipeline.feed(frame)                                 # the newest input frame, as it arrives
    out = await pipeline.next_output()                   # the newest output frame
    await pipeline.recalibrate(); await pipeline.set_portrait(load)   # between two frames
    pipeline.retarget(Retargeting(head_pose=0))           # at any moment (engines/retarget.py)
    pipeline.snapshot(); await pipeline.close()

The WebRTC session (streamer/session.py) feeds it the frames aiortc decodes; a local camera or
a worker process can feed it just as well. A frame is an RGB array or a PyAV `VideoFrame`.

Only the newest frame is ever worked on. Each hand-off is a one-frame slot: a frame still
waiting in a slot when a newer one arrives is dropped and counted, so no queue can build up
and latency stays flat however slow the engine is. The work is two stages on two threads:

  prep thread     colour conversion, face mesh, alignment, smoothing (`Stage.track`)
  engine thread   the engine step (`Stage.render`), the conversion of the output

so frame n+1 is tracked while frame n is in the engine, for engines that wait on a device
(`waits_on_device`: a GPU step waits with the GIL released). A CPU engine's prep stage takes
the newest frame only once the engine is idle: the two would only compete for the cores.
At most three driving frames exist at once (tracked, waiting, in the engine); the Animator
rotates three sets of buffers for them, so tracking never overwrites what the engine reads.

Each stage holds its own asyncio lock for a frame's whole trip through its thread. A command
(a new portrait, recalibration) takes both, so it runs on the engine thread with both threads
idle, and drops the frame waiting between them (made for the old portrait). A new portrait is
decoded and prepared elsewhere first (`executor`): the stream only waits for the swap.
Closing lets each thread finish its job, then frees the stage on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from engines import Engine
from engines.animator import Animator, prepare_sources
from engines.base import DrivingFrame, Rendered, SourcePortrait
from engines.retarget import NEUTRAL, Retargeting

from .governor import Governor, GovernorOptions, LevelMaker, best_ready, governed_engine, make_levels
from .stats import SessionStats

logger = logging.getLogger("xportrait.pipeline")

WORKER_PREFIX = "xportrait-pipeline"  # the names of both of a pipeline's threads start with this
PIPELINE_BUFFERS = 3  # driving frames alive at most: being tracked, waiting for the engine, in it


class PipelineClosed(RuntimeError):
    pass


class NoPortrait(ValueError):
    """A portrait was given to a stage that has none (echo)."""


def worker_threads() -> int:
    """How many pipeline threads are alive (two per pipeline once its frames flow)."""
    return sum(t.name.startswith(WORKER_PREFIX) for t in threading.enumerate())


# -- engines ------------------------------------------------------------------------------------
class EnginePool:
    """Engines wait here between sessions: a diffusion engine's weights, compilation and CUDA
    graphs are made once. `take` and `give_back` may be called from any thread."""

    def __init__(self, create: Callable[[], Engine]):
        self._create = create
        self._idle: list[Engine] = []
        self._lock = threading.Lock()

    def take(self) -> Engine:
        """An idle engine if there is one, else a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._create()

    def give_back(self, engine: Engine) -> None:
        engine.reset()
        with self._lock:
            self._idle.append(engine)


# -- stages: what the two threads do to a frame ---------------------------------------------------
class Stage(Protocol):
    takes_portrait: bool
    tracks_faces: bool  # track() runs the face mesh (its time is the "face" stage)
    waits_on_device: bool  # overlap tracking with the engine step
    frames_without_face: int

    def open(self) -> None: ...  # engine thread, before any frame
    def track(self, rgb: np.ndarray, moment: float, tag: Any) -> DrivingFrame | Rendered: ...  # prep thread
    def render(self, driving: DrivingFrame | Rendered) -> Rendered | None: ...  # engine thread
    def release(self, driving: DrivingFrame | Rendered) -> None: ...  # a dropped frame's buffers
    def realign(self) -> None: ...  # prep thread: the input changed size
    def recalibrate(self) -> None: ...  # engine thread, between frames
    def prepare_portrait(self, image: np.ndarray) -> Any: ...  # any thread: slow, touches no state
    def use_portrait(self, prepared: Any) -> None: ...  # engine thread, between frames
    def retarget(self, settings: Retargeting) -> None: ...  # any thread, any moment (engines/retarget.py)
    def close(self) -> None: ...  # engine thread, last


class AnimateStage:
    """The portrait animated with the webcam's head pose and expression (`Animator`), on an
    engine from the pool, given back when the stage closes."""

    takes_portrait = True
    tracks_faces = True

    def __init__(self, pool: EnginePool, portrait: np.ndarray, retargeting: Retargeting = NEUTRAL):
        self._pool = pool
        self._portrait: np.ndarray | None = portrait
        self._retargeting = retargeting
        self.animator: Animator | None = None
        self.size = 0  # the engine's, once open

    def open(self) -> None:
        engine = self._pool.take()
        try:
            animator = Animator(engine, buffers=PIPELINE_BUFFERS, retargeting=self._retargeting)
        except BaseException:
            self._pool.give_back(engine)
            raise
        try:
            animator.set_sources([self._portrait])
        except BaseException:
            animator.close()
            self._pool.give_back(engine)
            raise
        self.animator, self._portrait, self.size = animator, None, animator.size
        animator.retarget(self._retargeting)  # one that came while the animator was being made

    @property
    def waits_on_device(self) -> bool:
        return self.animator is not None and self.animator.engine.waits_on_device

    @property
    def frames_without_face(self) -> int:
        return self.animator.frames_without_face if self.animator is not None else 0

    def track(self, rgb, moment, tag):
        return self.animator.track(rgb, moment, tag)

    def render(self, driving):
        return self.animator.render(driving)

    def release(self, driving) -> None:
        self.animator.release(driving)

    def realign(self) -> None:
        self.animator.realign()

    def recalibrate(self) -> None:
        self.animator.recalibrate()

    def prepare_portrait(self, image: np.ndarray) -> Sequence[SourcePortrait]:
        return prepare_sources([image], self.size)

    def use_portrait(self, prepared: Sequence[SourcePortrait]) -> None:
        self.animator.use_sources(prepared)

    def retarget(self, settings: Retargeting) -> None:
        self._retargeting = settings  # for open(), if it has not run yet
        if self.animator is not None:
            self.animator.retarget(settings)

    def close(self) -> None:
        if self.animator is not None:
            animator, self.animator = self.animator, None
            animator.close()
            self._pool.give_back(animator.engine)


class EchoStage:
    """The webcam frame itself, through the same threads and slots: the transport's own cost."""

    takes_portrait = False
    tracks_faces = False
    waits_on_device = False
    frames_without_face = 0

    def open(self) -> None:
        pass

    def track(self, rgb, moment, tag):
        return Rendered(rgb, tag)

    def render(self, driving):
        return driving

    def release(self, driving) -> None:
        pass

    def realign(self) -> None:
        pass

    def recalibrate(self) -> None:
        pass

    def prepare_portrait(self, image):
        raise NoPortrait("this session runs in echo mode: it has no portrait")

    def use_portrait(self, prepared) -> None:
        raise NoPortrait("this session runs in echo mode: it has no portrait")

    def retarget(self, settings) -> None:
        raise NoPortrait("this session runs in echo mode: it has no portrait to retarget")

    def close(self) -> None:
        pass


# -- frames between the stages ------------------------------------------------------------------------
@dataclass
class Input:
    frame: Any  # an RGB array, or anything with PyAV's to_ndarray(format="rgb24")
    arrived: float  # time.perf_counter() when it arrived
    size: tuple[int, int]  # width, height


@dataclass
class Prepared:
    """A frame out of the prep thread, on its way to the engine thread."""

    driving: DrivingFrame | Rendered  # a Rendered needs no engine step (echo, or no face seen yet)
    convert_in_ms: float
    face_ms: float
    ready_at: float  # time.perf_counter() when the prep thread finished it


@dataclass
class Output:
    frame: Any  # what `convert_out` made of the rendered image (default: a copy of it)
    arrived: float  # when the input frame it was made from arrived
    source: Any  # that input frame (its pts, its time base)
    cost_ms: float = 0.0  # its cost at the bottleneck: the engine step (+ the face mesh on a CPU engine)


def _copy(image: np.ndarray, source: Any) -> np.ndarray:
    return image.copy()  # the engine may render the next frame into the same array


def _nothing() -> None:
    """A job that proves a thread idle: its executor runs jobs in order, one at a time."""


class Pipeline:
    def __init__(self, stage: Stage, stats: SessionStats | None = None, name: str = "",
                 convert_out: Callable[[np.ndarray, Any], Any] = _copy, governor: GovernorOptions | None = None):
        """`convert_out(image, input_frame)` runs on the engine thread for each output frame
        (e.g. into a VideoFrame carrying the input's pts); `name` tags the threads; `governor`:
        hold a frame rate / latency by moving the engine along its quality levels."""
        self.stage = stage
        self.stats = stats or SessionStats()
        self._convert_out = convert_out
        prefix = f"{WORKER_PREFIX}-{name}" if name else WORKER_PREFIX
        self._prep_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{prefix}-prep")
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{prefix}-engine")
        self.closed = False
        self._latest: Input | None = None  # the newest input frame not yet prepared
        self._prepared: Prepared | None = None  # the newest prepared frame not yet in the engine
        self._output: Output | None = None  # the newest output frame not yet taken
        self._input_ready, self._prepared_ready, self._output_ready = (asyncio.Event() for _ in range(3))
        self._engine_done = asyncio.Event()  # no prepared frame waits for, or is in, the engine
        self._engine_done.set()
        self._preparing = asyncio.Lock()  # held by the prep stage while a frame is on its thread
        self._rendering = asyncio.Lock()  # held by the engine stage while a frame is on its thread
        self._size: tuple[int, int] | None = None  # of the last input frame tracked (prep thread)
        self._handed_at: float | None = None  # when the previous output frame was taken
        self._handed_arrival = 0.0
        self._handed_cost = 0.0
        self._tasks: list[asyncio.Task] = []
        self._governor_options = governor
        self.governor: Governor | None = None  # once started, if the engine has levels
        self._governed: Any = None  # that engine
        self._levels: LevelMaker | None = None  # what makes its other levels
        self._quality_request: int | None = None  # a level for the engine thread to set before its next step

    # -- the caller's side ------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the stage on the engine thread (an engine, the first portrait), then let frames
        flow. Raises what the stage raises (e.g. NoFaceError); the pipeline is closed then."""
        try:
            await self._between_frames(self._open_stage)
        except BaseException:
            await self.close()
            raise
        self._tasks += [asyncio.ensure_future(self._prep_stage()), asyncio.ensure_future(self._engine_stage())]

    def feed(self, frame: Any, arrived: float | None = None) -> None:
        """The newest input frame (an RGB array or a PyAV VideoFrame); never blocks."""
        if self.closed:
            return
        now = time.perf_counter()
        arrived = now if arrived is None else arrived
        stats = self.stats
        stats.frames_in += 1
        stats.fps_in.tick(now)
        stats.last_input_at = now
        if self._latest is not None:
            stats.dropped_stale += 1
        size = (frame.shape[1], frame.shape[0]) if isinstance(frame, np.ndarray) else (frame.width, frame.height)
        self._latest = Input(frame, arrived, size)
        self._input_ready.set()

    async def next_output(self) -> Output:
        """The newest output frame, once there is one; raises PipelineClosed once closed. The
        time until the next call counts as the consumer's stage (`encode_send`), and a frame's
        latency runs from its input's arrival to that next call."""
        now = time.perf_counter()
        stats = self.stats
        if self._handed_at is not None:
            stats.stages["encode_send"].add((now - self._handed_at) * 1e3)
            stats.latency.add((now - self._handed_arrival) * 1e3)
            self._handed_at = None
            if self.governor is not None:
                self._govern(now, (now - self._handed_arrival) * 1e3)
        while self._output is None:
            if self.closed:
                raise PipelineClosed("the pipeline has closed")
            await self._output_ready.wait()
            self._output_ready.clear()
        output, self._output = self._output, None
        stats.frames_out += 1
        self._handed_at, self._handed_arrival, self._handed_cost = time.perf_counter(), output.arrived, output.cost_ms
        stats.fps_out.tick(self._handed_at)
        return output

    async def recalibrate(self) -> None:
        """Make the next frame with a face the new neutral pose and alignment."""
        await self._between_frames(self.stage.recalibrate)

    async def set_portrait(self, load: Callable[[], np.ndarray], executor: Executor | None = None) -> np.ndarray:
        """Load (decode) and prepare a new portrait on `executor` (None: the event loop's
        default) while frames keep flowing, then swap it in between two frames. Raises what
        loading or preparing raise (NoFaceError, ...); the previous portrait stays then."""
        if not self.stage.takes_portrait:
            raise NoPortrait("this session runs in echo mode: it has no portrait")
        self._check_open()

        def prepare():
            image = load()
            return image, self.stage.prepare_portrait(image)

        image, prepared = await asyncio.get_running_loop().run_in_executor(executor, prepare)
        await self._between_frames(self.stage.use_portrait, prepared)
        return image

    def retarget(self, settings: Retargeting) -> None:
        """New values for the retargeting controls; the next frames ramp to them. Raises
        NoPortrait in echo mode."""
        self._check_open()
        self.stage.retarget(settings)

    def snapshot(self) -> dict:
        self.stats.frames_without_face = self.stage.frames_without_face
        making = self._levels.making if self._levels is not None else None
        quality = self.governor.snapshot(making) if self.governor else None
        return {**self.stats.snapshot(), "quality": quality}

    async def close(self) -> None:
        """Stop taking frames, let each thread finish the job it holds, free the stage on the
        engine thread; idempotent. Each thread ends once its last job is done."""
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._latest = self._prepared = self._output = None
        self._output_ready.set()  # wake a waiting next_output, which then raises
        # Cancelling a stage's task does not stop the job its thread is running; a thread runs
        # its jobs in order: once a no-op has run on the prep thread nothing runs there again,
        # and the stage is freed on the engine thread after whatever it was doing.
        loop = asyncio.get_running_loop()
        prep_idle = loop.run_in_executor(self._prep_thread, _nothing)
        self._prep_thread.shutdown(wait=False)
        await prep_idle
        release = loop.run_in_executor(self._engine_thread, self.stage.close)
        self._engine_thread.shutdown(wait=False)
        try:
            await release
        except Exception:
            logger.exception("freeing the pipeline's stage failed")
        if self._levels is not None:  # after the stage's close: the engine streams no more
            self._levels.streaming(False)
            self._levels = None

    # -- the two stages ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise PipelineClosed("the pipeline has closed")

    async def _between_frames(self, fn, *args):
        """Run `fn` on the engine thread while neither thread has a frame and none waits
        between them. The two locks are taken in this order; a stage only holds its own."""
        async with self._preparing, self._rendering:
            self._check_open()
            self._drop_prepared()
            return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    async def _prep_stage(self) -> None:
        loop, stats = asyncio.get_running_loop(), self.stats
        while True:
            await self._input_ready.wait()
            self._input_ready.clear()
            if not self.stage.waits_on_device:
                # A CPU engine: tracking beside its step would only compete for the same cores
                # (measured: same fps, twice the latency once 2 cores are busy), so the newest
                # frame is taken once the engine is done with the last one, as one thread would.
                await self._engine_done.wait()
            async with self._preparing:
                if self._latest is None:
                    continue
                frame, self._latest = self._latest, None
                stats.stages["wait"].add((time.perf_counter() - frame.arrived) * 1e3)
                try:
                    prepared = await loop.run_in_executor(self._prep_thread, self._prepare, frame)
                except Exception:
                    stats.errors += 1
                    logger.exception("preparing a frame failed")
                    continue
                stats.stages["convert_in"].add(prepared.convert_in_ms)
                stats.stages["face"].add(prepared.face_ms)
                self._drop_prepared()  # the engine thread is still busy: only the newest waits
                self._prepared = prepared
                self._engine_done.clear()
                self._prepared_ready.set()

    async def _engine_stage(self) -> None:
        loop, stats = asyncio.get_running_loop(), self.stats
        while True:
            await self._prepared_ready.wait()
            self._prepared_ready.clear()
            async with self._rendering:
                if self._prepared is None:
                    continue
                prepared, self._prepared = self._prepared, None
                stats.stages["wait_engine"].add((time.perf_counter() - prepared.ready_at) * 1e3)
                try:
                    result = await loop.run_in_executor(self._engine_thread, self._render, prepared.driving)
                except Exception:
                    stats.errors += 1
                    logger.exception("rendering a frame failed")
                    continue
                finally:
                    self._engine_done.set()
                if result is None:  # the engine is holding frames in flight
                    continue
                output, engine_ms, convert_out_ms = result
                # The governor's cost: what the frame needed, not the ticks the engine added because
                # the frame interval had room for them (the live engine's --ticks-per-frame auto).
                spare_ms = self._governed.timings.last.get("spare", 0.0) if self._governed is not None else 0.0
                output.cost_ms = engine_ms - spare_ms + (0.0 if self.stage.waits_on_device else prepared.face_ms)
                stats.frames_processed += 1
                stats.stages["engine"].add(engine_ms)
                stats.stages["convert_out"].add(convert_out_ms)
                if self._output is not None:
                    stats.dropped_output += 1
                self._output = output
                self._output_ready.set()

    def _drop_prepared(self) -> None:
        """Drop the frame waiting for the engine thread, if any, and give its buffers back."""
        if self._prepared is not None:
            self.stats.dropped_prepared += 1
            self.stage.release(self._prepared.driving)
            self._prepared = None
            self._engine_done.set()

    # -- the quality governor (streamer/governor.py) -------------------------------------------------
    def _open_stage(self) -> None:
        """Engine thread: open the stage; a governed engine starts at its best level."""
        self.stage.open()
        engine = governed_engine(self.stage) if self._governor_options is not None else None
        if engine is not None:
            start = best_ready(engine)  # (the pool's engine may come back at another session's level)
            engine.set_quality(start)
            self._levels = make_levels(engine, streaming=True)  # the levels not made yet: made while no
            # session streams on the engine, or when a governor waits for one
            self.governor = Governor(self._governor_options, engine.quality_levels(), start, engine.quality_ready,
                                     failed=self._levels.failed.__contains__)
            self._governed = engine

    def _govern(self, now: float, latency_ms: float) -> None:
        """Event loop, per frame handed out: measure; a move is set by the engine thread."""
        stats, governor = self.stats, self.governor
        governor.observe(now, latency_ms, self._handed_cost)
        dropped = stats.dropped_stale + stats.dropped_prepared + stats.dropped_output
        level = governor.decide(now, stats.fps_in.rate(now), dropped)
        if level is not None:
            logger.info("quality %s", governor.reason)
            self._quality_request = level
        elif governor.waiting is not None and governor.waiting > governor.level:
            self._levels.want(governor.waiting)  # a rung down, to hold the target: made now, session or not
            # (a rung up waits until no session streams: making it would slow this one for minutes)

    def _apply_quality(self) -> None:
        """Engine thread, between two steps: the level the governor chose, if it chose one."""
        level, self._quality_request = self._quality_request, None
        if level is not None:
            governed_engine(self.stage).set_quality(level)

    # -- on the threads ----------------------------------------------------------------------------
    def _prepare(self, frame: Input) -> Prepared:
        """Prep thread: one input frame in, what the engine thread needs for it out."""
        t0 = time.perf_counter()
        picture = frame.frame
        rgb = picture if isinstance(picture, np.ndarray) else picture.to_ndarray(format="rgb24")
        t1 = time.perf_counter()
        if self._size is not None and frame.size != self._size:
            self.stage.realign()  # the camera changed resolution: the head is elsewhere in pixels
            self.stats.resolution_changes += 1
        self._size = frame.size
        moment = getattr(picture, "time", None)
        moment = float(moment) if moment is not None else frame.arrived
        driving = self.stage.track(rgb, moment, frame)
        t2 = time.perf_counter()
        return Prepared(driving, (t1 - t0) * 1e3, (t2 - t1) * 1e3 if self.stage.tracks_faces else 0.0, t2)

    def _render(self, driving: DrivingFrame | Rendered) -> tuple[Output, float, float] | None:
        """Engine thread: a prepared frame in; the output frame, when one leaves the engine."""
        if self._quality_request is not None:
            self._apply_quality()
        t0 = time.perf_counter()
        rendered = self.stage.render(driving)
        t1 = time.perf_counter()
        if rendered is None:
            return None
        source: Input = rendered.tag
        output = Output(self._convert_out(rendered.image, source.frame), source.arrived, source.frame)
        t2 = time.perf_counter()
        return output, (t1 - t0) * 1e3, (t2 - t1) * 1e3
