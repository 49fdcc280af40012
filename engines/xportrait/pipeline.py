"""Offline X-Portrait inference (paper, section 4.1), with the released code's sampler.

- Initial latents: the source latent, forward-diffused to the first timestep (not pure noise).
- Each step: the reference keys/values for that timestep (once, for all frames and windows),
  then the noise of every frame, predicted in temporal windows that overlap; where windows
  overlap, their predictions are averaged ("prompt travel"); then one scheduler step for the
  whole clip.
- Sampler: the released default is DDIM over ldm's uniform timesteps (991, 958, ... 1 for
  "30 steps") with classifier-free guidance 5; with LCM weights (an LCM-LoRA fused into the
  UNet), diffusers' LCMScheduler, a few steps, no guidance.

Windows, as the released code: length W (16), stride W - overlap (12), starting at an offset
drawn anew each step and wrapping around the clip's end, so seams move from step to step.
`offsets="fixed"` starts at 0 without wrapping (the last window ends on the last frame).
Offsets and noise come from one seeded generator: a fixed seed gives identical frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, LCMScheduler

from .config import XPortraitConfig
from .model import XPortraitModel


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "ddim"  # "ddim" (released default) or "lcm"
    steps: int = 30
    guidance: float = 5.0
    window: int = 16
    overlap: int = 4
    offsets: str = "random"  # "random" (released), "fixed", or "causal" (the live engine's frames, offline)
    shared_noise: bool = False  # one noise image for every frame (steadier) instead of one each
    seed: int = 999
    decode_batch: int = 4  # frames the VAE decodes at once: its 512² activations dominate peak memory

    @classmethod
    def released(cls) -> "SamplerSettings":
        return cls()

    @classmethod
    def lcm(cls, steps: int = 4) -> "SamplerSettings":
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
    w = settings.window
    if frames <= w:
        return [torch.arange(frames)]
    stride = w - settings.overlap
    if settings.offsets == "fixed":
        starts = list(range(0, frames - w, stride)) + [frames - w]
        return [torch.arange(s, s + w) for s in starts]
    offset = int(torch.randint(0, frames, (1,), generator=generator))
    return [(torch.arange(s, s + w) % frames) for s in range(offset, offset + frames - settings.overlap, stride)]


def fuse_windows(frames: int, groups: Sequence[torch.Tensor], predict: Callable[[torch.Tensor], torch.Tensor],
                 like: torch.Tensor) -> torch.Tensor:
    """Average each frame's predictions over the windows that contain it (uniform weights)."""
    total = torch.zeros_like(like)
    count = torch.zeros(frames, dtype=like.dtype, device=like.device)
    for idx in groups:
        total.index_add_(0, idx.to(like.device), predict(idx))
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

    def initial_latents(self, scheduler, source_latent: torch.Tensor, frames: int,
                        generator: torch.Generator) -> torch.Tensor:
        """The source latent forward-diffused to the first timestep, for every frame (paper 4.1:
        a little of the source's structure survives the noise, against popping)."""
        shape = (1 if self.settings.shared_noise else frames, *source_latent.shape[1:])
        noise = torch.randn(shape, generator=generator).to(source_latent).expand(frames, -1, -1, -1)
        t0 = scheduler.timesteps[:1].to(source_latent.device)
        return scheduler.add_noise(source_latent.expand(frames, -1, -1, -1), noise, t0)

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

        source_latents = model.encode(sources)
        references = [z[None] for z in source_latents]
        x = self.initial_latents(scheduler, source_latents[:1], n, generator)

        for i, t in enumerate(timesteps):
            t = t.to(x.device)
            reference = model.reference_features(references, t)  # once per step, every window shares it
            self.reference_calls += len(references)

            def predict(idx: torch.Tensor) -> torch.Tensor:
                idx = idx.to(x.device)
                return model.predict_noise(x[idx], t, len(idx), reference, driving[idx], local[idx], s.guidance)

            eps = fuse_windows(n, windows(n, s, generator), predict, x)
            # LCM re-noises between steps (from the same seeded generator); its last step returns the clean sample.
            step = scheduler.step(eps, t, x, generator=generator) if s.sampler == "lcm" else scheduler.step(eps, t, x)
            x = step.prev_sample
            if progress:
                progress(i + 1, len(timesteps))

        return torch.cat([model.decode(chunk) for chunk in x.split(s.decode_batch)])
