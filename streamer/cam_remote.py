"""`xportrait cam --server URL`: the camera over WebRTC to a running `xportrait serve`, the avatar
back into the Feed, through the streaming client's `Connection`; reconnects with backoff.

Only this mode imports aiortc: `xportrait cam` on the local engine never loads it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from client.stream_client import RTP_CLOCK, TIME_BASE, ClientError, Connection, Refused, Untrusted

from .cam import BACKOFF_S, CamError, Controls, say
from .capture import Camera
from .options import CamOptions
from .sinks import Feed

class CameraTrack(MediaStreamTrack):
    """The camera as an aiortc video track: the newest frame each time the encoder asks, pts in
    90 kHz ticks of the camera's rate; `sent` maps a pts to the frame's capture time."""

    kind = "video"

    def __init__(self, camera: Camera, keep: int = 600):
        super().__init__()
        self.camera = camera
        self.ticks = RTP_CLOCK / camera.fps
        self.sent: OrderedDict[int, float] = OrderedDict()
        self._keep = keep
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="xportrait-cam-track")
        self.count = 0

    async def recv(self) -> av.VideoFrame:
        loop = asyncio.get_running_loop()
        while True:
            if self.readyState != "live" or self.camera.frames.closed:
                raise MediaStreamError
            captured = await loop.run_in_executor(self._waiter, self.camera.frames.take, 0.2)
            if captured is not None:
                break
        frame = captured.frame
        frame.pts = round(self.count * self.ticks)
        frame.time_base = TIME_BASE
        self.sent[frame.pts] = captured.at
        if len(self.sent) > self._keep:
            self.sent.popitem(last=False)
        self.count += 1
        return frame

    def captured_at(self, pts: int, origin: int | None) -> float | None:
        """The capture time of the camera frame a returned frame was made from (None: unknown)."""
        if origin is None:
            return None
        return self.sent.get(round(round((pts + origin) / self.ticks) * self.ticks))

    def stop(self) -> None:
        super().stop()
        self._waiter.shutdown(wait=False)


class RemoteAvatar:
    """The engine on a running `xportrait serve`, through the streaming client's Connection."""

    def __init__(self, opts: CamOptions, still: Callable[[str], np.ndarray | None], names: list[str]):
        self.opts = opts
        self.names = list(names)  # the portraits n / p switch between (the server's gallery by default)
        self.index = 0
        self._still = still
        self.connects = self.losses = self.received = 0
        self.server_stats: dict = {}  # the server's last stats message (its own in->out latency, stages)
        self.status = "connecting"

    async def _gallery(self) -> list[str]:
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(self.opts.server + "/portraits", headers={"Authorization": f"Bearer {self.opts.token}"}
                                    if self.opts.token else {}, timeout=aiohttp.ClientTimeout(total=10)) as response:
                    return [p["name"] for p in await response.json()] if response.status == 200 else []
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            return []  # n / p then have nothing to switch between

    async def run(self, camera: Camera, feed: Feed, controls: Controls, until: float) -> None:
        opts = self.opts
        attempt = 0
        camera.start()
        while not controls.quit.is_set() and time.perf_counter() < until and not camera.frames.closed:
            track = CameraTrack(camera)
            portrait = self.names[self.index] if self.names else None

            def on_frame(frame: av.VideoFrame, arrived: float, track: CameraTrack = track) -> None:
                origin = current.stats.get("output_pts_origin")  # in the server's stats messages
                feed.put(frame.to_ndarray(format="rgb24"), track.captured_at(frame.pts, origin))
                self.received += 1

            current = Connection(opts.server, track, mode=opts.mode, portrait=portrait if opts.mode == "animate" else None,
                                 token=opts.token, on_frame=on_frame)
            try:
                answer = await current.open(opts.connect_timeout)
            except Untrusted as exc:
                raise CamError(str(exc), 1) from None
            except Refused as exc:
                if exc.status in (401, 403):
                    raise CamError(f"{exc}; pass the token the server was started with (--token)", 1) from None
                if exc.status != 503:
                    raise CamError(str(exc), 1) from None
                wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                say(f"{exc}; trying again in {wait:g} s")
            except (ConnectionError, ClientError) as exc:
                wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                say(f"{exc}; {'trying again' if self.connects == 0 else 'reconnecting'} in {wait:g} s")
            else:
                self.connects += 1
                attempt = 0
                if not self.names:  # the server's gallery, for n / p
                    self.names = await self._gallery()
                    self.index = self.names.index(portrait) if portrait in self.names else 0
                    self._set_still(feed)
                say(f"{'connected to' if self.connects == 1 else 'reconnected to'} {opts.server} "
                    f"(session {answer.get('session')})")
                self.status = "live"
                self.server_stats = current.stats  # updated in place as messages come
                reason = await self._watch(current, feed, controls, until)
                if reason is None:
                    return
                self.losses += 1
                self.status = "reconnecting"
                wait = BACKOFF_S[0]
                say(f"connection lost ({reason}): the camera shows the last frame, then the portrait; "
                    f"reconnecting in {wait:g} s")
            finally:
                await current.close()
                track.stop()
            attempt += 1
            deadline = time.perf_counter() + wait
            while time.perf_counter() < deadline and not controls.quit.is_set() and time.perf_counter() < until:
                await asyncio.sleep(0.05)

    def _set_still(self, feed: Feed) -> None:
        if self.names:
            image = self._still(self.names[self.index])
            if image is not None:
                feed.set_still(image)

    async def _watch(self, connection, feed: Feed, controls: Controls, until: float) -> str | None:
        """Until the connection is lost (the reason) or it is time to stop (None)."""
        retarget = not controls.retargeting.neutral  # the controls, for this session too
        while not controls.quit.is_set() and time.perf_counter() < until:
            if retarget:  # once the data channel is open
                retarget = not connection.send({"type": "retarget", **controls.retargeting.as_dict()})
            for command in controls.pending():
                if command == "retarget":
                    retarget = not connection.send({"type": "retarget", **controls.retargeting.as_dict()})
                elif command == "recalibrate":
                    if connection.send({"type": "recalibrate"}):
                        say("recalibrated: the next frame is the neutral pose")
                elif command in ("next", "previous") and len(self.names) > 1:
                    index = (self.index + (1 if command == "next" else -1)) % len(self.names)
                    try:
                        await connection.set_portrait(self.names[index])
                    except (ClientError, OSError) as exc:
                        say(f"{exc}; keeping {self.names[self.index]}")
                        continue
                    self.index = index
                    self._set_still(feed)
                    say(f"portrait: {self.names[index]}")
            if connection.failed:
                return connection.failed
            lost_after = self.opts.lost_after
            if connection.last_frame_at is not None and time.perf_counter() - connection.last_frame_at > lost_after:
                return f"no frame from the server for {lost_after:g} s"
            await asyncio.sleep(0.05)
        return None
