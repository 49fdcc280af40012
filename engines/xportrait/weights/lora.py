"""Fusing a LoRA (e.g. LCM-LoRA) into the UNet's weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError, listing
from .files import read_state_dict

log = logging.getLogger(__name__)

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
        problems.append(f"{len(unknown)} key(s) name no linear or conv layer of the UNet: {listing(unknown)}")
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
