"""One WebRTC peer: its webcam track into a `Pipeline` (streamer/pipeline.py), the pipeline's
newest frame back out on an `AvatarTrack`, live stats on its data channel, and the timeouts.

The event loop only moves frames: a reader task drains the incoming track as fast as aiortc
decodes it into `Pipeline.feed`, which keeps just the newest frame; aiortc's sender pulls
`AvatarTrack.recv`, which is the pipeline's newest output. Whoever created the session holds
its `secret` (given in the offer's answer): only that controls it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from fractions import Fraction
from typing import Callable

from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from engines.retarget import MESSAGE_TYPE as RETARGET, NEUTRAL, Retargeting

from .glass import capture_clock, receiver_origin, record_sender_reports, sender_rtp
from .governor import GovernorOptions
from .limits import TokenBucket
from .pipeline import Pipeline, PipelineClosed, Stage

logger = logging.getLogger("xportrait.session")

REPORT_INTERVAL_S = 0.5
MAX_BUFFERED = 256 * 1024  # bytes waiting on the data channel for the peer, beyond which nothing more is sent
# Data-channel commands a peer may send: a burst (a slider dragged), then this many a second;
# beyond that they are ignored (a flood would take the event loop from every other session).
COMMAND_BURST, COMMANDS_PER_S = 120, 60
MAX_COMMAND_BYTES = 4096  # the largest command is a retarget message of a few hundred bytes
RTP_TIME_BASE = Fraction(1, 90000)


def to_video_frame(image, source: VideoFrame) -> VideoFrame:
    """An output image as a VideoFrame with its input frame's pts (the client matches on it)."""
    out = VideoFrame.from_ndarray(image, format="rgb24")
    out.pts, out.time_base = source.pts, source.time_base
    return out


class AvatarTrack(MediaStreamTrack):
    """The frames going back to the peer: always the pipeline's newest, never a queue."""

    kind = "video"

    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self._pipeline = pipeline
        self.sender = None  # our RTCRtpSender, for the capture clock (streamer/glass.py)
        self.avatar_origin: int | None = None  # avatar RTP timestamp minus pts
        self._sent_pts: int | None = None

    def _note_rtp_origin(self) -> None:
        """aiortc asks for a frame once the last one is sent: its RTP timestamp is the last packet's."""
        rtp = sender_rtp(self.sender)
        if rtp is not None and self._sent_pts is not None:
            self.avatar_origin = (rtp - self._sent_pts) & 0xFFFFFFFF

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._note_rtp_origin()
        try:
            frame = (await self._pipeline.next_output()).frame
        except PipelineClosed:
            raise MediaStreamError from None
        stats = self._pipeline.stats
        if stats.output_pts_origin is None:
            stats.output_pts_origin = frame.pts
        self._sent_pts = frame.pts if frame.time_base == RTP_TIME_BASE else None
        return frame


