"""The released X-Portrait checkpoint's key names and shapes, for any XPortraitConfig.

Written from the released code's module structure (ldm UNetModel_Temporal, cldm ControlNet,
ControlNetReferenceOnly, AnimateDiff's VanillaTemporalModule, ldm AutoencoderKL, the HF CLIP
text tower of FrozenCLIPEmbedder, the DDPM schedule buffers), walking the constructors the way
they build their modules. It knows nothing of our model or of engines/xportrait/weights/:
a test that loads what it writes checks the loader's mapping against the released layout,
not against itself. At the SD1.5 config it yields the counts derived from the released code
(model.diffusion_model 686 + 560 motion, appearance 698, each ControlNet 340, VAE 248,
CLIP 197, 13 buffers: 3082).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

Shapes = dict[str, tuple[int, ...]]

DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)
ATTENTION_RESOLUTIONS = (4, 2, 1)  # cldm_v15 yaml: spatial transformers at downsampling 1, 2, 4


class _Keys:
    """Accumulates (name -> shape) the way nn.Module.state_dict names submodules."""

    def __init__(self):
        self.shapes: Shapes = {}

    def linear(self, name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
        self.shapes[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            self.shapes[f"{name}.bias"] = (fan_out,)

    def conv(self, name: str, cin: int, cout: int, k: int) -> None:
        self.shapes[f"{name}.weight"] = (cout, cin, k, k)
        self.shapes[f"{name}.bias"] = (cout,)

    def norm(self, name: str, c: int) -> None:  # GroupNorm / LayerNorm
        self.shapes[f"{name}.weight"] = (c,)
        self.shapes[f"{name}.bias"] = (c,)


# -- ldm/modules/diffusionmodules/openaimodel.py and ldm/modules/attention.py -----------------

def _resblock(k: _Keys, p: str, cin: int, cout: int, emb: int) -> None:
    k.norm(p + "in_layers.0", cin)  # GroupNorm32, SiLU, conv
    k.conv(p + "in_layers.2", cin, cout, 3)
    k.linear(p + "emb_layers.1", emb, cout)  # SiLU, linear (no scale-shift norm)
    k.norm(p + "out_layers.0", cout)  # GroupNorm32, SiLU, Dropout, zero conv
    k.conv(p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        k.conv(p + "skip_connection", cin, cout, 1)  # else nn.Identity


def _cross_attention(k: _Keys, p: str, dim: int, context: int) -> None:
    k.linear(p + "to_q", dim, dim, bias=False)  # heads * dim_head == dim
    k.linear(p + "to_k", context, dim, bias=False)
    k.linear(p + "to_v", context, dim, bias=False)
    k.linear(p + "to_out.0", dim, dim)  # Sequential(Linear, Dropout)


def _feed_forward(k: _Keys, p: str, dim: int) -> None:
    k.linear(p + "net.0.proj", dim, 8 * dim)  # GEGLU(dim, 4 * dim): one projection, two halves
    k.linear(p + "net.2", 4 * dim, dim)  # net.1 is Dropout


def _spatial_transformer(k: _Keys, p: str, c: int, context: int) -> None:
    k.norm(p + "norm", c)
    k.conv(p + "proj_in", c, c, 1)  # use_linear_in_transformer False: 1x1 convs
    b = p + "transformer_blocks.0."
    _cross_attention(k, b + "attn1.", c, c)
    _feed_forward(k, b + "ff.", c)
    _cross_attention(k, b + "attn2.", c, context)
    for i in (1, 2, 3):
        k.norm(b + f"norm{i}", c)
    k.conv(p + "proj_out", c, c, 1)


# -- ldm/modules/motion_module.py (AnimateDiff VanillaTemporalModule) -------------------------

def _temporal_module(k: _Keys, p: str, c: int, max_len: int) -> None:
    p += "temporal_transformer."
    k.norm(p + "norm", c)
    k.linear(p + "proj_in", c, c)
    b = p + "transformer_blocks.0."
    for i in (0, 1):  # attention_block_types: Temporal_Self, Temporal_Self
        a = b + f"attention_blocks.{i}."
        k.linear(a + "to_q", c, c, bias=False)
        k.linear(a + "to_k", c, c, bias=False)
        k.linear(a + "to_v", c, c, bias=False)
        k.linear(a + "to_out.0", c, c)
        k.shapes[a + "pos_encoder.pe"] = (1, max_len, c)
        k.norm(b + f"norms.{i}", c)
    k.linear(b + "ff.net.0.proj", c, 8 * c)  # diffusers FeedForward, geglu
    k.linear(b + "ff.net.2", 4 * c, c)
    k.norm(b + "ff_norm", c)
    k.linear(p + "proj_out", c, c)


def _hint_block(k: _Keys, p: str, channels: tuple[int, ...], model_channels: int) -> None:
    """cldm's input_hint_block: conv, SiLU, ... ; convs at even indices, a zero conv last."""
    convs = [(3, channels[0])]
    for a, b in zip(channels, channels[1:]):
        convs += [(a, a), (a, b)]
    convs.append((channels[-1], model_channels))
    for i, (cin, cout) in enumerate(convs):
        k.conv(f"{p}input_hint_block.{2 * i}", cin, cout, 3)


