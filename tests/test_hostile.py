"""The server under hostile and careless input, bounded (loopback only, a few requests each).

Signalling (bodies, content types, SDP), tokens and headers (Host, Origin, bytes that are not
UTF-8), uploads (before media, rate, size, a slow decode beside the stream), control of a
session from another one, and a webcam that changes resolution mid-stream. Each answer is a
status with a message in words, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import types

import cv2
import numpy as np
import pytest
from live_helpers import (FPS, Peer, Webcam, clip, configured, encoded, freed, prepared, psnr,  # noqa: F401
                          raw_request, running, until)

import streamer.server
from streamer import samples

NO_INTERNALS = re.compile(r"Error:|Traceback|object at 0x|KeyError|AssertionError|BytesIO")


async def offer_sdp() -> str:
    """A real offer (a webcam track and a data channel), as a browser would make it."""
    peer = Peer(Webcam(lambda i: np.zeros((64, 64, 3), np.uint8), 0))
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    sdp = peer.pc.localDescription.sdp
    await peer.close()
    return sdp


async def refused(response, status: int, words: str) -> str:
    assert response.status == status, (response.status, await response.text())
    assert response.content_type == "application/json"
    message = (await response.json())["error"]
    assert words in message, message
    assert not NO_INTERNALS.search(message), message
    return message


def port_of(http) -> int:
    return http._base_url.port


# ------------------------------------------------------------------------------------- signalling
def test_malformed_offers_are_400s_in_words_and_hold_no_slot(prepared):
    async def main():
        async with running(prepared) as http:
            good = await offer_sdp()
            json_headers = {"Content-Type": "application/json"}
            # A web page's no-preflight POST (text/plain) or no type at all: not an offer.
            for headers in ({"Content-Type": "text/plain"}, {}):
                response = await http.post("/offer", data=json.dumps({"sdp": good, "type": "offer"}), headers=headers)
                await refused(response, 415, "application/json")
            await refused(await http.post("/offer", data="[" * 100_000, headers=json_headers), 400, "nested")
            for field, value in (("portrait", ["a"]), ("portrait", {"a": 1}), ("mode", ["animate"]), ("mode", 7)):
                response = await http.post("/offer", json={"sdp": good, "type": "offer", field: value})
                await refused(response, 400, f"unknown {field}")
            big = {"sdp": good + "a=x:" + "y" * 300_000 + "\r\n", "type": "offer"}
            await refused(await http.post("/offer", json=big), 413, "larger than")
            spoilt = {
                "fingerprint": "\r\n".join(line for line in good.split("\r\n") if not line.startswith("a=fingerprint")),
                "port": re.sub(r"m=video \d+", "m=video NaN", good),
                "x=value": good.replace("a=mid:0", "junk", 1),
                "video track": re.sub(r"m=video \d+", "m=audio 9", good),
                "ICE credentials": "\r\n".join(line for line in good.split("\r\n") if not line.startswith("a=ice-pwd")),
                "v=0": good[4:],
                # aiortc fails on these only while answering (a 500, and a slot held for good)
                "same a=mid": good + good[good.index("m=video"):good.index("m=application")],
                "names the a=mid '7'": good.replace("a=group:BUNDLE", "a=group:BUNDLE 7 #", 1),
                # a DTLS handshake against these can only fail
                "malformed DTLS fingerprint": re.sub(r"(a=fingerprint:sha-256 )\S+", r"\1zz", good),
                "fingerprint has 31 bytes": re.sub(r"(a=fingerprint:sha-256 )\S\S:", r"\1", good),
                "digest this server checks": re.sub(r"a=fingerprint:sha-\d+", "a=fingerprint:md5", good),
            }
            for words, sdp in spoilt.items():
                response = await http.post("/offer", json={"sdp": sdp, "type": "offer"})
                message = await refused(response, 400, words)
                assert message.startswith("invalid SDP offer: ")
                assert not prepared.sessions  # refused before a slot was taken
            await refused(await http.get("/nowhere"), 404, "nothing at /nowhere")
            await refused(await http.put("/offer"), 405, "PUT")
            assert (await http.get("/stats")).status == 200  # still serving

    asyncio.run(main())


def test_an_offer_aiortc_fails_on_while_answering_is_a_400_and_holds_no_slot(prepared, monkeypatch):
    """What check_offer cannot foresee: aiortc raising while it answers, and again while the
    refused session's peer connection closes. The session is still freed, its slot given back."""
    from aiortc import RTCPeerConnection

    async def broken_answer(self, description):
        raise AttributeError("'NoneType' object has no attribute '_set_mid'")

    close = RTCPeerConnection.close

    async def broken_close(self):
        await close(self)
        raise AttributeError("'NoneType' object has no attribute '_unregister_data_receiver'")

    async def main():
        async with running(prepared) as http:
            good = await offer_sdp()
            monkeypatch.setattr(RTCPeerConnection, "setLocalDescription", broken_answer)
            monkeypatch.setattr(RTCPeerConnection, "close", broken_close)
            for _ in range(prepared.config.max_sessions + 1):
                response = await http.post("/offer", json={"sdp": good, "type": "offer"})
                message = await refused(response, 400, "invalid SDP offer")
                assert not prepared.sessions, message
            assert await freed(prepared)

    asyncio.run(main())


