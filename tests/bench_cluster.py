"""Sessions x fps through plain `serve` and through `serve --workers N`, and the time from
POST /offer to its answer (what the front adds to signalling). BENCHMARKS.md has the figures.

    PYTHONPATH=$PWD:tests python tests/bench_cluster.py [--seconds 8] [--runs plain,1,2] [--sessions 1,2] [--offers 8] [--serve-args '...']

Each run starts its own server (`serve --port 0`, and `--workers N --max-sessions K` with
K = ceil(most sessions / N)), opens 1, then 2... sessions of a webcam at 25 fps (the
astronaut's synthetic clip, animated by the warp engine at 512), and reports per session the
frames per second that came back over the last `--seconds`, and the offer's answer time;
then `--offers` echo sessions one after another (no engine in the way): the signalling time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import statistics
import time

import aiohttp
from conftest import running_server
from live_helpers import FPS, Peer, Webcam

from streamer import samples
from streamer.rtp import keep_media_on_loopback


async def measure(url: str, clip, sessions: int, seconds: float) -> dict:
    async with aiohttp.ClientSession(url) as http:
        peers, offers = [], []
        for _ in range(sessions):
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], int((seconds + 20) * FPS)))
            await peer.pc.setLocalDescription(await peer.pc.createOffer())
            started = time.perf_counter()
            response = await http.post("/offer", json={"sdp": peer.pc.localDescription.sdp, "type": "offer"})
            offers.append((time.perf_counter() - started) * 1e3)
            assert response.status == 200, await response.text()
            reply = await response.json()
            from aiortc import RTCSessionDescription

            await peer.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], reply["type"]))
            peers.append(peer)
        deadline = time.monotonic() + 30
        while not all(len(p.received) >= 5 for p in peers):  # every stream running
            assert time.monotonic() < deadline, "no frames"
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # past the start
        counts = [len(p.received) for p in peers]
        await asyncio.sleep(seconds)
        fps = [(len(p.received) - c) / seconds for p, c in zip(peers, counts)]
        for peer in peers:
            await peer.close()
        await asyncio.sleep(3.0)  # the sessions end on the server before the next step
        return {"sessions": sessions, "fps_each": [round(f, 1) for f in fps], "fps_total": round(sum(fps), 1),
                "offer_ms": [round(o, 1) for o in offers]}


async def signalling(url: str, clip, offers: int) -> list[float]:
    """POST /offer -> answer, in ms, for `offers` echo sessions one after another (no engine:
    the signalling path alone, with the peer connection's setup on the server)."""
    from aiortc import RTCSessionDescription

    times = []
    async with aiohttp.ClientSession(url) as http:
        for _ in range(offers):
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 10 * FPS))
            await peer.pc.setLocalDescription(await peer.pc.createOffer())
            started = time.perf_counter()
            response = await http.post("/offer", json={"sdp": peer.pc.localDescription.sdp, "type": "offer",
                                                       "mode": "echo"})
            times.append((time.perf_counter() - started) * 1e3)
            assert response.status == 200, await response.text()
            reply = await response.json()
            await peer.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], reply["type"]))
            while len(peer.received) < 3:
                await asyncio.sleep(0.05)
            await peer.close()
            while (await (await http.get("/stats")).json())["sessions"]:
                await asyncio.sleep(0.1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", default="plain,1,2")
    parser.add_argument("--sessions", default="1,2")
    parser.add_argument("--offers", type=int, default=8, help="echo offers one after another, for signalling time")
    parser.add_argument("--serve-args", default="", help="more flags for every serve, e.g. the engine's")
    args = parser.parse_args()
    keep_media_on_loopback()
    clip = [frame for frame, _ in samples.driving_clip("astronaut", frames=2 * FPS, fps=FPS)]
    counts = [int(n) for n in args.sessions.split(",")]
    for run in args.runs.split(","):
        flags = ["--max-sessions", str(max(counts))] if run == "plain" else \
            ["--workers", run, "--max-sessions", str(math.ceil(max(counts) / int(run)))]
        with running_server(*flags, *shlex.split(args.serve_args)) as (process, url):
            results = [asyncio.run(measure(url, clip, n, args.seconds)) for n in counts]
            echo = asyncio.run(signalling(url, clip, args.offers))
            process.terminate()
            process.wait(timeout=60)  # its Ray too, before the next run starts one
        offers = [o for r in results for o in r["offer_ms"]]
        print(json.dumps({"run": run if run == "plain" else f"{run} workers", "results": results,
                          "offer_ms_median": round(statistics.median(offers), 1),
                          "echo_offer_ms": {"median": round(statistics.median(echo), 1), "min": round(min(echo), 1),
                                            "max": round(max(echo), 1)}}), flush=True)


if __name__ == "__main__":
    main()
