"""`xportrait serve`: the live portrait animator over WebRTC (aiohttp + aiortc).

In the manner of aiortc's examples/server/server.py: the page POSTs its SDP offer to /offer
and gets the answer back; the peer's webcam track goes into a `Session` (streamer/session.py),
whose `Pipeline` (streamer/pipeline.py) animates it on two threads with an engine from the
server's `EnginePool`, and the result goes back on the session's `AvatarTrack`.

Routes:
  GET  /                the page (client/index.html, app.js, style.css, favicon.ico)
  GET  /portraits       the bundled portraits, as JSON [{name, thumbnail}]
  GET  /portraits/NAME  a portrait's thumbnail (JPEG)
  POST /offer           application/json {"sdp", "type": "offer", "mode"?: "animate"|"echo",
                        "portrait"?: NAME} -> {"sdp", "type": "answer", "session", "secret"}
  POST /avatar?session=ID[&portrait=NAME]  with the header `X-Session-Secret: SECRET`:
                        switch to a bundled portrait, or upload one (the image as the body, or
                        as the first file of a multipart form), once the session's video flows
  GET  /stats           every session's live statistics, as JSON (nothing that controls one)
  GET  /ice-servers     the STUN/TURN servers (--ice-server) the page's peer connection uses, as JSON

/offer, /avatar, /stats and /ice-servers need the token when the server has one (--token): an
`Authorization: Bearer TOKEN` header or a `token=TOKEN` query parameter. A session is
controlled only with the secret its offer's answer gave. Every request's Host must name this
server (DNS rebinding) and a browser's Origin must be the page's own or one --allow-origin
names (cross-site requests). Errors are JSON {"error": message} with a 4xx/5xx status.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import ipaddress
import json
import logging
import signal
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from urllib.parse import urlsplit

import cv2
import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from engines import EngineError
from engines.animator import Animator
from engines.face import NoFaceError

from .governor import governed_engine, make_levels
from .images import ImageError, ImageTooLarge, read_image
from .limits import TokenBucket
from .listen import check_can_listen
from .options import (DEFAULT_PORT, MAX_UPLOAD_BYTES, IceServer, ServeOptions, add_engine_arguments,
                      add_governor_arguments, engine_factory, serve_options)
from .pipeline import AnimateStage, EchoStage, EnginePool, NoPortrait, PipelineClosed, worker_threads
from .rtp import complete_frames_on_marker, is_loopback, keep_media_on_loopback
from .session import Session
from .signalling import OfferError, check_offer

logger = logging.getLogger("xportrait.server")

MODES = ("animate", "echo")  # echo: the same pipeline with the webcam frame as its output
MAX_OFFER_BYTES = 256 * 1024
THUMBNAIL_SIDE = 160
CLIENT_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
SECRET_HEADER = "X-Session-Secret"
UNUSABLE_OFFER = "it names no codec or transport this server can use (it offers VP8 and H.264 video over DTLS-SRTP)"
PORTRAIT_CHANGES = (5, 1.0)  # per session: 5 portrait changes at once, then one a second


Config = ServeOptions  # the server's configuration: its command's options


class JSONError(web.HTTPException):
    """An HTTP error of any status whose body is JSON {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        self.status_code = status  # read by HTTPException.__init__
        super().__init__(text=json.dumps({"error": message}), content_type="application/json", headers=headers)


def in_progress() -> JSONError:
    """A session's second portrait change while its first is under way (never read)."""
    return JSONError(429, "a portrait change for this session is still in progress; the previous portrait is kept",
                     {"Retry-After": "1"})


class Server:
    def __init__(self, config: ServeOptions, engines: EnginePool | None = None,
                 portrait_changes: tuple[int, float] = PORTRAIT_CHANGES, tls: ssl.SSLContext | None = None):
        """`engines`: where sessions take their engine (default: made from config.engine);
        `portrait_changes`: each session's (burst, seconds per change after it); `tls`: serve
        HTTPS with it (streamer/tls.py makes one from the options)."""
        self.config = config
        self.tls = tls
        self.engines = engines or EnginePool(engine_factory(config.engine))
        self.portrait_changes = portrait_changes
        self.sessions: dict[str, Session] = {}
        self.gallery: dict[str, np.ndarray] = {}
        self.thumbnails: dict[str, bytes] = {}
        # Uploads are decoded and meshed here, one at a time, never on a session's threads:
        # memory stays at one image's budget, and no stream waits for another's upload.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="xportrait-decode")
        self._portrait_limits: dict[str, TokenBucket] = {}
        self._changing: set[str] = set()  # sessions with a portrait change in progress
        self._names = _server_names(config.host, config.allow_origins)
        self._origins = {origin.rstrip("/").lower() for origin in config.allow_origins}
        self._favicon = _favicon()

    # -- startup: everything slow happens once, before the first request -------------------
    def prepare(self, portraits: dict[str, np.ndarray] | None = None) -> None:
        """Load the gallery (default: the bundled portraits) and run one frame through an
        engine, which then waits in the pool for the first session. Raises EngineError."""
        self.load_gallery(portraits)
        # Loads mediapipe's models and the engine's code, and proves both work on this machine.
        engine = self.engines.take()
        animator = Animator(engine)
        try:
            animator.set_sources([self.default_portrait])
            animator.drive(self.default_portrait, 0.0)
            if self.config.governor is not None and (governed := governed_engine(animator)):
                make_levels(governed)  # the other levels: made while no session streams, or when a governor waits
        finally:
            animator.close()
            self.engines.give_back(engine)

    def load_gallery(self, portraits: dict[str, np.ndarray] | None = None) -> None:
        """The portraits sessions may name, and their thumbnails (default: the bundled ones)."""
        if portraits is None:
            from . import samples

            portraits = {name: samples.portrait(name) for name in samples.PORTRAITS}
        for name, image in portraits.items():
            self.gallery[name] = image
            thumb = cv2.resize(image, _fit(image.shape, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA)
            _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
            self.thumbnails[name] = jpeg.tobytes()

    @property
    def default_portrait(self) -> np.ndarray:
        return next(iter(self.gallery.values()))

    def app(self) -> web.Application:
        complete_frames_on_marker()  # one frame interval less latency on every incoming frame
        app = web.Application(middlewares=[self._errors_as_json, self._same_site_only],
                              client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self.page)
        app.router.add_get("/favicon.ico", self.favicon)
        app.router.add_get("/portraits", self.portraits)
        app.router.add_get("/portraits/{name}", self.thumbnail)
        app.router.add_post("/offer", self.offer)
        app.router.add_post("/avatar", self.avatar)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/ice-servers", self.ice_servers)
        for name in CLIENT_FILES:
            app.router.add_get(f"/{name}", self.page)
        app.on_shutdown.append(self.close_all)
        return app

    # -- middlewares ------------------------------------------------------------------------------
    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler):
        """Every error answers JSON {"error": message}, aiohttp's own (404, 405, 413) too."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.content_type == "application/json" or exc.status < 400:
                raise
            if isinstance(exc, web.HTTPRequestEntityTooLarge):
                message = f"the request body is larger than {MAX_OFFER_BYTES // 1024} KiB"
            elif isinstance(exc, web.HTTPMethodNotAllowed):
                message = f"{request.method} is not allowed on {request.path}"
            elif isinstance(exc, web.HTTPNotFound):
                message = f"nothing at {request.path}"
            else:
                message = exc.reason
            raise JSONError(exc.status, message) from None
        except ConnectionResetError:
            raise
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            raise JSONError(500, "internal server error (logged on the server)") from None

    @web.middleware
    async def _same_site_only(self, request: web.Request, handler):
        """Refuse a Host that does not name this server (a DNS-rebinding page) and a browser
        request sent by another site's page (its Origin)."""
        host = request.headers.get("Host", "")
        if not self._host_allowed(host):
            raise JSONError(403, f"this server does not answer to the host name {host[:100]!r}: open it by its "
                             "address or a name given to --allow-origin")
        origin = request.headers.get("Origin")
        if origin is not None:
            own = f"{request.scheme}://{host}".lower()
            if origin.lower() != own and origin.rstrip("/").lower() not in self._origins:
                raise JSONError(403, f"requests from pages at {origin[:100]} are refused: open the page from this "
                                 f"server, or start serve with --allow-origin {origin[:100]}")
        return await handler(request)

    def _host_allowed(self, host: str) -> bool:
        try:
            name = urlsplit(f"//{host}").hostname if host else None
        except ValueError:  # "[::1", "[name]": no host name at all
            return False
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True  # an address typed by the user; a rebinding page has a domain name
        except ValueError:
            return name == "localhost" or name.endswith(".localhost") or name in self._names

    # -- helpers ------------------------------------------------------------------------------------
    def _authorize(self, request: web.Request) -> None:
        token = self.config.token
        if token is None:
            return
        given = request.query.get("token", "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[len("Bearer "):]
        # Header bytes that are not UTF-8 arrive as surrogates: they compare unequal, no 500.
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
            raise JSONError(401, "missing or wrong access token: open the page as http(s)://HOST:PORT/?token=TOKEN, "
                             "or send the header 'Authorization: Bearer TOKEN'")

    def controlled_session(self, session_id: str, given: str) -> Session:
        """The session named `session_id` (?session=ID), if `given` (the request's secret header) is its secret."""
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise JSONError(404, f"no live session {session_id[:40]!r}: start the stream first")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), session.secret.encode()):
            raise JSONError(403, f"session {session.id} is controlled only by the peer that started it: send "
                             f"the header '{SECRET_HEADER}' with the secret from the offer's answer")
        return session

    async def _read_upload(self, request: web.Request) -> bytes:
        limit = self.config.max_upload_bytes
        too_big = JSONError(413, f"the upload is larger than {limit / 2**20:g} MiB; the previous portrait is kept")
        if request.content_length is not None and request.content_length > limit:
            raise too_big
        try:
            if request.content_type.startswith("multipart/"):
                reader = await request.multipart()
                part = await reader.next()
                while part is not None and getattr(part, "filename", None) is None:
                    part = await reader.next()
                if part is None:
                    raise JSONError(400, "the form has no file in it; the previous portrait is kept")
                read = part.read_chunk
            else:
                read = request.content.read
            chunks, total = [], 0
            while chunk := await read(65536):
                total += len(chunk)
                if total > limit:
                    raise too_big
                chunks.append(chunk)
        # aiohttp's parser: ValueError, AssertionError, or an HTTP parsing error (a part's bad header)
        except (ValueError, AssertionError, HttpProcessingError):
            what = "multipart form" if request.content_type.startswith("multipart/") else "request body"
            raise JSONError(400, f"the {what} is malformed; the previous portrait is kept") from None
        return b"".join(chunks)

    # -- routes -----------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/") or "index.html"
        body = resources.files("client").joinpath(name).read_bytes()
        return web.Response(body=body, content_type=CLIENT_FILES[name], headers={"Cache-Control": "no-cache"})

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(body=self._favicon, content_type="image/x-icon",
                            headers={"Cache-Control": "max-age=86400"})

    async def portraits(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": name, "thumbnail": f"/portraits/{name}"} for name in self.gallery])

    async def thumbnail(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.thumbnails:
            raise JSONError(404, f"no bundled portrait {name[:60]!r}")
        return web.Response(body=self.thumbnails[name], content_type="image/jpeg")

    async def offer(self, request: web.Request) -> web.Response:
        self._authorize(request)
        shape = 'the body must be JSON: {"sdp": "...", "type": "offer"}'
        if request.content_type != "application/json":
            raise JSONError(415, f"send the offer with 'Content-Type: application/json'; {shape}")
        try:
            params = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise JSONError(400, shape) from None
        except RecursionError:
            raise JSONError(400, f"the JSON is nested too deeply; {shape}") from None
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str) or params.get("type") != "offer":
            raise JSONError(400, shape)
        mode = params.get("mode", "animate")
        if not isinstance(mode, str) or mode not in MODES:
            raise JSONError(400, f"unknown mode {_short(mode)}; choose one of: {', '.join(MODES)}")
        name = params.get("portrait") or next(iter(self.gallery))
        if not isinstance(name, str) or name not in self.gallery:
            raise JSONError(400, f"unknown portrait {_short(name)}; choose one of: {', '.join(self.gallery)}")
        try:
            check_offer(params["sdp"])  # before a slot is taken: a bad offer holds nothing
        except OfferError as exc:
            raise JSONError(400, f"invalid SDP offer: {exc}") from None
        return web.json_response(await self.open_session(params["sdp"], mode, name))

    async def open_session(self, sdp: str, mode: str, name: str) -> dict:
        """A session for a checked offer (its SDP, mode, gallery portrait): the answer
        {"sdp", "type", "session", "secret"}. Raises JSONError (503 when full, 400)."""
        if len(self.sessions) >= self.config.max_sessions:
            raise JSONError(503, f"server busy: all {self.config.max_sessions} sessions are in use; "
                             "try again when one ends")

        pc = RTCPeerConnection(rtc_configuration(self.config.ice_servers))  # none given: a local server needs none
        stage = AnimateStage(self.engines, self.gallery[name]) if mode == "animate" else EchoStage()
        session = Session(pc, mode, stage, name, self._forget, self.config.idle_timeout,
                          self.config.connect_timeout, governor=self.config.governor)
        self.sessions[session.id] = session  # counts against --max-sessions from here on

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                session.request_close(f"connection {pc.connectionState}")

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            session.channel = channel
            channel.on("message", session.on_message)

        @pc.on("track")
        def on_track(track) -> None:
            if session.add_track(track):
                pc.addTrack(session.output)

        ready = asyncio.ensure_future(session.pipeline.start())  # the engine warms up while SDP is parsed
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                if session.webcam is None:
                    raise JSONError(400, "invalid SDP offer: it has no video track: send the webcam as a video track")
                answer = await pc.createAnswer()  # fails when no codec is shared, among others
            except web.HTTPException:
                raise
            except Exception:  # checked above; what remains is aiortc's view of the offer
                raise JSONError(400, f"invalid SDP offer: {UNUSABLE_OFFER}") from None
            await ready
            if session.closed:  # the peer's connection failed, or the server is shutting down
                raise JSONError(503, f"the session ended before its offer was answered ({session.close_reason}); "
                                 "try again")
            try:
                await pc.setLocalDescription(answer)  # aiortc matches the offer's sections here too
            except Exception:
                logger.info("session %s: aiortc could not answer the offer", session.id, exc_info=True)
                raise JSONError(400, f"invalid SDP offer: {UNUSABLE_OFFER}") from None
            session.answered()
        except BaseException:
            await asyncio.gather(ready, return_exceptions=True)  # never leave its outcome unread
            await session.close("offer refused")
            raise
        logger.info("session %s: %s, portrait %s", session.id, mode, name)
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                "session": session.id, "secret": session.secret}

    async def avatar(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response(await self.change_portrait(
            request.query.get("session", ""), request.headers.get(SECRET_HEADER, ""), request.query.get("portrait"),
            lambda: self._read_upload(request)))

    def portrait_change_allowed(self, session_id: str, secret: str, name: str | None) -> Session:
        """The checks of a portrait change that cost nothing (before an upload is read): the
        session and its secret, its mode, the portrait's name, video flowing. Raises JSONError."""
        session = self.controlled_session(session_id, secret)
        if not session.pipeline.stage.takes_portrait:
            raise JSONError(400, "this session runs in echo mode: it has no portrait")
        if name is not None and name not in self.gallery:
            raise JSONError(404, f"no bundled portrait {name[:60]!r}")
        if name is None and not session.media_flowing:
            raise JSONError(409, "no video has arrived from this session yet: upload once the stream runs")
        if session.id in self._changing:
            raise in_progress()
        self._rate_limit(session, self._portrait_limits.setdefault(session.id, TokenBucket(*self.portrait_changes)).wait())
        return session

    @staticmethod
    def _rate_limit(session: Session, wait: float) -> None:
        if wait:
            raise JSONError(429, f"too many portrait changes: try again in {wait:.1f} s; the previous portrait is kept",
                        {"Retry-After": str(max(1, round(wait)))})

    async def change_portrait(self, session_id: str, secret: str, name: str | None, read) -> dict:
        """Switch session `session_id` to the gallery's `name`, or (None) to the image that
        `await read()` returns, read only once every other check has passed. Raises JSONError."""
        session = self.portrait_change_allowed(session_id, secret, name)
        self._rate_limit(session, self._portrait_limits[session.id].take())
        self._changing.add(session.id)
        try:
            if name is not None:
                image = self.gallery[name]
                load = lambda: image  # noqa: E731
            else:
                data = await read()
                name = "upload"
                load = lambda: read_image(data, "the upload")  # noqa: E731
            image = await session.pipeline.set_portrait(load, self._decoder)
        except ImageTooLarge as exc:
            raise JSONError(413, f"{exc}; the previous portrait is kept") from None
        except ImageError as exc:
            raise JSONError(400, f"{exc}; the previous portrait is kept") from None
        except NoFaceError:
            raise JSONError(422, "no face found in the image: use a photo or drawing where a face is clearly "
                             "visible; the previous portrait is kept") from None
        except NoPortrait as exc:
            raise JSONError(400, str(exc)) from None
        except PipelineClosed:
            raise JSONError(404, f"session {session.id} has ended: start the stream again") from None
        finally:
            self._changing.discard(session.id)
        session.portrait = name
        return {"session": session.id, "portrait": name, "width": image.shape[1], "height": image.shape[0]}

    async def stats(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response({
            "engine": self.config.engine.name,
            "size": self.config.engine.size,
            "max_sessions": self.config.max_sessions,
            "sessions_active": len(self.sessions),
            "worker_threads": worker_threads(),
            "sessions": [session.snapshot() for session in self.sessions.values()],
        })

    async def ice_servers(self, request: web.Request) -> web.Response:
        self._authorize(request)  # TURN credentials are for this server's users only
        return web.json_response([server.for_browser() for server in self.config.ice_servers])

    # -- teardown ------------------------------------------------------------------------------------
    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self._portrait_limits.pop(session.id, None)

    async def close_all(self, app: web.Application | None = None) -> None:
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())))
        self._decoder.shutdown(wait=False)