@pytest.mark.realtime
def test_the_connect_timeout_counts_from_the_answer_not_from_a_slow_engine_start(prepared, clip):
    """On a loaded machine the engine may take longer to start than --connect-timeout: the
    offer is still answered, and the session streams (it was closed mid-offer: a 500)."""
    from streamer.pipeline import EnginePool

    def slow_engine():
        time.sleep(1.5)
        return prepared.engines.take()

    server = configured(prepared, engines=EnginePool(slow_engine), connect_timeout=0.5)

    async def main():
        async with running(server) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 10 * FPS))
            response = await peer.offer(http)
            assert response.status == 200, await response.text()
            await until(lambda: len(peer.received) >= 3, 20)
            await peer.close()
            assert await freed(server)

    asyncio.run(main())


# ----------------------------------------------------------------------------- tokens and headers
def test_tokens_hosts_and_origins(prepared):
    server = configured(prepared, token="s3cret", allow_origins=("https://studio.example",))

    async def main():
        async with running(server) as http:
            port = port_of(http)
            # Bytes that are not UTF-8 in the Authorization header: refused, not a 500.
            status, body = await raw_request(port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                   b"Authorization: Bearer s3\xff\xfecret\r\nConnection: close\r\n\r\n")
            assert status == 401 and b"token" in body
            message = await refused(await http.get("/stats"), 401, "?token=")  # says how, for a browser user
            assert "Authorization" in message
            auth = {"Authorization": "Bearer s3cret"}
            assert (await http.get("/stats", headers=auth)).status == 200
            # DNS rebinding: a page of evil.example whose name now points at us.
            for path in ("/", "/stats", "/portraits"):
                response = await http.get(path, headers={**auth, "Host": f"evil.example:{port}"})
                await refused(response, 403, "host name")
            for host in ("[::1", "[zz]", "[evil.example]:80"):  # no host name at all, said in words (was a 500)
                status, body = await raw_request(port, f"GET /stats HTTP/1.1\r\nHost: {host}\r\n"
                                                       "Authorization: Bearer s3cret\r\nConnection: close\r\n\r\n".encode())
                assert status == 403 and b"host name" in body, (host, status, body)
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"studio.example:{port}", f"[::1]:{port}"):
                assert (await http.get("/stats", headers={**auth, "Host": host})).status == 200, host
            # Cross-site requests: another page's script, a sandboxed page (Origin: null).
            for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}"):
                response = await http.post("/offer", json={}, headers={**auth, "Origin": origin})
                await refused(response, 403, "--allow-origin")
            for origin in (f"http://127.0.0.1:{port}", "https://studio.example"):  # the page itself; one allowed
                response = await http.post("/offer", json={}, headers={**auth, "Origin": origin})
                await refused(response, 400, "JSON")  # past the checks: judged on its content

    asyncio.run(main())


