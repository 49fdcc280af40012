"""The released checkpoint's tensor names <-> ours, both ways.

The released code is ldm/CompVis-style (lllyasviel's ControlNet base): its checkpoint names
tensors by ldm module paths (`model.diffusion_model.input_blocks.4.0.in_layers.2.weight`);
our modules are diffusers' (`unet.unet.down_blocks.1.resnets.0.conv1.weight`). The map is a
table of module prefixes, built once per XPortraitConfig by walking the ldm blocks the way
ldm numbers them; a name maps by its longest known prefix, the rest of it unchanged. The same
table read backwards gives the released names of our tensors (`to_released`, for exporting
trained weights in the released layout).

What the released file holds beyond our modules: the schedule buffers (`ddpm_schedule`,
computed as ldm registers them), CLIP's text tower (we keep only the empty prompt's
embedding) and the reference net's hint encoder (built by the released code, never called).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ..config import XPortraitConfig

# The released file's parts: its prefix -> ours. "text_encoder." is not a module of our
# model: those tensors compute the empty-prompt embedding (`model.text`).
UNET, APPEARANCE, POSE, LOCAL = ("model.diffusion_model.", "appearance_control_model.", "pose_control_model.",
                                 "local_pose_control_model.")
VAE, TEXT = "first_stage_model.", "cond_stage_model.transformer."

DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)

IGNORED = [  # (pattern, why a tensor of a file is not used)
    (r"appearance_control_model\.input_hint_block\.",
     "the reference net's hint encoder: the released code builds it but never calls it"),
    (r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$", "CLIP's token positions 0..76"),
    (r"model_ema\.", "training's EMA copy of the UNet (the regular weights are used, as diffusers does)"),
    (rf"({'|'.join(DDPM_BUFFERS)})$", "the diffusion schedule: checked against SD1.5's (alphas_cumprod)"),
]

# Our keys whose ldm tensor is a 1x1 convolution and ours a linear layer.
CONV_AS_LINEAR = re.compile(r"vae\.(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
REFERENCE_UNUSED = ("conv_norm_out.", "conv_out.")  # the reference net has no output layers
NOT_RELEASED = ("small_decoder.",)  # ours only (TAESD for the live path): not part of the released model

RESNET = (  # ldm ResBlock -> diffusers ResnetBlock2D
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)
VAE_RESNET = (("", ""), ("nin_shortcut.", "conv_shortcut."))  # same names but the shortcut's
VAE_ATTENTION = (  # ldm AttnBlock (1x1 convs) -> diffusers Attention (linears, see CONV_AS_LINEAR)
    ("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."),
)
MOTION = (  # AnimateDiff VanillaTemporalModule -> diffusers MotionAdapter naming
    ("", ""),
    # Each of the two attentions carries its own copy of the (fixed) positional table; ours has
    # one per block. Both copies land on it and must agree; exported, it is written to both.
    ("transformer_blocks.0.attention_blocks.0.pos_encoder.", "transformer_blocks.0.pos_embed."),
    ("transformer_blocks.0.attention_blocks.1.pos_encoder.", "transformer_blocks.0.pos_embed."),
    ("transformer_blocks.0.attention_blocks.0.", "transformer_blocks.0.attn1."),
    ("transformer_blocks.0.attention_blocks.1.", "transformer_blocks.0.attn2."),
    ("transformer_blocks.0.norms.0.", "transformer_blocks.0.norm1."),
    ("transformer_blocks.0.norms.1.", "transformer_blocks.0.norm2."),
    ("transformer_blocks.0.ff_norm.", "transformer_blocks.0.norm3."),
)

Pairs = list[tuple[str, str]]  # (released prefix, our prefix)


def _block(released: str, ours: str, leaves=(("", ""),)) -> Pairs:
    return [(released + a, ours + b) for a, b in leaves]


def unet_pairs(config: XPortraitConfig, *, decoder: bool = True, out: bool = True,
               controlnet: bool = False) -> Pairs:
    """ldm UNetModel / ControlNet -> diffusers UNet2DConditionModel / ControlNetModel.

    ldm numbers its blocks flat: input block 1 + level * per + j is res(+attention) block j of
    a down level (per = layers_per_block + 1: the level's downsampler comes last); output
    block level * per + j is res block j of an up level, its upsampler riding on the last one
    (after the attention, where the level has one). Spatial attention: every down level but
    the last, every up level but the first (SD1.5's attention_resolutions 4, 2, 1).
    """
    levels, layers = len(config.block_out_channels), config.layers_per_block
    per = layers + 1
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in.")]
    for level in range(levels):
        for j in range(layers):
            i = 1 + level * per + j
            pairs += _block(f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET)
            if level < levels - 1:
                pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level < levels - 1:
            pairs.append((f"input_blocks.{(level + 1) * per}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
    pairs += _block("middle_block.0.", "mid_block.resnets.0.", RESNET)
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += _block("middle_block.2.", "mid_block.resnets.1.", RESNET)
    if decoder:
        for level in range(levels):
            attention = level > 0
            for j in range(per):
                i = level * per + j
                pairs += _block(f"output_blocks.{i}.0.", f"up_blocks.{level}.resnets.{j}.", RESNET)
                if attention:
                    pairs.append((f"output_blocks.{i}.1.", f"up_blocks.{level}.attentions.{j}."))
                if j == layers and level < levels - 1:
                    pairs.append((f"output_blocks.{i}.{2 if attention else 1}.conv.",
                                  f"up_blocks.{level}.upsamplers.0.conv."))
    if out:
        pairs += [("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    if controlnet:
        skips = 1 + levels * layers + (levels - 1)  # conv_in, every res block, every downsampler
        pairs += [(f"zero_convs.{j}.0.", f"controlnet_down_blocks.{j}.") for j in range(skips)]
        pairs.append(("middle_block_out.0.", "controlnet_mid_block."))
        # cldm's input_hint_block: convs at even indices (SiLUs between), a zero conv last
        blocks = 2 * (len(config.conditioning_channels) - 1)
        pairs.append(("input_hint_block.0.", "controlnet_cond_embedding.conv_in."))
        pairs += [(f"input_hint_block.{2 * (b + 1)}.", f"controlnet_cond_embedding.blocks.{b}.") for b in range(blocks)]
        pairs.append((f"input_hint_block.{2 * (blocks + 1)}.", "controlnet_cond_embedding.conv_out."))
    return pairs


def motion_pairs(config: XPortraitConfig) -> Pairs:
    """The released UNet's temporal modules, numbered over all down (then up) positions; ours
    by level: `layers_per_block` per down level, one more per up level."""
    levels, layers = len(config.block_out_channels), config.layers_per_block
    pairs: Pairs = []
    for k in range(levels * layers):
        pairs += _block(f"input_blocks_motion_module.{k}.0.temporal_transformer.",
                        f"down_blocks.{k // layers}.motion_modules.{k % layers}.", MOTION)
    for k in range(levels * (layers + 1)):
        pairs += _block(f"output_blocks_motion_module.{k}.0.temporal_transformer.",
                        f"up_blocks.{k // (layers + 1)}.motion_modules.{k % (layers + 1)}.", MOTION)
    return pairs


def vae_pairs(config: XPortraitConfig) -> Pairs:
    """ldm AutoencoderKL -> diffusers AutoencoderKL (ldm numbers decoder levels from the top
    resolution, diffusers from the bottom)."""
    levels, layers = len(config.vae_block_out_channels), config.vae_layers_per_block
    last = levels - 1
    pairs: Pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.norm_out.", f"{part}.conv_norm_out.")]
        pairs += _block(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET)
        pairs += _block(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)
        pairs += _block(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION)
    for i in range(levels):
        for j in range(layers):
            pairs += _block(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET)
        if i < last:
            pairs.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        for j in range(layers + 1):
            pairs += _block(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{last - i}.resnets.{j}.", VAE_RESNET)
        if i > 0:
            pairs.append((f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{last - i}.upsamplers.0.conv."))
    return pairs + [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]


def _longest(table: dict, key: str) -> str | None:
    """The longest prefix of `key` (ending at a dot) that `table` knows."""
    end = key.rfind(".")
    while end > 0:
        if key[: end + 1] in table:
            return key[: end + 1]
        end = key.rfind(".", 0, end)
    return None


@dataclass(frozen=True)
class KeyMap:
    """Module prefixes: released -> ours, and ours -> released (one of ours may have two
    released names: a temporal block's positional table)."""

    ours_of: dict[str, str]
    released_of: dict[str, tuple[str, ...]]

    def ours(self, released: str) -> str | None:
        """Our name for a released tensor name, or None (a name the release does not have)."""
        hit = _longest(self.ours_of, released)
        return None if hit is None else self.ours_of[hit] + released[len(hit):]

    def released(self, ours: str) -> tuple[str, ...]:
        """The released names of one of our tensors (empty: none)."""
        hit = _longest(self.released_of, ours)
        return () if hit is None else tuple(p + ours[len(hit):] for p in self.released_of[hit])


@functools.lru_cache(maxsize=8)
def key_map(config: XPortraitConfig) -> KeyMap:
    unet = unet_pairs(config)
    parts = [
        (UNET, "unet.motion.", motion_pairs(config)),
        (UNET, "unet.unet.", unet),
        (APPEARANCE, "reference_net.unet.", unet_pairs(config, out=False)),
        (POSE, "pose_controlnet.", unet_pairs(config, decoder=False, out=False, controlnet=True)),
        (LOCAL, "local_controlnet.", unet_pairs(config, decoder=False, out=False, controlnet=True)),
        (VAE, "vae.", vae_pairs(config)),
        (TEXT, "text_encoder.", [("text_model.", "")]),  # HF CLIPTextModel; ours without "text_model."
    ]
    ours_of: dict[str, str] = {}
    released_of: dict[str, list[str]] = {}
    for theirs, mine, pairs in parts:
        for a, b in pairs:
            released, ours = theirs + a, mine + b
            if ours_of.setdefault(released, ours) != ours:
                raise AssertionError(f"key map: {released} maps twice")
            released_of.setdefault(ours, []).append(released)
    return KeyMap(ours_of, {k: tuple(v) for k, v in released_of.items()})


def ignored(key: str) -> str | None:
    """Why a released tensor is not used, if it is one of those."""
    return next((why for pattern, why in IGNORED if re.match(pattern, key)), None)


# -- the schedule buffers ------------------------------------------------------------------------

def sd15_alphas_cumprod(config: XPortraitConfig) -> torch.Tensor:
    """ldm's "linear" schedule (diffusers' scaled_linear), in float64 as ldm computes it."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def ddpm_schedule(config: XPortraitConfig) -> dict[str, torch.Tensor]:
    """The 13 buffers ldm's DDPM.register_schedule stores (float64 math, float32 tensors;
    v_posterior 0, logvar_init 0): what a released-layout file holds besides weights."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.train_timesteps,
                           dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    variance = betas * (1.0 - prev) / (1.0 - ac)
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(config.train_timesteps, dtype=torch.float64),
    }
    return {name: values[name].float() for name in DDPM_BUFFERS}
