"""The live server: HTTP bad input, and the media path with two aiortc peers in one process.

The server runs in the test's own event loop on 127.0.0.1; the "browser" is an aiortc peer
sending a synthetic webcam (streamer.samples' driving clip of a real portrait) at a fixed
rate, with known pts, and collecting what comes back. The pipeline tests swap in a fake
engine and a slowed tracker: their costs are sleeps, as a GPU engine's step mostly is.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from fakes import PortraitEngine
from live_helpers import (FPS, TICKS, Peer, Webcam, clip, configured, encoded, freed, prepared, psnr,  # noqa: F401
                          running, sent_pts, until, worker_threads)
from PIL import Image

from engines.animator import Animator
from engines.base import DrivingFrame, Rendered
from streamer import samples
from streamer.pipeline import EnginePool


# ------------------------------------------------------------------------------------------ HTTP
def test_page_and_gallery(prepared):
    async def main():
        async with running(prepared) as http:
            page = await (await http.get("/")).text()
            assert "app.js" in page and "<video" in page
            script = await http.get("/app.js")
            assert script.status == 200 and "RTCPeerConnection" in await script.text()
            listed = await (await http.get("/portraits")).json()
            assert [p["name"] for p in listed] == list(samples.PORTRAITS)
            thumb = await (await http.get(listed[0]["thumbnail"])).read()
            assert cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR).shape[2] == 3
            assert (await http.get("/portraits/nobody")).status == 404

    asyncio.run(main())


def test_offer_rejects_malformed_json_and_sdp(prepared):
    async def main():
        async with running(prepared) as http:
            for body in (b"{not json", b"[1, 2]", json.dumps({"type": "offer"}).encode(),
                         json.dumps({"sdp": "v=0", "type": "answer"}).encode()):
                response = await http.post("/offer", data=body, headers={"Content-Type": "application/json"})
                assert response.status == 400
                assert "JSON" in (await response.json())["error"]
            # Real offers, spoilt: text, cut in half, a broken candidate, no codec left.
            webcam = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            webcam.addTrack(Webcam(lambda i: np.zeros((64, 64, 3), np.uint8), 0))
            await webcam.setLocalDescription(await webcam.createOffer())
            good = webcam.localDescription.sdp
            await webcam.close()
            for sdp in ("this is not SDP", good[: len(good) // 2], good.replace("a=candidate:", "a=candidate:zz ", 1),
                        good.replace("a=rtpmap", "a=nortpmap")):
                response = await http.post("/offer", json={"sdp": sdp, "type": "offer"})
                assert response.status == 400
                assert "invalid SDP offer" in (await response.json())["error"]
                assert await freed(prepared)
            # An offer with a data channel and no webcam track.
            peer = Peer(webcam=None)
            response = await peer.offer(http)
            assert response.status == 400
            assert "no video track" in (await response.json())["error"]
            await peer.close()
            for field, value in (("mode", "fast"), ("portrait", "nobody")):
                peer = Peer(Webcam(lambda i: np.zeros((64, 64, 3), np.uint8), 0))
                response = await peer.offer(http, **{field: value})
                assert response.status == 400 and value in (await response.json())["error"]
                await peer.close()
            assert await freed(prepared)

    asyncio.run(main())


def test_token_is_required_on_offer_avatar_and_stats(prepared):
    server = configured(prepared, token="s3cret")

    async def main():
        async with running(server) as http:
            for method, path in (("POST", "/offer"), ("POST", "/avatar?session=x"), ("GET", "/stats")):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    response = await http.request(method, path, headers=headers)
                    assert response.status == 401, (path, headers)
                    assert "token" in (await response.json())["error"]
            good = {"Authorization": "Bearer s3cret"}
            assert (await http.get("/stats", headers=good)).status == 200
            assert (await http.get("/stats?token=s3cret")).status == 200
            # Past the token check: the request is judged on its content.
            assert (await http.post("/offer", data=b"x", headers=good)).status == 415
            assert (await http.post("/offer", data=b"x", headers={**good, "Content-Type": "application/json"})
                    ).status == 400
            assert (await http.post("/avatar?session=x", headers=good)).status == 404
            assert (await http.get("/")).status == 200  # the page itself is public

    asyncio.run(main())


def test_max_sessions_refuses_with_503_until_one_ends(prepared, clip):
    server = configured(prepared, max_sessions=1)

    async def main():
        async with running(server) as http:
            first = Peer(Webcam(clip.__getitem__, 2 * FPS))
            assert (await first.offer(http)).status == 200
            second = Peer(Webcam(clip.__getitem__, 2 * FPS))
            response = await second.offer(http)
            assert response.status == 503
            assert "busy" in (await response.json())["error"]
            await second.close()
            await first.close()
            assert await freed(server)
            third = Peer(Webcam(clip.__getitem__, 2 * FPS))
            assert (await third.offer(http)).status == 200
            await third.close()
            assert await freed(server)

    asyncio.run(main())


# ------------------------------------------------------------------------------------ media path
@pytest.mark.realtime
def test_animated_frames_come_back_with_their_input_pts_and_stats(prepared, clip):
    portrait_crop = None

    async def main():
        nonlocal portrait_crop
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 3 * FPS))
            assert (await peer.offer(http)).status == 200
            session = prepared.sessions[peer.session]
            portrait_crop = session.pipeline.stage.animator.sources[0].image.copy()
            await until(lambda: len(peer.received) >= 2 * FPS and peer.stats and peer.stats[-1]["frames_out"] >= 2 * FPS,
                        20)
            stats = (await (await http.get("/stats")).json())
            assert stats["sessions_active"] == 1 and stats["worker_threads"] == 2  # prep and engine
            await peer.close()
            assert await freed(prepared), "the session or its worker thread outlived the peer"
            return peer, stats

    peer, stats = asyncio.run(main())
    for pts, _, image in peer.received:
        assert image.shape == (512, 512, 3)
        assert sent_pts(peer, pts) is not None, f"output pts {pts} matches no webcam frame"
    # The avatar is the portrait, moved: close to the portrait's crop, far from the webcam picture.
    last = peer.received[-1][2]
    assert psnr(last, portrait_crop) > 15
    live = peer.stats[-1]
    assert live["type"] == "stats" and live["mode"] == "animate" and live["errors"] == 0
    assert live["frames_out"] >= 2 * FPS and live["fps_out"] > FPS / 2
    assert 0 < live["latency_ms"]["p50"] <= live["latency_ms"]["p95"] < 1000
    assert all(live["stages_ms"][stage] is not None for stage in ("convert_in", "face", "engine", "encode_send"))
    assert live["stages_ms"]["face"] > 0 and live["stages_ms"]["engine"] > 0
    assert stats["sessions"][0]["frames_in"] > 0


@pytest.mark.realtime
def test_echo_returns_the_webcam_frames_through_the_same_path(prepared, clip):
    async def main():
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 2 * FPS))
            assert (await peer.offer(http, mode="echo")).status == 200
            await until(lambda: len(peer.received) >= FPS and peer.stats, 20)
            await peer.close()
            assert await freed(prepared)
            return peer

    peer = asyncio.run(main())
    qualities = []
    for pts, _, image in peer.received[5:]:
        source = sent_pts(peer, pts)
        assert source is not None
        assert image.shape == (480, 640, 3)
        qualities.append(psnr(image, clip[source // TICKS % len(clip)]))
    assert np.median(qualities) > 25, qualities  # the same pictures, after two VP8 passes
    assert peer.stats[-1]["mode"] == "echo" and peer.stats[-1]["stages_ms"]["face"] < 0.5  # no face work


@pytest.mark.realtime
def test_no_face_holds_the_last_pose(prepared, clip):
    blank = np.full_like(clip[0], 40)
    face_frames = FPS + FPS // 2

    async def main():
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)] if i < face_frames else blank, 3 * FPS))
            assert (await peer.offer(http)).status == 200
            await until(lambda: peer.stats and peer.stats[-1]["frames_in"] >= 3 * FPS - 2, 20)
            await until(lambda: peer.stats[-1]["frames_without_face"] > FPS, 5)
            await peer.close()
            assert await freed(prepared)
            return peer

    peer = asyncio.run(main())
    with_face = [image for pts, _, image in peer.received if sent_pts(peer, pts) < face_frames * TICKS - TICKS]
    without = [image for pts, _, image in peer.received if sent_pts(peer, pts) >= (face_frames + 5) * TICKS]
    assert len(without) > FPS // 2
    for image in without:
        assert image.mean() > 60  # no black frames: the portrait, in its last pose
        assert psnr(image, with_face[-1]) > 24
    assert peer.stats[-1]["errors"] == 0


@pytest.mark.realtime
@pytest.mark.parametrize("stage", ["track", "render"])
def test_a_slow_stage_drops_stale_frames_and_latency_does_not_creep(prepared, clip, monkeypatch, stage):
    """With one stage costing 3 frame periods, a queue would add ~80 ms per frame; the newest-
    frame slot keeps the round trip flat and counts the input frames it skips. (The warp engine
    computes on the CPU, so tracking waits for its step: nothing is prepared and then dropped.)"""
    slowed = getattr(Animator, stage)

    def slow(self, *args, **kwargs):
        time.sleep(3 / FPS)
        return slowed(self, *args, **kwargs)

    monkeypatch.setattr(Animator, stage, slow)

    async def main():
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 4 * FPS))  # 4 s: a queue would end ~2.5 s behind
            assert (await peer.offer(http)).status == 200
            await until(lambda: peer.stats and peer.stats[-1]["frames_in"] >= 4 * FPS - 3, 30)
            await asyncio.sleep(0.6)
            await peer.close()
            assert await freed(prepared)
            return peer

    peer = asyncio.run(main())
    round_trips = [(arrived - peer.webcam.sent[sent_pts(peer, pts)]) * 1e3 for pts, arrived, _ in peer.received]
    stats = peer.stats[-1]
    assert stats["dropped_stale"] > 2 * FPS  # most frames were skipped, and counted
    assert stats["dropped_prepared"] == 0
    assert stats["dropped"] >= stats["dropped_stale"] and stats["errors"] == 0
    assert stats["frames_processed"] < 3 * FPS
    early, late = np.median(round_trips[3:10]), np.median(round_trips[-7:])
    assert late < early + 60, (early, late)  # flat: a queue would be seconds behind by now
    assert max(round_trips) < 600


# -------------------------------------------------------------------------- the two-stage pipeline
TRACK_S, STEP_S = 0.040, 0.045  # each stage's cost, as sleeps: the GIL is free meanwhile
SERIAL_FPS = 1 / (TRACK_S + STEP_S)  # the most one thread doing both could reach: 11.8


class Stages:
    """Which of a session's two stages are at work right now, seen from inside them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.tracking = self.stepping = 0
        self.overlaps = 0  # a step started or ended while a frame was being tracked, or the reverse
        self.clashes: list[str] = []  # an engine change made while a frame was in either stage

    @contextlib.contextmanager
    def busy(self, stage: str):
        with self._lock:
            setattr(self, stage, getattr(self, stage) + 1)
            self.overlaps += self.tracking > 0 and self.stepping > 0
        try:
            yield
        finally:
            with self._lock:
                self.overlaps += self.tracking > 0 and self.stepping > 0
                setattr(self, stage, getattr(self, stage) - 1)

    def check_idle(self, change: str) -> None:
        with self._lock:
            if self.tracking or self.stepping:
                self.clashes.append(f"{change} while tracking {self.tracking}, stepping {self.stepping}")


