"""Sizes of the X-Portrait model: the real SD1.5 one and a tiny one of the same architecture.

Every module (UNet, reference net, both ControlNets, temporal modules, VAE, text encoder)
is built from one `XPortraitConfig`, so a tiny configuration exercises exactly the code the
full one runs, on a CPU, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class XPortraitConfig:
    resolution: int = 512  # frames are resolution x resolution; latents are 1/8 of that
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_heads: int = 8  # spatial attention heads (diffusers' SD1.5 "attention_head_dim" = 8)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    conditioning_channels: tuple[int, ...] = (16, 32, 96, 256)  # ControlNet hint encoder
    # Temporal modules (AnimateDiff "Vanilla", as the released code configures them).
    motion_heads: int = 8
    motion_max_len: int = 24  # positional encoding length
    window: int = 16  # frames per temporal window: the released modules are trained on 16
    # VAE
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    # Text encoder (CLIP ViT-L/14 text tower); only the empty prompt is ever encoded.
    text_hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    # Diffusion schedule of SD1.5 (ldm "linear" = diffusers "scaled_linear").
    beta_start: float = 0.00085
    beta_end: float = 0.012
    train_timesteps: int = 1000

    @classmethod
    def sd15(cls, resolution: int = 512) -> "XPortraitConfig":
        return cls(resolution=resolution)

    @classmethod
    def tiny(cls, resolution: int = 64) -> "XPortraitConfig":
        """The same architecture a few channels wide, for CPU tests."""
        return cls(
            resolution=resolution,
            block_out_channels=(16, 32, 64, 64),  # widths change where SD1.5's do: same keys
            attention_heads=2,
            cross_attention_dim=32,
            norm_num_groups=8,
            conditioning_channels=(8, 8, 8, 16),
            motion_heads=2,
            vae_block_out_channels=(8, 16, 32, 32),
            vae_norm_num_groups=8,
            text_hidden_size=32,
            text_layers=2,
            text_heads=2,
            text_intermediate_size=64,
        )

    def with_resolution(self, resolution: int) -> "XPortraitConfig":
        return replace(self, resolution=resolution)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    # -- diffusers constructor arguments --------------------------------------------------------
    def unet_kwargs(self) -> dict:
        levels = len(self.block_out_channels)
        return dict(
            sample_size=self.latent_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            attention_head_dim=self.attention_heads,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.norm_num_groups,
        )

    def controlnet_kwargs(self) -> dict:
        kwargs = self.unet_kwargs()
        for key in ("sample_size", "out_channels", "up_block_types"):
            kwargs.pop(key)
        return dict(kwargs, conditioning_channels=3, conditioning_embedding_out_channels=self.conditioning_channels)

    def vae_kwargs(self) -> dict:
        levels = len(self.vae_block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=self.vae_block_out_channels,
            layers_per_block=self.vae_layers_per_block,
            latent_channels=4,
            norm_num_groups=self.vae_norm_num_groups,
            sample_size=self.resolution,
            scaling_factor=self.scaling_factor,
        )

    def text_kwargs(self) -> dict:
        """transformers.CLIPTextConfig arguments."""
        return dict(
            vocab_size=49408,
            hidden_size=self.text_hidden_size,
            intermediate_size=self.text_intermediate_size,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=self.cross_attention_dim,
        )
