"""What the live-server tests share: a prepared server, a paced synthetic webcam, and a peer
that plays the browser (aiortc, in the test's own event loop, on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fractions
import io
import json
import threading
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from PIL import Image

from streamer import samples
from streamer.pipeline import WORKER_PREFIX, EnginePool
from streamer.server import Config, Server

FPS = 25
TICKS = 90_000 // FPS
TIME_BASE = fractions.Fraction(1, 90_000)


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    """Two seconds of a webcam user (the astronaut, moving and talking), 640x480."""
    return [frame for frame, _ in samples.driving_clip("astronaut", frames=2 * FPS, fps=FPS)]


@pytest.fixture(scope="module")
def prepared() -> Server:
    server = Server(Config(max_sessions=2, max_upload_bytes=2 * 1024 * 1024, idle_timeout=2.0,
                           connect_timeout=2.0))
    server.prepare()
    return server


def configured(prepared: Server, engines: EnginePool | None = None, portrait_changes=(5, 1.0), **changes) -> Server:
    """A server sharing the prepared gallery (and engines, unless given), with other settings."""
    server = Server(dataclasses.replace(prepared.config, **changes), engines or prepared.engines, portrait_changes)
    server.gallery, server.thumbnails = prepared.gallery, prepared.thumbnails
    return server


@contextlib.asynccontextmanager
async def running(server: Server, tls=None, trust=None):
    """The server on 127.0.0.1 (HTTPS with the SSLContext `tls`, trusted by the client's `trust`);
    yields an HTTP client session for it."""
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if tls else "http"
    try:
        async with aiohttp.ClientSession(f"{scheme}://{host}:{port}",
                                         connector=aiohttp.TCPConnector(ssl=trust) if trust else None) as http:
            yield http
    finally:
        await runner.cleanup()
    assert not server.sessions


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)]


async def freed(server: Server, timeout: float = 10.0) -> bool:
    """Wait until no session is left and every worker thread has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.sessions and not worker_threads():
            return True
        await asyncio.sleep(0.05)
    return False


class Webcam(MediaStreamTrack):
    """Frames from a list, cycled, paced at FPS; pts = index * TICKS. `frames(i)` picks the
    picture for frame i; returning None pauses the webcam for good (no more frames)."""

    kind = "video"

    def __init__(self, pictures, count: int):
        super().__init__()
        self.pictures, self.count = pictures, count
        self.sent: dict[int, float] = {}
        self.index = 0
        self._start = None

    async def recv(self) -> VideoFrame:
        if self.index >= self.count:
            await asyncio.Event().wait()  # a camera that stops sending but stays open
        if self._start is None:
            self._start = time.perf_counter()
        delay = self._start + self.index / FPS - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = VideoFrame.from_ndarray(self.pictures(self.index), format="rgb24")
        frame.pts, frame.time_base = self.index * TICKS, TIME_BASE
        self.sent[frame.pts] = time.perf_counter()
        self.index += 1
        return frame


class Peer:
    """The browser's side: a webcam track out, the avatar track and stats messages in."""

    def __init__(self, webcam: Webcam | None = None, channel: bool = True):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.webcam = webcam
        self.received: list[tuple[int, float, np.ndarray]] = []
        self.stats: list[dict] = []
        self.session = self.secret = None
        if webcam is not None:
            self.pc.addTrack(webcam)
        if channel:
            self.channel = self.pc.createDataChannel("stats")
            self.channel.on("message", lambda m: self.stats.append(json.loads(m)))
        self.pc.on("track", self._on_track)
        self._tasks = []

    def _on_track(self, track) -> None:
        async def read() -> None:
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    self.received.append((frame.pts, time.perf_counter(), frame.to_ndarray(format="rgb24")))
        self._tasks.append(asyncio.ensure_future(read()))

    async def offer(self, http: aiohttp.ClientSession, answer: bool = True, headers: dict | None = None,
                    **fields) -> aiohttp.ClientResponse:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post("/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer", **fields},
                                   headers=headers)
        if response.status == 200:
            reply = await response.json()
            self.session, self.secret = reply["session"], reply["secret"]
            if answer:
                await self.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], reply["type"]))
        return response

    @property
    def control(self) -> dict:
        """The headers that control this peer's session."""
        return {"X-Session-Secret": self.secret}

    def origin(self) -> int:
        return next(s["output_pts_origin"] for s in reversed(self.stats) if s["output_pts_origin"] is not None)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        self.pc.remove_all_listeners()  # no cycle keeps this peer (and its codec threads) alive


def sent_pts(peer: Peer, pts: int) -> int | None:
    """The webcam pts a received frame came from (RTP truncates a tick or two on the way)."""
    guess = round((pts + peer.origin()) / TICKS) * TICKS
    return guess if abs(pts + peer.origin() - guess) <= 3 and guess in peer.webcam.sent else None


async def until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-6))


def encoded(image: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **options)
    return buffer.getvalue()


async def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes that an HTTP client library would refuse to send; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
