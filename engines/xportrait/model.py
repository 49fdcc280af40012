"""The X-Portrait model: a frozen SD1.5 renderer and the trainable modules around it.

- `unet`: SD1.5 UNet + temporal modules M (unet.py, temporal.py)
- `reference_net`: appearance module R (reference.py)
- `pose_controlnet`: motion ControlNet C on the aligned driving RGB frame
- `local_controlnet`: the same architecture on the eye/mouth-patch image
- `vae`: SD's AutoencoderKL
- `text`: the empty prompt's CLIP embedding, computed once at load (text is not used)

All inputs are tensors; images are (N, 3, H, W) in [-1, 1], latents are scaled by the VAE's
scaling factor. Loading real weights: weights/.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from .config import XPortraitConfig
from .reference import ReferenceKV, install_reference_attention, project_reference, self_attention_layers
from .temporal import MotionModules
from .unet import ReferenceNet, TemporalKV, TemporalUNet, control_walk, control_walk_deep, control_walk_in, project_times

# The reference net records into one dict per model: one reference_features call at a time (a
# live engine may make a quality level on one thread while a portrait changes on another).
_RECORDING = threading.Lock()


@dataclass
class LevelTimes:
    """Every resnet's time projection for a batch's timesteps ((N, C, 1, 1) each, in call
    order; unet.project_times), per network: what the live tick's levels repeat, made once."""

    unet_down: list[torch.Tensor]
    unet_up: list[torch.Tensor]
    pose: list[torch.Tensor]
    local: list[torch.Tensor]


Residuals = tuple[list[torch.Tensor], torch.Tensor]  # a ControlNet's: down list, mid


def add_residuals(pose: Residuals, local: Residuals) -> Residuals:
    """Both ControlNets' residuals as the UNet takes them: added, unscaled, as the released code
    does (no mid without the ControlNets' deep levels: deep levels reused)."""
    return [p + l for p, l in zip(pose[0], local[0], strict=True)], None if pose[1] is None else pose[1] + local[1]