# ------------------------------------------------------------------------------------------- uploads
@pytest.mark.realtime
def test_uploads_need_flowing_media_are_rate_limited_and_never_stall_the_stream(prepared, clip, monkeypatch):
    server = configured(prepared, portrait_changes=(2, 30.0))
    slow_s = 1.0
    read_image = streamer.server.read_image

    def slow_read(*args, **kwargs):  # a large photo's decode, on the decode thread
        time.sleep(slow_s)
        return read_image(*args, **kwargs)

    monkeypatch.setattr(streamer.server, "read_image", slow_read)
    portrait = encoded(samples.portrait("grace_hopper"))

    async def main():
        async with running(server) as http:
            # Offers that never connect: their sessions take no upload (nothing decodes for them).
            silent = Peer(Webcam(lambda i: clip[i % len(clip)], FPS))
            assert (await silent.offer(http, answer=False)).status == 200
            response = await http.post(f"/avatar?session={silent.session}", data=portrait, headers=silent.control)
            await refused(response, 409, "no video has arrived")
            await silent.close()

            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 12 * FPS))
            assert (await peer.offer(http)).status == 200
            session = server.sessions[peer.session]
            await until(lambda: session.media_flowing and session.stats.frames_out > 5, 20)
            url = f"/avatar?session={peer.session}"
            out_before, started = session.stats.frames_out, time.perf_counter()
            await asyncio.sleep(slow_s)
            usual = (session.stats.frames_out - out_before) / (time.perf_counter() - started)
            # One change at a time; the stream goes on while the portrait is decoded and meshed.
            first = asyncio.ensure_future(http.post(url, data=portrait, headers=peer.control))
            await asyncio.sleep(0.2)
            await refused(await http.post(url + "&portrait=astronaut", headers=peer.control), 429, "in progress")
            out_before = session.stats.frames_out
            started = time.perf_counter()
            response = await first
            took = time.perf_counter() - started
            assert response.status == 200, await response.text()
            assert took > slow_s * 0.6
            rate = (session.stats.frames_out - out_before) / took
            assert rate > usual / 4, f"{rate:.1f} fps while an upload was decoded, {usual:.1f} before: a stall"
            # The burst is spent (2): the next change waits, and says for how long.
            response = await http.post(url + "&portrait=astronaut", headers=peer.control)
            assert response.status == 200, await response.text()
            message = await refused(await http.post(url + "&portrait=grace_hopper", headers=peer.control),
                                    429, "too many portrait changes")
            assert "previous portrait is kept" in message
            assert int((await http.post(url, headers=peer.control)).headers["Retry-After"]) >= 1
            assert session.portrait == "astronaut"
            await peer.close()
            assert await freed(server)

    asyncio.run(main())