def rtc_configuration(ice_servers: tuple[IceServer, ...]) -> RTCConfiguration:
    """aiortc's configuration for the server's peers: the STUN/TURN servers of --ice-server."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
                                        for s in ice_servers])


def _short(value) -> str:
    """A client's value quoted for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fit(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    h, w = shape[:2]
    k = side / max(h, w)
    return max(1, round(w * k)), max(1, round(h * k))


def _server_names(host: str, allow_origins: tuple[str, ...]) -> set[str]:
    """Host names (besides addresses and localhost) that requests may use to reach us."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host:
            names.add(host.lower())
    for origin in allow_origins:
        hostname = urlsplit(origin).hostname
        if hostname:
            names.add(hostname.lower())
    return names


def _favicon() -> bytes:
    """A 32x32 icon: a pale face on the page's dark blue, drawn once."""
    from PIL import Image, ImageDraw

    icon = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle((0, 0, 63, 63), radius=14, fill=(17, 34, 68, 255))
    draw.ellipse((14, 8, 50, 52), fill=(153, 204, 255, 255))
    for x in (24, 36):
        draw.ellipse((x - 3, 24, x + 3, 30), fill=(17, 34, 68, 255))
    draw.arc((22, 30, 42, 44), 20, 160, fill=(17, 34, 68, 255), width=3)
    buffer = io.BytesIO()
    icon.save(buffer, "ICO", sizes=[(32, 32), (16, 16)])
    return buffer.getvalue()


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--token", help="access token required on /offer, /avatar and /stats")
    parser.add_argument("--max-sessions", type=int,
                        help="concurrent sessions at most (default 4; 1 for --engine xportrait: one GPU, one stream)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                        help="largest portrait upload, MiB (default 10)")
    parser.add_argument("--idle-timeout", type=float, default=15.0,
                        help="close a session whose webcam sends nothing for this many seconds (default 15)")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="close a session that has no media this many seconds after its offer (default 30)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    parser.add_argument("--self-signed", action="store_true",
                        help="serve HTTPS with a self-signed certificate for this machine's names and addresses "
                             "(made once, kept in ~/.cache/xportrait/tls; the browser asks you to accept it)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                        help="another page (scheme://host[:port]) allowed to call this server; repeatable")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain HTTP on a non-loopback --host (the token and the page cross the network "
                             "unencrypted, and browsers refuse the camera to such pages)")
    parser.add_argument("--tunnel", action="store_true",
                        help="the page is reached through an SSH tunnel (ssh -L 8080:127.0.0.1:8080 THIS_HOST): "
                             "HTTP stays on loopback, WebRTC media (UDP, which no SSH tunnel carries) is offered "
                             "on this machine's network addresses")
    parser.add_argument("--verbose", action="store_true",
                        help="log WebRTC details too (ICE and DTLS state changes of aioice and aiortc)")
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL",
                        help="a STUN or TURN server for WebRTC, given to the server's peers and the page: "
                             "stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT][?transport=tcp]; repeatable "
                             "(behind NAT, across hosts)")
    g = parser.add_argument_group("Ray workers (streamer/cluster; needs the cluster extra: pip install 'xportrait[cluster]')")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run sessions on N Ray workers (each its own engine and WebRTC peers; --max-sessions "
                        "is then per worker): on a local Ray started for this command, or on --ray-address")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="join a running Ray cluster (HOST:6379 of `ray start --head`, or auto): use its "
                        "workers, starting --workers N of them where fewer run; they outlive this command")
    g.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray of --workers (default: all)")
    g.add_argument("--worker-cpus", type=float, metavar="N",
                   help="CPUs each warp-engine worker reserves (default 1; a diffusion worker takes one GPU)")
    add_engine_arguments(parser)
    add_governor_arguments(parser)


