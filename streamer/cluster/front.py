"""The front: `serve`'s HTTP server, with the sessions on Ray workers (streamer/cluster/worker.py).

Everything a request meets first is plain serve's (streamer/server.py): the page, the token,
the Host and Origin checks, the offer's validation, the upload's size limit. Then:

  POST /offer    goes to the live worker with the most free slots (503 when every slot of
                 every live worker is taken); that worker's answer (its SDP, its session and
                 secret) comes back as is, so media flows between the browser and the worker
  POST /avatar   goes to the session's worker, which checks the secret (and the rest) before
                 the front reads the upload, then takes the image
  GET  /session?session=ID  (X-Session-Secret) the session's state: 410 with the reason once
                 its worker died, for the page to say why its stream stopped
  GET  /stats    every worker (state, pid, node, GPU, restarts) and every session, aggregated

The front holds nothing a session needs: routes (session -> worker) are learnt from the
workers' own lists, every second, so a restarted front finds every live session again. A
monitor asks each worker for its status every MONITOR_INTERVAL_S; a worker whose process
died fails that call at once (Ray knows), and its sessions end with the reason said on
/stats and to the next control request; new sessions go to the live workers while Ray
restarts it, and a restarted worker (a new `instance`) takes sessions again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from aiohttp import web

from ..options import ServeOptions
from ..pipeline import EnginePool
from ..rtp import is_loopback
from ..server import SECRET_HEADER, JSONError, Server, in_progress
from .placement import ClusterError, check_resources, connect, disconnect, start_workers, stop_workers

logger = logging.getLogger("xportrait.cluster.front")

MONITOR_INTERVAL_S = 0.5
STALL_S = 10.0  # a worker that answers nothing this long is shown as not answering
CALL_TIMEOUT_S = 30.0  # a control call (portrait, state)
OFFER_TIMEOUT_S = 600.0  # an offer may wait for a new engine (minutes for a compiled diffusion one)
READY_TIMEOUT_S = 1800.0  # start-up: weights, torch.compile, CUDA graphs on every worker
ENDED_KEPT = 1000  # the reasons of this many ended sessions are kept


def _no_local_engine():
    raise RuntimeError("the front runs no engine: sessions run on the Ray workers")


def _cause(exc: BaseException) -> str:
    """Ray's error, cut to its first sentence."""
    text = " ".join(str(exc).split())
    for cut in (". ", "; "):
        if cut in text:
            text = text.split(cut, 1)[0]
    return text[:200]


@dataclass
class WorkerState:
    """What the front knows of one worker, from its last status."""

    name: str
    handle: object
    state: str = "starting"  # starting, live, not answering, restarting, dead, failed
    instance: str | None = None
    status: dict = field(default_factory=dict)
    restarts: int = 0
    detail: str | None = None  # why it is not live
    reserved: int = 0  # offers in flight to it
    asked_at: float = 0.0  # when the pending status call went out
    answered_at: float = 0.0
    status_asked_at: float = 0.0  # when the call that `status` answers went out
    pending: asyncio.Future | None = None

    @property
    def sessions(self) -> list[dict]:
        return self.status.get("sessions", [])

    @property
    def free(self) -> int:
        return self.status.get("capacity", 0) - len(self.sessions) - self.reserved

    def summary(self) -> dict:
        status = self.status
        return {"name": self.name, "state": self.state, "pid": status.get("pid"), "node": status.get("node"),
                "gpus": status.get("gpus", []), "instance": self.instance, "restarts": self.restarts,
                "capacity": status.get("capacity"), "sessions_active": len(self.sessions),
                "ice_servers": status.get("ice_servers", []), "detail": self.detail}


