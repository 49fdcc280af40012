"""Offline X-Portrait inference (paper, section 4.1), with the released code's sampler.

By default every step is the release's (core/test_xportrait.py, ldm's DDIMSampler_ReferenceOnly),
drawn from one seeded generator, so a fixed seed gives identical frames:

- Latents: the VAE posterior is sampled, once per frame, for the start latent and for each
  reference (the release encodes the source once per frame of the clip).
- Initial latents: each frame's start latent forward-diffused to t = T - 1 = 999 (not pure
  noise: a little of the source's structure survives, against popping).
- Each step: the noise of every frame, predicted in temporal windows of W (16) frames with
  stride W - overlap (12), from an offset drawn anew each step, wrapping around the clip's end
  (so seams move from step to step). A clip of W frames or fewer is one window too: at W its
  order rotates each step, below W frames repeat to fill it (a repeated frame takes the
  prediction of its last place in the window, as the release's `out[idx] += eps` does).
  Where windows overlap, their predictions are averaged ("prompt travel"); then one
  scheduler step for the whole clip. The reference keys/values come from each window's
  frames' own reference latents.
- Sampler: DDIM over ldm's uniform timesteps (991, 958, ... 1 for "30 steps") with
  classifier-free guidance 5; with LCM weights (an LCM-LoRA fused into the UNet), diffusers'
  LCMScheduler, a few steps, no guidance.

Our own choices, by name: `posterior="mean"` (the posterior mean, deterministic: one reference
for all frames, its keys/values computed once per step instead of per window),
`start_noise="first-step"` (forward-diffuse to the sampler's first timestep, the noise level
it assumes), `offsets="fixed"` (windows from frame 0 without wrapping; a clip of W frames or
fewer runs once, as it is), `shared_noise` (one noise image for every frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, LCMScheduler

from ..options import DEFAULT_SEED, DEFAULT_WINDOW, LCM_STEPS, RELEASED_GUIDANCE, RELEASED_STEPS
from .config import XPortraitConfig
from .model import XPortraitModel


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "ddim"  # "ddim" (released default) or "lcm"
    steps: int = RELEASED_STEPS
    guidance: float = RELEASED_GUIDANCE
    window: int = DEFAULT_WINDOW
    overlap: int = 4
    offsets: str = "random"  # "random" (released), "fixed", or "causal" (the live engine's frames, offline)
    shared_noise: bool = False  # one noise image for every frame (steadier) instead of one each
    posterior: str = "sample"  # VAE latents: "sample" (released: one draw per frame) or "mean"
    start_noise: str = "released"  # forward diffusion to t = T - 1 ("released") or to the first step ("first-step")
    seed: int = DEFAULT_SEED
    decode_batch: int = 4  # frames the VAE decodes at once: its 512² activations dominate peak memory

    @classmethod
    def released(cls) -> "SamplerSettings":
        return cls()

    @classmethod
    def lcm(cls, steps: int = LCM_STEPS) -> "SamplerSettings":
        return cls(sampler="lcm", steps=steps, guidance=1.0)

    def validate(self) -> None:
        if self.sampler not in ("ddim", "lcm"):
            raise ValueError(f"sampler must be 'ddim' or 'lcm', got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.offsets != "causal" and not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window), got {self.overlap} with window {self.window}")
        if self.offsets not in ("random", "fixed", "causal"):
            raise ValueError(f"offsets must be 'random', 'fixed' or 'causal', got {self.offsets!r}")
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', got {self.posterior!r}")
        if self.start_noise not in ("released", "first-step"):
            raise ValueError(f"start_noise must be 'released' or 'first-step', got {self.start_noise!r}")
        if self.offsets == "causal" and (self.sampler != "lcm" or self.guidance != 1.0):
            raise ValueError("causal windows are the live engine's: LCM sampling without guidance")


def make_scheduler(config: XPortraitConfig, settings: SamplerSettings):
    common = dict(num_train_timesteps=config.train_timesteps, beta_start=config.beta_start,
                  beta_end=config.beta_end, beta_schedule="scaled_linear", prediction_type="epsilon")
    if settings.sampler == "lcm":
        scheduler = LCMScheduler(**common, set_alpha_to_one=True, timestep_spacing="leading")
        scheduler.set_timesteps(settings.steps)
        return scheduler
    scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(settings.steps)
    # ldm's "uniform" DDIM timesteps: range(0, T, T // steps) + 1, which is one more step than
    # asked when T is not a multiple (31 for 30: 991, 958, ..., 1); the released code samples these.
    # (Where that would reach T itself, e.g. 3 steps, the last one is dropped: ldm would index past its table.)
    stride = config.train_timesteps // settings.steps
    uniform = np.arange(0, config.train_timesteps, stride) + 1
    scheduler.timesteps = torch.from_numpy(uniform[uniform < config.train_timesteps][::-1].copy())
    return scheduler


def windows(frames: int, settings: SamplerSettings, generator: torch.Generator) -> list[torch.Tensor]:
    """The frame indices of each temporal window for one denoising step."""
    w, stride = settings.window, settings.window - settings.overlap
    if settings.offsets == "fixed":
        if frames <= w:
            return [torch.arange(frames)]
        starts = list(range(0, frames - w, stride)) + [frames - w]
        return [torch.arange(s, s + w) for s in starts]
    # The release: W frames from a random offset, modulo the clip's length, whatever its length.
    offset = int(torch.randint(0, frames, (1,), generator=generator))
    span = max(frames - settings.overlap, 1)  # (the release runs no window for frames <= overlap: 0/0)
    return [torch.arange(s, s + w) % frames for s in range(offset, offset + span, stride)]


def last_places(idx: torch.Tensor) -> torch.Tensor | None:
    """Positions in `idx` of each frame's last occurrence, in order; None if none repeats."""
    order = idx.tolist()
    if len(set(order)) == len(order):
        return None
    last = {frame: place for place, frame in enumerate(order)}
    return torch.tensor(sorted(last.values()))