class SlowEngine(PortraitEngine):
    """A GPU engine's shape: `step` waits STEP_S with the GIL released, as a device sync does,
    and checks that its driving frame stayed as it was for the whole step."""

    name = "slow"
    size = 128
    needs_driving_image = True
    waits_on_device = True

    def __init__(self, stages: Stages):
        super().__init__()
        self.stages = stages
        self.steps = self.corrupted = self.prepares = self.resets = 0

    def prepare(self, sources) -> None:
        self.stages.check_idle("prepare")
        self.prepares += 1
        self.portrait = sources[0].image.copy()

    def step(self, frame: DrivingFrame) -> Rendered:
        with self.stages.busy("stepping"):
            landmarks, image, when, tag = frame.landmarks.copy(), frame.image.copy(), frame.time, frame.tag
            time.sleep(STEP_S)
            intact = (np.array_equal(frame.landmarks, landmarks) and np.array_equal(frame.image, image)
                      and frame.time == when and frame.tag is tag)
            self.steps += 1
            self.corrupted += not intact
            return super().step(frame)

    def reset(self) -> None:
        self.stages.check_idle("reset")
        self.resets += 1


class SlowCpuEngine(SlowEngine):
    """The same costs, but the step computes on the CPU (the GIL aside): no overlap wanted."""

    waits_on_device = False


