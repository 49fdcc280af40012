"""The command line's edge: every command's options as one typed, frozen object, built once
from its flags and validated where it is made.

Each command module keeps `add_arguments(parser)` (its flags; the engine flags every command
shares are `add_engine_arguments` here) and its `run(args)`, which calls the matching
`*_options(args)` below first and passes the object down: nothing past this module reads an
argparse Namespace. A broken rule raises `OptionError` naming the flag; `xportrait` reports it
as a usage error (exit status 2).

The engines' own options are engines/options.py; this module only maps flags onto them.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field, fields
from typing import Callable
from urllib.parse import urlsplit

from engines.options import (
    BACKENDS,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    DEFAULT_WINDOW,
    DTYPES,
    ENGINES,
    LCM_STEPS,
    LIVE_STEPS,
    MODEL_SIZES,
    RELEASED_GUIDANCE,
    RELEASED_STEPS,
    SAMPLERS,
    TOKEN_DOWNSAMPLE,
    EngineOptions,
    LiveOptions,
    OptionError,
    WarpOptions,
    XPortraitOptions,
    at_least,
    flag,
    positive,
)
from engines.retarget import EYE_MODES, NEUTRAL, RANGES, Retargeting

from .governor import GovernorOptions

DEFAULT_PORT = 8080
MAX_UPLOAD_BYTES = 10 * 1024 * 1024

# The diffusion engine's flags and the XPortraitOptions field each sets (all but --engine/--size).
XPORTRAIT_FLAGS = ("base", "checkpoint", "lcm_lora", "sampler", "steps", "guidance", "seed", "device", "dtype",
                   "allow_hub", "trust_checkpoint", "random_weights", "model_size")
LIVE_FLAGS = ("compile", "autotune", "tiny_decoder", "lookahead", "backend", "graphs", "ticks_per_frame",
              "level_groups", "deep_levels", "reuse_controls", "token_downsample")


# -- flags ------------------------------------------------------------------------------------------
def add_engine_arguments(parser: argparse.ArgumentParser, choose_engine: bool = True) -> None:
    """--engine (unless the command has one engine), --size, and the diffusion engine's flags."""
    if choose_engine:
        parser.add_argument("--engine", choices=ENGINES, default="warp", help="animation engine (default: warp)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"square output resolution, a multiple of 8, at least 64 (default: {DEFAULT_SIZE})")
    g = parser.add_argument_group("xportrait engine (--engine xportrait)")
    g.add_argument("--base", metavar="PATH", help="Stable Diffusion 1.5: a diffusers folder or one .safetensors/.ckpt")
    g.add_argument("--checkpoint", metavar="PATH", help="the released X-Portrait checkpoint (model_state-*.th)")
    g.add_argument("--lcm-lora", metavar="PATH", help="an LCM-LoRA for SD1.5, fused into the UNet (few-step sampling)")
    g.add_argument("--sampler", choices=SAMPLERS,
                   help=f"default: lcm with --lcm-lora, else the released DDIM ({RELEASED_STEPS} steps, "
                        f"guidance {RELEASED_GUIDANCE:g})")
    g.add_argument("--steps", type=int,
                   help=f"denoising steps (default: {RELEASED_STEPS} DDIM as released; {LCM_STEPS} with --lcm-lora; "
                        f"{LIVE_STEPS} live)")
    g.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance (default: {RELEASED_GUIDANCE:g} as released; 1 with --lcm-lora)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"noise seed (default: {DEFAULT_SEED}, as released)")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cuda, cuda:1, cpu")
    g.add_argument("--dtype", choices=DTYPES, help="default: fp16 on a GPU, fp32 on a CPU")
    g.add_argument("--allow-hub", action="store_true",
                   help="let --base/--checkpoint/--lcm-lora name Hugging Face hub ids (downloads); default: local paths only")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle torch weights files fully, for one that holds Python objects besides tensors "
                        "(this can run code from the file: only for files you trust); default: tensors only")
    g.add_argument("--random-weights", action="store_true",
                   help="no weights: random ones, to measure cost (every output is labelled as such)")
    g.add_argument("--compile", action="store_true",
                   help="live engine: torch.compile the tick before capturing its CUDA graph (minutes of startup, "
                        "about twice the frame rate)")
    g.add_argument("--autotune", action="store_true",
                   help="live engine, with --compile: time Triton kernels against cuBLAS for each of the tick's "
                        "matrix products and keep the fastest (inductor's max_autotune_gemm; many more minutes the "
                        "first time, cached after in TORCHINDUCTOR_CACHE_DIR)")
    g.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="live engine: run the modules with torch, or the graphs `xportrait export` wrote (--graphs)")
    g.add_argument("--graphs", metavar="DIR", help="exported graphs for --backend onnx|tensorrt")
    g.add_argument("--tiny-decoder", metavar="PATH",
                   help="live engine: decode with TAESD (a diffusers AutoencoderTiny folder; 'random' with --random-weights)")
    g.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="live engine: each frame also attends to the next K frames in flight, for K frames more "
                        "latency and (S+K)/S the work per frame (default: 0, causal)")
    g.add_argument("--ticks-per-frame", type=_ticks_per_frame, default=1, metavar="1|2|auto",
                   help="live engine: stream ticks per camera frame; the second enters the same frame again, so a "
                        "frame leaves after S ticks of GPU time instead of S camera intervals (it must fit: 2 ticks "
                        "in a frame interval); auto: a second tick whenever it fits (default: 1)")
    g.add_argument("--level-groups", type=int, default=1, metavar="G",
                   help="live engine: step the S levels in G passes a camera frame, each on S / G frames in flight: "
                        "the same frames, each out after S / G - 1 camera intervals plus G passes instead of S - 1 "
                        "intervals plus one tick (the passes must fit in a frame interval; G divides --steps; "
                        "default: 1)")
    g.add_argument("--deep-levels", type=_levels, default=(), metavar="L[,L...]",
                   help="live engine, lossy (random weights cannot judge it): only these levels (from 0, the "
                        "noisiest) walk the whole UNet and ControlNets; at the others a frame walks only their "
                        "first and last levels, on the deep features of its last listed level (default: all)")
    g.add_argument("--reuse-controls", action="store_true",
                   help="live engine, with --deep-levels, lossy too: the ControlNets walk only at the deep levels; "
                        "at the others a frame reuses their first-level residuals from its last deep level")
    g.add_argument("--token-downsample", type=int, choices=TOKEN_DOWNSAMPLE, default=1, metavar="N",
                   help="live engine, lossy too: at the latents' size the reference attention takes keys and values "
                        "of averaged NxN blocks of tokens, the frame's own and the portrait's (ToDo); the "
                        "queries stay whole (1, 2 or 4; default: 1, every token)")
    g.add_argument("--model-size", choices=MODEL_SIZES, default="sd15",
                   help="tiny: the same architecture a few channels wide (tests, demos with --random-weights)")


