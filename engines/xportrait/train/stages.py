"""The training stages and their objective.

Paper 4.1: SD1.5 stays frozen (UNet, VAE, text encoder) and the modules are plugged in and
trained one after another, R, then C, then M, with the epsilon objective of eq. (1) on
SD1.5's schedule (1000 steps, scaled-linear betas 0.00085..0.012). What each stage sees,
read from the paper and the released model (which modules exist, what each one takes):

- `appearance` (R): the reference net on the clean latent of I_S at the step's timestep
  (the released "image_control" path without noise), its self-attention tokens joined into
  the UNet's. Target: I_D, another frame of the same clip (same person, other pose), so R has
  to carry appearance across a pose change. No ControlNet and no temporal module is plugged
  in yet: the UNet runs without residuals and with M left out.
- `motion` (C and the local C^l): R (trained, frozen) on I_S; C on the cross-identity control
  image I_C = F(I_S' -> I_D); C^l on its eye and mouth patches I_C^l; both scaled by the same
  random (sx, sy) in [0.9, 1.1]; their residuals summed unscaled into the UNet (released
  code). Target I_D. Single frames, M left out. Both ControlNets train together (the paper
  trains the local branch as part of the control stage; its generator was tuned for it).
- `temporal` (M): everything above frozen and conditioning as in `motion`, on clips of 16
  consecutive frames (`frames`), one I_S, one I_S' and one scaling per clip; the UNet with
  its temporal modules over all 16 frames (bidirectional, as released). One timestep per clip.
- `causal` (ours): M fine-tuned as the live engine runs it: each frame attends over the W - 1
  before it (and k newer ones with look-ahead) at the positions the streaming engine gives
  it (causal.live_pattern, from the streaming engine's own bookkeeping). Clips of `frames`
  frames (default W + 8, so that the ring fills and then slides).

Classifier-free guidance: our sampler's unconditional branch is the frozen SD1.5 UNet alone
(no reference, no controls), which needs no training. The released code's branch keeps the
appearance and zeroes both hints; `uncond_prob` trains that one: a sample's hints are zeroed
with that probability (the ControlNets still run, so every trained parameter gets a gradient). Fresh modules start as the released training started them: R as a copy
of the UNet, each ControlNet as a copy of the UNet's encoder with zero output convolutions,
M with zero output projections (an identity at first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import XPortraitModel
from ..unet import walk


@dataclass(frozen=True)
class Stage:
    name: str
    trains: tuple[str, ...]  # module paths in XPortraitModel
    controls: bool  # ControlNets plugged in
    temporal: bool  # M plugged in (clips of several frames)
    causal: bool = False
    frames: int = 1  # default frames per sample


STAGES = {
    "appearance": Stage("appearance", ("reference_net",), controls=False, temporal=False),
    "motion": Stage("motion", ("pose_controlnet", "local_controlnet"), controls=True, temporal=False),
    "temporal": Stage("temporal", ("unet.motion",), controls=True, temporal=True, frames=16),
    "causal": Stage("causal", ("unet.motion",), controls=True, temporal=True, causal=True, frames=24),
}
ORDER = tuple(STAGES)
MODULES = ("unet.unet", "unet.motion", "reference_net", "pose_controlnet", "local_controlnet", "vae")


def as_input(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (..., H, W, 3) from the loader -> (..., 3, H, W) in [-1, 1], on their device."""
    return images.movedim(-1, -3).to(dtype) / 127.5 - 1.0


def submodule(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def freeze_for(model: XPortraitModel, stage: Stage) -> list[nn.Parameter]:
    """Everything frozen except the stage's modules; returns their parameters."""
    model.requires_grad_(False)
    params = []
    for path in stage.trains:
        module = submodule(model, path)
        module.requires_grad_(True)
        params += list(module.parameters())
    return params


class StageForward(nn.Module):
    """One training step's loss for a stage: the module `accelerate` wraps (DDP syncs only
    the parameters that require grad: the stage's own)."""

    def __init__(self, model: XPortraitModel, stage: Stage, pattern=None):
        super().__init__()
        self.model, self.stage = model, stage
        self.pattern = pattern  # causal stage: temporal.FramePattern over the clip's frames
        from diffusers import DDPMScheduler

        c = model.config
        self.schedule = DDPMScheduler(num_train_timesteps=c.train_timesteps, beta_start=c.beta_start,
                                      beta_end=c.beta_end, beta_schedule="scaled_linear", prediction_type="epsilon")

    def forward(self, source: torch.Tensor, target: torch.Tensor, control: torch.Tensor | None = None,
                local: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """source (B, H, W, 3); target, control, local (B, F, H, W, 3), uint8 RGB as the loader
        gives them; uncond (B,) bool. Returns the mean squared error of the predicted noise, eq. (1)."""
        model, stage = self.model, self.stage
        b, f = target.shape[:2]
        dtype = next(model.vae.parameters()).dtype
        with torch.no_grad():
            z0 = model.encode(as_input(target.flatten(0, 1), dtype))
            z_source = model.encode(as_input(source, dtype))
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        t = torch.randint(0, self.schedule.config.num_train_timesteps, (b,), generator=generator,
                          device=z0.device)
        t_frames = t.repeat_interleave(f)
        noisy = self.schedule.add_noise(z0, noise, t_frames)

        reference = self.reference(z_source, t, f)
        down = mid = None
        if stage.controls:
            pose_hint, local_hint = as_input(control.flatten(0, 1), noisy.dtype), as_input(local.flatten(0, 1), noisy.dtype)
            if uncond is not None:  # the released unconditional branch: zero pose and local hints
                keep = (~uncond).repeat_interleave(f).to(noisy.dtype).view(-1, 1, 1, 1)
                pose_hint, local_hint = pose_hint * keep, local_hint * keep
            down, mid = model.controls(noisy, t_frames, pose_hint, local_hint)
        if stage.temporal:
            modules = len(model.unet.motion.in_order())
            past = [self.pattern] * modules if self.pattern is not None else None
            eps = model.unet(noisy, t_frames, model.text, f, down, mid, temporal_past=past, reference=reference)
        else:  # M not plugged in: the SD1.5 UNet alone
            eps = walk(model.unet.unet, noisy, t_frames, model.text, down_residuals=down, mid_residual=mid,
                       reference=reference)
        return F.mse_loss(eps.float(), noise.float())

    def reference(self, z_source: torch.Tensor, t: torch.Tensor, frames: int):
        """R's keys and values per sample (the same code the engine runs), repeated over the
        sample's frames."""
        model = self.model
        features = XPortraitModel.reference_features.__wrapped__  # the engine's, with autograd on
        if self.stage.name == "appearance":
            reference = features(model, [z_source], t)
        else:
            with torch.no_grad():
                reference = features(model, [z_source], t)
        if frames > 1:
            reference = {n: kv._replace(key=kv.key.repeat_interleave(frames, 0),
                                        value=kv.value.repeat_interleave(frames, 0))
                         for n, kv in reference.items()}
        return reference