@pytest.fixture(params=[SlowEngine])
def slow_pipeline(prepared, monkeypatch, request):
    """A server whose sessions run SlowEngine (or the class given as the fixture's param),
    with tracking slowed to TRACK_S a frame."""
    stages = Stages()
    engines: list[SlowEngine] = []
    track = Animator.track

    def slow_track(self, *args, **kwargs):
        with stages.busy("tracking"):
            time.sleep(TRACK_S)
            return track(self, *args, **kwargs)

    def take_engine() -> SlowEngine:
        engines.append(request.param(stages))
        return engines[-1]

    monkeypatch.setattr(Animator, "track", slow_track)
    return configured(prepared, EnginePool(take_engine)), stages, engines


@pytest.mark.realtime
@pytest.mark.parametrize("slow_pipeline", [SlowEngine, SlowCpuEngine], indirect=True)
def test_frame_n_plus_1_is_tracked_while_frame_n_is_in_the_engine(slow_pipeline, clip):
    """An engine that waits on a device: tracking and its step overlap, the session renders at
    about 1/max(stage), well above what one thread doing both could (1/sum), and no step sees
    its frame change. An engine that computes on the CPU: tracking waits for its step (two
    frames in flight would only compete for the same cores), so never beyond 1/sum."""
    server, stages, engines = slow_pipeline

    async def main():
        async with running(server) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 8 * FPS))
            assert (await peer.offer(http)).status == 200
            session = server.sessions[peer.session]
            await until(lambda: session.stats.frames_processed >= 5, 20)
            start, processed = time.perf_counter(), session.stats.frames_processed
            await asyncio.sleep(3)
            fps = (session.stats.frames_processed - processed) / (time.perf_counter() - start)
            snapshot = session.snapshot()
            await peer.close()
            assert await freed(server)
            return fps, snapshot

    fps, snapshot = asyncio.run(main())
    engine = engines[0]
    if engine.waits_on_device:
        ideal = 1 / max(TRACK_S, STEP_S)
        assert fps > 1.3 * SERIAL_FPS, f"{fps:.1f} fps: one thread doing both reaches {SERIAL_FPS:.1f}, two {ideal:.1f}"
        assert stages.overlaps > 10
    else:
        assert stages.overlaps == 0 and fps < 1.1 * SERIAL_FPS
    assert engine.steps > 30 and engine.corrupted == 0
    assert snapshot["errors"] == 0 and snapshot["stages_ms"]["engine"] >= STEP_S * 1e3


