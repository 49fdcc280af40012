"""The front's view of its workers, with stand-in worker handles (no Ray cluster): what /stats
and a session lookup see is an answer to a status call made after the request came in."""

from __future__ import annotations

import asyncio
import types

import pytest

pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")

from streamer.cluster.front import Front  # noqa: E402
from streamer.options import ServeOptions  # noqa: E402


class SlowWorker:
    """A worker handle whose status call answers after `delay` with the worker as it was when
    the call came (as a Ray actor's does: the method runs, then the answer travels)."""

    def __init__(self, delay: float):
        self.delay, self.frames, self.calls = delay, 0, 0
        self.status = types.SimpleNamespace(remote=self._status)

    def _status(self):
        self.calls += 1
        snapshot = {"instance": "i", "error": None, "capacity": 1, "name": "w", "pid": 1, "node": "n",
                    "sessions": [{"id": "s", "mode": "animate", "frames_processed": self.frames}]}

        async def answer():
            await asyncio.sleep(self.delay)
            return snapshot
        return answer()


def test_a_fresh_refresh_answers_with_what_the_workers_have_now():
    async def main():
        handle = SlowWorker(0.2)
        front = Front(ServeOptions(), {"w": handle})
        await front.refresh()  # the monitor's call, in flight: the worker has processed nothing yet
        await asyncio.sleep(0.05)
        handle.frames = 25  # then frames flow
        await front.refresh(wait=True, timeout=5.0)
        stale = front.workers["w"].sessions[0]["frames_processed"]
        await front.refresh()
        await asyncio.sleep(0.05)
        handle.frames = 50
        await front.refresh(wait=True, timeout=5.0, fresh=True)
        return stale, front.workers["w"].sessions[0]["frames_processed"], handle.calls

    stale, fresh, calls = asyncio.run(main())
    assert stale == 0  # waiting alone takes the answer to the call made before
    assert fresh == 50 and calls == 3  # fresh: the call in flight answered, then one made after the request


def test_a_fresh_refresh_gives_up_at_its_timeout():
    async def main():
        front = Front(ServeOptions(), {"w": SlowWorker(10.0)})
        started = asyncio.get_running_loop().time()
        await front.refresh(wait=True, timeout=0.3, fresh=True)
        return asyncio.get_running_loop().time() - started, front.workers["w"].state

    took, state = asyncio.run(main())
    assert took < 2.0 and state == "starting"  # no answer yet: still starting, and the request goes on