def _ticks_per_frame(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"1, 2 or auto, got {text!r}") from None


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels as integers separated by commas (e.g. 0,2), got {text!r}") from None


def _given(args: argparse.Namespace, names) -> list[str]:
    """The flags among `names` set to something other than their default."""
    defaults = {"seed": DEFAULT_SEED, "device": "auto", "model_size": "sd15", "backend": "torch", "lookahead": 0,
                "ticks_per_frame": 1, "level_groups": 1, "deep_levels": (), "token_downsample": 1}
    return [flag(n) for n in names if getattr(args, n, None) not in (None, False, defaults.get(n))]


def engine_options(args: argparse.Namespace, live: bool = False, engine: str | None = None,
                   window: int = DEFAULT_WINDOW) -> EngineOptions:
    """The engine options add_engine_arguments' flags describe. `live`: for a command that runs
    the engine frame by frame (serve, bench --stream), where the xportrait engine streams."""
    engine = engine or args.engine
    if engine == "warp":
        given = _given(args, XPORTRAIT_FLAGS + LIVE_FLAGS)
        if given:
            raise OptionError(f"{', '.join(given)}: only for --engine xportrait")
        return WarpOptions(size=args.size)
    if not live:
        given = _given(args, LIVE_FLAGS)
        if given:
            raise OptionError(f"{', '.join(given)}: only for the live engine "
                              "(serve, bench --stream, eval --stream)")
    live_options = LiveOptions(lookahead=args.lookahead, compile=args.compile, autotune=args.autotune,
                               tiny_decoder=args.tiny_decoder,
                               backend=args.backend, graphs=args.graphs,
                               ticks_per_frame=args.ticks_per_frame, level_groups=args.level_groups,
                               deep_levels=args.deep_levels, reuse_controls=args.reuse_controls,
                               token_downsample=args.token_downsample) if live else None
    return XPortraitOptions(size=args.size, window=window, live=live_options,
                            **{name: getattr(args, name) for name in XPORTRAIT_FLAGS})