@pytest.mark.realtime
def test_a_new_portrait_and_recalibration_wait_for_both_threads(slow_pipeline, clip):
    """Changes to the engine (prepare, reset) happen with no frame in either stage, while
    frames keep coming before and after."""
    server, stages, engines = slow_pipeline

    async def main():
        async with running(server) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 8 * FPS))
            assert (await peer.offer(http)).status == 200
            session = server.sessions[peer.session]
            await until(lambda: peer.stats and session.stats.frames_processed >= 5, 20)
            url = f"/avatar?session={peer.session}"
            for portrait in ("grace_hopper", "astronaut", "grace_hopper"):
                for _ in range(2):
                    peer.channel.send(json.dumps({"type": "recalibrate"}))
                    await asyncio.sleep(0.07)
                assert (await http.post(f"{url}&portrait={portrait}", headers=peer.control)).status == 200
            shown = session.stats.frames_processed
            await until(lambda: session.stats.frames_processed >= shown + 10, 10)
            errors = session.stats.errors
            await peer.close()
            assert await freed(server)
            return errors

    assert asyncio.run(main()) == 0
    engine = engines[0]
    # Each portrait resets; so does each recalibration (one sent while another waits is that one).
    assert engine.prepares == 4 and engine.resets >= 4 + 3
    assert stages.clashes == [] and engine.corrupted == 0