class Front(Server):
    def __init__(self, config: ServeOptions, workers: dict, tls=None):
        """`workers`: name -> Ray actor handle (streamer/cluster/placement.py)."""
        super().__init__(config, engines=EnginePool(_no_local_engine), tls=tls)
        self.workers = {name: WorkerState(name, handle) for name, handle in workers.items()}
        self.routes: dict[str, tuple[str, float]] = {}  # session -> (worker, when the front learnt it)
        self.ended: OrderedDict[str, dict] = OrderedDict()  # session -> {"worker", "reason", "at"}
        self._monitor: asyncio.Task | None = None

    def prepare(self, portraits=None) -> None:
        self.load_gallery(portraits)  # the page's thumbnails; the portraits themselves live on the workers

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/session", self.session_state)
        app.on_startup.append(self._start_monitor)
        app.on_cleanup.append(self._stop_monitor)
        return app

    # -- the workers' states ----------------------------------------------------------------------------
    async def _start_monitor(self, app=None) -> None:
        await self.refresh(wait=True)
        self._monitor = asyncio.ensure_future(self._watch())

    async def _stop_monitor(self, app=None) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:
                logger.exception("watching the workers failed")

    async def refresh(self, wait: bool = False, timeout: float = 5.0, fresh: bool = False) -> None:
        """Ask every worker for its status (one call in flight per worker) and take the answers
        that came; `wait`: until each has answered or failed, at most `timeout` seconds; with
        `fresh` too, answers to calls made from now on (a live worker whose call was already in
        flight, from the monitor, is asked again once it answers: that answer predates now)."""
        since = time.monotonic()
        deadline = since + timeout
        while True:
            now = time.monotonic()
            for worker in self.workers.values():
                if worker.pending is None:
                    worker.pending = asyncio.ensure_future(self._ask(worker.handle))
                    worker.asked_at = now
            pending = [w.pending for w in self.workers.values() if w.pending is not None]
            if wait and pending:
                await asyncio.wait(pending, timeout=max(0.0, deadline - now))
            for worker in self.workers.values():
                if worker.pending is not None and worker.pending.done():
                    future, worker.pending = worker.pending, None
                    exc = future.exception()
                    if exc is None:
                        self._answered(worker, future.result(), worker.asked_at)
                    else:
                        self._lost(worker, exc)
                elif worker.state == "live" and now - worker.asked_at > STALL_S:
                    worker.state, worker.detail = "not answering", f"no status for {now - worker.asked_at:.0f} s"
            stale = [w for w in self.workers.values()
                     if w.state == "live" and w.pending is None and w.status_asked_at < since]
            if not (wait and fresh and stale) or time.monotonic() >= deadline:
                return

    @staticmethod
    async def _ask(handle) -> dict:
        return await handle.status.remote()

    def _answered(self, worker: WorkerState, status: dict, asked_at: float) -> None:
        if worker.instance is not None and status["instance"] != worker.instance:
            worker.restarts += 1
            self._end_sessions(worker, "its worker restarted")
        worker.instance, worker.status, worker.answered_at = status["instance"], status, time.monotonic()
        worker.status_asked_at = asked_at
        if status.get("error"):
            worker.state, worker.detail = "failed", status["error"]
            return
        worker.state, worker.detail = "live", None
        live = {s["id"] for s in status["sessions"]}
        for session in live:
            if session not in self.routes or self.routes[session][0] != worker.name:
                self.routes[session] = (worker.name, asked_at)
        for session, (name, learnt) in list(self.routes.items()):
            if name == worker.name and session not in live and learnt < asked_at:
                del self.routes[session]  # it ended on its worker (the peer left, a timeout)

    def _lost(self, worker: WorkerState, exc: BaseException) -> None:
        from ray.exceptions import ActorDiedError

        was_live = worker.state in ("live", "not answering")
        dead = isinstance(exc, ActorDiedError) and "restart" not in str(exc).lower()
        worker.state = "dead" if dead else "restarting"
        worker.detail = _cause(exc)
        if was_live or worker.sessions:
            pid, node = worker.status.get("pid"), worker.status.get("node")
            logger.warning("worker %s (pid %s on %s) is lost: %s", worker.name, pid, node, worker.detail)
            # Ray's own words stay on /stats (the worker's detail); the session's reason is plain.
            self._end_sessions(worker, f"its worker {worker.name} (pid {pid} on {node}) died"
                                       + ("" if dead else "; Ray is restarting it"))
            worker.status = {**worker.status, "sessions": []}

    def _end_sessions(self, worker: WorkerState, reason: str) -> None:
        now = time.time()
        for session in [s for s, (name, _) in self.routes.items() if name == worker.name]:
            del self.routes[session]
            self.ended[session] = {"id": session, "worker": worker.name, "reason": reason, "at": now}
            logger.info("session %s ended: %s", session, reason)
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    # -- calls to a worker ------------------------------------------------------------------------------
    async def _call(self, worker: WorkerState, method: str, *args, timeout: float = CALL_TIMEOUT_S) -> dict:
        """A worker's answer; a worker that dies meanwhile ends its sessions (410 for them)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            reply = await asyncio.wait_for(getattr(worker.handle, method).remote(*args), timeout)
        except (RayActorError, ActorUnavailableError) as exc:
            self._lost(worker, exc)
            raise JSONError(503, f"worker {worker.name} is lost ({_cause(exc)}); try again") from None
        except asyncio.TimeoutError:
            raise JSONError(504, f"worker {worker.name} did not answer within {timeout:g} s") from None
        if reply["status"] != 200:
            raise JSONError(reply["status"], reply["error"], reply.get("headers") or None)
        return reply["body"]

    async def _session_worker(self, session: str) -> WorkerState:
        """The worker serving `session`: 410 with the reason when it died with its worker, 404
        when no worker has it."""
        for attempt in range(2):
            if session in self.ended:
                raise JSONError(410, f"session {session} has ended: {self.ended[session]['reason']}; "
                                     "start the stream again")
            if session in self.routes:
                return self.workers[self.routes[session][0]]
            if attempt == 0:  # a session this front has not heard of yet: ask the workers
                await self.refresh(wait=True, fresh=True)
        raise JSONError(404, f"no live session {session[:40]!r}: start the stream first")

    # -- routes -----------------------------------------------------------------------------------------
    async def open_session(self, sdp: str, mode: str, name: str) -> dict:
        live = [w for w in self.workers.values() if w.state == "live"]
        if not live:
            states = ", ".join(f"{w.name} {w.state}" for w in self.workers.values())
            raise JSONError(503, f"server busy: no worker is up ({states}); try again in a moment")
        for worker in sorted(live, key=lambda w: (-w.free, w.name)):
            if worker.free <= 0:
                break
            worker.reserved += 1
            try:
                answer = await self._call(worker, "offer", sdp, mode, name, timeout=OFFER_TIMEOUT_S)
            except JSONError as exc:
                if exc.status in (503, 504):
                    continue  # full after all (another front), or lost: the next worker
                raise
            finally:
                worker.reserved -= 1
            self.routes[answer["session"]] = (worker.name, time.monotonic())
            worker.status.setdefault("sessions", []).append({"id": answer["session"]})
            logger.info("session %s on worker %s", answer["session"], worker.name)
            return answer
        total = sum(w.status.get("capacity", 0) for w in live)
        raise JSONError(503, f"server busy: all {total} sessions of the {len(live)} live workers are in use; "
                             "try again when one ends")

    async def avatar(self, request: web.Request) -> web.Response:
        self._authorize(request)
        session, secret = request.query.get("session", ""), request.headers.get(SECRET_HEADER, "")
        name = request.query.get("portrait")
        worker = await self._session_worker(session)
        # The secret, the rate limit, a change under way: on the worker, before any upload is read.
        await self._call(worker, "portrait_allowed", session, secret, name)
        if session in self._changing:  # one upload of a session read at a time, as plain serve does
            raise in_progress()
        self._changing.add(session)
        try:
            data = None if name is not None else await self._read_upload(request)
            return web.json_response(await self._call(worker, "change_portrait", session, secret, name, data))
        finally:
            self._changing.discard(session)

    async def session_state(self, request: web.Request) -> web.Response:
        self._authorize(request)
        session = request.query.get("session", "")
        worker = await self._session_worker(session)
        return web.json_response(await self._call(worker, "session_state", session,
                                                  request.headers.get(SECRET_HEADER, "")))

    async def stats(self, request: web.Request) -> web.Response:
        self._authorize(request)
        await self.refresh(wait=True, timeout=2.0, fresh=True)  # the workers' own figures, now
        workers = list(self.workers.values())
        live = [w for w in workers if w.state == "live"]
        sessions = [{**s, "worker": w.name} for w in workers for s in w.sessions if "mode" in s]
        engine = next((w.status["engine"] for w in live if "engine" in w.status), self.config.engine)
        return web.json_response({
            "engine": engine.name,
            "size": engine.size,
            "max_sessions": sum(w.status.get("capacity", 0) for w in live),
            "max_sessions_per_worker": max((w.status.get("capacity", 0) for w in live), default=0),
            "sessions_active": len(sessions),
            "workers": [w.summary() for w in workers],
            "sessions": sessions,
            "ended": list(self.ended.values())[-50:],
        })

    async def close_all(self, app: web.Application | None = None) -> None:
        self._decoder.shutdown(wait=False)  # the sessions are the workers': they outlive the front

    async def end_all(self, reason: str, timeout: float = 10.0) -> None:
        """End every live worker's sessions, each peer told why on its data channel (a worker
        not placed yet, or lost, would never answer: it is left out)."""
        calls = [asyncio.ensure_future(self._ask_shutdown(w.handle, reason))
                 for w in self.workers.values() if w.state == "live"]
        if calls:
            await asyncio.wait(calls, timeout=timeout)
            for call in calls:
                call.cancel()

    @staticmethod
    async def _ask_shutdown(handle, reason: str) -> None:
        await handle.shutdown.remote(reason)


# -- the command ------------------------------------------------------------------------------------------
async def _wait_ready(front: Front, expected: int) -> str | None:
    """Until `expected` workers are up (those the cluster can place now; the others join when
    it grows), at most READY_TIMEOUT_S; the error of a worker that cannot run, else None."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        await front.refresh(wait=True, timeout=2.0)
        failed = [w for w in front.workers.values() if w.state in ("failed", "dead")]
        if failed:
            return f"worker {failed[0].name} cannot run: {failed[0].detail}"
        waiting = [w.name for w in front.workers.values() if w.state != "live"]
        if len(front.workers) - len(waiting) >= min(expected, len(front.workers)):
            return None
        if time.monotonic() > deadline:
            if len(waiting) < len(front.workers):
                logger.warning("serving without %s: not up after %.0f s", ", ".join(waiting), READY_TIMEOUT_S)
                return None
            return f"no worker came up within {READY_TIMEOUT_S:.0f} s"


