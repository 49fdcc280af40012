"""Every engine's options, typed and validated once, where they are built.

`create_engine` (engines/__init__.py) takes one of these: `WarpOptions`, or `XPortraitOptions`,
offline or, with `live=LiveOptions(...)`, the live streaming engine. The command line builds
them from its flags once (streamer/options.py); code builds them directly. Each rule and each
default is written here and nowhere else; a broken rule raises `OptionError`, whose message
names the option as the command line spells it (`--lcm-lora` for `lcm_lora`).

No torch here: `xportrait serve --engine warp` imports this module and never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

ENGINES = ("warp", "xportrait")
BACKENDS = ("torch", "onnx", "tensorrt")
SAMPLERS = ("ddim", "lcm")
MODEL_SIZES = ("sd15", "tiny")
DTYPES = ("fp16", "bf16", "fp32")

DEFAULT_SIZE = 512
DEFAULT_SEED = 999  # the released code's
RELEASED_STEPS = 30  # the released sampler: DDIM "30 steps" (ldm's uniform timesteps: 31 evaluations)
RELEASED_GUIDANCE = 5.0  # and its classifier-free guidance
LCM_STEPS = 4  # LCM sampling with an LCM-LoRA, offline
LIVE_STEPS = LCM_STEPS  # LCM steps of the live engine (= frames in flight), and of the exported graphs
DEFAULT_WINDOW = 16  # temporal window: the released modules are trained on 16 frames
TICKS_PER_FRAME = (1, 2, "auto")  # the live engine's stream ticks per camera frame
TOKEN_DOWNSAMPLE = (1, 2, 4)  # the side of the blocks of tokens the live engine's --token-downsample averages


class OptionError(ValueError):
    """An option that breaks a rule; the message names the option (as its flag) and the rule."""


def flag(name: str) -> str:
    """The command-line spelling of an option: lcm_lora -> --lcm-lora."""
    return "--" + name.replace("_", "-")


SIZE_RULE = "a multiple of 8 and at least 64"  # every square size: the VAE's factor, the mesh's minimum


def valid_size(size) -> bool:
    return isinstance(size, int) and size >= 64 and size % 8 == 0


def check_size(size: int, name: str = "size") -> int:
    if not valid_size(size):
        raise OptionError(f"{flag(name)} must be {SIZE_RULE}, got {size}")
    return size


def at_least(value, minimum, name: str):
    """`value` >= `minimum`, or an OptionError naming the option."""
    if value < minimum:
        raise OptionError(f"{flag(name)} must be at least {minimum}, got {value}")
    return value


def positive(value, name: str):
    if not value > 0:
        raise OptionError(f"{flag(name)} must be positive, got {value}")
    return value


def one_of(value, choices: tuple, name: str):
    if value not in choices:
        raise OptionError(f"{flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


@dataclass(frozen=True)
class WarpOptions:
    """The weight-free warp engine."""

    name: ClassVar[str] = "warp"
    size: int = DEFAULT_SIZE  # square output resolution
    grid: int | None = None  # the warp map's grid (default: the full size; coarser is cheaper)

    def __post_init__(self):
        check_size(self.size)
        if self.grid is not None:
            at_least(self.grid, 2, "grid")


@dataclass(frozen=True)
class LiveOptions:
    """What only the live (streaming) diffusion engine takes."""

    lookahead: int = 0  # each frame also attends to the next K frames in flight (K frames later)
    compile: bool = False  # torch.compile the tick before capturing its CUDA graph
    # With compile: inductor times its Triton templates against cuBLAS for each of the tick's
    # matrix products and keeps the fastest (max_autotune_gemm): much longer the first time,
    # cached after in inductor's cache directory.
    autotune: bool = False
    cuda_graph: bool = True  # replay the tick as one CUDA graph (on a GPU, with the torch backend)
    tiny_decoder: str | None = None  # TAESD folder ('random' with random weights) instead of the full VAE
    channels_last: bool = True  # cuDNN's layout on a GPU
    backend: str = "torch"  # or the graphs `xportrait export` wrote, run by onnx / tensorrt
    graphs: str | None = None  # the exported graphs' folder, for backend onnx / tensorrt
    # Ticks of the stream batch per camera frame: 1; 2 (the extra tick enters the same frame
    # again, so a frame leaves after S ticks of GPU time, not S camera intervals); or "auto":
    # a second tick whenever the last tick's measured time fits in what is left of the interval.
    ticks_per_frame: int | str = 1
    # Level groups G: each tick steps the S levels in G passes of S / G frames in flight, so a
    # frame leaves S / G - 1 camera intervals plus G passes after it came in, with the frames
    # of G = 1 exactly (the passes must fit in a frame interval). The quality ladder has each
    # step count in the most groups G' <= G that divide it, then in one pass.
    level_groups: int = 1
    # Deep features reused (lossy; judge it with real weights): only these levels walk the whole
    # UNet and ControlNets; at the others a frame walks their first and last levels, on the deep
    # features of its last listed level (DeepCache's idea across a frame's LCM steps). Empty: all.
    deep_levels: tuple[int, ...] = ()
    # With deep levels, on a GPU: where a pass's deep entries and reused entries are each one run
    # (e.g. --deep-levels 0), the reused ones walk their first and last levels on a stream of their
    # own while the deep ones walk theirs and the deep levels; the same frames. False: every entry
    # in one batch (the bench's baseline for it).
    reused_beside: bool = True
    # With deep levels, lossy too: the ControlNets walk only at the deep levels; at the others a
    # frame's UNet takes the ControlNets' first-level residuals of its last deep level (encoder
    # propagation, as Faster Diffusion reuses a ControlNet's features across steps).
    reuse_controls: bool = False
    # Lossy, at any levels: the reference attention at the latents' size takes keys and values of
    # averaged blocks of this side of tokens, the UNet's own and the reference's (ToDo's token
    # downsampling); the queries stay whole. 1: every token.
    token_downsample: int = 1

    def __post_init__(self):
        at_least(self.lookahead, 0, "lookahead")
        if self.deep_levels:
            levels = self.deep_levels
            if list(levels) != sorted(set(levels)) or levels[0] != 0:
                raise OptionError(f"--deep-levels: increasing levels from 0 (e.g. 0 or 0,2), "
                                  f"got {','.join(map(str, levels))}")
            if self.lookahead or self.backend != "torch":
                raise OptionError("--deep-levels works with the torch backend without --lookahead (look-ahead "
                                  "entries wait at level 0; the exported graphs are whole walks)")
        if self.reuse_controls and not self.deep_levels:
            raise OptionError("--reuse-controls reuses the ControlNets' residuals of a frame's last deep level: "
                              "give --deep-levels too")
        one_of(self.ticks_per_frame, TICKS_PER_FRAME, "ticks_per_frame")
        at_least(self.level_groups, 1, "level_groups")
        one_of(self.token_downsample, TOKEN_DOWNSAMPLE, "token_downsample")
        if self.token_downsample != 1 and self.backend != "torch":
            raise OptionError("--token-downsample works with the torch backend (the exported graphs attend over "
                              "every token)")
        if self.autotune and not self.compile:
            raise OptionError("--autotune tunes the compiled tick: give --compile too")
        if self.level_groups > 1:
            if self.lookahead:
                raise OptionError("--level-groups and --lookahead do not combine (look-ahead entries wait at level 0)")
            if self.ticks_per_frame != 1:
                raise OptionError("--level-groups and --ticks-per-frame do not combine: the passes already step "
                                  "each frame G levels a camera frame")
        one_of(self.backend, BACKENDS, "backend")
        if self.backend != "torch":
            if not self.graphs:
                raise OptionError(f"--backend {self.backend} needs --graphs DIR (written by `xportrait export`)")
            if self.lookahead:
                raise OptionError("--lookahead works with the torch backend only (the exported graphs attend causally)")
            if self.tiny_decoder is not None:
                raise OptionError("--tiny-decoder works with the torch backend only (no small-decoder graph)")
        elif self.graphs:
            raise OptionError("--graphs is for --backend onnx or tensorrt")


@dataclass(frozen=True)
class XPortraitOptions:
    """The X-Portrait diffusion engine: offline (the whole clip at once, `live` None) or live
    (frame by frame, a few frames late: `live` set)."""

    name: ClassVar[str] = "xportrait"
    size: int = DEFAULT_SIZE
    # Weights: the released checkpoint on Stable Diffusion 1.5 (and an LCM-LoRA), or random ones.
    base: str | None = None
    checkpoint: str | None = None
    lcm_lora: str | None = None
    random_weights: bool = False
    model_size: str = "sd15"  # "tiny": the same architecture a few channels wide
    allow_hub: bool = False  # base/checkpoint/lcm_lora may name Hugging Face hub ids
    trust_checkpoint: bool = False  # unpickle torch files fully (Python objects besides tensors)
    # Sampling. None: the sampler's default (offline: the released DDIM, 30 steps, guidance 5,
    # or LCM with an LCM-LoRA, 4 steps, no guidance; live: LCM, LIVE_STEPS, no guidance).
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = DEFAULT_SEED
    window: int = DEFAULT_WINDOW  # temporal window (frames)
    # The offline engine's windows: overlap, start offsets, one noise image for every frame.
    overlap: int = 4
    offsets: str = "random"
    shared_noise: bool = False
    # Where it runs: a torch device (auto: cuda if present) and dtype (None: fp16 on a GPU, fp32 on a CPU).
    device: str = "auto"
    dtype: str | None = None
    live: LiveOptions | None = None

    def __post_init__(self):
        check_size(self.size)
        one_of(self.model_size, MODEL_SIZES, "model_size")
        if self.sampler is not None:
            one_of(self.sampler, SAMPLERS, "sampler")
        if self.dtype is not None:
            one_of(self.dtype, DTYPES, "dtype")
        if self.steps is not None:
            at_least(self.steps, 1, "steps")
        at_least(self.window, 1, "window")
        if not self.device:
            raise OptionError("--device must name a torch device (auto, cpu, cuda, cuda:1)")
        graphs = self.live is not None and self.live.backend != "torch"
        if not (self.random_weights or self.checkpoint is not None or graphs):
            raise OptionError("the xportrait engine needs --checkpoint (the released model_state-*.th) and --base "
                              "(Stable Diffusion 1.5), or --random-weights to measure cost without weights")
        if self.live is not None:
            if self.sampler not in (None, "lcm") or self.guidance not in (None, 1.0):
                raise OptionError("the live xportrait engine samples with LCM and no guidance "
                                  "(--sampler lcm, --guidance 1)")
            if (self.overlap, self.offsets, self.shared_noise) != (4, "random", False):
                raise OptionError("overlap, offsets and shared_noise are the offline engine's windows")
            if self.live.tiny_decoder == "random" and not self.random_weights:
                raise OptionError("--tiny-decoder random is only for --random-weights")
            if self.live.deep_levels and self.live.deep_levels[-1] >= self.stream_steps:
                raise OptionError(f"--deep-levels: levels below --steps ({self.stream_steps}), "
                                  f"got {','.join(map(str, self.live.deep_levels))}")
            if self.stream_steps % self.live.level_groups:
                raise OptionError(f"--level-groups must divide --steps ({self.stream_steps} steps in "
                                  f"{self.live.level_groups} groups)")

    @property
    def stream_steps(self) -> int:
        """The live engine's LCM steps (frames in flight)."""
        return LIVE_STEPS if self.steps is None else self.steps

    @property
    def weights(self) -> dict:
        """What `load_model` takes to find the weights."""
        return dict(base=self.base, checkpoint=self.checkpoint, lcm_lora=self.lcm_lora,
                    random_weights=self.random_weights, seed=self.seed, allow_hub=self.allow_hub,
                    trust_checkpoint=self.trust_checkpoint)


EngineOptions = Union[WarpOptions, XPortraitOptions]