def fuse_windows(frames: int, groups: Sequence[torch.Tensor], predict: Callable[[torch.Tensor], torch.Tensor],
                 like: torch.Tensor) -> torch.Tensor:
    """Average each frame's predictions over the windows that contain it (uniform weights).
    Within one window a repeated frame (a clip shorter than the window) counts once, with
    the prediction of its last place, as the release's `out[idx] += eps; count[idx] += 1`."""
    total = torch.zeros_like(like)
    count = torch.zeros(frames, dtype=like.dtype, device=like.device)
    for idx in groups:
        eps = predict(idx)
        keep = last_places(idx)
        if keep is not None:
            idx, eps = idx[keep], eps[keep.to(eps.device)]
        total.index_add_(0, idx.to(like.device), eps)
        count.index_add_(0, idx.to(like.device), torch.ones(len(idx), dtype=like.dtype, device=like.device))
    if (count == 0).any():
        raise RuntimeError("a frame was left out of every window")
    return total / count.view(-1, *([1] * (like.dim() - 1)))


class XPortraitPipeline:
    def __init__(self, model: XPortraitModel, settings: SamplerSettings = SamplerSettings()):
        settings.validate()
        if settings.window > model.config.motion_max_len:
            raise ValueError(f"window {settings.window} exceeds the temporal modules' {model.config.motion_max_len} positions")
        self.model = model
        self.settings = settings
        self.reference_calls = 0  # reference-net evaluations (tests count them)

    @torch.no_grad()
    def latents(self, sources: torch.Tensor, frames: int, scheduler,
                generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(initial latents (N, 4, h, w), one reference latent per source: (N, 4, h, w), a
        posterior draw per frame, or (1, 4, h, w) for all frames with posterior "mean"), in the
        release's order of draws: the start latents, their noise, then the references."""
        model = self.model
        posterior = model.vae.encode(sources).latent_dist
        mean, std, scale = posterior.mean, posterior.std, model.config.scaling_factor
        if self.settings.posterior == "mean":
            means = mean * scale
            x = self.initial_latents(scheduler, means[:1].expand(frames, -1, -1, -1), generator)
            return x, [m[None] for m in means]

        def draws(r: int) -> torch.Tensor:
            eps = torch.randn((frames, *mean.shape[1:]), generator=generator).to(mean)
            return (mean[r:r + 1] + std[r:r + 1] * eps) * scale

        x = self.initial_latents(scheduler, draws(0), generator)
        return x, [draws(r) for r in range(len(sources))]

    def start_timestep(self, scheduler) -> torch.Tensor:
        if self.settings.start_noise == "first-step":
            return scheduler.timesteps[:1]
        return torch.tensor([self.model.config.train_timesteps - 1])  # ldm q_sample(x, t=999)

    def initial_latents(self, scheduler, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each frame's start latent (N, 4, h, w) forward-diffused to the start timestep (paper
        4.1: a little of the source's structure survives the noise, against popping)."""
        frames = start.shape[0]
        shape = (1 if self.settings.shared_noise else frames, *start.shape[1:])
        noise = torch.randn(shape, generator=generator).to(start).expand(frames, -1, -1, -1)
        return scheduler.add_noise(start, noise, self.start_timestep(scheduler).to(start.device))

    @torch.no_grad()
    def __call__(self, sources: torch.Tensor, driving: torch.Tensor, local: torch.Tensor,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """sources (R, 3, H, W), driving and local (N, 3, H, W), all in [-1, 1] on the model's
        device and dtype -> N frames (N, 3, H, W) in [-1, 1]. The first source is the one
        whose latent seeds the initial noise; all are appearance references."""
        model, s = self.model, self.settings
        if s.offsets == "causal":  # each frame attends over the W - 1 before it, step by step, fixed noise
            from .stream import StreamSettings, render_causal

            latents = render_causal(model, StreamSettings(s.steps, s.window, s.seed), sources, driving, local)
            self.reference_calls += len(sources) * s.steps
            return torch.cat([model.decode(chunk) for chunk in latents.split(s.decode_batch)])
        n = driving.shape[0]
        generator = torch.Generator("cpu").manual_seed(s.seed)
        scheduler = make_scheduler(model.config, s)
        timesteps = scheduler.timesteps

        x, references = self.latents(sources, n, scheduler, generator)
        per_frame = references[0].shape[0] > 1

        for i, t in enumerate(timesteps):
            t = t.to(x.device)
            shared = None
            if not per_frame:  # one reference for all frames: once per step, every window shares it
                shared = model.reference_features(references, t)
                self.reference_calls += len(references)

            def predict(idx: torch.Tensor) -> torch.Tensor:
                idx = idx.to(x.device)
                reference = shared
                if reference is None:  # each frame of the window with its own reference draws
                    reference = model.reference_features([r[idx] for r in references], t)
                    self.reference_calls += len(references)
                return model.predict_noise(x[idx], t, len(idx), reference, driving[idx], local[idx], s.guidance)

            eps = fuse_windows(n, windows(n, s, generator), predict, x)
            # LCM re-noises between steps (from the same seeded generator); its last step returns the clean sample.
            step = scheduler.step(eps, t, x, generator=generator) if s.sampler == "lcm" else scheduler.step(eps, t, x)
            x = step.prev_sample
            if progress:
                progress(i + 1, len(timesteps))

        return torch.cat([model.decode(chunk) for chunk in x.split(s.decode_batch)])