@pytest.mark.realtime
def test_an_upload_over_the_pixel_budget_is_refused_from_its_header(prepared, clip):
    """A small PNG of 60 megapixels: decoded, it would be ~180 MB per upload."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (10_000, 6_000), (90, 90, 90)).save(buffer, "PNG")
    bomb = buffer.getvalue()
    assert len(bomb) < 400_000
    server = configured(prepared, portrait_changes=(100, 0.01))

    async def main():
        async with running(server) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 6 * FPS))
            assert (await peer.offer(http)).status == 200
            session = server.sessions[peer.session]
            await until(lambda: session.media_flowing, 20)
            started = time.perf_counter()
            for _ in range(4):
                response = await http.post(f"/avatar?session={peer.session}", data=bomb, headers=peer.control)
                message = await refused(response, 413, "megapixels")
                assert "previous portrait is kept" in message
            assert time.perf_counter() - started < 2  # refused from the header: nothing was decoded
            # Malformed forms: a 400 in words (a part's header that is not ASCII was a 500).
            form = "multipart/form-data; boundary=xx"
            for body in (b'--xx\r\n\xff\xfe: y\r\n\r\nabc\r\n--xx--\r\n', b'--xx\r\nno colon\r\n\r\nabc\r\n--xx--\r\n'):
                response = await http.post(f"/avatar?session={peer.session}", data=body,
                                           headers={**peer.control, "Content-Type": form})
                await refused(response, 400, "multipart form is malformed")
            await peer.close()
            assert await freed(server)

    asyncio.run(main())


def test_an_upload_is_only_read_by_the_image_formats_the_server_names(monkeypatch):
    """Pillow opens ~40 formats, and loads EPS by running Ghostscript on it: an upload (anyone's
    bytes) is opened only as one of the formats the server says it takes; a local file (the
    user's own, `animate`) as any."""
    from PIL import EpsImagePlugin

    from streamer.images import ImageError, read_image

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"
    for data in (eps, encoded(np.zeros((8, 8, 3), np.uint8), "PPM"), encoded(np.zeros((8, 8, 3), np.uint8), "TGA")):
        with pytest.raises(ImageError, match="not an image this server can read"):
            read_image(data, "the upload")
    assert not ran
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert read_image(encoded(np.full((8, 8, 3), 90, np.uint8), fmt), "the upload").shape == (8, 8, 3), fmt


# --------------------------------------------------------------------- control across sessions
@pytest.mark.realtime
def test_a_session_is_controlled_only_with_its_own_secret(prepared, clip):
    server = configured(prepared, portrait_changes=(100, 0.01))

    async def main():
        async with running(server) as http:
            alice = Peer(Webcam(lambda i: clip[i % len(clip)], 6 * FPS))
            mallory = Peer(Webcam(lambda i: clip[i % len(clip)], 6 * FPS))
            assert (await alice.offer(http)).status == 200
            assert (await mallory.offer(http)).status == 200
            sessions = [server.sessions[alice.session], server.sessions[mallory.session]]
            await until(lambda: all(s.media_flowing for s in sessions), 20)
            stats = await (await http.get("/stats")).text()
            assert alice.session in stats and alice.secret not in stats and mallory.secret not in stats
            assert "secret" not in stats
            url = f"/avatar?session={alice.session}&portrait=grace_hopper"
            for headers in ({}, mallory.control, {"X-Session-Secret": alice.session},
                            {"X-Session-Secret": alice.secret[:-1] + "\u00e9"}):
                await refused(await http.post(url, headers=headers), 403, "X-Session-Secret")
            assert sessions[0].portrait == "astronaut"
            assert (await http.post(url, headers=alice.control)).status == 200
            assert sessions[0].portrait == "grace_hopper" and sessions[1].portrait == "astronaut"
            await alice.close()
            await mallory.close()
            assert await freed(server)

    asyncio.run(main())


# ------------------------------------------------------------------------------------- data channel
@pytest.mark.realtime
def test_a_flood_of_data_channel_commands_queues_nothing(prepared, clip):
    """A page (or a program) sending thousands of recalibrate messages: one recalibration waits
    at a time (each used to wait as its own task for both pipeline threads: memory grew and
    the stream stopped); retarget messages are applied at once; bad ones change nothing; past
    a burst, commands over the session's rate (and oversized ones) are ignored unparsed, said
    once a second, and counted."""
    from streamer.session import COMMAND_BURST, COMMANDS_PER_S, MAX_COMMAND_BYTES

    async def main():
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 60 * FPS))
            assert (await peer.offer(http)).status == 200
            session = prepared.sessions[peer.session]
            await until(lambda: session.stats.frames_out >= 3, 20)
            tasks = len(session._tasks)
            sent = []
            send = session.channel.send
            session.channel.send = lambda text: (sent.append(json.loads(text)), send(text))
            for index in range(1000):
                session.on_message('{"type": "recalibrate"}')
                session.on_message('{"type": "retarget", "head_pose": %g}' % (index % 20 / 10))
                for bad in ('{"type": "retarget", "head_pose": NaN}', '{"type": "retarget", "eyes": ["open"]}',
                            '{"type": "retarget", "expression": 1e999}', '[' * 5000, '{"type": {"a": 1}}', "\udcff"):
                    session.on_message(bad)
            assert len(session._tasks) <= tasks + 1, len(session._tasks)
            # The burst (and what a second refills, were the loop that slow) was taken; the rest ignored.
            taken = 8000 - session.commands_ignored
            assert COMMAND_BURST <= taken <= COMMAND_BURST + COMMANDS_PER_S, taken
            told = [m for m in sent if m["type"] == "error" and m["message"].startswith("command ignored")]
            assert len(told) == 1, told  # said once (a second), not per command
            await asyncio.sleep(0.2)  # the rate refills: commands are taken again
            session.on_message('{"type": "retarget", "head_pose": 0.25}')
            assert session.retargeting.head_pose == 0.25
            ignored = session.commands_ignored
            session.on_message('{"type": "retarget", "head_pose": 0.5, "pad": "%s"}' % ("x" * MAX_COMMAND_BYTES))
            assert session.retargeting.head_pose == 0.25 and session.commands_ignored == ignored + 1
            out = session.stats.frames_out
            await until(lambda: session.stats.frames_out >= out + 5, 20)  # still streaming
            assert session.stats.errors == 0
            await peer.close()
            assert await freed(prepared)

    asyncio.run(main())


