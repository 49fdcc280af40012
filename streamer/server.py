"""`xportrait serve`: the live portrait animator over WebRTC (aiohttp + aiortc).

In the manner of aiortc's examples/server/server.py: the page POSTs its SDP offer to /offer
and gets the answer back; the peer's webcam track goes into a `Session` (streamer/session.py),
which animates it on its own two threads (face tracking, engine) and sends the result back on
an `AvatarTrack`.

Routes:
  GET  /                the page (client/index.html, app.js, style.css)
  GET  /portraits       the bundled portraits, as JSON [{name, thumbnail}]
  GET  /portraits/NAME  a portrait's thumbnail (JPEG)
  POST /offer           {"sdp", "type": "offer", "mode"?: "animate"|"echo", "portrait"?: NAME}
                        -> {"sdp", "type": "answer", "session"}
  POST /avatar?session=ID[&portrait=NAME]  switch to a bundled portrait, or upload one
                        (the image as the body, or as the first file of a multipart form)
  GET  /stats           every session's live statistics, as JSON

/offer, /avatar and /stats need the token when the server has one (--token): an
`Authorization: Bearer TOKEN` header or a `token=TOKEN` query parameter. Errors are JSON
{"error": message} with a 4xx/5xx status.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import json
import logging
import signal
import sys
from importlib import resources

import cv2
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from PIL import Image, ImageOps, UnidentifiedImageError

from engines import EngineError
from engines.animator import Animator
from engines.face import MAX_SIDE, NoFaceError, downscale

from .options import DEFAULT_PORT, MAX_UPLOAD_BYTES, ServeOptions, add_engine_arguments, engine_factory, serve_options
from .rtp import complete_frames_on_marker, is_loopback, keep_media_on_loopback
from .session import MODES, Session, SessionClosed, worker_threads

logger = logging.getLogger("xportrait.server")

# Pixels decoded at most for one upload (after JPEG's decode-time reduction): 8000 x 8000.
# Larger images are refused before decoding; anything up to it is downscaled to MAX_SIDE.
MAX_UPLOAD_PIXELS = 64_000_000
THUMBNAIL_SIDE = 160
CLIENT_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


class UploadError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JSONError(web.HTTPException):
    """An HTTP error of any status whose body is JSON {"error": message}."""

    def __init__(self, status: int, message: str):
        self.status_code = status  # read by HTTPException.__init__
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


def fail(status: int, message: str) -> web.HTTPException:
    return JSONError(status, message)


def decode_image(data: bytes) -> np.ndarray:
    """An uploaded file's bytes -> RGB uint8, upright (EXIF), at most MAX_SIDE pixels a side."""
    if not data:
        raise UploadError(400, "the upload is empty: send an image file (JPEG, PNG, WebP, ...)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG decodes straight at 1/2..1/8 scale
            width, height = image.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise UploadError(413, f"the image is {width}x{height} pixels; at most "
                                       f"{MAX_UPLOAD_PIXELS // 1_000_000} megapixels are accepted")
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"the image has too many pixels: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, UploadError):
            raise
        raise UploadError(400, f"not an image this server can read ({type(exc).__name__}: {exc})") from None
    return downscale(rgb)


Config = ServeOptions  # the server's configuration: its command's options


class Server:
    def __init__(self, config: ServeOptions, make_engine=None):
        """`make_engine`: a new engine per call (default: streamer.options.engine_factory)."""
        self.config = config
        self._make_engine = make_engine or engine_factory(config.engine)
        self.sessions: dict[str, Session] = {}
        self.gallery: dict[str, np.ndarray] = {}
        self.thumbnails: dict[str, bytes] = {}
        # Engines of ended sessions (and the one warmed at startup) wait here for the next
        # session: a diffusion engine's weights, compilation and CUDA graphs are made once.
        self._idle_engines: list = []

    # -- startup: everything slow happens once, before the first request -------------------
    def prepare(self, portraits: dict[str, np.ndarray] | None = None) -> None:
        """Load the gallery (default: the bundled portraits) and run one frame through the
        engine. Raises EngineError."""
        if portraits is None:
            from . import samples

            portraits = {name: samples.portrait(name) for name in samples.PORTRAITS}
        for name, image in portraits.items():
            self.gallery[name] = image
            thumb = cv2.resize(image, _fit(image.shape, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA)
            _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
            self.thumbnails[name] = jpeg.tobytes()
        # Loads mediapipe's models and the engine's code, and proves both work on this machine.
        animator = Animator(self._take_engine())
        try:
            animator.set_sources([self.default_portrait])
            animator.drive(self.default_portrait, 0.0)
        finally:
            animator.close()
        self._return_engine(animator.engine)

    def _take_engine(self):
        """An idle engine if there is one, else a new one (sessions' engine threads call this)."""
        try:
            return self._idle_engines.pop()
        except IndexError:
            return self._make_engine()

    def _return_engine(self, engine) -> None:
        engine.reset()
        self._idle_engines.append(engine)

    @property
    def default_portrait(self) -> np.ndarray:
        return next(iter(self.gallery.values()))

    def app(self) -> web.Application:
        complete_frames_on_marker()  # one frame interval less latency on every incoming frame
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/portraits", self.portraits)
        app.router.add_get("/portraits/{name}", self.thumbnail)
        app.router.add_post("/offer", self.offer)
        app.router.add_post("/avatar", self.avatar)
        app.router.add_get("/stats", self.stats)
        for name in CLIENT_FILES:
            app.router.add_get(f"/{name}", self.page)
        app.on_shutdown.append(self.close_all)
        return app

    # -- helpers ------------------------------------------------------------------------------------
    def _authorize(self, request: web.Request) -> None:
        token = self.config.token
        if token is None:
            return
        given = request.query.get("token", "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise fail(401, "missing or wrong access token (send 'Authorization: Bearer TOKEN')")

    def _session(self, request: web.Request) -> Session:
        session_id = request.query.get("session", "")
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise fail(404, f"no live session {session_id!r}: start the stream first")
        return session

    async def _read_upload(self, request: web.Request) -> bytes:
        limit = self.config.max_upload_bytes
        too_big = fail(413, f"the upload is larger than {limit / 2**20:g} MiB")
        if request.content_length is not None and request.content_length > limit:
            raise too_big
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            part = await reader.next()
            while part is not None and getattr(part, "filename", None) is None:
                part = await reader.next()
            if part is None:
                raise fail(400, "the form has no file in it")
            chunks, read = [], part.read_chunk
        else:
            chunks, read = [], request.content.read
        total = 0
        while chunk := await read(65536):
            total += len(chunk)
            if total > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    # -- routes -----------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/") or "index.html"
        body = resources.files("client").joinpath(name).read_bytes()
        return web.Response(body=body, content_type=CLIENT_FILES[name], headers={"Cache-Control": "no-cache"})

    async def portraits(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": name, "thumbnail": f"/portraits/{name}"} for name in self.gallery])

    async def thumbnail(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.thumbnails:
            raise fail(404, f"no bundled portrait {name!r}")
        return web.Response(body=self.thumbnails[name], content_type="image/jpeg")

    async def offer(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            params = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise fail(400, 'the body must be JSON: {"sdp": "...", "type": "offer"}') from None
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str) or params.get("type") != "offer":
            raise fail(400, 'the body must be JSON: {"sdp": "...", "type": "offer"}')
        if "\nm=" not in params["sdp"].replace("\r\n", "\n"):
            raise fail(400, "invalid SDP offer: it has no media section (no m= line)")
        mode = params.get("mode", "animate")
        if mode not in MODES:
            raise fail(400, f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        name = params.get("portrait") or next(iter(self.gallery))
        if name not in self.gallery:
            raise fail(400, f"unknown portrait {name!r}; choose one of: {', '.join(self.gallery)}")
        if len(self.sessions) >= self.config.max_sessions:
            raise fail(503, f"server busy: all {self.config.max_sessions} sessions are in use; "
                            "try again when one ends")

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # a local server needs no STUN
        session = Session(pc, mode, self._take_engine, self._forget, self.config.idle_timeout,
                          self.config.connect_timeout, return_engine=self._return_engine)
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

        ready = session.prepare(self.gallery[name], name)  # the engine warms up while SDP is parsed
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=params["sdp"], type="offer"))
                if session.webcam is None:
                    raise fail(400, "the offer has no video track: send the webcam as a video track")
                answer = await pc.createAnswer()  # fails when no codec is shared, among others
            except web.HTTPException:
                raise
            except Exception as exc:  # aiortc's parser raises many kinds; all mean a bad offer
                raise fail(400, f"invalid SDP offer ({type(exc).__name__}: {exc})") from None
            await ready
            await pc.setLocalDescription(answer)
        except BaseException:
            await asyncio.gather(ready, return_exceptions=True)  # never leave its outcome unread
            await session.close("offer refused")
            raise
        logger.info("session %s: %s, portrait %s", session.id, mode, name)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": session.id})

    async def avatar(self, request: web.Request) -> web.Response:
        self._authorize(request)
        session = self._session(request)
        if session.mode != "animate":
            raise fail(400, "this session runs in echo mode: it has no portrait")
        name = request.query.get("portrait")
        if name is not None:
            if name not in self.gallery:
                raise fail(404, f"no bundled portrait {name!r}")
            image = self.gallery[name]
            load = lambda: image  # noqa: E731
        else:
            data = await self._read_upload(request)
            name = "upload"
            load = lambda: decode_image(data)  # noqa: E731  (decoded on the session's engine thread)
        try:
            width, height = await session.set_portrait(load, name)
        except UploadError as exc:
            raise fail(exc.status, f"{exc}; the previous portrait is kept") from None
        except NoFaceError:
            raise fail(422, "no face found in the image; the previous portrait is kept") from None
        except SessionClosed as exc:
            raise fail(404, f"{exc}: start the stream again") from None
        return web.json_response({"session": session.id, "portrait": name, "width": width, "height": height})

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

    # -- teardown ------------------------------------------------------------------------------------
    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def close_all(self, app: web.Application | None = None) -> None:
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())))


def _fit(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    h, w = shape[:2]
    k = side / max(h, w)
    return max(1, round(w * k)), max(1, round(h * k))


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
    add_engine_arguments(parser)


async def serve(server: Server, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        print(f"xportrait serve: http://{bound[0]}:{bound[1]}/ (engine {server.config.engine.name}, "
              f"size {server.config.engine.size})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()  # runs on_shutdown: every session is closed and freed


def run(args: argparse.Namespace) -> int:
    options = serve_options(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = options.engine
    if options.host not in ("127.0.0.1", "localhost", "::1") and not options.token:
        logger.warning("serving on %s without --token: anyone who can reach it can stream and upload", options.host)
    steps = ["the face mesh", f"the {engine.name} engine"]
    if engine.name == "xportrait":
        steps[1] += " (weights" + (", torch.compile: minutes" if engine.live.compile else "") + \
                    (", CUDA graph capture" if engine.device != "cpu" else "") + ")"
    print(f"xportrait serve: preparing {' and '.join(steps)}, once, before accepting connections...", flush=True)
    try:
        server = Server(options)
        server.prepare()
    except EngineError as exc:
        print(f"xportrait serve: {exc}", file=sys.stderr)
        return 2
    if is_loopback(options.host):
        keep_media_on_loopback()
    try:
        asyncio.run(serve(server, options.host, options.port))
    except OSError as exc:
        print(f"xportrait serve: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 2
    return 0
