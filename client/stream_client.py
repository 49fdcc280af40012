"""`xportrait client`: play a video file as a webcam to a running `xportrait serve`, over real
WebRTC, record the avatar stream that comes back, and report round-trip latency, fps and drops.

This is the latency benchmark's tool. Each frame is sent with its own pts (90 kHz ticks,
paced at the file's frame rate) and the server returns every rendered frame with the pts of
the webcam frame it came from, so a received frame is matched to the moment its input was
handed to the encoder: that difference is the full round trip (encode, network, decode,
server work, encode, network, decode).

RTP rebases timestamps at each receiver (the first frame received becomes 0), so the pts
that comes back is off by the pts of the first frame the server sent; the server states
that origin in its stats messages (`output_pts_origin`) on the data channel.

`--mode echo` asks the server to bypass face tracking and the engine (the same code path
otherwise): its latency is the transport floor. `--mode both` measures echo, then animate,
in one run. The report is JSON on stdout (and in --report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from urllib.parse import urlsplit
from pathlib import Path
from typing import Callable

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from streamer.options import ClientOptions, client_options
from streamer.rtp import complete_frames_on_marker, is_loopback, keep_media_on_loopback
from streamer.video import VideoError, VideoWriter, open_video, probe

logger = logging.getLogger("xportrait.client")

RTP_CLOCK = 90_000  # video RTP timestamps tick at 90 kHz
TIME_BASE = Fraction(1, RTP_CLOCK)
DRAIN_S = 1.5  # after the last frame is sent, how long to wait for the last ones to come back
TIMELINE_WINDOW_S = 10.0


class ClientError(RuntimeError):
    """A failure to report to the user (exit status 1)."""


class FileTrack(MediaStreamTrack):
    """A video file as a live webcam: frames paced at the file's rate, pts in 90 kHz ticks.

    Decoding runs on a helper thread, one frame ahead, so the event loop only paces.
    `sent` maps each frame's pts to the moment it was handed to the encoder.
    """

    kind = "video"

    def __init__(self, path: str, duration: float | None = None, loop: bool = False):
        super().__init__()
        info = probe(path)
        self.fps = float(info.fps)
        self.ticks = RTP_CLOCK / self.fps
        self.limit = None if duration is None else max(1, round(duration * self.fps))
        self._path, self._loop = path, loop
        self._container = open_video(path)
        self._frames = self._container.decode(video=0)
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="xportrait-client-decode")
        self._next = None
        self._start: float | None = None
        self.count = 0
        self.sent: dict[int, float] = {}

    def _decode(self) -> av.VideoFrame | None:
        for _ in range(2):  # a second try only after rewinding a looped file
            try:
                return next(self._frames)
            except StopIteration:
                if not self._loop:
                    return None
                self._container.seek(0)
                self._frames = self._container.decode(video=0)
            except av.FFmpegError as exc:
                raise VideoError(f"cannot decode {self._path} at frame {self.count}: {exc}") from None
        return None

    async def recv(self) -> av.VideoFrame:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.run_in_executor(self._decoder, self._decode)
        frame = await self._next
        if frame is None or self.readyState != "live" or (self.limit is not None and self.count >= self.limit):
            self.stop()
            raise MediaStreamError
        self._next = loop.run_in_executor(self._decoder, self._decode)  # decode ahead while waiting
        if self._start is None:
            self._start = time.perf_counter()
        delay = self._start + self.count / self.fps - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        frame.pts = round(self.count * self.ticks)
        frame.time_base = TIME_BASE
        self.sent[frame.pts] = time.perf_counter()
        self.count += 1
        return frame

    def close(self) -> None:
        self.stop()
        self._decoder.shutdown(wait=True)
        self._container.close()


class Recorder:
    """Writes received frames to a file on its own thread (streamer.video.VideoWriter: H.264
    MP4, or the format the file name's extension names)."""

    def __init__(self, path: str | None, fps: float):
        self.path, self.fps = path, fps
        self._writer: VideoWriter | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="xportrait-client-record")
        self._pending = []
        self.frames = 0

    def add(self, frame: av.VideoFrame, seconds: float) -> None:
        if self.path is not None:
            self._pending.append(self._thread.submit(self._write, frame, seconds))

    def _write(self, frame: av.VideoFrame, seconds: float) -> None:
        if self._writer is None:
            self._writer = VideoWriter(self.path, frame.width, frame.height, self.fps, time_base=TIME_BASE,
                                       preset="veryfast")
        self._writer.write(frame.to_ndarray(format="rgb24"), seconds)
        self.frames += 1

    def close(self) -> None:
        try:
            for future in self._pending:
                future.result()  # raises the first write error
        finally:
            if self._writer is not None:
                self._thread.submit(self._writer.close).result()
            self._thread.shutdown(wait=True)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None, "mean": None}
    array = np.asarray(values)
    return {"p50": round(float(np.percentile(array, 50)), 2), "p95": round(float(np.percentile(array, 95)), 2),
            "max": round(float(array.max()), 2), "mean": round(float(array.mean()), 2)}