# ------------------------------------------------------------------------ the front (serve --workers)
class InProcessWorker:
    """A Ray actor handle stand-in: `handle.method.remote(*args)` runs streamer/cluster/worker.py's
    Worker method on a real Server in this event loop (media flows to it as to a worker's)."""

    def __init__(self, server):
        from streamer.cluster.worker import Worker

        worker = Worker.__new__(Worker)  # its __init__ joins Ray; the rest is plain serve's
        worker.name, worker.options, worker.server, worker.error = "w0", server.config, server, None
        worker.instance, worker.pid, worker.node, worker.gpus, worker.started = "i0", os.getpid(), "127.0.0.1", [], 0
        self.worker = worker

    def __getattr__(self, method):
        call = getattr(self.worker, method)
        return types.SimpleNamespace(remote=lambda *args: asyncio.ensure_future(call(*args)))


@pytest.mark.realtime
def test_the_front_reads_one_upload_per_session_at_a_time_and_checks_before_reading(prepared, clip, monkeypatch):
    """Through the front, a session's concurrent uploads are refused (429) before their bodies
    are read, as plain serve refuses them: the front buffered each one (10 MiB apiece) and
    only then heard the worker's 429. Another session's secret controls nothing here either."""
    pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")
    from streamer.cluster.front import Front

    server = configured(prepared, portrait_changes=(100, 0.01))
    read_image = streamer.server.read_image
    monkeypatch.setattr(streamer.server, "read_image", lambda *a, **k: (time.sleep(1.0), read_image(*a, **k))[1])
    front = Front(server.config, {"w0": InProcessWorker(server)})
    front.load_gallery(prepared.gallery)
    reads = []
    read_upload = front._read_upload

    async def counted(request):
        reads.append(request)
        return await read_upload(request)

    front._read_upload = counted
    portrait = encoded(samples.portrait("grace_hopper"))

    async def main():
        async with running(front) as http:
            alice, mallory = (Peer(Webcam(lambda i: clip[i % len(clip)], 30 * FPS)) for _ in range(2))
            for peer in (alice, mallory):
                response = await peer.offer(http)
                assert response.status == 200, await response.text()
                await front.refresh(wait=True)  # the front learns the session from the worker
            await until(lambda: all(s.media_flowing for s in server.sessions.values()), 20)
            url = f"/avatar?session={alice.session}"
            for headers in ({}, mallory.control):
                await refused(await http.post(url, data=portrait, headers=headers), 403, "X-Session-Secret")
            assert not reads
            responses = await asyncio.gather(*(http.post(url, data=portrait, headers=alice.control) for _ in range(6)))
            statuses = sorted(r.status for r in responses)
            assert statuses == [200] + [429] * 5, statuses
            assert len(reads) == 1, f"the front read {len(reads)} uploads of one session at once"
            for peer in (alice, mallory):
                await peer.close()
            await until(lambda: not server.sessions, 10)
        await server.close_all()

    asyncio.run(main())


@pytest.mark.realtime
def test_a_peer_that_reads_nothing_back_gets_no_more_queued_for_it(prepared, clip):
    """Replies and stats wait in the data channel's buffer until the peer takes them: a peer
    that never does (a program that floods retarget messages and reads nothing) is sent nothing
    more once a bounded amount waits, instead of the server's memory filling with its replies."""
    from streamer.session import MAX_BUFFERED

    async def main():
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 20 * FPS))
            assert (await peer.offer(http)).status == 200
            session = prepared.sessions[peer.session]
            await until(lambda: session.channel is not None and session.channel.readyState == "open", 20)
            sent = []
            session.channel.send = sent.append  # nothing leaves: the buffer stays as full as it is
            session.channel._RTCDataChannel__bufferedAmount = MAX_BUFFERED + 1
            for _ in range(100):
                session.on_message('{"type": "retarget", "head_pose": 0.5}')
            await asyncio.sleep(0.6)  # a stats report's interval
            assert sent == [] and session.retargeting.head_pose == 0.5  # applied, not answered
            session.channel._RTCDataChannel__bufferedAmount = 0
            session.on_message('{"type": "retarget", "head_pose": 0.25}')
            assert json.loads(sent[-1])["head_pose"] == 0.25
            await peer.close()
            assert await freed(prepared)

    asyncio.run(main())