def engine_factory(options: EngineOptions) -> Callable[[], object]:
    """How a command that makes engines on demand (one per live session) makes them: the
    graphs of --backend onnx|tensorrt are loaded here, once, and every engine shares them."""
    from engines import create_engine

    model = None
    if isinstance(options, XPortraitOptions) and options.live is not None and options.live.backend != "torch":
        from export.graph_model import graph_model

        model = graph_model(options)
    return lambda: create_engine(options, model)


# -- the quality governor (serve, cam; streamer/governor.py) -----------------------------------------
def add_governor_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quality governor (off unless one of these is given)")
    g.add_argument("--target-fps", type=float, metavar="FPS",
                   help="hold this output frame rate: the engine steps down its ladder of cheaper settings when "
                        "it falls short, and back up when there is room (warp: a coarser warp map, then no matte; "
                        "xportrait: the full VAE over --tiny-decoder's, no look-ahead, then fewer LCM steps, down to 2)")
    g.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="hold a frame's input-to-output latency (p50) under this, along the same ladder")


def governor_options(args: argparse.Namespace) -> GovernorOptions | None:
    if args.target_fps is None and args.max_latency_ms is None:
        return None
    return GovernorOptions(target_fps=args.target_fps, max_latency_ms=args.max_latency_ms)


def _positive_fields(options, names) -> None:
    for name in names:
        positive(getattr(options, name), name)


# -- retargeting (engines/retarget.py): animate and cam --------------------------------------------------
def add_retarget_arguments(parser: argparse.ArgumentParser) -> None:
    """The retargeting controls' values (cam: the start values; its keys change them)."""
    g = parser.add_argument_group("retargeting: how much of the driver reaches the portrait")
    r = {name: f"[{low:g}, {high:g}]" for name, (low, high) in RANGES.items()}
    g.add_argument("--expression", type=float, default=1.0, metavar="X",
                   help=f"expression intensity in {r['expression']}: 0 the neutral face, 1 as driven (default), "
                        "2 exaggerated")
    g.add_argument("--head-pose", type=float, default=1.0, metavar="X",
                   help=f"head-pose intensity in {r['head_pose']}: 0 a steady head that still talks, 1 as driven "
                        "(default)")
    g.add_argument("--mouth-open", type=float, default=1.0, metavar="X",
                   help=f"gain on the mouth's opening in {r['mouth_open']}: 0 closed, 1 as driven (default)")
    g.add_argument("--eyes", choices=EYE_MODES, default="follow",
                   help="follow: blinks pass through (default); open: the eyes stay open")


def retargeting_options(args: argparse.Namespace) -> Retargeting:
    return Retargeting(expression=args.expression, head_pose=args.head_pose, mouth_open=args.mouth_open,
                       eyes=args.eyes)


# -- serve ------------------------------------------------------------------------------------------
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server for WebRTC's ICE, from `--ice-server URL`: stun:HOST[:PORT], or
    turn:USER:PASSWORD@HOST[:PORT][?transport=tcp] (turns: over TLS); a TURN server needs both."""

    url: str  # without the credentials: what aiortc's and the browser's `urls` take
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> "IceServer":
        scheme, _, rest = text.partition(":")
        if scheme not in ICE_SCHEMES or not rest or rest.startswith("//"):
            raise OptionError(f"--ice-server {text!r}: give stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT]"
                              "[?transport=udp|tcp] (turns: for TURN over TLS)")
        username = credential = None
        if "@" in rest:
            login, _, rest = rest.rpartition("@")
            username, _, credential = login.partition(":")
        host = rest.split("?", 1)[0].rsplit(":", 1)[0] if not rest.startswith("[") else rest
        if not host:
            raise OptionError(f"--ice-server {text!r} names no host")
        if scheme.startswith("turn") and not (username and credential):
            raise OptionError(f"--ice-server {scheme}:...{rest!r}: a TURN server needs a user and a password: "
                              f"{scheme}:USER:PASSWORD@{rest}")
        if scheme.startswith("stun") and username:
            raise OptionError(f"--ice-server {scheme}:...: a STUN server takes no user or password")
        return cls(f"{scheme}:{rest}", username, credential)

    def for_browser(self) -> dict:
        """An RTCIceServer dictionary, as the page's RTCPeerConnection takes it."""
        entry = {"urls": self.url}
        if self.username:
            entry.update(username=self.username, credential=self.credential)
        return entry