def _mismatch(front: Front) -> str | None:
    """With --workers: a running worker made with another engine than this command asks for
    (an older front's). Without (joining the running workers), their engine is taken as is."""
    ours = front.config
    if ours.cluster.workers is None:
        return None
    for worker in front.workers.values():
        engine = worker.status.get("engine")
        if engine is not None and engine != ours.engine:
            return (f"worker {worker.name} runs {engine!r}, this serve asks {ours.engine!r}: stop the "
                    "cluster's xportrait workers first (`ray stop` on its hosts ends the cluster), or "
                    "join them as they are with --ray-address alone")
    return None


async def _serve(front: Front, options: ServeOptions, local: bool, expected: int) -> int:
    from ..server import serve

    problem = await _wait_ready(front, expected) or _mismatch(front)
    if problem:
        print(f"xportrait serve: {problem}", file=sys.stderr)
        return 2
    for worker in front.workers.values():
        status = worker.status
        if worker.state != "live":
            print(f"xportrait serve: worker {worker.name}: {worker.state} (it joins once placed)", flush=True)
            continue
        gpus = f", GPU {','.join(status['gpus'])}" if status.get("gpus") else ""
        print(f"xportrait serve: worker {worker.name}: pid {status.get('pid')} on {status.get('node')}{gpus}, "
              f"{status.get('capacity')} sessions, {len(worker.sessions)} running", flush=True)
    try:
        await serve(front, options.host, options.port)
    finally:
        if local:  # the local Ray ends with this command: its sessions end now, each told why
            await front.end_all("the server is shutting down")
    return 0


