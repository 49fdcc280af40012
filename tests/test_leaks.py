"""After any number of sessions the idle server is back to its baseline: threads (native ones
too: libav's codec threads never show in `threading`), file descriptors, and objects.

The garbage collector is off for the run, so an ended session must be freed by reference
counting alone: a reference cycle would keep it, its peer connection and their codec
threads alive until some later full collection (20 one-second sessions once took an idle
server from 18 to 46 threads).
"""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

import pytest
from live_helpers import FPS, Peer, Webcam, clip, configured, encoded, prepared, running, until  # noqa: F401

from engines.animator import Animator
from streamer import samples
from streamer.pipeline import Pipeline
from streamer.session import Session

pytestmark = pytest.mark.realtime

SESSIONS = 10


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def gc_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads and fds through /proc (Linux)")
def test_the_idle_server_returns_to_its_baseline_after_many_sessions(prepared, clip, gc_off, monkeypatch):
    server = configured(prepared, portrait_changes=(100, 0.01))
    made: list[weakref.ref] = []
    for kind in (Session, Pipeline, Animator):
        init = kind.__init__

        def tracked(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            made.append(weakref.ref(self))

        monkeypatch.setattr(kind, "__init__", tracked)
    portrait = encoded(samples.portrait("grace_hopper"))

    async def one(http, index: int) -> None:
        """A short session of each kind in turn: animate with a recalibration and an upload, echo."""
        peer = Peer(Webcam(lambda i: clip[i % len(clip)], FPS))
        echo = index % 3 == 2
        assert (await peer.offer(http, mode="echo" if echo else "animate")).status == 200
        await until(lambda: len(peer.received) >= 5, 20)
        if not echo:
            peer.channel.send('{"type": "recalibrate"}')
            response = await http.post(f"/avatar?session={peer.session}", data=portrait, headers=peer.control)
            assert response.status == 200, await response.text()
        await peer.close()
        await until(lambda: not server.sessions, 10)

    async def main():
        async with running(server) as http:
            for index in range(3):  # warm: the decode thread, the loop's executor, aiohttp's pools
                await one(http, index)
            await asyncio.sleep(0.5)
            before = native_threads(), open_fds()
            for index in range(SESSIONS):
                await one(http, index)
            await asyncio.sleep(0.5)  # codec threads end as their contexts are freed
            return before, (native_threads(), open_fds())

    (threads_before, fds_before), (threads_after, fds_after) = asyncio.run(main())
    alive = [ref() for ref in made if ref() is not None]
    assert alive == [], f"{len(alive)} of {len(made)} sessions, pipelines or animators outlived their session"
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