class XPortraitModel(nn.Module):
    def __init__(self, config: XPortraitConfig):
        super().__init__()
        self.config = config
        motion = MotionModules(config.block_out_channels, config.layers_per_block, config.motion_heads,
                               config.motion_max_len, config.norm_num_groups)
        self.unet = TemporalUNet(UNet2DConditionModel(**config.unet_kwargs()), motion)
        self.reference_net = ReferenceNet(UNet2DConditionModel(**config.unet_kwargs()))
        self.pose_controlnet = ControlNetModel(**config.controlnet_kwargs())
        self.local_controlnet = ControlNetModel(**config.controlnet_kwargs())
        self.vae = AutoencoderKL(**config.vae_kwargs())
        # The empty prompt's embedding (1, 77, D). Filled from the text encoder's weights at load.
        self.register_buffer("text", torch.zeros(1, 77, config.cross_attention_dim), persistent=False)
        self._recorded = install_reference_attention(self.reference_net.unet, self.unet.unet)

    # -- images <-> latents ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (the posterior mean: deterministic)."""
        return self.vae.encode(images).latent_dist.mean * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (N, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents / self.config.scaling_factor).sample.clamp(-1, 1)

    @property
    def temporal_shapes(self) -> list[tuple[int, int, int]]:
        """(latent pixels, channels, heads) of every temporal module, in call order: down level
        i works at latent/2^i; in the up path a level's last module follows its upsampler."""
        config = self.config
        side, levels, layers = config.latent_size, len(config.block_out_channels), config.layers_per_block
        sizes: list[int] = []
        for i in range(levels):
            sizes += [side >> i] * layers
        for j in range(levels):
            level = levels - 1 - j
            sizes += [side >> level] * layers + [side >> max(level - 1, 0) if j < levels - 1 else side]
        modules = self.unet.motion.in_order()
        return [(size * size, m.norm.num_channels, m.transformer_blocks[0].attn1.heads)
                for m, size in zip(modules, sizes, strict=True)]

    # -- the per-source part ---------------------------------------------------------------------
    @torch.no_grad()
    def reference_features(self, source_latents: Sequence[torch.Tensor], timestep: torch.Tensor,
                           token_downsample: int = 1) -> ReferenceKV:
        """Keys and values of every reference at `timestep`, for the UNet's self-attention.

        Depends on the sources and the timestep only: compute once per source and timestep.
        Each source latent is (1, 4, h, w); several are joined along the tokens.
        `token_downsample` > 1 (lossy): at the latents' size, keys and values of averaged
        blocks of tokens, the UNet's own too where these are handed in (reference.py).
        """
        recorded = []
        with _RECORDING:
            for latent in source_latents:
                self._recorded.clear()
                self.reference_net(latent, timestep, self.text)
                recorded.append(dict(self._recorded))
            self._recorded.clear()
        return project_reference(self.unet.unet, recorded, tuple(source_latents[0].shape[-2:]), token_downsample)

    # -- the per-frame part ----------------------------------------------------------------------
    def control(self, controlnet: ControlNetModel, sample: torch.Tensor, timestep: torch.Tensor,
                hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ControlNet's residuals (down list, mid)."""
        text = self.text.expand(sample.shape[0], -1, -1)
        t = timestep.reshape(-1).expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        down, mid = controlnet(sample, t, text, hint, return_dict=False)
        return list(down), mid

    def controls(self, sample: torch.Tensor, timestep: torch.Tensor, pose_hint: torch.Tensor,
                 local_hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Both ControlNets' residuals, summed."""
        return add_residuals(self.control(self.pose_controlnet, sample, timestep, pose_hint),
                             self.control(self.local_controlnet, sample, timestep, local_hint))

    # -- the live tick's parts: the ControlNets and the UNet's halves, from what repeats made once:
    # a frame's hint embeddings (the same at each of its levels: made when it enters) and a
    # level's time projections (every resnet's, of a level's timestep: made once per level).
    def level_times(self, timesteps: torch.Tensor) -> LevelTimes:
        """Every resnet's time projection for these timesteps (one per batch entry)."""
        down, up = project_times(self.unet.unet, timesteps, self.text.dtype)
        return LevelTimes(down, up, project_times(self.pose_controlnet, timesteps, self.text.dtype)[0],
                          project_times(self.local_controlnet, timesteps, self.text.dtype)[0])

    def embed_pose_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The pose ControlNet's embedding of its hint ((N, 3, H, W) -> (N, C, h, w))."""
        return self.pose_controlnet.controlnet_cond_embedding(hint)

    def embed_local_hint(self, hint: torch.Tensor) -> torch.Tensor:
        return self.local_controlnet.controlnet_cond_embedding(hint)

    @property
    def hint_embedding_channels(self) -> int:
        return self.config.block_out_channels[0]

    def pose_control(self, sample: torch.Tensor, times: LevelTimes,
                     hint_embedding: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return control_walk(self.pose_controlnet, sample, times.pose, self.text, hint_embedding)

    def local_control(self, sample: torch.Tensor, times: LevelTimes,
                      hint_embedding: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return control_walk(self.local_controlnet, sample, times.local, self.text, hint_embedding)

    def unet_down(self, sample: torch.Tensor, times: LevelTimes, reference: ReferenceKV,
                  temporal_past) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The UNet's first half (features, skips): needs no ControlNet, so it runs beside them."""
        return self.unet.down(sample, times.unet_down, self.text, 1, temporal_past, reference)

    def unet_up(self, h: torch.Tensor, skips: list[torch.Tensor], times: LevelTimes, reference: ReferenceKV,
                down_residuals: list[torch.Tensor], mid_residual: torch.Tensor, temporal_past) -> torch.Tensor:
        return self.unet.up(h, skips, times.unet_up, self.text, 1, down_residuals, mid_residual, temporal_past,
                            reference)

    # -- deep features reused (DeepCache-style, `StreamSettings.deep_levels`): at some of a
    # frame's levels only the UNet's first and last levels are walked (and the ControlNets' first),
    # on the deep features its last full walk left (unet.walk_reusing).
    @property
    def deep_feature_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the deep features (what the last up level starts from)."""
        return self.config.block_out_channels[1], self.config.latent_size, self.config.latent_size

    @property
    def first_level_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of each first-level skip (and ControlNet residual on it)."""
        return self.config.block_out_channels[0], self.config.latent_size, self.config.latent_size

    @property
    def deep_temporal_modules(self) -> list[bool]:
        """Per temporal module (call order): whether it is one of the deep levels'."""
        _, down, up, _ = self.unet.module_parts()
        return [i in range(down.start, down.stop) or i in range(up.start, up.stop)
                for i in range(len(self.unet.motion.in_order()))]

    @property
    def first_level_skips(self) -> int:
        """How many of the down residuals are the first level's (`walk_in`'s skips)."""
        return 1 + len(self.unet.unet.down_blocks[0].resnets)

    def controlnet(self, which: str) -> ControlNetModel:
        return {"pose": self.pose_controlnet, "local": self.local_controlnet}[which]

    def control_in(self, which: str, sample: torch.Tensor, times: LevelTimes, hint_embedding: torch.Tensor):
        """A ControlNet ("pose", "local") to its first level: (features, the first residuals)."""
        return control_walk_in(self.controlnet(which), sample, getattr(times, which), self.text, hint_embedding)

    def control_deep(self, which: str, h: torch.Tensor, times: LevelTimes):
        """The rest of the ControlNet from `control_in`'s features: (deeper residuals, mid)."""
        net = self.controlnet(which)
        return control_walk_deep(net, h, getattr(times, which)[len(net.down_blocks[0].resnets):], self.text)

    def unet_in(self, sample, times: LevelTimes, reference: ReferenceKV, temporal_past):
        return self.unet.part_in(sample, times.unet_down, self.text, temporal_past, reference)

    def unet_deep_down(self, h, times: LevelTimes, reference: ReferenceKV, temporal_past):
        return self.unet.part_deep_down(h, times.unet_down, self.text, temporal_past, reference)

    def unet_deep_up(self, h, skips, times: LevelTimes, reference: ReferenceKV, down_residuals, mid_residual,
                     temporal_past) -> torch.Tensor:
        return self.unet.part_deep_up(h, skips, times.unet_up, self.text, down_residuals, mid_residual,
                                      temporal_past, reference)

    def unet_out(self, deep, skips, times: LevelTimes, reference: ReferenceKV, down_residuals,
                 temporal_past) -> torch.Tensor:
        return self.unet.part_out(deep, skips, times.unet_up, self.text, down_residuals, temporal_past, reference)

    @torch.no_grad()
    def predict_noise_reusing(self, sample: torch.Tensor, timestep: torch.Tensor, reference: ReferenceKV,
                              pose_hint: torch.Tensor, local_hint: torch.Tensor, temporal_past=None,
                              deep: torch.Tensor | None = None, controls: list[torch.Tensor] | None = None):
        """`predict_noise_with_keys` for one frame, its deep features and both ControlNets'
        first-level residuals (summed: what the UNet's first level takes); given `deep` (the
        frame's, from an earlier level) the deep levels are not walked and `temporal_past` and
        the keys are the first and last levels' modules' only (TemporalUNet.forward_reusing);
        given `controls` too (the frame's first-level residuals from there), the ControlNets
        are not walked either. Returns (noise, keys, deep features, first-level residuals)."""
        if controls is None:
            down, mid = self.controls(sample, timestep, pose_hint, local_hint)
        elif deep is None:
            raise ValueError("reused controls stand for the first level only: give the deep features too")
        else:
            down, mid = controls, None
        eps, keys, deep = self.unet.forward_reusing(sample, timestep, self.text, down, mid, temporal_past,
                                                    reference, deep)
        return eps, keys, deep, down[: self.first_level_skips]

    @torch.no_grad()
    def fuse_self_attention_projections(self) -> None:
        """For the live tick: each spatial self-attention's q, k and v projections of the UNet
        and both ControlNets as one product (diffusers' `fuse_projections`: the same weights
        side by side, one GEMM reading its input once instead of three), and the ControlNets'
        cross-attention k and v likewise. A copy of the weights, made once (again if they
        change); the reference net keeps its separate projections."""
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        for attn in self_attention_layers(self.unet.unet).values():
            attn.fuse_projections()  # its processor (reference.ReadReference) reads to_qkv then
        for net in (self.pose_controlnet, self.local_controlnet):
            for module in net.modules():
                if isinstance(module, Attention):
                    module.fuse_projections()
                    module.set_processor(FusedAttnProcessor2_0())

    @torch.no_grad()
    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, frames: int, reference: ReferenceKV,
                      pose_hint: torch.Tensor, local_hint: torch.Tensor, guidance: float = 1.0,
                      temporal_past=None) -> torch.Tensor:
        """The noise in `sample` ((clips * frames, 4, h, w)) at `timestep`, conditioned on the
        reference and both hints. With guidance != 1, classifier-free guidance against the
        released code's unconditional branch: the same UNet with no reference and no controls."""
        down, mid = self.controls(sample, timestep, pose_hint, local_hint)
        eps = self.unet(sample, timestep, self.text, frames, down, mid, temporal_past, reference)
        if guidance == 1.0:
            return eps
        plain = self.unet(sample, timestep, self.text, frames, temporal_past=temporal_past)
        return plain + guidance * (eps - plain)

    @torch.no_grad()
    def predict_noise_with_keys(self, sample: torch.Tensor, timestep: torch.Tensor, frames: int,
                                reference: ReferenceKV, pose_hint: torch.Tensor, local_hint: torch.Tensor,
                                temporal_past=None) -> tuple[torch.Tensor, list[TemporalKV]]:
        """`predict_noise` without guidance, and every temporal module's position-free keys and
        values of these frames (in call order): what a causal cache of them keeps."""
        down, mid = self.controls(sample, timestep, pose_hint, local_hint)
        return self.unet.forward_with_keys(sample, timestep, self.text, frames, down, mid, temporal_past, reference)
