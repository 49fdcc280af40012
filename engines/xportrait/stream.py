"""Streaming X-Portrait: few-step LCM denoising of a live frame sequence, a stream batch.

With S LCM steps (timesteps t_0 > ... > t_{S-1}), S frames are in flight at once, frame i at
level k having entered k ticks ago. Each tick one UNet call on the batch of S denoises every
frame in flight by one level: the new driving frame enters at t_0 (its latent: the source
latent forward-diffused with fixed noise), the oldest leaves clean and only it is decoded.
A frame is out S - 1 ticks after it came in. A tick may also enter the last frame again
(`tick_again`): with two ticks per camera frame a frame is out after S ticks of GPU time
rather than S - 1 camera intervals, and the stream is the causal one over the clip with each
frame entered twice.

Level groups G (`StreamSettings.level_groups`, S a multiple of G): a tick steps the levels in
G passes, pass g on the S / G frames in flight at levels g, g + G, ...: the frame that entered
steps through levels 0..G-1 in the tick it entered, so a frame is out S / G - 1 ticks after it
came in, plus G passes of GPU time. Every level's frames are the ones G = 1 has there, in the
same order: the frames are exactly the same, the work is in batches of S / G instead of S.

Temporal attention is causal: at level k a frame attends over the last W - 1 frames' keys
and values *at level k* (one cache per level), recorded when those frames were there.
Reference keys/values depend only on the source and the timestep: one set per level,
computed at prepare.

Deep features reused (`StreamSettings.deep_levels`, DeepCache's idea across a frame's LCM
steps): at a level not listed, a frame walks only the UNet's first and last levels (at the
latents' size) and the ControlNets' first, and the last up level starts from the deep features
(what the deeper levels handed it) of that frame's last listed level, instead of walking the
deeper levels again. Lossy, behind an option: with random weights its error says nothing of
a trained model's. The deep levels' temporal modules then see only the listed levels. On a
GPU, where a pass's deep entries and reused entries are each one run (`--deep-levels 0`: the
first entry, the rest), the reused ones walk their first and last levels on a stream of their
own while the deep ones walk theirs and the deep levels (a batch of one or two there leaves most
of the GPU idle). With `reuse_controls` too, the ControlNets walk only at the listed levels: at
the others the UNet's first level takes the frame's ControlNet residuals (summed) from its last
listed level, which move down the levels with it as its deep features do.

`render_causal` computes the same frames the plain way, frame after frame and step after
step: the offline definition the streaming engine is tested against.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from diffusers import LCMScheduler
from torch.profiler import record_function

from ..options import DEFAULT_SEED, DEFAULT_WINDOW, LIVE_STEPS, at_least
from .config import XPortraitConfig
from .model import LevelTimes, XPortraitModel, add_residuals
from .reference import ReferenceKV, reference_rows
from .temporal import FramesKV, RingTick, TemporalPast, TemporalRing

# CUDA stream priority of the captured tick's main path (lower is sooner; the ControlNets' side
# streams keep the default, 0, the lowest). On the H200 (split tick, 2 passes): compiled 33.25 ms
# a replay against 33.6 at 0; uncompiled 46.05 against 47.14, and 48.34 with the side streams
# first (BENCHMARKS.md).
MAIN_PRIORITY = -1
_ONE_CAPTURE = threading.Lock()  # CUDA graph captures in this process, one at a time (StreamingDenoiser.capture)


@runtime_checkable
class DenoiserModel(Protocol):
    """What the StreamingDenoiser runs: met by the torch `XPortraitModel` and by exported
    graphs (`export.graph_model.GraphModel`). Tensors in and out are on the denoiser's device."""

    config: XPortraitConfig

    @property
    def temporal_shapes(self) -> list[tuple[int, int, int]]:
        """(latent pixels, channels, heads) of every temporal module, in call order."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, h, w)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (N, 3, H, W) in [-1, 1]."""

    def reference_features(self, source_latents: Sequence[torch.Tensor], timestep: torch.Tensor,
                           token_downsample: int = 1) -> ReferenceKV:
        """Every reference's keys and values at `timestep`, sources joined along the tokens
        (`token_downsample` > 1: of averaged blocks at the latents' size, reference.py)."""

    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, frames: int, reference: ReferenceKV,
                      pose_hint: torch.Tensor, local_hint: torch.Tensor, guidance: float = 1.0,
                      temporal_past=None) -> torch.Tensor:
        """The noise in `sample`; `temporal_past`: the stream's TemporalRings, into which the
        current frames' keys and values are written at the tick's slot."""