async def serve(server: Server, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=server.tls)
        await site.start()
        bound = runner.addresses[0]
        scheme = "https" if server.tls else "http"
        address = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(f"xportrait serve: {scheme}://{address}:{bound[1]}/ (engine {server.config.engine.name}, "
              f"size {server.config.engine.size})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()  # runs on_shutdown: every session is closed and freed


def configure_logging(verbose: bool) -> None:
    """Our own lines (the server's, the engines') from INFO up; other libraries' only from
    WARNING up unless `verbose`: ICE and DTLS state changes are half the log at INFO (the
    sessions' own lines say enough), and on a fresh machine mediapipe's import of pyplot logs
    matplotlib's font cache."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)
    for name in ("xportrait", "engines"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(level)


def _tls_context(options: ServeOptions):
    """The SSLContext the options ask for (None: plain HTTP); prints where a made one lies.
    Raises TLSError (or OSError) naming the file at fault."""
    from .tls import fingerprint, host_names, self_signed, server_context

    if options.self_signed:
        cert, key = self_signed(host_names(options.host))
        print(f"xportrait serve: self-signed certificate {cert} (SHA-256 {fingerprint(cert)}); "
              "your browser will ask you to accept it once", flush=True)
        return server_context(cert, key)
    if options.tls_cert:
        return server_context(options.tls_cert, options.tls_key)
    return None


def run(args: argparse.Namespace) -> int:
    options = serve_options(args)
    configure_logging(options.verbose)
    from .tls import TLSError

    try:
        tls = _tls_context(options)
    except (TLSError, OSError) as exc:
        print(f"xportrait serve: {exc}", file=sys.stderr)
        return 2
    try:  # a taken port is refused before the engine (or Ray) is prepared, not after
        check_can_listen(options.host, options.port)
    except OSError as exc:
        print(f"xportrait serve: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 2
    if options.cluster is not None:  # sessions on Ray workers: ray is imported only here
        from .cluster.front import run_front

        return run_front(options, tls)
    engine = options.engine
    if not is_loopback(options.host) and not options.token:
        logger.warning("serving on %s without --token: anyone who can reach it can stream and upload", options.host)
    steps = ["the face mesh", f"the {engine.name} engine"]
    if engine.name == "xportrait":
        steps[1] += " (weights" + (", torch.compile: minutes" if engine.live.compile else "") + \
                    (", CUDA graph capture" if engine.device != "cpu" else "") + ")"
    print(f"xportrait serve: preparing {' and '.join(steps)}, once, before accepting connections...", flush=True)
    try:
        server = Server(options, tls=tls)
        server.prepare()
    except EngineError as exc:
        print(f"xportrait serve: {exc}", file=sys.stderr)
        return 2
    if is_loopback(options.host) and not options.tunnel:
        keep_media_on_loopback()
    try:
        asyncio.run(serve(server, options.host, options.port))
    except OSError as exc:
        print(f"xportrait serve: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 2
    return 0
