"""X-Portrait's weights: Stable Diffusion 1.5, the released checkpoint, LCM-LoRA.

`load_model` builds the model from
- `base`: SD1.5, as a diffusers folder (unet/, vae/, text_encoder/) or one ldm-layout file
  (`.safetensors`, `.ckpt`). It fills the UNet, the VAE and the text embedding, and starts the
  reference net as a copy of the UNet (the released training starts R that way).
- `checkpoint`: the released `model_state-*.th`, in the ldm layout of the released code
  (`model.diffusion_model.*`, `appearance_control_model.*`, `pose_control_model.*`,
  `local_pose_control_model.*`, `first_stage_model.*`, `cond_stage_model.*`, schedule buffers).
  What it holds replaces what the base gave.

Every tensor of every file is either mapped onto one of our parameters (by the rule tables
below) or ignored for a stated reason; anything else is an error that lists the keys, as is a
parameter that no file fills and a tensor of the wrong shape. (The released inference script
loads with strict=False, which would hide all three.)

Files are read locally. Hub ids are downloaded only where the caller passes `allow_hub=True`.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..base import EngineError
from .config import XPortraitConfig
from .model import XPortraitModel
from .temporal import sinusoidal_positions

log = logging.getLogger(__name__)

__all__ = ["WeightsError", "load_model", "fuse_lora", "map_released", "read_state_dict"]

LISTED = 20  # keys named in an error message before "... and N more"

# CLIP's tokenisation of the empty prompt, padded to 77: <|startoftext|>, then <|endoftext|>
# (SD1.5's tokenizer pads with it). Both CFG branches of the released code use "" only.
EMPTY_PROMPT_IDS = [49406] + [49407] * 76

DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".th", ".bin")


class WeightsError(EngineError):
    """Weights that cannot be read or do not fit the model; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Rule tables: ldm key -> our key
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """Keys matching `pattern` (at the start) get the prefix `to(match)`; what follows the
    match keeps its name, except the leading parts renamed by `leaves`."""

    pattern: str
    to: Callable[[re.Match], str]
    leaves: tuple[tuple[str, str], ...] = ()


def _rename(rules: Iterable[Rule], key: str) -> str | None:
    for rule in rules:
        m = re.match(rule.pattern, key)
        if m is None:
            continue
        rest = key[m.end():]
        for old, new in rule.leaves:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return rule.to(m) + rest
    return None


RESNET_LEAVES = (  # ldm ResBlock -> diffusers ResnetBlock2D
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)
VAE_RESNET_LEAVES = (("nin_shortcut.", "conv_shortcut."),)
VAE_ATTENTION_LEAVES = (  # ldm AttnBlock (1x1 convs) -> diffusers Attention (linears, see _fit)
    ("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."),
)
MOTION_LEAVES = (  # AnimateDiff VanillaTemporalModule -> diffusers MotionAdapter naming
    # Each of the two attentions carries its own copy of the (fixed) positional table; ours
    # has one per block. Both copies land on it and must agree (see _Collector.put).
    ("transformer_blocks.0.attention_blocks.0.pos_encoder.", "transformer_blocks.0.pos_embed."),
    ("transformer_blocks.0.attention_blocks.1.pos_encoder.", "transformer_blocks.0.pos_embed."),
    ("transformer_blocks.0.attention_blocks.0.", "transformer_blocks.0.attn1."),
    ("transformer_blocks.0.attention_blocks.1.", "transformer_blocks.0.attn2."),
    ("transformer_blocks.0.norms.0.", "transformer_blocks.0.norm1."),
    ("transformer_blocks.0.norms.1.", "transformer_blocks.0.norm2."),
    ("transformer_blocks.0.ff_norm.", "transformer_blocks.0.norm3."),
)