@runtime_checkable
class SplitDenoiserModel(DenoiserModel, Protocol):
    """A DenoiserModel in parts, for the split tick (the ControlNets beside the UNet's down path)."""

    hint_embedding_channels: int  # of the hint embeddings, at the latents' size

    def level_times(self, timesteps: torch.Tensor) -> LevelTimes:
        """Every resnet's time projection for these timesteps: the same at every tick."""

    def embed_pose_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The pose ControlNet's embedding of its hint: the same at every level of a frame."""

    def embed_local_hint(self, hint: torch.Tensor) -> torch.Tensor: ...

    def pose_control(self, sample: torch.Tensor, times: LevelTimes,
                     hint_embedding: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def local_control(self, sample: torch.Tensor, times: LevelTimes,
                      hint_embedding: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def unet_down(self, sample: torch.Tensor, times: LevelTimes, reference: ReferenceKV,
                  temporal_past) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def unet_up(self, h: torch.Tensor, skips: list[torch.Tensor], times: LevelTimes, reference: ReferenceKV,
                down_residuals: list[torch.Tensor], mid_residual: torch.Tensor, temporal_past) -> torch.Tensor: ...


@runtime_checkable
class ReusingDenoiserModel(SplitDenoiserModel, Protocol):
    """A SplitDenoiserModel whose parts split again at the first level, for deep levels
    (`StreamSettings.deep_levels`: the torch `XPortraitModel`)."""

    deep_feature_shape: tuple[int, int, int]  # (C, h, w) of what the last up level starts from
    first_level_shape: tuple[int, int, int]  # (C, h, w) of each first-level skip
    deep_temporal_modules: list[bool]  # per temporal module (call order): one of the deep levels'?
    first_level_skips: int  # how many of the down residuals are the first level's

    def control_in(self, which: str, sample: torch.Tensor, times: LevelTimes,
                   hint_embedding: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def control_deep(self, which: str, h: torch.Tensor,
                     times: LevelTimes) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def unet_in(self, sample: torch.Tensor, times: LevelTimes, reference: ReferenceKV,
                temporal_past) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def unet_deep_down(self, h: torch.Tensor, times: LevelTimes, reference: ReferenceKV,
                       temporal_past) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def unet_deep_up(self, h: torch.Tensor, skips: list[torch.Tensor], times: LevelTimes, reference: ReferenceKV,
                     down_residuals: list[torch.Tensor], mid_residual: torch.Tensor, temporal_past) -> torch.Tensor: ...

    def unet_out(self, deep: torch.Tensor, skips: list[torch.Tensor], times: LevelTimes, reference: ReferenceKV,
                 down_residuals: list[torch.Tensor], temporal_past) -> torch.Tensor: ...


@dataclass(frozen=True)
class StreamSettings:
    steps: int = LIVE_STEPS  # LCM steps = frames in flight
    window: int = DEFAULT_WINDOW  # temporal window: the current frame and W - 1 before it
    seed: int = DEFAULT_SEED
    lookahead: int = 0  # K newer frames each frame also attends to, for K more frames of latency
    level_groups: int = 1  # G passes a tick, each on S / G frames in flight (see the module's docstring)
    # The levels that walk the whole UNet (and ControlNets); at the others a frame walks only their
    # first and last levels, on the deep features its last full level left (see the module's
    # docstring). Empty: every level walks it all (the plain stream).
    deep_levels: tuple[int, ...] = ()
    # With deep levels: the ControlNets walk only at them too; at the others a frame's UNet takes
    # the ControlNets' first-level residuals (summed) of its last deep level (encoder propagation).
    reuse_controls: bool = False
    # Lossy too, at any levels: the reference attention at the latents' size takes keys and values
    # of averaged blocks of this side of tokens, its own and the reference's (reference.py; ToDo).
    token_downsample: int = 1

    def validate(self, max_len: int) -> None:
        """The bounds a model with `max_len` temporal positions sets (XPortraitOptions checks
        the rest where the options are made)."""
        at_least(self.steps, 1, "steps")
        if not 1 <= self.window <= max_len:
            raise ValueError(f"--window must be in [1, {max_len}] (the temporal modules' positions), "
                             f"got {self.window}")
        if self.lookahead < 0 or self.window + self.lookahead > max_len:
            raise ValueError(f"--lookahead must be in [0, {max_len - self.window}] with a window of {self.window} "
                             f"(window + look-ahead <= {max_len}, the temporal modules' positions), "
                             f"got {self.lookahead}")
        at_least(self.level_groups, 1, "level_groups")
        at_least(self.token_downsample, 1, "token_downsample")
        if self.steps % self.level_groups:
            raise ValueError(f"--level-groups must divide --steps ({self.steps} steps in {self.level_groups} groups)")
        if self.level_groups > 1 and self.lookahead:
            raise ValueError("--level-groups and --lookahead do not combine (look-ahead entries wait at level 0)")
        if self.deep_levels:
            levels = self.deep_levels
            if list(levels) != sorted(set(levels)) or levels[0] != 0 or levels[-1] >= self.steps:
                raise ValueError(f"--deep-levels must be increasing levels from 0, each below --steps ({self.steps}), "
                                 f"got {','.join(map(str, levels))}")
            if self.lookahead:
                raise ValueError("--deep-levels and --lookahead do not combine (look-ahead entries wait at level 0)")
        elif self.reuse_controls:
            raise ValueError("--reuse-controls reuses the ControlNets' residuals of a frame's last deep level: "
                             "give --deep-levels too")


class LCMLevels:
    """The LCM step at each level, as per-level coefficients (so a batch of frames at
    different levels steps at once), with fixed noise per level shared by all frames."""

    def __init__(self, model: XPortraitModel, settings: StreamSettings, device, dtype):
        config = model.config
        scheduler = LCMScheduler(num_train_timesteps=config.train_timesteps, beta_start=config.beta_start,
                                 beta_end=config.beta_end, beta_schedule="scaled_linear", prediction_type="epsilon",
                                 set_alpha_to_one=True, timestep_spacing="leading")
        scheduler.set_timesteps(settings.steps)
        t = scheduler.timesteps
        self.timesteps = t.to(device)
        a = scheduler.alphas_cumprod[t].double()
        skip, out = zip(*(scheduler.get_scalings_for_boundary_condition_discrete(int(x)) for x in t))
        a_next = torch.cat([a[1:], torch.ones(1, dtype=a.dtype)])  # the last level re-noises nothing
        shape = (-1, 1, 1, 1)
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float64).view(shape).to(device, dtype)
        self.sqrt_a, self.sqrt_b = as_tensor(a.sqrt()), as_tensor((1 - a).sqrt())
        self.c_skip, self.c_out = as_tensor(skip), as_tensor(out)
        self.next_sqrt_a, self.next_sqrt_b = as_tensor(a_next.sqrt()), as_tensor((1 - a_next).sqrt())
        self.steps = len(t)
        latent = (4, config.latent_size, config.latent_size)
        generator = torch.Generator().manual_seed(settings.seed)
        # noise[0] seeds each entering frame, noise[k] re-noises into level k: fixed across frames
        # (no flicker from noise alone).
        self.noise = torch.randn((self.steps, *latent), generator=generator).to(device, dtype)

    def enter(self, source_latent: torch.Tensor) -> torch.Tensor:
        return self.sqrt_a[0] * source_latent + self.sqrt_b[0] * self.noise[0]

    def denoise(self, x: torch.Tensor, eps: torch.Tensor, levels: slice) -> torch.Tensor:
        """The LCM estimate of the clean latent, for frames at `levels` (a slice of the levels,
        strided for a level group)."""
        x0 = (x - self.sqrt_b[levels] * eps) / self.sqrt_a[levels]
        return self.c_out[levels] * x0 + self.c_skip[levels] * x

    def renoise(self, clean: torch.Tensor, levels: slice) -> torch.Tensor:
        """Into the next level: frames that were at `levels`."""
        noise = self.noise[levels.start + 1 : (levels.stop or self.steps) + 1 : levels.step]
        return self.next_sqrt_a[levels] * clean + self.next_sqrt_b[levels] * noise


def control_hints(frames: torch.Tensor, boxes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ControlNets' inputs from aligned driving frames, on the frames' device.

    frames: uint8 RGB (N, H, W, 3); boxes: (N, 3, 4) x0, y0, x1, y1 of the eye and mouth
    patches (engines.face.local_patch_boxes). Returns the pose hint (the frame) and the
    local hint (the patches, -1 elsewhere: black, as in the released code), (N, 3, H, W)
    in [-1, 1]. On the device, so the live tick's graph builds them from the raw frame.
    """
    pose = frames.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
    h, w = frames.shape[1:3]
    ys = torch.arange(h, device=frames.device)[None, None, :, None]
    xs = torch.arange(w, device=frames.device)[None, None, None, :]
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # (N, 3, 1, 1)
    inside = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).any(dim=1)  # (N, H, W)
    return pose, torch.where(inside[:, None], pose, torch.full_like(pose, -1.0))


def reference_per_level(model: XPortraitModel, source_latents: list[torch.Tensor], timesteps: torch.Tensor,
                        token_downsample: int = 1) -> ReferenceKV:
    """Every level's reference keys/values, stacked along the batch: (levels, tokens, C)."""
    per_level = [model.reference_features(source_latents, t, token_downsample) for t in timesteps]
    return {name: kv._replace(key=torch.cat([r[name].key for r in per_level]),
                              value=torch.cat([r[name].value for r in per_level]))
            for name, kv in per_level[0].items()}


def _causal_past(recent: list[list[tuple[FramesKV, FramesKV]]], modules: Sequence[int] | None = None):
    """The temporal pasts (TemporalPast per module) of the frames in `recent` ([frame][module]
    keys, oldest first), for `modules` (indices, default all); None without frames."""
    if not recent:
        return None
    return [TemporalPast(tuple(FramesKV(torch.cat([frame[m][j].key for frame in recent], dim=1),
                                        torch.cat([frame[m][j].value for frame in recent], dim=1))
                               for j in range(2)))
            for m in (range(len(recent[0])) if modules is None else modules)]


@torch.no_grad()
def render_causal(model: XPortraitModel, settings: StreamSettings, sources: torch.Tensor, driving: torch.Tensor,
                  local: torch.Tensor) -> torch.Tensor:
    """Offline, causal: frame by frame, each through every LCM step, attending at each step
    over the previous W - 1 frames at that step. Returns clean latents (N, 4, h, w)."""
    levels = LCMLevels(model, settings, sources.device, sources.dtype)
    latents = model.encode(sources)
    source_latents = [z[None] for z in latents]
    references = [model.reference_features(source_latents, t, settings.token_downsample) for t in levels.timesteps]
    history: list[list[list[tuple[FramesKV, FramesKV]]]] = [[] for _ in range(levels.steps)]  # [level][frame][module]
    out = []
    for f in range(driving.shape[0]):
        x = levels.enter(latents[:1])
        deep = controls = None  # the frame's deep features (and controls), from its last deep level
        for level, t in enumerate(levels.timesteps):
            past = _causal_past(history[level][-(settings.window - 1):] if settings.window > 1 else [])
            if settings.deep_levels:
                at_deep = level in settings.deep_levels
                eps, keys, deep, firsts = model.predict_noise_reusing(
                    x, t, references[level], driving[f : f + 1], local[f : f + 1], past, None if at_deep else deep,
                    None if at_deep or not settings.reuse_controls else controls)
                controls = firsts if at_deep else controls
            else:
                eps, keys = model.predict_noise_with_keys(x, t, 1, references[level], driving[f : f + 1],
                                                          local[f : f + 1], temporal_past=past)
            history[level].append(keys)
            clean = levels.denoise(x, eps, slice(level, level + 1))
            x = levels.renoise(clean, slice(level, level + 1)) if level < levels.steps - 1 else clean
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def lossy_noise_error(model: XPortraitModel, settings: StreamSettings, sources: torch.Tensor, driving: torch.Tensor,
                      local: torch.Tensor) -> list[float]:
    """What the lossy options (`settings.deep_levels`, `reuse_controls`, `token_downsample`) do
    to the predicted noise: along the plain causal frames (`render_causal` with every level
    walked whole over every token), the noise the options predict at each level from the same
    input and temporal past against the plain walk's: at a level not listed, on the frame's
    deep features (and, with `reuse_controls`, its ControlNets' first-level residuals) from its
    last listed level, which the options walked there. Per level, ||lossy - plain|| / ||plain||
    over the frames (0 where no option changes the walk)."""
    levels = LCMLevels(model, settings, sources.device, sources.dtype)
    latents = [z[None] for z in model.encode(sources)]
    plain = [model.reference_features(latents, t) for t in levels.timesteps]
    lossy = plain if settings.token_downsample == 1 else \
        [model.reference_features(latents, t, settings.token_downsample) for t in levels.timesteps]
    first, _, _, last = model.unet.module_parts()
    outer = [*range(first.start, first.stop), *range(last.start, last.stop)]  # the reused walk's modules
    history: list[list] = [[] for _ in range(levels.steps)]
    squared = torch.zeros((2, levels.steps), dtype=torch.float64)  # [error, plain] per level
    for f in range(driving.shape[0]):
        x = levels.enter(latents[0])
        for level, t in enumerate(levels.timesteps):
            recent = history[level][-(settings.window - 1):] if settings.window > 1 else []
            hints = (driving[f : f + 1], local[f : f + 1])
            eps, keys, deep, controls = model.predict_noise_reusing(x, t, plain[level], *hints, _causal_past(recent))
            at_deep = not settings.deep_levels or level in settings.deep_levels
            changed = not at_deep or lossy is not plain  # does an option change this level's walk?
            if at_deep:
                if changed:  # the walk is whole, the attention's tokens are not
                    approx, _, deep, controls = model.predict_noise_reusing(x, t, lossy[level], *hints,
                                                                            _causal_past(recent))
                held = deep, controls  # what the frame's reused levels start from
            else:
                approx = model.predict_noise_reusing(x, t, lossy[level], *hints, _causal_past(recent, outer), held[0],
                                                     held[1] if settings.reuse_controls else None)[0]
            if changed:
                squared[0, level] += (approx - eps).double().square().sum().cpu()
                squared[1, level] += eps.double().square().sum().cpu()
            history[level].append(keys)
            clean = levels.denoise(x, eps, slice(level, level + 1))
            x = levels.renoise(clean, slice(level, level + 1)) if level < levels.steps - 1 else clean
    return (squared[0] / squared[1].clamp(min=1e-30)).sqrt().tolist()


def update_ring_tick(tick: RingTick, valid: torch.Tensor, occupied: torch.Tensor, ring_index: torch.Tensor,
                     newer: torch.Tensor, has_newer: torch.Tensor) -> None:
    """This tick's slot (`tick.slot`) joins each entry's window (real if a frame is at that
    entry: `occupied`) and the slot written W ticks ago drops out (`valid`: entries x W, kept
    across ticks); positions follow the frames' ages; with look-ahead, `newer[e, o]` is the
    entry that holds entry e's o-th newer frame (`has_newer`: whether there is one). Once a
    tick, in place: every temporal module (in either half of a split tick) reads the result."""
    slot, w = tick.slot, valid.shape[1]
    valid.index_copy_(1, slot, occupied[:, None])
    tick.mask.copy_(valid.index_fill(1, slot, True))  # a level's current frame attends to itself
    age = (slot - ring_index) % w  # 0 for the current slot
    older = age[None, :] > age[:, None]  # [j, i]: slot i holds an older frame than slot j
    tick.positions.copy_((tick.mask[:, None, :] & older[None]).sum(dim=-1))
    if tick.ahead is not None:
        tick.ahead.copy_(has_newer & occupied[newer])


@dataclass
class LevelGroup:
    """One pass of a tick (level group g of G): a batch entry per frame in flight, the newest
    first, at levels g, g + G, ... (after the look-ahead entries, which wait at level 0), with
    those levels' latents, timesteps, reference features and temporal rings (a level's ring
    holds the frames that were at that level)."""

    levels: slice  # into LCMLevels' per-level tensors
    entry_levels: torch.Tensor  # each entry's level
    timesteps: torch.Tensor
    x: torch.Tensor  # (entries, 4, h, w)
    rings: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # per temporal module: K1, V1, K2, V2
    times: LevelTimes | None = None  # the split tick's: every resnet's time projection at these levels
    reference: ReferenceKV | None = None  # set by prepare
    deep: "DeepRows | None" = None  # with deep levels: this pass's entries at them


@dataclass
class DeepRows:
    """A pass's entries at deep levels (`StreamSettings.deep_levels`; maybe none), with what
    they walk the deep levels with: their time projections, reference features and rows of
    the tick's ring view (the deep modules' rings hold only these entries)."""

    rows: torch.Tensor  # entry indices, long
    count: int
    times: LevelTimes | None  # None without rows
    tick: RingTick
    reference: ReferenceKV | None = None  # set by prepare
    # With the reused entries beside the deep walk: (the deep entries', the reused entries') rows,
    # each one run of the pass's entries; None: all entries walk the first level at once, the deep
    # ones the deep levels, then all the last level (one batch).
    runs: tuple[slice, slice] | None = None


def _run(rows: list[int]) -> slice | None:
    """`rows` as a slice, where they are one run of consecutive entries."""
    return slice(rows[0], rows[-1] + 1) if rows and rows == list(range(rows[0], rows[-1] + 1)) else None


def _times_of(t: LevelTimes, run: slice) -> LevelTimes:
    """A run of entries' rows of a pass's time projections (views)."""
    return LevelTimes([p[run] for p in t.unet_down], [p[run] for p in t.unet_up], [p[run] for p in t.pose],
                      [p[run] for p in t.local])


@dataclass(frozen=True)
class SplitParts:
    """The split tick's parts, as `_advance_split` calls them: each may be compiled on its own (one
    compiled part serves every pass: a pass's tensors are its arguments)."""

    enter: Callable
    controls: list[tuple[Callable, Callable]]  # per ControlNet: (hint embedding, residuals)
    down: Callable
    up: Callable
    finish: Callable
    # A pass whose reused entries walk beside its deep entries (`DeepRows.runs`), on row runs:
    controls_beside: list[tuple[Callable, Callable, Callable]]  # per ControlNet: embedding, first level, deeper
    in_rows: Callable
    deeper_down: Callable
    deep_up: Callable
    out_rows: Callable


def _named(name: str, part: Callable) -> Callable:
    """`part` inside a profiler range named after it ("part: NAME", and the number of entries
    where its first argument is a run of them), so that a profile of the tick sums its kernels
    and FLOP by part (streamer/tickprofile.py). Host-side only: a replayed graph runs none of it."""
    def named(*args, **kwargs):
        run = args[0] if args and isinstance(args[0], slice) else None
        label = f"part: {name}" if run is None else f"part: {name} ({run.stop - run.start} of the entries)"
        with record_function(label):
            return part(*args, **kwargs)
    return named


def _beside(side: torch.cuda.Stream | None):
    """Run on `side` after what the current stream has queued (None: right here)."""
    if side is None:
        return contextlib.nullcontext()
    side.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(side)


def _wait(stream: torch.cuda.Stream | None, events: Sequence[torch.cuda.Event | None]) -> None:
    """`stream` waits for `events` (None, without a GPU: the work ran in order)."""
    for event in events:
        if event is not None:
            stream.wait_event(event)


def _mark(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event after what `stream` has queued so far (None: no stream, nothing to wait for)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


class StreamingDenoiser:
    """The stream batch and its caches. `tick` takes one aligned driving frame (uint8) and its
    eye/mouth patch boxes and returns the clean latent of the frame that leaves (with its
    tag), or None while the batch fills.

    Look-ahead K (`settings.lookahead`): K more batch entries in front of the levels hold the
    K newest frames at the first timestep, not yet stepped (every frame enters with the same
    latent, so they are exactly what level 0 will see). Each entry attends over its own ring
    and the K entries before it: the next K frames as they are now, one level noisier each, as
    in FIFO-Diffusion's diagonal denoising. A frame leaves S - 1 + K ticks after it entered;
    each tick costs (S + K) / S as much.

    Level groups G (`settings.level_groups`): each tick runs G passes (`groups`), one per
    LevelGroup, each on the S / G frames in flight; pass g's clean estimates are re-noised into
    pass g + 1's latents, the last pass's into the first's (one level on), and the last pass's
    oldest frame leaves. A frame leaves S / G - 1 ticks after it entered.

    Every tensor the per-tick work touches is allocated once (prepare, or the first tick)
    and then updated in place, so the whole tick can be captured as one CUDA graph
    (`capture()`): the host then only copies the new frame in and launches the graph.
    """

    def __init__(self, model: DenoiserModel, settings: StreamSettings, device, dtype, *,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 overlay: tuple[torch.Tensor, torch.Tensor] | None = None, split: bool = False,
                 reused_beside: bool | None = None):
        """`decode`: scaled latents -> images in [-1, 1] (e.g. `model.decode`, or TAESD's): the
        leaving frame is decoded inside the tick (and its graph) into `image`; None: latents only.
        `overlay`: (mask (res, res, 1) bool, pixels (res, res, 3) uint8) burnt into every decoded
        frame, in the tick. `split`: run the ControlNets beside the UNet's down path (on their
        own streams on a GPU), from what repeats made once: each ControlNet's embedding of a
        frame's hint (when it enters) and every resnet's time projection at each level (here);
        the model must be a `SplitDenoiserModel`. `reused_beside` (deep levels; default: on a
        GPU): where a pass's deep entries and reused entries are each one run of entries, the
        reused ones walk their first and last levels on a stream of their own while the deep ones
        walk theirs and the deep levels (which at one or two entries leave most of the GPU idle):
        the same frames, in other batches; on a CPU in order, for the tests."""
        settings.validate(model.config.motion_max_len)
        if split and not isinstance(model, SplitDenoiserModel):
            raise ValueError(f"a split tick needs the model's halves ({type(model).__name__} has none)")
        if overlay is not None and decode is None:
            raise ValueError("an overlay is burnt into decoded frames: give a decoder too")
        self.model, self.settings = model, settings
        self.levels = LCMLevels(model, settings, device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        res, h, ahead, w = model.config.resolution, model.config.latent_size, settings.lookahead, settings.window
        steps, passes = self.levels.steps, settings.level_groups
        # Batch entries a pass: the look-ahead ones, then one per frame in flight.
        entries = self.entries = steps // passes + ahead

        # Deep levels: their entries (one pass: entry k is at level k) walk the deep levels, whose
        # temporal modules' rings hold only those entries.
        if settings.deep_levels and not (split and isinstance(model, ReusingDenoiserModel)):
            raise ValueError("--deep-levels needs the split tick and a model whose parts split at the first "
                             f"level ({type(model).__name__}{'' if split else ', not split'})")
        reusing = bool(settings.deep_levels)
        in_deep = model.deep_temporal_modules if reusing else [False] * len(model.temporal_shapes)
        self._in_deep = in_deep
        cuda = split and self.device.type == "cuda"
        beside = reusing and (cuda if reused_beside is None else reused_beside)

        def group(g: int) -> LevelGroup:
            levels = [0] * ahead + list(range(g, steps, passes))
            deep_rows = [e for e, level in enumerate(levels) if level in settings.deep_levels]
            entry_levels = torch.tensor(levels, device=self.device)
            rings = [tuple(torch.zeros(((len(deep_rows) if deep else entries) * pixels, heads, w, channels // heads),
                                       device=self.device, dtype=dtype)
                           for _ in range(4))
                     for (pixels, channels, heads), deep in zip(model.temporal_shapes, in_deep, strict=True)]
            timesteps = self.levels.timesteps[entry_levels]
            times = model.level_times(timesteps) if split else None
            deep = None
            if reusing:
                rows = torch.tensor(deep_rows, dtype=torch.long, device=self.device)
                view = RingTick(self.slot, torch.zeros((len(rows), w), dtype=torch.bool, device=self.device),
                                torch.zeros((len(rows), w), dtype=torch.long, device=self.device))
                own, reused = _run(deep_rows), _run([e for e in range(entries) if e not in deep_rows])
                runs = (own, reused) if beside and own is not None and reused is not None else None
                deep = DeepRows(rows, len(deep_rows), model.level_times(timesteps[rows]) if deep_rows else None, view,
                                runs=runs)
            return LevelGroup(slice(g, steps, passes), entry_levels, timesteps,
                              torch.zeros((entries, 4, h, h), device=self.device, dtype=dtype), rings, times, deep=deep)

        # The ring slot this tick's frames take: advanced on the device at the start of every
        # tick (no host write per tick); W - 1 after a reset, so the first tick takes slot 0.
        self.slot = torch.full((1,), w - 1, dtype=torch.long, device=self.device)
        self.groups = [group(g) for g in range(passes)]
        self.entering = torch.zeros((1, 4, h, h), device=self.device, dtype=dtype)
        # Per frame in flight (every pass steps the same frames): both hints (in the split tick
        # the ControlNets' embeddings of them, the same at each level), and whether it is real.
        hint = (model.hint_embedding_channels, h, h) if split else (3, res, res)
        self.pose = torch.zeros((entries, *hint), device=self.device, dtype=dtype)
        self.local = torch.zeros_like(self.pose)
        # The split tick's entering hints, which each ControlNet's part embeds beside the UNet.
        self.entering_hints = [torch.zeros((1, 3, res, res), device=self.device, dtype=dtype)
                               for _ in range(2)] if split else None
        self.occupied = torch.zeros(entries, dtype=torch.bool, device=self.device)
        # The host writes the entering frame here; the tick turns it into both hints.
        self.new_frame = torch.zeros((1, res, res, 3), device=self.device, dtype=torch.uint8)
        self.new_boxes = torch.zeros((1, 3, 4), device=self.device, dtype=torch.long)
        self.enters = torch.zeros(1, dtype=torch.bool, device=self.device)
        # Which ring slots hold real frames per entry (the same for every pass: a tick writes
        # one slot of each pass's rings, for the same frames).
        self.valid = torch.zeros((entries, w), dtype=torch.bool, device=self.device)
        self._ring_index = torch.arange(w, device=self.device)
        # Look-ahead: entry i's o-th newer frame is entry i - 1 - o.
        newer = torch.arange(entries, device=self.device)[:, None] - 1 - torch.arange(ahead, device=self.device)[None]
        self._newer, self._has_newer = newer.clamp(min=0), newer >= 0
        # This tick's view of the rings, rewritten in place each tick (`_update_ring_tick`).
        self._tick = RingTick(self.slot, torch.zeros((entries, w), dtype=torch.bool, device=self.device),
                              torch.zeros((entries, w), dtype=torch.long, device=self.device),
                              torch.zeros((entries, ahead), dtype=torch.bool, device=self.device) if ahead else None)
        # Deep levels: each frame's deep features (entry e's, from its last deep level; a pass's
        # entry is the same frame in every pass of a tick), moving down with the frames.
        self.deep = torch.zeros((entries, *model.deep_feature_shape), device=self.device, dtype=dtype) \
            if reusing else None
        # With reused controls, likewise each frame's ControlNets' first-level residuals (summed), per skip.
        self.first_controls = [torch.zeros((entries, *model.first_level_shape), device=self.device, dtype=dtype)
                               for _ in range(model.first_level_skips)] if settings.reuse_controls else None
        # What a frame carries down the levels with it (each entry's row): its deep features and controls.
        self._carried = ([self.deep] if reusing else []) + (self.first_controls or [])
        self._entering = False  # what `enters` holds: written only when it changes
        self._repeatable = False  # whether the last tick entered a frame (tick_again repeats it)
        self.leaving = torch.zeros((1, 4, h, h), device=self.device, dtype=dtype)
        self.image = torch.zeros((res, res, 3), device=self.device, dtype=torch.uint8)  # the leaving frame, decoded
        self.decode, self.overlay, self.split = decode, overlay, split
        self._side_streams = [torch.cuda.Stream(), torch.cuda.Stream()] if cuda else None  # the ControlNets'
        # The reused entries' first and last levels, beside the deep walk (`DeepRows.runs`).
        self._reused_stream = torch.cuda.Stream() if cuda and self.reused_beside else None
        self._in_flight: list[tuple[bool, object]] = [(False, None)] * entries  # host-side: (real frame?, tag)
        self._graph = None
        self._parts = self._split_parts(lambda fn: fn) if split else None  # uncompiled, for `_advance`
        self.advance = self._advance  # one tick's work without the graph (capture() sets what it recorded)

    @property
    def captured(self) -> bool:
        """Whether a tick is recorded as a CUDA graph (`capture`), which `tick` replays."""
        return self._graph is not None

    @property
    def reused_beside(self) -> bool:
        """Whether a pass's reused entries walk beside its deep entries (`DeepRows.runs`)."""
        return any(group.deep is not None and group.deep.runs is not None for group in self.groups)

    @property
    def prepared(self) -> bool:
        return self.groups[0].reference is not None

    @torch.no_grad()
    def prepare(self, sources: torch.Tensor) -> None:
        """Per source: the entering latent and every level's reference features."""
        latents = self.model.encode(sources)
        self.entering.copy_(self.levels.enter(latents[:1]))
        per_level = reference_per_level(self.model, [z[None] for z in latents], self.levels.timesteps,
                                        self.settings.token_downsample)
        for group in self.groups:
            group.reference = self._set_reference(group.reference, per_level, group.entry_levels)
            if group.deep is not None:
                group.deep.reference = self._set_reference(group.deep.reference, per_level,
                                                           group.entry_levels[group.deep.rows])
        self.reset()

    def _set_reference(self, held: ReferenceKV | None, per_level: ReferenceKV, levels: torch.Tensor) -> ReferenceKV:
        """The reference features of these entries' levels: into `held` in place where it has
        their shapes (a captured graph reads those buffers), else new (and the graph dropped)."""
        reference = reference_rows(per_level, levels)
        if held is not None and all(held[name].key.shape == kv.key.shape for name, kv in reference.items()):
            for name, kv in reference.items():
                held[name].key.copy_(kv.key), held[name].value.copy_(kv.value)
            return held
        self._graph = None  # another number of references: tokens changed, capture again
        return reference

    def reset(self) -> None:
        """Empty the batch and the temporal caches (a new driving stream)."""
        for t in (self.pose, self.local, self.occupied, self.valid):
            t.zero_()
        for t in self._carried:
            t.zero_()
        self.slot.fill_(self.settings.window - 1)
        for group in self.groups:
            group.x.zero_()
            for ring in group.rings:
                for t in ring:
                    t.zero_()
        self._in_flight = [(False, None)] * self.entries
        self._repeatable = False  # tick_again needs a frame entered since

    def temporal_rings(self, group: int = 0) -> list[TemporalRing]:
        """A pass's temporal caches as the UNet takes them, for the current tick (set by `_enter`)."""
        return self._temporal_rings(self.groups[group].rings, self.groups[group].deep)

    def _temporal_rings(self, rings, deep: DeepRows | None = None) -> list[TemporalRing]:
        """Every module's ring with the tick's view of it (with deep levels, the deep modules'
        hold the pass's deep entries only: their rows of the view)."""
        return [TemporalRing(tensors, deep.tick if deep is not None and in_deep else self._tick)
                for tensors, in_deep in zip(rings, self._in_deep, strict=True)]

    def _update_ring_tick(self) -> None:
        update_ring_tick(self._tick, self.valid, self.occupied, self._ring_index, self._newer, self._has_newer)
        for group in self.groups:
            if group.deep is not None and group.deep.count:
                group.deep.tick.mask.copy_(self._tick.mask[group.deep.rows])
                group.deep.tick.positions.copy_(self._tick.positions[group.deep.rows])

    def _advance(self) -> None:
        if self.split:
            self._advance_split(self._parts)
        else:
            self._advance_eager()

    def _advance_eager(self) -> None:
        """The whole tick on device buffers, host-free: what a CUDA graph replays."""
        self._enter()
        for g, group in enumerate(self.groups):
            self._finish(g, self.model.predict_noise(group.x, group.timesteps, 1, group.reference, self.pose,
                                                     self.local, temporal_past=self._temporal_rings(group.rings)))

    def _enter(self) -> None:
        """Everyone moves down a level (G levels); the new frame (if any) takes level 0 and the
        next ring slot. Its hints are held as they are, or in the split tick given to the
        ControlNets' parts, which embed them beside the UNet (`_embed_pose`, `_embed_local`)."""
        self.slot.copy_((self.slot + 1) % self.settings.window)
        self.occupied[1:] = self.occupied[:-1].clone()
        for held in self._carried:  # each frame's deep features (and controls) go down the levels with it
            held[1:] = held[:-1].clone()
        hints = control_hints(self.new_frame, self.new_boxes, self.dtype)
        if self.split:
            for buffer, hint in zip(self.entering_hints, hints, strict=True):
                buffer.copy_(hint)
        else:
            for held, hint in zip((self.pose, self.local), hints, strict=True):
                held[1:] = held[:-1].clone()
                held[:1] = hint
        self.occupied[:1] = self.enters
        self.groups[0].x[: self.settings.lookahead + 1] = self.entering  # look-ahead entries and level 0
        self._update_ring_tick()

    def _finish(self, g: int, eps: torch.Tensor) -> None:
        """Pass g's LCM step: into the next pass's levels, or, after the last pass, one level
        on into the first's; the leaving frame is decoded."""
        levels, ahead, group = self.levels, self.settings.lookahead, self.groups[g]
        clean = levels.denoise(group.x[ahead:], eps[ahead:], group.levels)  # look-ahead entries wait
        if g + 1 < len(self.groups):
            self.groups[g + 1].x.copy_(levels.renoise(clean, group.levels))
            return
        self.leaving.copy_(clean[-1:])
        if clean.shape[0] > 1:
            older = slice(group.levels.start, levels.steps - 1, group.levels.step)  # the levels not leaving
            self.groups[0].x[ahead + 1 :] = levels.renoise(clean[:-1], older)
        if self.decode is not None:  # only the frame that leaves is decoded
            pixels = self.decode(self.leaving)[0].permute(1, 2, 0)
            image = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            if self.overlay is not None:
                image = torch.where(self.overlay[0], self.overlay[1], image)
            self.image.copy_(image)

    # The split tick: the ControlNets and the UNet's down path need nothing from each other, so
    # on a GPU they run on streams of their own (at the 16² and 8² levels a batch of S frames
    # leaves most of the GPU idle). Each part may be compiled on its own; the whole is one CUDA graph.
    def _advance_split(self, parts: SplitParts) -> None:
        parts.enter()
        sides = self._side_streams or [None] * len(parts.controls)
        for g, group in enumerate(self.groups):
            if group.deep is not None and group.deep.runs is not None:
                parts.finish(g, self._pass_beside(parts, g, group, sides))
                continue
            x, t, reference, rings, deep = group.x, group.times, group.reference, group.rings, group.deep
            residuals = []
            for (embed, control), side in zip(parts.controls, sides, strict=True):
                with _beside(side):
                    if g == 0:  # the entering frame's hint, once a tick, while the UNet walks down
                        embed()
                    residuals.append(control(x, t, deep))
            h, skips = parts.down(x, t, reference, rings, deep)
            for side in self._side_streams or ():
                torch.cuda.current_stream().wait_stream(side)
            parts.finish(g, parts.up(h, skips, t, residuals, reference, rings, deep))

    def _pass_beside(self, parts: SplitParts, g: int, group: LevelGroup, sides) -> torch.Tensor:
        """A pass with deep levels whose reused entries walk beside its deep entries: on every
        stream the deep run's chain first (its first level, the deep levels, its last level, on
        the main stream; its ControlNet levels on theirs), the reused run's first and last levels
        on the reused stream (on its frames' deep features from earlier levels), filling the GPU
        that the deep walk's batch of one or two leaves idle. The predicted noise."""
        x, t, reference, rings, deep = group.x, group.times, group.reference, group.rings, group.deep
        own, reused = deep.runs
        firsts, deeper, theirs, own_done, theirs_done = [], [], [], [], []
        for (embed, control_in, control_deep), side in zip(parts.controls_beside, sides, strict=True):
            with _beside(side):
                if g == 0:
                    embed()
                h, first = control_in(own, x, t)
                firsts.append(first)
                deeper.append(control_deep(h, deep))
                own_done.append(_mark(side))  # all the deep run's walk up needs of this ControlNet
                if self.first_controls is None:  # (reused controls: the reused run's are held)
                    theirs.append(control_in(reused, x, t)[1])
                    theirs_done.append(_mark(side))  # all the reused run's last level needs
        # Each run's rows of the first and last levels' rings, made here: a compiled part then
        # writes its ring slots in place, as it does a whole ring's (no view made and written inside).
        own_rings, reused_rings = self._ring_rows(rings, own), self._ring_rows(rings, reused)
        with _beside(self._reused_stream):
            _, skips = parts.in_rows(reused, x, t, reference, reused_rings)
            _wait(self._reused_stream, theirs_done)
            eps_reused = parts.out_rows(reused, skips, t, theirs or None, reference, reused_rings)
        main = torch.cuda.current_stream() if self._reused_stream is not None else None
        h, skips = parts.in_rows(own, x, t, reference, own_rings)
        h, skips_deeper = parts.deeper_down(h, rings, deep)
        _wait(main, own_done)
        parts.deep_up(h, skips_deeper, deeper, rings, deep)
        eps_own = parts.out_rows(own, skips, t, firsts, reference, own_rings)
        if main is not None:  # every stream joined (a captured graph needs them all back)
            for stream in (self._reused_stream, *self._side_streams):
                main.wait_stream(stream)
        return torch.cat((eps_own, eps_reused) if own.start < reused.start else (eps_reused, eps_own))

    def _split_parts(self, compiled: Callable[[Callable], Callable]) -> SplitParts:
        """The split tick's parts, each through `compiled` (identity, or torch.compile), each
        named for a profile of the tick (`_named`)."""
        part = lambda name, fn: _named(name, compiled(fn))
        return SplitParts(
            part("enter", self._enter),
            [(part("pose hint embedding", self._embed_pose), part("pose controlnet", self._pose_control)),
             (part("local hint embedding", self._embed_local), part("local controlnet", self._local_control))],
            part("unet down", self._down), part("unet up", self._up), part("finish", self._finish),
            [(part("pose hint embedding", self._embed_pose), part("pose first level", self._pose_first),
              part("pose deeper levels", self._pose_deeper)),
             (part("local hint embedding", self._embed_local), part("local first level", self._local_first),
              part("local deeper levels", self._local_deeper))],
            part("unet first level", self._in_rows), part("unet deeper down", self._deeper_down),
            part("unet deep up", self._deep_up), part("unet last level", self._out_rows))

    def _embed_pose(self) -> None:
        self._embed(self.pose, self.model.embed_pose_hint, self.entering_hints[0])

    def _embed_local(self) -> None:
        self._embed(self.local, self.model.embed_local_hint, self.entering_hints[1])

    @staticmethod
    def _embed(held: torch.Tensor, embed: Callable, hint: torch.Tensor) -> None:
        """Everyone's embedding moves down a level; the entering frame's takes the first."""
        held[1:] = held[:-1].clone()
        held[:1] = embed(hint)

    # Each ControlNet's residuals ((x, level times, the pass's deep rows) -> (down list, mid)).
    def _pose_control(self, x: torch.Tensor, t: LevelTimes, deep: DeepRows | None = None):
        if deep is not None:
            return self._control_reusing("pose", x, t, self.pose, deep)
        return self.model.pose_control(x, t, self.pose)

    def _local_control(self, x: torch.Tensor, t: LevelTimes, deep: DeepRows | None = None):
        if deep is not None:
            return self._control_reusing("local", x, t, self.local, deep)
        return self.model.local_control(x, t, self.local)

    def _control_reusing(self, which: str, x: torch.Tensor, t: LevelTimes, hint_embedding: torch.Tensor,
                         deep: DeepRows):
        """A ControlNet's residuals with deep levels: the first level's for every entry, the
        deeper ones and the mid for the pass's deep entries (none: no mid). With reused
        controls, all of them for the deep entries only (none: (None, None))."""
        if self.first_controls is not None:
            if not deep.count:
                return None, None
            h, first = self.model.control_in(which, x[deep.rows], deep.times, hint_embedding[deep.rows])
            deeper, mid = self.model.control_deep(which, h, deep.times)
            return first + deeper, mid
        h, first = self.model.control_in(which, x, t, hint_embedding)
        if not deep.count:
            return first, None
        deeper, mid = self.model.control_deep(which, h[deep.rows], deep.times)
        return first + deeper, mid

    # ... in two parts, for a pass whose reused entries walk beside its deep entries: the first
    # level for a run of entries ((features, residuals), the run's rows), the deeper levels for
    # the deep entries' features ((residuals, mid)).
    def _pose_first(self, run: slice, x: torch.Tensor, t: LevelTimes):
        return self.model.control_in("pose", x[run], _times_of(t, run), self.pose[run])

    def _local_first(self, run: slice, x: torch.Tensor, t: LevelTimes):
        return self.model.control_in("local", x[run], _times_of(t, run), self.local[run])

    def _pose_deeper(self, h: torch.Tensor, deep: DeepRows):
        return self.model.control_deep("pose", h, deep.times)

    def _local_deeper(self, h: torch.Tensor, deep: DeepRows):
        return self.model.control_deep("local", h, deep.times)

    # The UNet's halves ((features, skips) down, the predicted noise up); with deep levels in
    # pieces: a run of entries through the first level (`_in_rows`), the deep entries down the
    # deep levels (`_deeper_down`) and up them into their frames' deep features (`_deep_up`), a
    # run of entries through the last level from its frames' deep features (`_out_rows`). The
    # one-batch walk's runs are every entry.
    def _down(self, x: torch.Tensor, t: LevelTimes, reference: ReferenceKV, rings, deep: DeepRows | None = None):
        if deep is None:
            return self.model.unet_down(x, t, reference, self._temporal_rings(rings))
        every = slice(0, self.entries)
        h, skips = self._in_rows(every, x, t, reference, self._ring_rows(rings, every))
        if not deep.count:
            return None, skips
        h, deeper = self._deeper_down(h[deep.rows], rings, deep)
        return h, skips + deeper

    def _up(self, h, skips, t: LevelTimes, residuals, reference: ReferenceKV, rings,
            deep: DeepRows | None = None) -> torch.Tensor:
        """`residuals`: the pose and the local ControlNet's."""
        if deep is None:
            return self.model.unet_up(h, skips, t, reference, *add_residuals(*residuals), self._temporal_rings(rings))
        first, every = self.model.first_level_skips, slice(0, self.entries)
        firsts = None if self.first_controls is not None else [down for down, _ in residuals]
        if deep.count:
            self._deep_up(h, skips[first:], [(down[first:], mid) for down, mid in residuals], rings, deep)
            if firsts is None:  # reused controls: the deep entries' are held, then every entry's are read
                pose, local = (down[:first] for down, _ in residuals)
                for held, p, l in zip(self.first_controls, pose, local, strict=True):
                    held.index_copy_(0, deep.rows, p + l)
        return self._out_rows(every, skips, t, firsts, reference, self._ring_rows(rings, every))

    def _in_rows(self, run: slice, x: torch.Tensor, t: LevelTimes, reference: ReferenceKV, rows):
        """`rows`: the run's rows of the rings (`_ring_rows`)."""
        return self.model.unet_in(x[run], _times_of(t, run), reference_rows(reference, run), self._run_rings(rows))

    def _deeper_down(self, h: torch.Tensor, rings, deep: DeepRows):
        """The deep entries' features (`h`, theirs only) down the deep levels: (features, skips)."""
        return self.model.unet_deep_down(h, deep.times, deep.reference, self._temporal_rings(rings, deep))

    def _deep_up(self, h: torch.Tensor | None, skips: list[torch.Tensor], residuals, rings, deep: DeepRows) -> None:
        """Up the deep levels into the deep entries' frames' deep features, with the deep levels'
        `skips` and both ControlNets' deep levels' `residuals` (down list, mid), the deep entries'."""
        if not deep.count:
            return
        down, mid = add_residuals(*residuals)
        features = self.model.unet_deep_up(h, skips, deep.times, deep.reference, down, mid,
                                           self._temporal_rings(rings, deep))
        self.deep.index_copy_(0, deep.rows, features)

    def _out_rows(self, run: slice, skips: list[torch.Tensor], t: LevelTimes, firsts, reference: ReferenceKV,
                  rows) -> torch.Tensor:
        """The last level for the entries in `run`, with their first level's `skips` and both
        ControlNets' first-level residuals (`firsts`; the run's rows, maybe followed by more;
        None: the ones held for the run's frames, reused controls); `rows`: the run's rows of
        the rings (`_ring_rows`). With reused controls, the residuals given are held for the
        levels that reuse them."""
        first = self.model.first_level_skips
        if firsts is None:
            down = [held[run] for held in self.first_controls]
        else:
            down = [p + l for p, l in zip(firsts[0][:first], firsts[1][:first], strict=True)]
            for held, d in zip(self.first_controls or (), down):
                held[run] = d
        return self.model.unet_out(self.deep[run], skips[:first], _times_of(t, run), reference_rows(reference, run),
                                   down, self._run_rings(rows))

    def _ring_rows(self, rings, run: slice) -> tuple[list, torch.Tensor, torch.Tensor]:
        """A run of entries' rows of the first and last levels' rings (views: those modules are
        none of the deep ones, so their rings hold every entry, entry-major; for every entry the
        rings themselves; None for the deep ones), and of the tick's mask and positions."""
        if run == slice(0, self.entries):
            return ([None if in_deep else ring for ring, in_deep in zip(rings, self._in_deep, strict=True)],
                    self._tick.mask, self._tick.positions)
        at = [slice(run.start * pixels, run.stop * pixels) for pixels, _, _ in self.model.temporal_shapes]
        return ([None if in_deep else tuple([r[rows] for r in ring])
                 for ring, in_deep, rows in zip(rings, self._in_deep, at, strict=True)],
                self._tick.mask[run], self._tick.positions[run])

    def _run_rings(self, rows) -> list[TemporalRing | None]:
        """`_ring_rows`' rows as the UNet's parts take them."""
        rings, mask, positions = rows
        tick = RingTick(self.slot, mask, positions)
        return [None if ring is None else TemporalRing(ring, tick) for ring in rings]

    @torch.no_grad()
    def capture(self, warmup: int = 3, compile: bool = False, autotune: bool = False,
                main_priority: int = MAIN_PRIORITY) -> None:
        """Record one tick as a CUDA graph (after warm-up ticks, which also allocate the caches
        and, with `compile`, let torch.compile (default mode) fuse the tick's kernels; with
        `autotune` too, choose each matrix product's kernel by timing); the state is
        reset afterwards. `main_priority`: the CUDA stream priority the tick's main path is
        recorded at (the ControlNets' side streams: 0). CUDA only."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if not self.prepared:
            raise RuntimeError("prepare() first")
        if autotune and not compile:
            raise ValueError("autotune tunes the compiled tick: give compile=True too")
        # 1x1 convolutions as matrix products: the tick has many, and cuBLAS beats cuDNN there
        # (measured on the H100: 0.7 ms a tick). Freezing: the weights are constants, so what
        # depends on them alone (the empty prompt's keys and values in every cross-attention)
        # is computed once, at compile time (0.6 ms a tick). The weights must not change after
        # capture; the per-source state (reference, entering latent) is not frozen. Autotune:
        # each matrix product's kernel chosen by timing Triton templates against cuBLAS; the 3x3
        # convolutions stay cuDNN's (measured alone on the H200 at 450-540 TFLOP/s where they
        # are large, and weight-bound at 8x8), which also keeps the tuning to the products.
        options = {"conv_1x1_as_mm": True, "freezing": True}
        if autotune:
            options |= {"max_autotune_gemm": True, "max_autotune_conv_backends": "ATEN"}
        compiled = (lambda fn: torch.compile(fn, dynamic=False, options=options)) if compile else (lambda fn: fn)
        if self.split:
            parts = self._split_parts(compiled)
            advance = lambda: self._advance_split(parts)
        else:
            advance = compiled(self._advance_eager) if compile else self._advance
        # The tick's own stream (the UNet's path: the one every pass waits on) at main_priority,
        # above the ControlNets' side streams: where kernels of both are ready, the GPU starts the
        # main path's first. The graph keeps each kernel's stream priority (PyTorch >= 2.10
        # instantiates graphs with node priorities).
        stream = torch.cuda.Stream(priority=main_priority)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                advance()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Another thread may be stepping an engine meanwhile (a level made while the stream
        # runs): only this thread's calls must keep off the capture ("thread_local"); one
        # capture at a time in the process.
        with _ONE_CAPTURE, torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            advance()
        self._graph = graph
        self.advance = advance  # the recorded work (compiled, if asked), for profilers
        self.reset()

    @torch.no_grad()
    def tick(self, frame: torch.Tensor | None, boxes: torch.Tensor | None = None, tag=None):
        """Advance every frame in flight by one level (G levels with level groups); a new
        frame enters unless `frame` is None.

        frame: the aligned driving frame, uint8 (H, W, 3) (pinned host memory or the device);
        boxes: its eye and mouth patches, (3, 4) x0, y0, x1, y1. Returns (clean latent
        (1, 4, h, w), tag) for the frame that leaves, or None. The latent is the denoiser's
        buffer: use it before the next tick."""
        if not self.prepared:
            raise RuntimeError("prepare() first")
        entering = frame is not None
        if entering:
            self.new_frame[0].copy_(frame, non_blocking=True)
            self.new_boxes[0].copy_(boxes, non_blocking=True)
        if entering != self._entering:  # only around flushes: a steady stream launches nothing here
            self.enters.fill_(entering)
            self._entering = entering
        return self._advance_one(entering, tag)

    @torch.no_grad()
    def tick_again(self, tag=None):
        """A tick on which the frame that entered on the last tick enters again: it is still
        in the device's buffers, so nothing is copied and the same work (the same CUDA graph)
        runs. The copy is a frame like any other (its own ring slot, its own way out, S - 1
        ticks later): the stream is the one over the clip with that frame repeated, as
        `render_causal` renders it. What `tick` returns."""
        if not self._repeatable:
            raise RuntimeError("tick_again repeats a frame: the last tick entered none")
        return self._advance_one(True, tag)

    def _advance_one(self, entering: bool, tag):
        self._repeatable = entering
        if self._graph is not None:
            self._graph.replay()
        else:
            self._advance()
        self._in_flight = [(entering, tag)] + self._in_flight[:-1]
        real, leaving_tag = self._in_flight[-1]
        return (self.leaving, leaving_tag) if real else None