# ----------------------------------------------------------------------------- resolution changes
@pytest.mark.realtime
def test_a_webcam_that_changes_resolution_is_realigned(prepared, clip):
    """640x480 -> 1280x720 (the face larger, to the right) -> 320x240 -> 1920x1080 (larger, to
    the left): each change is counted, and the avatar keeps showing the portrait's face where
    it belongs, as it does at 640x480."""
    segment = FPS + FPS // 2

    def canvas(frame: np.ndarray, size: tuple[int, int], scale: float, x: int) -> np.ndarray:
        out = np.full((size[1], size[0], 3), 70, np.uint8)
        picture = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        h, w = min(picture.shape[0], size[1]), min(picture.shape[1], size[0] - x)
        out[:h, x:x + w] = picture[:h, :w]
        return out

    layouts = [None, ((1280, 720), 1.5, 320), ((320, 240), 0.5, 0), ((1920, 1080), 2.25, 0)]
    pictures = {}

    def picture(i: int) -> np.ndarray:
        index, layout = i % len(clip), layouts[min(i // segment, len(layouts) - 1)]
        if layout is None:
            return clip[index]
        if (index, layout) not in pictures:
            pictures[index, layout] = canvas(clip[index], *layout)
        return pictures[index, layout]

    for i in range(len(layouts) * segment):  # made here, not in the event loop while streaming
        picture(i)

    async def main():
        async with running(prepared) as http:
            peer = Peer(Webcam(picture, len(layouts) * segment))
            assert (await peer.offer(http)).status == 200
            session = prepared.sessions[peer.session]
            crop = session.pipeline.stage.animator.sources[0].image.copy()
            await until(lambda: peer.stats and peer.stats[-1]["frames_in"] >= len(layouts) * segment - 2, 40)
            await asyncio.sleep(0.5)
            await peer.close()
            assert await freed(prepared)
            return peer, crop

    peer, crop = asyncio.run(main())
    stats = peer.stats[-1]
    assert stats["resolution_changes"] == 3 and stats["errors"] == 0
    # Where the avatar's face is, per segment (by pts, the webcam frame index): where the
    # portrait's is, as at 640x480, not shifted or scaled into the background or shoulders.
    from engines.face import FaceTracker, head_box

    def box(image: np.ndarray) -> np.ndarray | None:
        landmarks = tracker.detect(image)
        if landmarks is None:
            return None
        b = head_box(landmarks)
        return np.array([(b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, b.x1 - b.x0])

    origin, offsets = peer.origin(), {}
    with FaceTracker(video=False) as tracker:
        home = box(crop)
        for pts, _, image in peer.received[::2]:
            index = round((pts + origin) / (90_000 // FPS))
            if index % segment < 5:  # a few frames for the decoder and the new alignment
                continue
            found = box(image)
            offset = 1.0 if found is None else float(np.abs(found - home).max() / home[2])
            offsets.setdefault(index // segment, []).append(offset)
    assert set(offsets) == set(range(len(layouts))), sorted(offsets)
    medians = [round(float(np.median(offsets[part])), 3) for part in sorted(offsets)]
    assert max(medians) < 0.12, medians  # a fraction of the face's width


@pytest.mark.parametrize("size", [(640, 480), (1280, 720)])
def test_realign_maps_the_moved_head_where_it_was(size, clip):
    """Animator level: after a change of frame size (and the head's place in it) the aligned
    landmarks are where they were; the motion reference stays."""
    from engines.animator import Animator
    from engines.face import FaceTracker, head_box
    from engines.warp import WarpEngine

    animator = Animator(WarpEngine(256), tracker=FaceTracker(video=False), smoothing=False)
    animator.set_sources([samples.portrait("astronaut")])
    try:
        first = animator.track(clip[0], 0.0)
        aligned, reference = first.landmarks.copy(), animator.reference.copy()
        animator.release(first)
        big = cv2.resize(clip[0], size, interpolation=cv2.INTER_LINEAR)
        moved = np.full((big.shape[0] + 200, big.shape[1] + 300, 3), 70, np.uint8)
        moved[200:, 300:] = big
        stale = animator.track(moved, 0.04)  # without realign: the old alignment, the head elsewhere
        width = head_box(aligned).width
        assert np.abs(stale.landmarks[:, :2] - aligned[:, :2]).max() > 0.3 * width
        animator.release(stale)
        animator.realign()
        again = animator.track(moved, 0.08)
        assert np.abs(again.landmarks[:, :2] - aligned[:, :2]).max() < 0.05 * width
        assert np.array_equal(animator.reference, reference)  # the neutral pose stays
        animator.release(again)
    finally:
        animator.close()