def ldm_unet(config, prefix: str, *, decoder: bool = True, out: bool = True, motion: bool = False,
             controlnet: bool = False, hint: bool = False) -> Shapes:
    """UNetModel(_Temporal) / ControlNet / ControlNetReferenceOnly at `config`'s widths."""
    k = _Keys()
    mc = config.block_out_channels[0]
    mult = [c // mc for c in config.block_out_channels]
    emb = 4 * mc
    ctx = config.cross_attention_dim
    nres = config.layers_per_block
    k.linear(prefix + "time_embed.0", mc, emb)
    k.linear(prefix + "time_embed.2", emb, emb)
    if hint:
        _hint_block(k, prefix, config.conditioning_channels, mc)
    k.conv(prefix + "input_blocks.0.0", 4, mc, 3)
    chans, ch, ds, i, m_in = [mc], mc, 1, 1, 0
    for level, mu in enumerate(mult):
        for _ in range(nres):
            _resblock(k, f"{prefix}input_blocks.{i}.0.", ch, mu * mc, emb)
            ch = mu * mc
            if ds in ATTENTION_RESOLUTIONS:
                _spatial_transformer(k, f"{prefix}input_blocks.{i}.1.", ch, ctx)
            if motion:
                _temporal_module(k, f"{prefix}input_blocks_motion_module.{m_in}.0.", ch, config.motion_max_len)
                m_in += 1
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            k.conv(f"{prefix}input_blocks.{i}.0.op", ch, ch, 3)
            chans.append(ch)
            i += 1
            ds *= 2
    if controlnet:
        for j, c in enumerate(chans):
            k.conv(f"{prefix}zero_convs.{j}.0", c, c, 1)
    _resblock(k, prefix + "middle_block.0.", ch, ch, emb)
    _spatial_transformer(k, prefix + "middle_block.1.", ch, ctx)
    _resblock(k, prefix + "middle_block.2.", ch, ch, emb)
    if controlnet:
        k.conv(prefix + "middle_block_out.0", ch, ch, 1)
    if decoder:
        i, m_out = 0, 0
        for level, mu in reversed(list(enumerate(mult))):
            for r in range(nres + 1):
                _resblock(k, f"{prefix}output_blocks.{i}.0.", ch + chans.pop(), mc * mu, emb)
                ch = mc * mu
                n = 1
                if ds in ATTENTION_RESOLUTIONS:
                    _spatial_transformer(k, f"{prefix}output_blocks.{i}.1.", ch, ctx)
                    n = 2
                if level and r == nres:
                    k.conv(f"{prefix}output_blocks.{i}.{n}.conv", ch, ch, 3)  # Upsample
                    ds //= 2
                if motion:
                    _temporal_module(k, f"{prefix}output_blocks_motion_module.{m_out}.0.", ch, config.motion_max_len)
                    m_out += 1
                i += 1
    if out:
        k.norm(prefix + "out.0", ch)
        k.conv(prefix + "out.2", mc, 4, 3)
    return k.shapes


# -- ldm/modules/diffusionmodules/model.py (Encoder, Decoder) + AutoencoderKL ------------------

def _vae_resnet(k: _Keys, p: str, cin: int, cout: int) -> None:
    k.norm(p + "norm1", cin)
    k.conv(p + "conv1", cin, cout, 3)
    k.norm(p + "norm2", cout)
    k.conv(p + "conv2", cout, cout, 3)
    if cin != cout:
        k.conv(p + "nin_shortcut", cin, cout, 1)


def _vae_attention(k: _Keys, p: str, c: int) -> None:
    k.norm(p + "norm", c)
    for name in ("q", "k", "v", "proj_out"):
        k.conv(p + name, c, c, 1)


def ldm_vae(config, prefix: str = "first_stage_model.") -> Shapes:
    k = _Keys()
    ch = config.vae_block_out_channels[0]
    mult = [c // ch for c in config.vae_block_out_channels]
    nres, z = config.vae_layers_per_block, 4
    e = prefix + "encoder."
    k.conv(e + "conv_in", 3, ch, 3)
    block_in = ch
    for i, mu in enumerate(mult):
        block_in = ch * ((1,) + tuple(mult))[i]
        for j in range(nres):
            _vae_resnet(k, f"{e}down.{i}.block.{j}.", block_in, ch * mu)
            block_in = ch * mu
        if i != len(mult) - 1:
            k.conv(f"{e}down.{i}.downsample.conv", block_in, block_in, 3)
    _vae_resnet(k, e + "mid.block_1.", block_in, block_in)
    _vae_attention(k, e + "mid.attn_1.", block_in)
    _vae_resnet(k, e + "mid.block_2.", block_in, block_in)
    k.norm(e + "norm_out", block_in)
    k.conv(e + "conv_out", block_in, 2 * z, 3)  # double_z
    d = prefix + "decoder."
    block_in = ch * mult[-1]
    k.conv(d + "conv_in", z, block_in, 3)
    _vae_resnet(k, d + "mid.block_1.", block_in, block_in)
    _vae_attention(k, d + "mid.attn_1.", block_in)
    _vae_resnet(k, d + "mid.block_2.", block_in, block_in)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            _vae_resnet(k, f"{d}up.{i}.block.{j}.", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != 0:
            k.conv(f"{d}up.{i}.upsample.conv", block_in, block_in, 3)
    k.norm(d + "norm_out", block_in)
    k.conv(d + "conv_out", block_in, 3, 3)
    k.conv(prefix + "quant_conv", 2 * z, 2 * z, 1)  # embed_dim 4
    k.conv(prefix + "post_quant_conv", z, z, 1)
    return k.shapes


# -- FrozenCLIPEmbedder.transformer: transformers 4.30 CLIPTextModel ---------------------------

def clip_text(config, prefix: str = "cond_stage_model.transformer.") -> Shapes:
    k = _Keys()
    t = prefix + "text_model."
    d, inner = config.text_hidden_size, config.text_intermediate_size
    k.shapes[t + "embeddings.token_embedding.weight"] = (49408, d)
    k.shapes[t + "embeddings.position_embedding.weight"] = (77, d)
    k.shapes[t + "embeddings.position_ids"] = (1, 77)  # int64 buffer, persistent in 4.30
    for layer in range(config.text_layers):
        p = f"{t}encoder.layers.{layer}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            k.linear(p + "self_attn." + name, d, d)
        k.norm(p + "layer_norm1", d)
        k.linear(p + "mlp.fc1", d, inner)
        k.linear(p + "mlp.fc2", inner, d)
        k.norm(p + "layer_norm2", d)
    k.norm(t + "final_layer_norm", d)
    return k.shapes


# -- ldm/models/diffusion/ddpm.py: register_schedule ------------------------------------------

def ddpm_buffers(config) -> dict[str, torch.Tensor]:
    """The 13 schedule buffers as ldm registers them (float64 math, stored float32)."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.train_timesteps,
                           dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior 0
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(config.train_timesteps, dtype=torch.float64),
    }
    assert tuple(values) == DDPM_BUFFERS
    return {name: v.float() for name, v in values.items()}


# -- the whole released model -----------------------------------------------------------------

PARTS = ("unet", "motion", "appearance", "pose", "local", "vae", "text", "schedule")
SD_PARTS = ("unet", "vae", "text", "schedule")  # what an SD1.5 single file holds


def released_shapes(config, parts=PARTS) -> Shapes:
    """ControlLDMReferenceOnly_Temporal_Pose_Local's state-dict layout (or some of its parts)."""
    shapes: Shapes = {}
    unet = ldm_unet(config, "model.diffusion_model.", motion=True)
    if "unet" in parts:
        shapes.update({k: v for k, v in unet.items() if "_motion_module." not in k})
    if "motion" in parts:
        shapes.update({k: v for k, v in unet.items() if "_motion_module." in k})
    if "appearance" in parts:
        shapes.update(ldm_unet(config, "appearance_control_model.", out=False, hint=True))
    if "pose" in parts:
        shapes.update(ldm_unet(config, "pose_control_model.", decoder=False, out=False, controlnet=True, hint=True))
    if "local" in parts:
        shapes.update(ldm_unet(config, "local_pose_control_model.", decoder=False, out=False, controlnet=True,
                               hint=True))
    if "vae" in parts:
        shapes.update(ldm_vae(config))
    if "text" in parts:
        shapes.update(clip_text(config))
    if "schedule" in parts:
        shapes.update({name: (config.train_timesteps,) for name in DDPM_BUFFERS})
    return shapes


def positional_table(length: int, dim: int) -> torch.Tensor:
    """AnimateDiff's PositionalEncoding.pe: sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * freq)
    pe[0, :, 1::2] = torch.cos(position * freq)
    return pe


def released_state_dict(config, parts=PARTS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in the released layout. Weights N(0, 1/fan_in) keep activations
    at unit scale (finite outputs), norm scales near 1; fixed buffers hold their real values."""
    g = torch.Generator().manual_seed(seed)
    schedule = ddpm_buffers(config)
    sd = {}
    for name, shape in released_shapes(config, parts).items():
        if name in schedule:
            sd[name] = schedule[name]
        elif name.endswith("pos_encoder.pe"):
            sd[name] = positional_table(shape[1], shape[2])
        elif name.endswith("position_ids"):
            sd[name] = torch.arange(shape[1]).unsqueeze(0)
        elif len(shape) >= 2:
            sd[name] = torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
        elif name.endswith(".weight"):
            sd[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = 0.1 * torch.randn(shape, generator=g)
    return sd


def write_checkpoint(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """As the released training writes it: torch.save({'state_dict': ...})."""
    torch.save({"state_dict": state_dict}, path)
    return path
