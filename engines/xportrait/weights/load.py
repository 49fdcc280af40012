"""The one entry that builds the model with its weights (`load_model`), and `random_model`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import XPortraitConfig
from ..model import XPortraitModel
from ..temporal import sinusoidal_positions
from .collect import Collector
from .errors import WeightsError
from .files import read_state_dict, resolve
from .lora import fuse_lora
from .text import clip_keys, empty_prompt_embedding, text_expected

log = logging.getLogger(__name__)


def load_model(config: XPortraitConfig, base: str | Path | None = None, checkpoint: str | Path | None = None,
               lcm_lora: str | Path | None = None, random_weights: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
               allow_hub: bool = False, trust_checkpoint: bool = False) -> XPortraitModel:
    """The X-Portrait model with its weights, in eval mode, on `device` in `dtype`.

    `base` (SD1.5: a diffusers folder, or one ldm-layout `.safetensors`/`.ckpt`) and
    `checkpoint` (the released model_state-*.th) together must fill every tensor; the
    checkpoint's tensors replace the base's, and where no file gives the reference net its own
    weights it starts as a copy of the base UNet (as the released training starts R).
    `lcm_lora` is fused into the UNet. `random_weights` draws every weight from `seed` instead
    (to measure cost without weights). Files are read locally; hub ids only with `allow_hub`.
    `trust_checkpoint`: unpickle torch files fully, for files that hold Python objects besides
    tensors (it can run code from the file; without it such files are refused, saying so).
    Raises WeightsError naming the files, keys and shapes at fault.
    """
    if random_weights:
        if base is not None or checkpoint is not None:
            raise WeightsError("random_weights excludes base and checkpoint weights: pass one or the other")
    elif base is None and checkpoint is None:
        raise WeightsError("no weights given: pass checkpoint= (the released model_state-*.th) and base= "
                           "(Stable Diffusion 1.5), or random_weights=True")
    # Every file is found (or fetched) before anything is built or read: a mistyped path is
    # refused at once, not after the other files have loaded.
    base = None if base is None else resolve(base, "base", allow_hub)
    checkpoint = None if checkpoint is None else resolve(checkpoint, "checkpoint", allow_hub)
    if lcm_lora is not None:
        lcm_lora = resolve(lcm_lora, "LCM-LoRA", allow_hub, "pytorch_lora_weights.safetensors")
    if random_weights:
        model = random_model(config, seed, device)
    else:
        model = _load_files(config, base, checkpoint, trust_checkpoint)
    if lcm_lora is not None:
        fuse_lora(model.unet.unet, lcm_lora)
    return model.to(device=device, dtype=dtype).eval()


def expected_tensors(config: XPortraitConfig) -> tuple[XPortraitModel, dict[str, torch.Size]]:
    """The model on the meta device (no memory; the files' tensors become its parameters) and
    the shape of every tensor the files must provide: the model's state dict and
    `text_encoder.*` (CLIP, without "text_model.") for the text embedding."""
    with torch.device("meta"):
        model = XPortraitModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    expected.update(text_expected(config))
    return model, expected


def map_released(config: XPortraitConfig, state_dict: dict[str, torch.Tensor],
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A complete released-layout state dict under our names: the model's state-dict keys, and
    `text_encoder.*` for the text embedding. Raises WeightsError listing unknown keys,
    unfilled tensors and wrong shapes."""
    found = Collector(config, expected_tensors(config)[1])
    found.add_released(state_dict, source)
    found.check()
    return found.tensors


def _load_files(config: XPortraitConfig, base: Path | None, checkpoint: Path | None, trust: bool) -> XPortraitModel:
    """The model from resolved local files."""
    model, expected = expected_tensors(config)
    found = Collector(config, expected)
    if base is not None:
        path = base
        if path.is_dir():
            _add_diffusers_folder(found, path)
        else:
            found.add_released(read_state_dict(path, trust), f"base {path}")
            found.seed_reference_net(f"base {path}")
    if checkpoint is not None:
        path = checkpoint
        if path.is_dir():
            raise WeightsError(f"checkpoint {path} is a folder; the released checkpoint is one model_state-*.th file")
        gave = found.add_released(read_state_dict(path, trust), f"checkpoint {path}")
        if gave == 0:
            found.problems.append(f"checkpoint {path}: none of its keys are X-Portrait weights")
    found.check()
    if found.reference_is_a_copy():
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


def _add_diffusers_folder(found: Collector, folder: Path) -> None:
    """A diffusers Stable Diffusion folder: unet/, vae/, text_encoder/ (whichever are there)."""
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
            sd = {ours: sd[theirs] for ours, theirs in clip_keys(module).items()}
        found.add_ours(sd, {"unet": "unet.unet.", "vae": "vae.", "text_encoder": "text_encoder."}[name], source)
        del module
    if "unet" in parts:
        found.seed_reference_net(f"base {folder / 'unet'}")


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