@dataclass(frozen=True)
class ClusterOptions:
    """`serve --workers N` / `--ray-address ADDRESS`: sessions run on Ray workers (streamer/cluster).
    `workers` None with an address: the workers already there; `address` None: a local Ray,
    started for this command with `cpus` CPUs (default: this machine's)."""

    workers: int | None = None
    address: str | None = None
    cpus: int | None = None  # the local Ray's CPUs (never more than this machine has)
    worker_cpus: float = 1.0  # each warp worker's CPUs (a diffusion worker takes a GPU and one CPU)

    def __post_init__(self):
        if self.workers is None and self.address is None:
            raise OptionError("a cluster needs --workers N, or --ray-address ADDRESS (its running workers)")
        if self.workers is not None:
            at_least(self.workers, 1, "workers")
        if self.address is not None and not self.address.strip():
            raise OptionError("--ray-address must name a cluster: HOST:PORT of its head, ray://HOST:10001, or auto")
        if self.cpus is not None:
            at_least(self.cpus, 1, "ray_cpus")
        positive(self.worker_cpus, "worker_cpus")


@dataclass(frozen=True)
class ServeOptions:
    """`xportrait serve`: the live server. `max_sessions` None: 1 for the diffusion engine (one
    GPU, one stream), 4 otherwise."""

    engine: EngineOptions = field(default_factory=WarpOptions)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    max_sessions: int | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    idle_timeout: float = 15.0
    connect_timeout: float = 30.0
    tls_cert: str | None = None  # HTTPS with this PEM certificate and tls_key
    tls_key: str | None = None
    self_signed: bool = False  # HTTPS with a certificate made for this machine (streamer/tls.py)
    allow_origins: tuple[str, ...] = ()  # other pages that may call the API: scheme://host[:port]
    insecure: bool = False  # plain HTTP on a network address, knowingly
    tunnel: bool = False  # the page comes through an SSH tunnel: media on the network addresses anyway
    verbose: bool = False  # aioice/aiortc at INFO too
    governor: GovernorOptions | None = None  # --target-fps / --max-latency-ms: None, off
    ice_servers: tuple[IceServer, ...] = ()  # STUN/TURN for the server's peers and the page's
    cluster: ClusterOptions | None = None  # None: sessions run in this process; else on Ray workers

    @property
    def tls(self) -> bool:
        return self.self_signed or self.tls_cert is not None

    def __post_init__(self):
        if isinstance(self.engine, XPortraitOptions) and self.engine.live is None:
            raise OptionError("serve runs the live engine: XPortraitOptions(live=LiveOptions(...))")
        if self.max_sessions is None:
            object.__setattr__(self, "max_sessions", 1 if isinstance(self.engine, XPortraitOptions) else 4)
        at_least(self.max_sessions, 1, "max_sessions")
        if self.max_upload_bytes < 1:
            raise OptionError(f"--max-upload-mb must be positive, got {self.max_upload_bytes / 2**20:g}")
        _positive_fields(self, ("idle_timeout", "connect_timeout"))
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port must be in [0, 65535], got {self.port}")
        if self.token == "":
            object.__setattr__(self, "token", None)
        if self.self_signed and (self.tls_cert or self.tls_key):
            raise OptionError("choose either --self-signed or --tls-cert/--tls-key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise OptionError("--tls-cert and --tls-key go together: the certificate and its private key")
        origins = []
        for origin in self.allow_origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise OptionError(f"--allow-origin {origin!r}: give a page's origin, scheme://host[:port]")
            origins.append(origin.rstrip("/"))
        object.__setattr__(self, "allow_origins", tuple(origins))
        if not _loopback(self.host) and not self.tls and not self.insecure:
            raise OptionError(
                f"refusing to serve --host {self.host} over plain HTTP: the token and the page would cross the "
                "network unencrypted, and browsers give the camera only to https:// pages (or localhost). Use "
                "--self-signed (or --tls-cert FILE --tls-key FILE); or keep the default --host, add --tunnel and "
                "reach it with ssh -L 8080:127.0.0.1:8080 THIS_HOST, then open http://127.0.0.1:8080; or pass "
                "--insecure on a network you trust.")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """None unless --workers or --ray-address is given (plain serve)."""
    if args.workers is None and args.ray_address is None:
        given = [f for f, v in (("--ray-cpus", args.ray_cpus), ("--worker-cpus", args.worker_cpus)) if v is not None]
        if given:
            raise OptionError(f"{', '.join(given)}: only with --workers or --ray-address")
        return None
    if args.ray_address is not None and args.ray_cpus is not None:
        raise OptionError("--ray-cpus is for the local Ray of --workers; a running cluster has its own")
    return ClusterOptions(workers=args.workers, address=args.ray_address, cpus=args.ray_cpus,
                          worker_cpus=1.0 if args.worker_cpus is None else args.worker_cpus)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    if not args.max_upload_mb > 0:
        raise OptionError(f"--max-upload-mb must be positive, got {args.max_upload_mb:g}")
    cluster = cluster_options(args)
    ice_servers = tuple(IceServer.parse(url) for url in args.ice_server)
    return ServeOptions(engine=engine_options(args, live=True), host=args.host, port=args.port, token=args.token,
                        max_sessions=args.max_sessions, max_upload_bytes=int(args.max_upload_mb * 2**20),
                        idle_timeout=args.idle_timeout, connect_timeout=args.connect_timeout,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, self_signed=args.self_signed,
                        allow_origins=tuple(args.allow_origin), insecure=args.insecure, tunnel=args.tunnel,
                        verbose=args.verbose, governor=governor_options(args), ice_servers=ice_servers,
                        cluster=cluster)


# -- animate ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnimateOptions:
    """`xportrait animate`: the first source is animated, the others are extra references.
    `ref_frame` None: the driving frame whose face is closest to the portrait's."""

    sources: tuple[str, ...]
    driving: str
    output: str
    engine: EngineOptions = field(default_factory=WarpOptions)
    ref_frame: int | None = None
    retargeting: Retargeting = NEUTRAL

    def __post_init__(self):
        if not self.sources:
            raise OptionError("animate needs at least one SOURCE portrait")
        if self.ref_frame is not None:
            at_least(self.ref_frame, 0, "ref_frame")


def animate_options(args: argparse.Namespace) -> AnimateOptions:
    return AnimateOptions(sources=tuple(args.sources), driving=args.driving, output=args.output,
                          engine=engine_options(args), ref_frame=args.ref_frame,
                          retargeting=retargeting_options(args))


# -- eval -------------------------------------------------------------------------------------------
EVAL_MAX_FRAMES = 5000  # frames are held in memory: about 4.6 GB at 640x480; cut longer clips


@dataclass(frozen=True)
class EvalOptions:
    """`xportrait eval`: how well `engine` follows `driving` (a video, or puppet:NAME).
    `frames` None: all of them (at most EVAL_MAX_FRAMES); `ref_frame` None: the closest to the portrait."""

    sources: tuple[str, ...]
    driving: str
    engine: EngineOptions = field(default_factory=WarpOptions)
    frames: int | None = None
    ref_frame: int | None = None
    json: str | None = None
    plot: str | None = None
    # With the live engine and a lossy option: the same stream without the lossy options at the
    # seed and at the next one too, and each figure's distance from the first against the seed's.
    judge: bool = False

    def __post_init__(self):
        if not self.sources:
            raise OptionError("eval needs at least one SOURCE portrait")
        if self.judge:
            live = getattr(self.engine, "live", None)
            if live is None:
                raise OptionError("--judge compares the live stream's options: give --stream too")
            if not (live.deep_levels or live.token_downsample > 1):
                raise OptionError("--judge judges a lossy option (--deep-levels, --reuse-controls, "
                                  "--token-downsample): give one")
        if self.frames is not None and not 1 <= self.frames <= EVAL_MAX_FRAMES:
            raise OptionError(f"--frames must lie in [1, {EVAL_MAX_FRAMES}], got {self.frames}")
        if self.ref_frame is not None:
            at_least(self.ref_frame, 0, "ref_frame")


def eval_options(args: argparse.Namespace) -> EvalOptions:
    if args.stream and args.engine == "warp":
        raise OptionError("--stream: only for --engine xportrait (the warp engine renders frame by frame already)")
    return EvalOptions(sources=tuple(args.sources), driving=args.driving,
                       engine=engine_options(args, live=args.stream),
                       frames=args.frames, ref_frame=args.ref_frame, json=args.json, plot=args.plot,
                       judge=args.judge)


# -- bench ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    """`xportrait bench`. `engine` is live (XPortraitOptions.live set) for `--stream`.
    `baseline_frames` None: each bench's default (5 for the warp engine, 8 for the stream)."""

    engine: EngineOptions = field(default_factory=WarpOptions)
    frames: int = 300
    warmup: int = 10
    source: str = "astronaut"
    driving: str | None = None
    baseline_frames: int | None = None
    json: bool = False
    fast_only: bool = False
    offline_steps: tuple[int, ...] = (4, 8)
    profile: str | None = None  # --stream: a folder for the tick's kernel profile
    paced_fps: float | None = None  # --stream: frames given as a camera at this rate gives them (None: back to back)

    def __post_init__(self):
        at_least(self.warmup, 0, "warmup")
        if self.paced_fps is not None:
            positive(self.paced_fps, "paced_fps")
        if self.frames <= self.warmup:
            raise OptionError(f"--frames must exceed --warmup, got {self.frames} and {self.warmup}")
        if self.baseline_frames is not None:
            at_least(self.baseline_frames, 0, "baseline_frames")
        if not self.offline_steps:
            raise OptionError("--offline-steps must name at least one step count")
        for steps in self.offline_steps:
            at_least(steps, 1, "offline_steps")

    @property
    def stream(self) -> bool:
        return isinstance(self.engine, XPortraitOptions) and self.engine.live is not None


def bench_options(args: argparse.Namespace) -> BenchOptions:
    if args.fast_only and not args.stream:
        raise OptionError("--fast-only is for --engine xportrait --stream")
    if args.profile and not args.stream:
        raise OptionError("--profile is for --engine xportrait --stream (the live tick)")
    if args.paced_fps is not None and not args.stream:
        raise OptionError("--paced-fps is for --engine xportrait --stream")
    if args.stream and args.engine != "xportrait":
        raise OptionError("--stream is for --engine xportrait (the warp engine always runs frame by frame)")
    try:
        offline_steps = tuple(int(n) for n in args.offline_steps.split(",") if n.strip())
    except ValueError:
        raise OptionError(f"--offline-steps must be step counts separated by commas, got {args.offline_steps!r}") from None
    return BenchOptions(engine=engine_options(args, live=args.stream), frames=args.frames, warmup=args.warmup,
                        source=args.source, driving=args.driving, baseline_frames=args.baseline_frames,
                        json=args.json, fast_only=args.fast_only, offline_steps=offline_steps,
                        profile=args.profile, paced_fps=args.paced_fps)


# -- export -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportOptions:
    """`xportrait export`: the live engine's modules as graphs, for `engine.size`, its LCM steps
    (`engine.stream_steps`) and temporal window (`engine.window`)."""

    to: str
    engine: XPortraitOptions
    compare: bool = False
    repeat: int = 5

    def __post_init__(self):
        at_least(self.repeat, 1, "repeat")


def export_options(args: argparse.Namespace) -> ExportOptions:
    engine = engine_options(args, live=True, engine="xportrait", window=args.window)
    if engine.live != LiveOptions():
        raise OptionError(f"{', '.join(_given(args, LIVE_FLAGS))}: not for export (the graphs are the torch modules)")
    return ExportOptions(to=args.to, engine=engine, compare=args.compare, repeat=args.repeat)


# -- client -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientOptions:
    """`xportrait client`: a video file played as a webcam to a running server."""

    input: str
    server: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    output: str | None = None
    mode: str = "animate"  # animate, echo, or both
    portrait: str | None = None
    token: str | None = None
    duration: float | None = None
    loop: bool = False
    connect_timeout: float = 15.0
    report: str | None = None

    def __post_init__(self):
        if self.mode not in ("animate", "echo", "both"):
            raise OptionError(f"--mode must be animate, echo or both, got {self.mode!r}")
        if self.duration is not None:
            positive(self.duration, "duration")
        if self.loop and self.duration is None:
            raise OptionError("--loop needs --duration")
        positive(self.connect_timeout, "connect_timeout")


def client_options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(**{f.name: getattr(args, f.name) for f in fields(ClientOptions)})


# -- cam --------------------------------------------------------------------------------------------
CAM_SWITCH = ("auto", "on", "off")
CAMERA_SIZE = (640, 480)
CAMERA_FPS = 30.0
HOLD_S = 2.0  # no new avatar frame for this long: the still portrait instead of the last frame
LOST_AFTER_S = 3.0  # remote: no avatar frame for this long means the connection is gone


@dataclass(frozen=True)
class CamOptions:
    """`xportrait cam`: the webcam animated into a virtual camera. `engine` runs here without
    `server` (its size is the outputs' either way). `virtual_camera` / `pipewire`: auto uses
    the output where this machine has it (and says how to get it otherwise), on fails without
    it, off leaves it out."""

    engine: EngineOptions = field(default_factory=WarpOptions)
    camera: str | None = None  # None: the first camera; an index, a device, a name, or a video file
    camera_size: tuple[int, int] = CAMERA_SIZE
    camera_fps: float = CAMERA_FPS
    loop: bool = False  # a video file as the camera starts over at its end
    portraits: tuple[str, ...] = ()  # bundled names or image files; (): the bundled ones (remote: the server's)
    server: str | None = None
    token: str | None = None
    mode: str = "animate"  # remote: echo has the server send the camera back as is (the transport's floor)
    connect_timeout: float = 15.0
    virtual_camera: str = "auto"
    virtual_camera_device: str | None = None  # pyvirtualcam's `device`, e.g. /dev/video10
    pipewire: str = "auto"
    name: str = "xportrait"  # the PipeWire source's name
    preview: bool = False
    record: str | None = None
    fps: float = 30.0  # the outputs' rate: a new frame goes out at once, the last one repeats at this rate
    hold: float = HOLD_S
    lost_after: float = LOST_AFTER_S
    duration: float | None = None
    report: str | None = None
    retargeting: Retargeting = NEUTRAL  # the controls' start values (keys change them)
    governor: GovernorOptions | None = None  # the local engine's (a server governs its own)

    def __post_init__(self):
        _positive_fields(self, ("camera_fps", "connect_timeout", "fps", "hold", "lost_after"))
        if self.governor is not None and self.server is not None:
            raise OptionError("--target-fps, --max-latency-ms: the engine runs on the server with --server "
                              "(give them to its serve)")
        if self.duration is not None:
            positive(self.duration, "duration")
        for name in ("virtual_camera", "pipewire"):
            if getattr(self, name) not in CAM_SWITCH:
                raise OptionError(f"{flag(name)} must be one of {', '.join(CAM_SWITCH)}, got {getattr(self, name)!r}")
        if min(self.camera_size) < 64:
            raise OptionError(f"--camera-size must be at least 64x64, got {self.camera_size[0]}x{self.camera_size[1]}")
        if self.server is not None:
            if urlsplit(self.server).scheme not in ("http", "https") or not urlsplit(self.server).hostname:
                raise OptionError(f"--server must be an http:// or https:// URL, got {self.server!r}")
            object.__setattr__(self, "server", self.server.rstrip("/"))
        if self.mode not in ("animate", "echo"):
            raise OptionError(f"--mode must be animate or echo, got {self.mode!r}")
        if self.mode == "echo" and self.server is None:
            raise OptionError("--mode echo needs --server: it measures the transport to a server and back")
        if self.token == "":
            object.__setattr__(self, "token", None)
        if not self.name or any(c in self.name for c in ", ="):
            raise OptionError(f"--name must be a plain name (no spaces, commas or '='), got {self.name!r}")

    @property
    def size(self) -> int:
        return self.engine.size


def cam_options(args: argparse.Namespace) -> CamOptions:
    if args.server:  # the engine is the server's: only --size (the outputs') applies here
        given = _given(args, XPORTRAIT_FLAGS + LIVE_FLAGS) + (["--engine"] if args.engine != "warp" else [])
        if given:
            raise OptionError(f"{', '.join(given)}: the engine runs on the server with --server (set it there)")
        engine = WarpOptions(size=args.size)
    else:
        engine = engine_options(args, live=True)
    return CamOptions(engine=engine, portraits=tuple(args.portrait), retargeting=retargeting_options(args),
                      governor=governor_options(args),
                      **{f.name: getattr(args, f.name) for f in fields(CamOptions)
                         if f.name not in ("engine", "portraits", "retargeting", "governor")})