def unet_rules(config: XPortraitConfig) -> list[Rule]:
    """ldm UNetModel / ControlNet -> diffusers UNet2DConditionModel / ControlNetModel.

    ldm numbers its blocks flat: input block i > 0 is layer (i-1) % per of level (i-1) // per,
    where a level holds `layers_per_block` res(+attention) blocks and then a downsampler;
    output block i is layer i % per of up level i // per (an upsampler rides on the last one).
    """
    per = config.layers_per_block + 1

    def down(i: str) -> str:
        return f"down_blocks.{(int(i) - 1) // per}"

    def up(i: str) -> str:
        return f"up_blocks.{int(i) // per}"

    hint_out = 4 * len(config.conditioning_channels) - 2  # ldm index of the hint encoder's last conv

    def hint(m: re.Match) -> str:
        j = int(m[1])
        if j == 0:
            return "controlnet_cond_embedding.conv_in."
        if j == hint_out:
            return "controlnet_cond_embedding.conv_out."
        return f"controlnet_cond_embedding.blocks.{j // 2 - 1}." if j % 2 == 0 else f"<odd hint layer {j}>."

    return [
        Rule(r"time_embed\.0\.", lambda m: "time_embedding.linear_1."),
        Rule(r"time_embed\.2\.", lambda m: "time_embedding.linear_2."),
        Rule(r"input_blocks\.0\.0\.", lambda m: "conv_in."),
        Rule(r"input_blocks\.(\d+)\.0\.op\.", lambda m: f"{down(m[1])}.downsamplers.0.conv."),
        Rule(r"input_blocks\.(\d+)\.0\.", lambda m: f"{down(m[1])}.resnets.{(int(m[1]) - 1) % per}.", RESNET_LEAVES),
        Rule(r"input_blocks\.(\d+)\.1\.", lambda m: f"{down(m[1])}.attentions.{(int(m[1]) - 1) % per}."),
        Rule(r"middle_block\.0\.", lambda m: "mid_block.resnets.0.", RESNET_LEAVES),
        Rule(r"middle_block\.1\.", lambda m: "mid_block.attentions.0."),
        Rule(r"middle_block\.2\.", lambda m: "mid_block.resnets.1.", RESNET_LEAVES),
        Rule(r"output_blocks\.(\d+)\.0\.", lambda m: f"{up(m[1])}.resnets.{int(m[1]) % per}.", RESNET_LEAVES),
        Rule(r"output_blocks\.(\d+)\.[12]\.conv\.", lambda m: f"{up(m[1])}.upsamplers.0.conv."),
        Rule(r"output_blocks\.(\d+)\.1\.", lambda m: f"{up(m[1])}.attentions.{int(m[1]) % per}."),
        Rule(r"out\.0\.", lambda m: "conv_norm_out."),
        Rule(r"out\.2\.", lambda m: "conv_out."),
        # ControlNet only
        Rule(r"zero_convs\.(\d+)\.0\.", lambda m: f"controlnet_down_blocks.{m[1]}."),
        Rule(r"middle_block_out\.0\.", lambda m: "controlnet_mid_block."),
        Rule(r"input_hint_block\.(\d+)\.", hint),
    ]


def motion_rules(config: XPortraitConfig) -> list[Rule]:
    """The released UNet's temporal modules, numbered over all down (then up) positions."""
    layers = config.layers_per_block

    def down(m: re.Match) -> str:
        return f"down_blocks.{int(m[1]) // layers}.motion_modules.{int(m[1]) % layers}."

    def up(m: re.Match) -> str:
        return f"up_blocks.{int(m[1]) // (layers + 1)}.motion_modules.{int(m[1]) % (layers + 1)}."

    return [
        Rule(r"input_blocks_motion_module\.(\d+)\.0\.temporal_transformer\.", down, MOTION_LEAVES),
        Rule(r"output_blocks_motion_module\.(\d+)\.0\.temporal_transformer\.", up, MOTION_LEAVES),
    ]