# --------------------------------------------------------------------------------------- uploads
@pytest.mark.realtime
def test_avatar_upload_bad_input_keeps_the_previous_portrait(prepared, clip):
    server = configured(prepared, portrait_changes=(100, 0.01))  # the rate limit has its own test
    astronaut, grace = samples.portrait("astronaut"), samples.portrait("grace_hopper")
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000), 90).save(buffer, "PNG")  # 81 MP of grey, 0.1 MB as PNG (refused on its size)
    huge = buffer.getvalue()  # made here: seconds of work that would stall the event loop

    async def main():
        async with running(server) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 10 * FPS))  # outlasts the uploads
            assert (await peer.offer(http)).status == 200
            session = server.sessions[peer.session]
            await until(lambda: session.media_flowing, 10)  # uploads are decoded only for live streams
            before = session.pipeline.stage.animator.sources[0].image.copy()
            url = f"/avatar?session={peer.session}"

            async def refused(body: bytes, status: int, words: str) -> None:
                response = await http.post(url, data=body, headers=peer.control)
                assert response.status == status, await response.text()
                message = (await response.json())["error"]
                assert words in message and "previous portrait is kept" in message
                assert " at 0x" not in message and "BytesIO" not in message  # words, not Python internals
                assert session.portrait == "astronaut"
                assert np.array_equal(session.pipeline.stage.animator.sources[0].image, before)

            await refused(b"hello, this is text", 400, "not an image")
            await refused(b"", 400, "empty")
            await refused(encoded(astronaut)[:2000], 400, "damaged or truncated")  # a truncated JPEG
            await refused(encoded(noise, "PNG"), 422, "no face")
            await refused(b"\xff" * (prepared.config.max_upload_bytes + 1), 413, "larger than")
            await refused(huge, 413, "megapixels")
            # The same through a multipart form, as curl -F sends it.
            form = aiohttp.FormData()
            form.add_field("image", b"not an image", filename="x.png", content_type="image/png")
            response = await http.post(url, data=form, headers=peer.control)
            assert response.status == 400 and "not an image" in (await response.json())["error"]

            # Good uploads: a large photo is downscaled, a bundled one switches by name.
            big = cv2.resize(grace, (grace.shape[1] * 5, grace.shape[0] * 5), interpolation=cv2.INTER_CUBIC)
            response = await http.post(url, data=encoded(big, quality=80), headers=peer.control)
            assert response.status == 200, await response.text()
            reply = await response.json()
            assert reply["portrait"] == "upload" and max(reply["width"], reply["height"]) <= 2048
            assert not np.array_equal(session.pipeline.stage.animator.sources[0].image, before)
            response = await http.post(url + "&portrait=astronaut", headers=peer.control)
            assert response.status == 200 and session.portrait == "astronaut"
            assert (await http.post(url + "&portrait=nobody", headers=peer.control)).status == 404
            assert (await http.post("/avatar?session=nope", data=encoded(astronaut))).status == 404
            shown = len(peer.received)
            await until(lambda: len(peer.received) > shown + 5, 10)  # still streaming after all that
            await peer.close()

            echo = Peer(Webcam(lambda i: clip[i % len(clip)], FPS))
            assert (await echo.offer(http, mode="echo")).status == 200
            response = await http.post(f"/avatar?session={echo.session}", data=encoded(astronaut),
                                       headers=echo.control)
            assert response.status == 400 and "echo" in (await response.json())["error"]
            await echo.close()
            assert await freed(server)

    asyncio.run(main())


# ----------------------------------------------------------------------------------- teardown
@pytest.mark.realtime
def test_a_silent_or_unanswered_peer_is_freed_by_the_timeouts(prepared, clip):
    async def main():
        async with running(prepared) as http:
            # Sends one second of video, then nothing, and never hangs up: the idle timeout (2 s).
            silent = Peer(Webcam(lambda i: clip[i % len(clip)], FPS))
            assert (await silent.offer(http)).status == 200
            # Offers, then never applies the answer, so ICE never starts: the connect timeout (2 s).
            unanswered = Peer(Webcam(lambda i: clip[i % len(clip)], FPS))
            assert (await unanswered.offer(http, answer=False)).status == 200
            assert len(prepared.sessions) == 2
            assert len(worker_threads()) >= 2  # each engine thread; a prep thread starts with the first frame
            await until(lambda: len(silent.received) > 5, 10)
            assert await freed(prepared, timeout=10)
            await silent.close()
            await unanswered.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------- RTP framing
def test_a_video_frame_leaves_the_jitter_buffer_on_its_marker_packet():
    from aiortc.rtp import RtpPacket

    from streamer.rtp import MarkerJitterBuffer

    def packet(sequence: int, timestamp: int, marker: bool) -> RtpPacket:
        p = RtpPacket(sequence_number=sequence, timestamp=timestamp, marker=int(marker))
        p._data = bytes([sequence])
        return p

    video = MarkerJitterBuffer(capacity=128, is_video=True)
    assert video.add(packet(0, 3000, False))[1] is None
    frame = video.add(packet(1, 3000, True))[1]  # complete now, not when frame 6000 starts
    assert frame is not None and frame.timestamp == 3000 and frame.data == b"\x00\x01"
    # A gap before the marker: nothing until the missing packet arrives, then the whole frame.
    assert video.add(packet(2, 6000, False))[1] is None
    assert video.add(packet(4, 6000, True))[1] is None
    frame = video.add(packet(3, 6000, False))[1]
    assert frame is not None and frame.data == b"\x02\x03\x04"
    # A lost marker packet: the frame still ends when the next one starts (aiortc's own rule).
    assert video.add(packet(5, 9000, False))[1] is None
    assert video.add(packet(7, 12000, False))[1] is None
    assert video.add(packet(6, 9000, False))[1].data == b"\x05\x06"