class Session:
    def __init__(self, pc: RTCPeerConnection, mode: str, stage: Stage, portrait: str,
                 on_closed: Callable[["Session"], None], idle_timeout: float, connect_timeout: float,
                 governor: GovernorOptions | None = None):
        record_sender_reports()  # the capture clock's half from the browser (streamer/glass.py)
        self.id = secrets.token_hex(6)  # public: /stats lists it
        self.secret = secrets.token_urlsafe(18)  # given only to the peer: controls the session
        self.pc = pc
        self.mode = mode
        self.portrait = portrait
        self.pipeline = Pipeline(stage, name=self.id, convert_out=to_video_frame, governor=governor)
        self.stats = self.pipeline.stats
        self.output = AvatarTrack(self.pipeline)
        self.channel = None  # the peer's data channel, for live stats
        self.webcam: MediaStreamTrack | None = None
        self.closed = False
        self.close_reason = ""
        self.changing_portrait = False  # one portrait change at a time (the server's rate limit)
        self._on_closed = on_closed
        self._idle_timeout, self._connect_timeout = idle_timeout, connect_timeout
        self._answered_at: float | None = None  # the connect timeout runs from the answer (`answered`)
        self._tasks: set[asyncio.Task] = {asyncio.ensure_future(self._report())}
        self._blackhole = MediaBlackhole()  # drains tracks we do not use (audio), so they cannot queue up
        self._closing: asyncio.Task | None = None
        self.retargeting: Retargeting = NEUTRAL  # the controls' values (engines/retarget.py)
        self._recalibrating: asyncio.Task | None = None  # at most one recalibration waits
        self._commands = TokenBucket(COMMAND_BURST, 1 / COMMANDS_PER_S)
        self.commands_ignored = 0  # over the rate or the size: counted, answered at most once a second
        self._told_ignored_at = -1.0

    def answered(self) -> None:
        """The offer is answered: the peer has --connect-timeout seconds from now to send video
        (not from the offer: a slow engine start must not close the session mid-offer)."""
        self._answered_at = time.perf_counter()

    @property
    def media_flowing(self) -> bool:
        """Webcam frames arrive (within the idle timeout)."""
        last = self.stats.last_input_at
        return last is not None and time.perf_counter() - last < self._idle_timeout

    def add_track(self, track: MediaStreamTrack) -> bool:
        """Take the peer's first video track as the webcam; drain anything else."""
        if track.kind == "video" and self.webcam is None:
            self.webcam = track
            self._tasks.add(asyncio.ensure_future(self._pump(track)))
            return True
        self._blackhole.addTrack(track)
        self._tasks.add(asyncio.ensure_future(self._blackhole.start()))
        return False

    def on_message(self, message) -> None:
        """Data channel commands from the page: {"type": "recalibrate"}, and
        {"type": "retarget", "head_pose": 0, ...} (`_retarget`). Over COMMANDS_PER_S (after a
        burst) or MAX_COMMAND_BYTES, a command is ignored before it is parsed."""
        if len(message) > MAX_COMMAND_BYTES or self._commands.take():
            self._ignored(len(message) > MAX_COMMAND_BYTES)
            return
        try:
            message = json.loads(message)
            command = message.get("type")
        except (ValueError, AttributeError, TypeError, RecursionError):
            return
        if command == "recalibrate" and not self.closed:
            if self._recalibrating is not None:
                return  # one already waits for the next frame: a second would do the same again
            task = self._recalibrating = asyncio.ensure_future(self.pipeline.recalibrate())
            self._tasks.add(task)
            task.add_done_callback(self._command_done)
        elif command == RETARGET and not self.closed:
            self._retarget(message)

    def _ignored(self, too_large: bool) -> None:
        self.commands_ignored += 1
        now = time.monotonic()
        if now - self._told_ignored_at >= 1.0:
            self._told_ignored_at = now
            why = (f"a command is at most {MAX_COMMAND_BYTES} bytes" if too_large else
                   f"at most {COMMANDS_PER_S} commands a second (after {COMMAND_BURST} at once)")
            self._send({"type": "error", "message": f"command ignored: {why}; {self.commands_ignored} ignored so far"})

    def _retarget(self, message: dict) -> None:
        """The controls the message names take its values (the others keep theirs). The peer
        hears back the values now in force, or, for a bad message, what is wrong with it (and
        nothing changes)."""
        try:
            settings = self.retargeting.updated(message)
            self.pipeline.retarget(settings)
        except PipelineClosed:
            return
        except ValueError as e:  # a bad value, or an echo session (NoPortrait)
            self._send({"type": "error", "command": RETARGET, "message": str(e)})
            return
        self.retargeting = settings
        self._send({"type": "retargeting", **settings.as_dict()})

    def _send(self, reply: dict) -> None:
        """A message to the peer, unless MAX_BUFFERED bytes already wait for it to take them."""
        channel = self.channel
        if channel is not None and channel.readyState == "open" and channel.bufferedAmount <= MAX_BUFFERED:
            channel.send(json.dumps(reply))

    def _command_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task is self._recalibrating:
            self._recalibrating = None
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, PipelineClosed):
            logger.error("session %s: a command failed", self.id, exc_info=error)

    async def _pump(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.pipeline.feed(frame, time.perf_counter())
        except MediaStreamError:
            self.request_close("the peer's video track ended")

    # -- reporting, timeouts ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """What anyone may see (/stats): nothing here grants control of the session."""
        return {"id": self.id, "mode": self.mode, "portrait": self.portrait,
                "connection": self.pc.connectionState, "retargeting": self.retargeting.as_dict(),
                "commands_ignored": self.commands_ignored, **self.pipeline.snapshot()}

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            now = time.perf_counter()
            answered = self._answered_at
            if self.stats.frames_in == 0 and answered is not None and now - answered > self._connect_timeout:
                self.request_close(f"no webcam frame within {self._connect_timeout:g} s of the offer")
                return
            last = self.stats.last_input_at
            if last is not None and now - last > self._idle_timeout:
                self.request_close(f"no webcam frame for {self._idle_timeout:g} s")
                return
            if self.channel is not None and self.channel.readyState == "open":
                self._send({"type": "stats", **self.snapshot(), "capture_clock": self._capture_clock()})

    def _capture_clock(self) -> dict | None:
        """For the page's glass-to-glass figure (streamer/glass.py); None until it is known."""
        output = self.output
        if output.sender is None:
            output.sender = next((s for s in self.pc.getSenders() if s.track is output), None)
        receiver = next((r for r in self.pc.getReceivers() if r.track is self.webcam), None) if self.webcam else None
        return capture_clock(getattr(receiver, "xportrait_sender_report", None), receiver_origin(receiver),
                             output.avatar_origin)

    # -- teardown -----------------------------------------------------------------------------------
    def request_close(self, reason: str) -> asyncio.Task:
        """Close from anywhere (callbacks, the session's own tasks); idempotent."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(reason))
        return self._closing

    async def close(self, reason: str) -> None:
        """Close, and return once closed: when a close is already under way (the peer's
        connection failed meanwhile), once that one is done."""
        await self.request_close(reason)

    async def _close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        logger.info("session %s closed: %s", self.id, reason)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._tasks.clear()
        self.output.stop()
        try:
            await self._blackhole.stop()
            await self.pc.close()
        except Exception:  # aiortc tearing down a peer it half set up (a refused offer's)
            logger.warning("session %s: closing its peer connection failed", self.id, exc_info=True)
        finally:
            # Whatever aiortc did, the pipeline is freed and the slot given back.
            await self.pipeline.close()
            # Nothing of this session may outlive it: the peer connection's handlers (closures
            # over it and the session) and the channel would otherwise keep both, and aiortc's
            # codec threads, alive until a full garbage collection.
            self.pc.remove_all_listeners()
            if self.channel is not None:
                self.channel.remove_all_listeners()
            self.channel = self.webcam = self.output.sender = None
            self._on_closed(self)