def vae_rules(config: XPortraitConfig) -> list[Rule]:
    """ldm AutoencoderKL -> diffusers AutoencoderKL (ldm numbers decoder levels from the
    top resolution, diffusers from the bottom)."""
    last = len(config.vae_block_out_channels) - 1
    return [
        Rule(r"(encoder|decoder)\.(conv_in|conv_out)\.", lambda m: f"{m[1]}.{m[2]}."),
        Rule(r"(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
        Rule(r"(encoder|decoder)\.mid\.block_([12])\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
             VAE_RESNET_LEAVES),
        Rule(r"(encoder|decoder)\.mid\.attn_1\.", lambda m: f"{m[1]}.mid_block.attentions.0.", VAE_ATTENTION_LEAVES),
        Rule(r"encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.",
             VAE_RESNET_LEAVES),
        Rule(r"encoder\.down\.(\d+)\.downsample\.conv\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv."),
        Rule(r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{last - int(m[1])}.resnets.{m[2]}.",
             VAE_RESNET_LEAVES),
        Rule(r"decoder\.up\.(\d+)\.upsample\.conv\.",
             lambda m: f"decoder.up_blocks.{last - int(m[1])}.upsamplers.0.conv."),
        Rule(r"(quant_conv|post_quant_conv)\.", lambda m: f"{m[1]}."),
    ]


TEXT_RULES = [Rule(r"text_model\.", lambda m: "")]  # HF CLIPTextModel, our keys without "text_model."


def ldm_parts(config: XPortraitConfig) -> list[tuple[str, str, list[Rule]]]:
    """(file prefix, our prefix, rules for the rest), tried in order. "text_encoder." is not a
    module of the model: those tensors compute the empty-prompt embedding (`model.text`)."""
    unet = unet_rules(config)
    return [
        ("model.diffusion_model.", "unet.motion.", motion_rules(config)),
        ("model.diffusion_model.", "unet.unet.", unet),
        ("appearance_control_model.", "reference_net.unet.", unet),
        ("pose_control_model.", "pose_controlnet.", unet),
        ("local_pose_control_model.", "local_controlnet.", unet),
        ("first_stage_model.", "vae.", vae_rules(config)),
        ("cond_stage_model.transformer.", "text_encoder.", TEXT_RULES),
    ]


IGNORED = [  # (pattern, why a tensor of the file is not used)
    (r"appearance_control_model\.input_hint_block\.",
     "the reference net's hint encoder: the released code builds it but never calls it"),
    (r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$", "CLIP's token positions 0..76"),
    (r"model_ema\.", "training's EMA copy of the UNet (the regular weights are used, as diffusers does)"),
    (rf"({'|'.join(DDPM_BUFFERS)})$", "the diffusion schedule: checked against SD1.5's (alphas_cumprod)"),
]

# Our keys whose ldm tensor is a 1x1 convolution and ours a linear layer.
CONV_AS_LINEAR = re.compile(r"vae\.(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
REFERENCE_UNUSED = ("conv_norm_out.", "conv_out.")  # the reference net has no output layers
REFERENCE_COPY = "reference net = UNet copy"


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or torch (`.ckpt .pt .pth .th .bin`) file; a
    Lightning-style {'state_dict': ...} is unwrapped, as is a DataParallel `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif suffix in TORCH_SUFFIXES:
            sd = _torch_load(path)
        else:
            raise WeightsError(f"{path}: unknown weights format {suffix!r} "
                               f"(expected .safetensors or one of {', '.join(TORCH_SUFFIXES)})")
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise WeightsError(f"{path}: holds Python objects besides tensors; it is read with "
                               "torch.load(weights_only=True), which runs no code from files. "
                               "Re-save its state_dict alone.") from None
        raise WeightsError(f"{path}: not a readable torch file ({e})") from None
    except Exception as e:  # truncated or foreign files fail in many ways, all meaning the same
        raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / ldm training files
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path}: holds no state dict (found {type(sd).__name__})")
    others = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsError(f"{path}: {len(others)} entries are not tensors: {_listing(others)}")
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _torch_load(path: Path):
    try:  # mmap: a multi-GB checkpoint is paged in as it is copied, never held twice
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format cannot be mapped


def resolve(path: str | Path, what: str, allow_hub: bool, hub_filename: str | None = None) -> Path:
    """A local path as is. Otherwise, only with `allow_hub`, a hub id: `owner/repo/path/in/repo`
    (a file) or `owner/repo` (a diffusers folder for `base`; `hub_filename` otherwise)."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if not allow_hub:
        raise WeightsError(f"{what} not found: {local} (a local file or folder is expected; "
                           "hub ids are downloaded only when allowed: --allow-hub, or allow_hub=True in Python)")
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = str(path).strip("/").split("/")
    try:
        if len(parts) > 2:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        if len(parts) == 2 and what == "base":
            names = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors")
            return Path(snapshot_download(str(path), allow_patterns=list(names)))
        if len(parts) == 2 and hub_filename:
            return Path(hf_hub_download(str(path), hub_filename))
    except Exception as e:
        raise WeightsError(f"could not fetch {what} {path!r} from the hub: {type(e).__name__}: {e}") from None
    raise WeightsError(f"{what} {path!r}: not a local path, nor a hub id of the form owner/repo/file")


# ---------------------------------------------------------------------------------------------
# Collecting tensors from the files
# ---------------------------------------------------------------------------------------------

@dataclass
class _Collector:
    """Tensors for our keys, where each came from, and what went wrong."""

    config: XPortraitConfig
    expected: dict[str, torch.Size]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def put(self, key: str, tensor: torch.Tensor, origin: str, fresh: dict[str, str]) -> None:
        """`fresh`: keys this file already gave; a second tensor for one must be equal (the
        two copies of a temporal module's positional table), anything else is a conflict."""
        if key in fresh:
            first = self.tensors[key]
            if first.shape != tensor.shape or not torch.equal(first, tensor):
                self.problems.append(f"{origin} and {fresh[key]} both map to {key} but differ")
            return
        fresh[key] = origin
        self.tensors[key] = tensor
        self.origin[key] = origin

    def add_ldm(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """Map an ldm-layout state dict (the released checkpoint, or an SD1.5 single file)."""
        parts = ldm_parts(self.config)
        unknown: list[str] = []
        ignored: dict[str, int] = {}
        fresh: dict[str, str] = {}
        for key, tensor in sd.items():
            reason = next((why for pattern, why in IGNORED if re.match(pattern, key)), None)
            if reason is not None:
                ignored[reason] = ignored.get(reason, 0) + 1
                self._check_ignored(key, tensor, source)
                continue
            ours = None
            for prefix, target, rules in parts:
                if key.startswith(prefix):
                    ours = _rename(rules, key[len(prefix):])
                    if ours is not None:
                        ours = target + ours
                        break
            if ours is None or ours not in self.expected:
                unknown.append(key)
                continue
            self.put(ours, tensor, f"{source}: {key}", fresh)
        if unknown:
            self.problems.append(f"{source}: {len(unknown)} key(s) match nothing in the X-Portrait model "
                                 f"(config {_describe(self.config)}): {_listing(unknown)}")
        for reason, n in ignored.items():
            log.info("%s: %d tensor(s) not used: %s", source, n, reason)
        return len(fresh)

    def add_ours(self, sd: dict[str, torch.Tensor], prefix: str, source: str) -> None:
        """A state dict already named as our module under `prefix` (a diffusers module)."""
        fresh: dict[str, str] = {}
        unknown = [k for k in sd if prefix + k not in self.expected]
        for k, tensor in sd.items():
            if prefix + k in self.expected:
                self.put(prefix + k, tensor, f"{source}: {k}", fresh)
        if unknown:
            self.problems.append(f"{source}: {len(unknown)} key(s) match nothing in the X-Portrait model "
                                 f"(config {_describe(self.config)}): {_listing(unknown)}")

    def seed_reference_net(self, source: str) -> None:
        """The reference net starts as a copy of the SD UNet (the released training does), where
        no file gave it weights of its own."""
        for key in [k for k in self.tensors if k.startswith("unet.unet.")]:
            rest = key[len("unet.unet."):]
            target = "reference_net.unet." + rest
            if not rest.startswith(REFERENCE_UNUSED) and target not in self.tensors:
                self.tensors[target] = self.tensors[key]
                self.origin[target] = f"{source}: the UNet's {rest} ({REFERENCE_COPY})"

    def _check_ignored(self, key: str, tensor: torch.Tensor, source: str) -> None:
        if key == "alphas_cumprod":
            ours = sd15_alphas_cumprod(self.config)
            if tensor.shape != ours.shape:
                self.problems.append(f"{source}: alphas_cumprod has {list(tensor.shape)} steps, "
                                     f"SD1.5's schedule has {list(ours.shape)}")
            elif not torch.allclose(tensor.double(), ours, atol=1e-5, rtol=1e-4):
                gap = (tensor.double() - ours).abs().max().item()
                self.problems.append(f"{source}: alphas_cumprod is not SD1.5's scaled_linear schedule "
                                     f"({self.config.beta_start}..{self.config.beta_end}): max difference {gap:.3g}")
        elif key.endswith("position_ids"):
            if not torch.equal(tensor.reshape(-1).long(), torch.arange(tensor.numel())):
                self.problems.append(f"{source}: {key} is not 0..{tensor.numel() - 1}")

    def check(self) -> None:
        for key, tensor in self.tensors.items():
            want = self.expected[key]
            if tensor.shape != want and CONV_AS_LINEAR.match(key) and tensor.shape == (*want, 1, 1):
                tensor = self.tensors[key] = tensor[:, :, 0, 0]
            if tensor.shape != want:
                self.problems.append(f"{self.origin[key]} has shape {list(tensor.shape)}, "
                                     f"but {key} needs {list(want)}")
            elif key.endswith("pos_embed.pe"):
                table = sinusoidal_positions(want[1], want[2])
                if not torch.allclose(tensor.float(), table, atol=1e-3):
                    self.problems.append(f"{self.origin[key]} is not the sinusoidal position table "
                                         "the temporal modules use")
        missing = [k for k in self.expected if k not in self.tensors]
        if missing:
            self.problems.append(f"no weights for {len(missing)} of the model's {len(self.expected)} tensors "
                                 f"({_by_module(missing, self.expected)}): {_listing(missing)}")
        if self.problems:
            raise WeightsError("cannot load the X-Portrait weights:\n- " + "\n- ".join(self.problems))


def sd15_alphas_cumprod(config: XPortraitConfig) -> torch.Tensor:
    """ldm's "linear" schedule (diffusers' scaled_linear), in float64 as ldm computes it."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _listing(keys: list[str]) -> str:
    shown = "\n    " + "\n    ".join(keys[:LISTED])
    return shown + (f"\n    ... and {len(keys) - LISTED} more" if len(keys) > LISTED else "")


def _by_module(missing: list[str], expected: dict) -> str:
    def module(k: str) -> str:
        parts = k.split(".")
        return ".".join(parts[:2]) if parts[0] in ("unet", "reference_net") else parts[0]

    total: dict[str, int] = {}
    for k in expected:
        total[module(k)] = total.get(module(k), 0) + 1
    lacking: dict[str, int] = {}
    for k in missing:
        lacking[module(k)] = lacking.get(module(k), 0) + 1
    return ", ".join(f"{m} {n}/{total[m]}" for m, n in lacking.items())


def _describe(config: XPortraitConfig) -> str:
    return f"widths {list(config.block_out_channels)}, text {config.cross_attention_dim}"


# ---------------------------------------------------------------------------------------------
# The text encoder: only the empty prompt's embedding is kept
# ---------------------------------------------------------------------------------------------

def _clip(config: XPortraitConfig) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config.text_kwargs()))


def _clip_keys(module: nn.Module) -> dict[str, str]:
    """Our text-encoder key (without "text_model.", as transformers 5 names them) -> the
    installed transformers' key; CLIP's constant position ids are not weights."""
    return {k.removeprefix("text_model."): k for k in module.state_dict() if not k.endswith("position_ids")}


def _text_expected(config: XPortraitConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        clip = _clip(config)
    sd = clip.state_dict()
    return {"text_encoder." + ours: sd[theirs].shape for ours, theirs in _clip_keys(clip).items()}


@torch.no_grad()
def empty_prompt_embedding(config: XPortraitConfig, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, 77, D): the CLIP text tower's last hidden state for "" (FrozenCLIPEmbedder, layer "last")."""
    clip = _clip(config)
    names = _clip_keys(clip)
    sd = {names[k]: v for k, v in weights.items()}
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):  # persistent in older transformers
            sd[k] = v
    clip.load_state_dict(sd, strict=True)
    ids = torch.tensor([EMPTY_PROMPT_IDS])
    return clip.eval()(input_ids=ids).last_hidden_state.float()


# ---------------------------------------------------------------------------------------------
# The base: a diffusers folder
# ---------------------------------------------------------------------------------------------

def _add_diffusers_folder(found: _Collector, folder: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = [name for name in ("unet", "vae", "text_encoder") if (folder / name).is_dir()]
    if not parts:
        raise WeightsError(f"{folder}: not a diffusers Stable Diffusion folder (no unet/, vae/ or text_encoder/)")
    for name in parts:
        source = f"base {folder / name}"
        try:
            if name == "unet":
                module = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
            elif name == "vae":
                module = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
            else:
                module = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        except Exception as e:  # missing config/weights, foreign architecture, unreadable file
            raise WeightsError(f"{source}: cannot load it ({type(e).__name__}: {e})") from None
        sd = module.state_dict()
        if name == "text_encoder":
            sd = {ours: sd[theirs] for ours, theirs in _clip_keys(module).items()}
        found.add_ours(sd, {"unet": "unet.unet.", "vae": "vae.", "text_encoder": "text_encoder."}[name], source)
        del module
    if "unet" in parts:
        found.seed_reference_net(f"base {folder / 'unet'}")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def load_model(config: XPortraitConfig, base: str | Path | None = None, checkpoint: str | Path | None = None,
               lcm_lora: str | Path | None = None, random_weights: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
               allow_hub: bool = False) -> XPortraitModel:
    """The X-Portrait model with its weights, in eval mode, on `device` in `dtype`.

    `base` (SD1.5) and `checkpoint` (the released model_state-*.th) together must fill every
    tensor; the checkpoint's tensors replace the base's. `lcm_lora` is fused into the UNet.
    `random_weights` draws every weight from `seed` instead (to measure cost without weights).
    Raises WeightsError naming the files, keys and shapes at fault.
    """
    if random_weights:
        if base is not None or checkpoint is not None:
            raise WeightsError("random_weights excludes base and checkpoint weights: pass one or the other")
        model = random_model(config, seed, device)
    elif base is None and checkpoint is None:
        raise WeightsError("no weights given: pass checkpoint= (the released model_state-*.th) and base= "
                           "(Stable Diffusion 1.5), or random_weights=True")
    else:
        model = _load_files(config, base, checkpoint, allow_hub)
    if lcm_lora is not None:
        fuse_lora(model.unet.unet, resolve(lcm_lora, "LCM-LoRA", allow_hub, "pytorch_lora_weights.safetensors"))
    return model.to(device=device, dtype=dtype).eval()


def _shapes_only(config: XPortraitConfig) -> tuple[XPortraitModel, dict[str, torch.Size]]:
    """The model on the meta device (no memory; the files' tensors become its parameters) and
    the shape of every tensor the files must provide."""
    with torch.device("meta"):
        model = XPortraitModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    expected.update(_text_expected(config))
    return model, expected


def map_released(config: XPortraitConfig, state_dict: dict[str, torch.Tensor],
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A complete released-layout state dict under our names: the model's state-dict keys, and
    `text_encoder.*` (CLIP, without "text_model.") for the text embedding. Raises WeightsError
    listing unknown keys, unfilled tensors and wrong shapes."""
    found = _Collector(config, _shapes_only(config)[1])
    found.add_ldm(state_dict, source)
    found.check()
    return found.tensors


def _load_files(config: XPortraitConfig, base, checkpoint, allow_hub: bool) -> XPortraitModel:
    model, expected = _shapes_only(config)
    found = _Collector(config, expected)
    if base is not None:
        path = resolve(base, "base", allow_hub)
        if path.is_dir():
            _add_diffusers_folder(found, path)
        else:
            found.add_ldm(read_state_dict(path), f"base {path}")
            found.seed_reference_net(f"base {path}")
    if checkpoint is not None:
        path = resolve(checkpoint, "checkpoint", allow_hub)
        if path.is_dir():
            raise WeightsError(f"checkpoint {path} is a folder; the released checkpoint is one model_state-*.th file")
        gave = found.add_ldm(read_state_dict(path), f"checkpoint {path}")
        if gave == 0:
            found.problems.append(f"checkpoint {path}: none of its keys are X-Portrait weights")
    found.check()
    if any(REFERENCE_COPY in found.origin[k] for k in found.origin if k.startswith("reference_net.")):
        log.warning("the reference net is a copy of the base UNet, untrained for appearance: "
                    "no appearance_control_model.* weights were given")

    text = empty_prompt_embedding(config, {k.removeprefix("text_encoder."): v for k, v in found.tensors.items()
                                           if k.startswith("text_encoder.")})
    weights = {}
    aliased: set[int] = set()
    for key, tensor in found.tensors.items():
        if key.startswith("text_encoder."):
            continue
        if id(tensor) in aliased:  # the reference net's copy of the UNet: its own storage
            tensor = tensor.clone()
        aliased.add(id(tensor))
        weights[key] = tensor
    model.load_state_dict(weights, strict=True, assign=True)
    model.text = text
    return model


def random_model(config: XPortraitConfig, seed: int, device: str | torch.device = "cpu") -> XPortraitModel:
    """Every weight drawn from `seed` (on `device`: an SD-sized model is 2.9e9 draws): linear and
    conv weights N(0, 1/fan_in), so activations keep their scale (at SD1.5 size no module's
    output exceeds 60: finite in fp16 too), norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2);
    the text embedding N(0, 1) (a LayerNorm output). The positional tables get their values."""
    with torch.device("meta"):  # no default initialisation: every tensor is drawn below
        model = XPortraitModel(config)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(shape) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(normal(p.shape) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.02 * normal(p.shape))
            else:
                p.copy_(0.02 * normal(p.shape))
        for name, buffer in model.named_buffers():
            if name.endswith("pos_embed.pe"):
                buffer.copy_(sinusoidal_positions(buffer.shape[1], buffer.shape[2]))
            elif name == "text":
                buffer.copy_(normal(buffer.shape))
            else:  # a buffer this function does not know would hold uninitialised memory
                raise RuntimeError(f"random_model: no values for the buffer {name}")
    return model


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

KOHYA_KEY = re.compile(r"(lora_unet_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
PEFT_KEY = re.compile(r"(?:unet\.|base_model\.model\.)?([\w.]+?)\.(lora_A\.weight|lora_B\.weight|alpha)$")
LORA_PART = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
             "alpha": "alpha"}


@torch.no_grad()
def fuse_lora(unet: nn.Module, path: str | Path, scale: float = 1.0) -> int:
    """Fuse a LoRA into `unet` (a diffusers UNet2DConditionModel): W += scale * alpha/rank * up @ down
    for every layer it names (linear, 1x1 and 3x3 convolutions). Returns the number of layers
    changed. Reads the kohya format LCM-LoRA ships in (`lora_unet_<module_path_with_underscores>
    .lora_down/.lora_up/.alpha`) and the diffusers/PEFT one (`unet.<module.path>.lora_A/lora_B`;
    alpha = rank unless given). A key that names no layer is an error and nothing is changed."""
    path = Path(path)
    sd = read_state_dict(path)
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    kohya_names = {"lora_unet_" + name.replace(".", "_"): name for name in layers}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in sd.items():
        m = KOHYA_KEY.match(key)
        name = kohya_names.get(m[1]) if m else None
        if name is None:
            m = PEFT_KEY.match(key)
            name = m[1] if m and m[1] in layers else None
        if name is None:
            unknown.append(key)
            continue
        groups.setdefault(name, {})[LORA_PART[m[2]]] = tensor
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) name no linear or conv layer of the UNet: {_listing(unknown)}")
    for name, parts in groups.items():
        weight = layers[name].weight
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            problems.append(f"{name}: has no {'down' if down is None else 'up'} matrix")
            continue
        rank = down.shape[0]
        if (up.shape[0] != weight.shape[0] or up.shape[1] != rank or any(s != 1 for s in up.shape[2:])
                or tuple(down.shape[1:]) != tuple(weight.shape[1:])):
            problems.append(f"{name}: down {list(down.shape)} and up {list(up.shape)} do not fit the layer's "
                            f"weight {list(weight.shape)}")
    if problems:
        raise WeightsError(f"{path}: cannot fuse this LoRA:\n- " + "\n- ".join(problems))
    for name, parts in groups.items():
        weight = layers[name].weight
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        delta = (up.flatten(1).float() @ down.flatten(1).float()) * (scale * alpha / rank)
        weight.copy_((weight.float() + delta.to(weight.device).reshape(weight.shape)).to(weight.dtype))
    log.info("%s: fused into %d layers (scale %g)", path, len(groups), scale)
    return len(groups)