def run_front(options: ServeOptions, tls) -> int:
    """`xportrait serve --workers N | --ray-address ADDRESS`: exit status."""
    cluster = options.cluster
    local = cluster.address is None
    count = cluster.workers
    print(f"xportrait serve: starting {'a local Ray and ' if local else ''}"
          f"{count if count else 'the running'} {options.engine.name} workers...", flush=True)
    try:
        where = connect(cluster)
    except ClusterError as exc:
        print(f"xportrait serve: {exc}", file=sys.stderr)
        return 2
    handles = {}
    try:
        placeable, warnings = check_resources(options, count or 1, where)
        for warning in warnings:
            print(f"xportrait serve: warning: {warning}", file=sys.stderr)
        # One machine and a front on loopback: the workers' media stays on loopback too.
        loopback = local and is_loopback(options.host) and not options.tunnel
        handles = start_workers(options, loopback)
        front = Front(options, handles, tls)
        front.prepare()
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # until serve() takes it over
        try:
            return asyncio.run(_serve(front, options, local, placeable if count else len(handles)))
        except OSError as exc:
            print(f"xportrait serve: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
            return 2
    except ClusterError as exc:
        print(f"xportrait serve: {exc}", file=sys.stderr)
        return 2
    finally:
        if local and handles:
            stop_workers(handles)
        disconnect()


__all__ = ["Front", "run_front"]
