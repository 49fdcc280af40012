"""One Ray worker: an engine pool and its own WebRTC peers, in the actor's event loop.

The worker is `serve`'s session host without its HTTP: a `Server` (streamer/server.py) whose
sessions, secrets, rate limits and portrait checks are exactly plain serve's, reached by the
front through Ray actor calls instead of HTTP requests. aiortc runs in the actor's asyncio
loop (an async actor keeps that loop running between calls), so media flows straight
between the browser and this worker's host; the front only carries signalling.

Every call answers a plain dict, never an exception: {"status": 200, "body": ...} or
{"status": 4xx/5xx, "error": message, "headers": {...}}, which the front turns back into the
same HTTP answer plain serve gives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time

from engines import EngineError

from ..rtp import complete_frames_on_marker, keep_media_on_loopback
from ..server import JSONError, Server, configure_logging
from ..options import ServeOptions

logger = logging.getLogger("xportrait.cluster.worker")


def _reply(body) -> dict:
    return {"status": 200, "body": body}


def _refusal(exc: JSONError) -> dict:
    headers = {k: v for k, v in exc.headers.items() if k == "Retry-After"}
    return {"status": exc.status, "error": json.loads(exc.text)["error"], "headers": headers}


class Worker:
    """Made by the front (streamer/cluster/placement.py) as a named, detached Ray actor with
    `num_gpus=1` (diffusion) or some CPUs (warp); Ray restarts it when its process dies, and
    this constructor then runs again: a new `instance`, no sessions."""

    def __init__(self, name: str, options: ServeOptions, loopback_media: bool):
        configure_logging(options.verbose)
        if loopback_media:  # one machine, a front on loopback: media stays on loopback too
            keep_media_on_loopback()
        complete_frames_on_marker()
        import ray

        context = ray.get_runtime_context()
        self.name = name
        self.options = options
        self.instance = secrets.token_hex(4)  # changes when Ray restarts this worker
        self.pid = os.getpid()
        self.node = ray.util.get_node_ip_address()
        self.gpus = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
        self.started = time.time()
        self.error: str | None = None
        self.server = Server(options)
        try:
            self.server.prepare()  # the gallery, mediapipe, one engine warmed up: before any offer
        except EngineError as exc:
            self.error = str(exc)  # reported by status(): the front says it and stops
        logger.info("worker %s ready (pid %d on %s%s)", name, self.pid, self.node,
                    f", GPU {','.join(self.gpus)}" if self.gpus else "")

    async def status(self) -> dict:
        """Who this worker is and its sessions' live statistics (what /stats shows)."""
        server = self.server
        return {
            "name": self.name, "instance": self.instance, "pid": self.pid, "node": self.node, "gpus": self.gpus,
            "started": self.started, "error": self.error, "engine": self.options.engine,
            "capacity": self.options.max_sessions, "sessions": [s.snapshot() for s in server.sessions.values()],
            "ice_servers": [s.url for s in self.options.ice_servers],
        }

    async def offer(self, sdp: str, mode: str, portrait: str) -> dict:
        """A new session for a checked offer: the answer, or a refusal (503 when full)."""
        if self.error is not None:
            return {"status": 503, "error": f"worker {self.name} has no engine: {self.error}", "headers": {}}
        try:
            return _reply(await self.server.open_session(sdp, mode, portrait))
        except JSONError as exc:
            return _refusal(exc)

    async def portrait_allowed(self, session: str, secret: str, portrait: str | None) -> dict:
        """The checks of a portrait change that come before its upload is read."""
        try:
            self.server.portrait_change_allowed(session, secret, portrait)
            return _reply(None)
        except JSONError as exc:
            return _refusal(exc)

    async def change_portrait(self, session: str, secret: str, portrait: str | None, data: bytes | None) -> dict:
        async def read() -> bytes:
            return data

        try:
            return _reply(await self.server.change_portrait(session, secret, portrait, read))
        except JSONError as exc:
            return _refusal(exc)

    async def session_state(self, session: str, secret: str) -> dict:
        """A session's state for the peer that holds its secret."""
        try:
            live = self.server.controlled_session(session, secret)
        except JSONError as exc:
            return _refusal(exc)
        return _reply({"session": live.id, "state": "live", "worker": self.name, "connection": live.pc.connectionState,
                       "portrait": live.portrait})

    async def shutdown(self, reason: str) -> int:
        """End every session, telling each peer why on its data channel first; how many ended."""
        sessions = list(self.server.sessions.values())
        told = 0
        for session in sessions:
            channel = session.channel
            if channel is not None and channel.readyState == "open":
                channel.send(json.dumps({"type": "ended", "reason": reason}))
                told += 1
        if told:
            await asyncio.sleep(0.2)  # the messages leave before the peer connections close
        await self.server.close_all()
        return len(sessions)