def match_latencies(sent: dict[int, float], received: list[tuple[int, float]], origin: int,
                    ticks: float) -> tuple[list[tuple[float, float]], int]:
    """(send time, round-trip ms) of each received frame, matched to its sent frame by pts.

    A received pts plus the server's output origin is the sent pts, give or take the
    ticks that the encoders' timebase conversions truncate; a received frame that lands
    on no sent frame is counted as unmatched.
    """
    matched, unmatched = [], 0
    for pts, arrived in received:
        index = round((pts + origin) / ticks)
        sent_pts = round(index * ticks)
        if abs(pts + origin - sent_pts) > ticks / 4 or sent_pts not in sent:
            unmatched += 1
            continue
        matched.append((sent[sent_pts], (arrived - sent[sent_pts]) * 1e3))
    return matched, unmatched


def timeline(matched: list[tuple[float, float]], window_s: float = TIMELINE_WINDOW_S) -> list[dict]:
    """Round-trip percentiles per window of the run: flat means no queue is building up."""
    if not matched:
        return []
    start = matched[0][0]
    windows: dict[int, list[float]] = {}
    for sent_at, ms in matched:
        windows.setdefault(int((sent_at - start) // window_s), []).append(ms)
    return [{"from_s": k * window_s, **_percentiles(v), "frames": len(v)} for k, v in sorted(windows.items())]


class Refused(ClientError):
    """The server answered the offer with an error status (401 wrong token, 503 busy, 4xx bad offer)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"the server refused the offer ({status}): {message}")
        self.status = status


class Untrusted(ClientError):
    """The server's TLS certificate is not trusted on this machine (retrying will not help)."""


class Connection:
    """One session with a running `xportrait serve`: `webcam` goes out over WebRTC and every
    avatar frame that comes back goes to `on_frame(frame, arrived)` (perf_counter) on the event
    loop; the server's latest stats message is in `stats`. `xportrait client` drives it with a
    file as the webcam, `xportrait cam` with the local camera.
    """

    def __init__(self, server: str, webcam: MediaStreamTrack, *, mode: str = "animate",
                 portrait: str | None = None, token: str | None = None,
                 on_frame: Callable[[av.VideoFrame, float], None] | None = None):
        complete_frames_on_marker()  # as the server does: no frame waits for the next one
        if is_loopback(urlsplit(server).hostname or ""):
            keep_media_on_loopback()  # a server on this machine: media stays on loopback as well
        self.server = server.rstrip("/")
        self.webcam, self.mode, self.portrait, self.token = webcam, mode, portrait, token
        self._on_frame = on_frame
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.stats: dict = {}
        self.session: str | None = None
        self.secret: str | None = None  # the answer's: controls this session (POST /avatar)
        self.frames = 0
        self.last_frame_at: float | None = None
        self.first_frame = asyncio.Event()
        self._channel = None
        self._tasks: list[asyncio.Task] = []

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def failed(self) -> str | None:
        """Why the connection is gone, or None while it is up."""
        state = self.pc.connectionState
        return f"the connection {state}" if state in ("failed", "closed") else None

    async def open(self, connect_timeout: float = 15.0) -> dict:
        """Offer, answer, and wait for the first avatar frame; return the server's answer.
        Raises Refused (an error status), ConnectionError (no server there), ClientError."""
        pc = self.pc
        pc.addTrack(self.webcam)
        self._channel = channel = pc.createDataChannel("stats")

        @channel.on("message")
        def on_message(message) -> None:
            data = json.loads(message)
            if data.get("type") == "stats":
                self.stats.clear()
                self.stats.update(data)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self._tasks.append(asyncio.ensure_future(self._receive(track)))

        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "mode": self.mode}
        if self.portrait:
            offer["portrait"] = self.portrait
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(self.server + "/offer", json=offer, headers=self.headers,
                                     timeout=aiohttp.ClientTimeout(total=60)) as response:
                    if response.status != 200:
                        raise Refused(response.status, await _error_message(response))
                    answer = await response.json()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Untrusted(f"the server's TLS certificate is not trusted here ({exc.certificate_error}): for a "
                            "--self-signed server, copy the certificate it printed to this machine and trust it "
                            "(SSL_CERT_FILE=cert.pem, or add it to the system's store), or give the server one "
                            "from a CA (--tls-cert, --tls-key)") from None
        except aiohttp.ClientConnectionError as exc:
            raise ConnectionError(f"cannot reach the server at {self.server}: {exc}") from None
        except asyncio.TimeoutError:
            raise ConnectionError(f"the server at {self.server} did not answer the offer within 60 s") from None
        except aiohttp.ClientError as exc:  # an invalid URL, a malformed answer
            raise ConnectionError(f"cannot talk to the server at {self.server}: {type(exc).__name__}: {exc}") from None
        self.session, self.secret = answer.get("session"), answer.get("secret")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        try:
            await asyncio.wait_for(self.first_frame.wait(), connect_timeout)
        except asyncio.TimeoutError:
            raise ClientError(f"no frame came back within {connect_timeout:g} s "
                              f"(connection: {pc.connectionState})") from None
        return answer

    async def _receive(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.last_frame_at = now = time.perf_counter()
            self.frames += 1
            if self._on_frame is not None:
                self._on_frame(frame, now)
            self.first_frame.set()

    def send(self, message: dict) -> bool:
        """A command on the data channel ({"type": "recalibrate"}); False when it is not open."""
        if self._channel is None or self._channel.readyState != "open":
            return False
        self._channel.send(json.dumps(message))
        return True

    async def set_portrait(self, name: str) -> dict:
        """Switch the session to one of the server's portraits (POST /avatar)."""
        headers = {**self.headers, **({"X-Session-Secret": self.secret} if self.secret else {})}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.server}/avatar", params={"session": self.session or "", "portrait": name},
                                 headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as response:
                if response.status != 200:
                    raise ClientError(f"the server refused portrait {name!r} ({response.status}): "
                                      f"{await _error_message(response)}")
                return await response.json()

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()


async def _error_message(response: aiohttp.ClientResponse) -> str:
    try:
        return (await response.json())["error"]
    except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
        return (await response.text())[:300]


async def stream(server: str, path: str, mode: str, *, output: str | None = None, portrait: str | None = None,
                 token: str | None = None, duration: float | None = None, loop: bool = False,
                 connect_timeout: float = 15.0) -> dict:
    """One session: send the file, receive the avatar, return the report."""
    webcam = FileTrack(path, duration=duration, loop=loop)
    recorder = Recorder(output, webcam.fps)
    received: list[tuple[int, float]] = []
    origin_pts = None

    def on_frame(frame: av.VideoFrame, now: float) -> None:
        nonlocal origin_pts
        received.append((frame.pts, now))
        if origin_pts is None:
            origin_pts = frame.pts
        recorder.add(frame, float((frame.pts - origin_pts) * TIME_BASE))

    connection = Connection(server, webcam, mode=mode, portrait=portrait, token=token, on_frame=on_frame)
    server_stats = connection.stats
    try:
        answer = await connection.open(connect_timeout)
        # Stream until the file (or --duration) ends, then let the last frames come back.
        while webcam.readyState == "live":
            if connection.failed:
                raise ClientError(f"{connection.failed} while streaming")
            await asyncio.sleep(0.1)
        stream_end = time.perf_counter()
        while time.perf_counter() - stream_end < DRAIN_S and connection.pc.connectionState == "connected":
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
        webcam.close()
        await asyncio.get_running_loop().run_in_executor(None, recorder.close)

    origin = server_stats.get("output_pts_origin")
    matched, unmatched = ([], len(received)) if origin is None else \
        match_latencies(webcam.sent, received, origin, webcam.ticks)
    latencies = [ms for _, ms in matched]
    sent_times = sorted(webcam.sent.values())
    arrived = [t for _, t in received]

    def rate(times: list[float]) -> float:
        return round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 and times[-1] > times[0] else 0.0

    return {
        "mode": mode,
        "session": answer.get("session"),
        "input": path,
        "input_fps": round(webcam.fps, 3),
        "frames_sent": len(webcam.sent),
        "frames_received": len(received),
        "frames_matched": len(latencies),
        "frames_unmatched": unmatched,
        "dropped": len(webcam.sent) - len(latencies),
        "fps_sent": rate(sent_times),
        "fps_received": rate(arrived),
        "latency_ms": _percentiles(latencies),
        "latency_ms_per_window": timeline(matched),
        "output": output,
        "frames_recorded": recorder.frames,
        "server": server_stats,
    }


def _output_for(output: str | None, mode: str, both: bool) -> str | None:
    if output is None or not both or mode == "animate":
        return output
    path = Path(output)
    return str(path.with_name(f"{path.stem}.{mode}{path.suffix}"))


async def measure(args: ClientOptions) -> dict:
    modes = ("echo", "animate") if args.mode == "both" else (args.mode,)
    report = {}
    for mode in modes:
        report[mode] = await stream(args.server, args.input, mode, output=_output_for(args.output, mode, len(modes) > 1),
                                    portrait=args.portrait, token=args.token, duration=args.duration, loop=args.loop,
                                    connect_timeout=args.connect_timeout)
    if len(modes) > 1:
        echo, animate = report["echo"]["latency_ms"]["p50"], report["animate"]["latency_ms"]["p50"]
        if echo is not None and animate is not None:
            report["engine_cost_ms_p50"] = round(animate - echo, 2)
    return report if len(modes) > 1 else report[modes[0]]


def server_url(text: str) -> str:
    """The server's base URL: http(s)://HOST[:PORT][/PATH]; a bare HOST[:PORT] means http://.
    For argparse: anything else is an error that says what is expected."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number in range)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port number from 1 to 65535, got {text!r}") \
            from None
    if not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"expected a URL such as http://127.0.0.1:8080, got {text!r}")
    return url.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="video file to play as the webcam")
    parser.add_argument("--server", type=server_url, default="http://127.0.0.1:8080", metavar="URL",
                        help="the server's URL; a bare HOST:PORT means http:// (default: %(default)s)")
    parser.add_argument("--output", help="record the avatar stream to this file (the extension chooses the format: "
                                         ".mp4, .webm, .mkv, ...)")
    parser.add_argument("--mode", choices=("animate", "echo", "both"), default="animate",
                        help="animate (default); echo bypasses the engine (the transport floor); both runs echo, "
                             "then animate")
    parser.add_argument("--portrait", help="bundled portrait to animate (default: the server's first)")
    parser.add_argument("--token", help="the server's access token")
    parser.add_argument("--duration", type=float, help="stop after this many seconds of video")
    parser.add_argument("--loop", action="store_true", help="repeat the file (until --duration)")
    parser.add_argument("--connect-timeout", type=float, default=15.0,
                        help="seconds to wait for the first frame back (default 15)")
    parser.add_argument("--report", help="also write the JSON report to this file")


def run(args: argparse.Namespace) -> int:
    options = client_options(args)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if options.output is not None:
        from streamer.output import OutputPathError, check_output

        try:
            check_output(options.output, [options.input])
        except OutputPathError as exc:
            print(f"xportrait client: --output: {exc}", file=sys.stderr)
            return 2
    try:
        report = asyncio.run(measure(options))
    except VideoError as exc:
        print(f"xportrait client: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"xportrait client: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"xportrait client: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if options.report:
        Path(options.report).write_text(text + "\n")
    return 0
