"""Our model's tensors under the released checkpoint's names: exporting (trained) weights.

The inverse of loading: what `to_released` returns, saved as `torch.save({"state_dict": sd})`
(`write_released`), is a `model_state-*.th` in the released layout, which `load_model`
reads back to the same model and the released code's `load_state_dict` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..config import XPortraitConfig
from .errors import WeightsError, listing
from .keymap import APPEARANCE, CONV_AS_LINEAR, NOT_RELEASED, TEXT, ddpm_schedule, key_map

# What a released file holds that our model does not: CLIP's text tower (the model keeps only
# the empty prompt's embedding) and the reference net's hint encoder (built, never called).
NOT_HELD = (TEXT, APPEARANCE + "input_hint_block.")


def to_released(config: XPortraitConfig, model: nn.Module,
                extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of `model` (UNet, temporal modules, reference net, both ControlNets, VAE)
    under its released name(s), plus ldm's schedule buffers. The tensors are the model's own
    (detached, not copied); a VAE attention's linear weight becomes the 1x1 convolution ldm
    stores, and each temporal block's positional table is written under both its names.

    `extra`: released-layout tensors of what the model does not hold (`NOT_HELD`: the CLIP
    text tower, e.g. from the base or the checkpoint trained from, and the unused hint
    encoder), added as they are: with them the file is complete, as the release's is.
    Anything else in `extra` is an error, since it would replace a tensor of the model.
    """
    names = key_map(config)
    out: dict[str, torch.Tensor] = {}
    unnamed = []
    for key, tensor in model.state_dict().items():
        if key.startswith(NOT_RELEASED):
            continue
        released = names.released(key)
        if not released:
            unnamed.append(key)
            continue
        tensor = tensor.detach()
        if CONV_AS_LINEAR.match(key):
            tensor = tensor[:, :, None, None]
        for name in released:
            out[name] = tensor
    if unnamed:
        raise WeightsError(f"{len(unnamed)} tensor(s) of the model have no released name: {listing(unnamed)}")
    out.update(ddpm_schedule(config))
    if extra:
        foreign = [k for k in extra if not k.startswith(NOT_HELD)]
        if foreign:
            raise WeightsError(f"extra: {len(foreign)} key(s) are not a part the model lacks "
                               f"({', '.join(NOT_HELD)}): {listing(foreign)}")
        out.update(extra)
    return out


def write_released(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """As the released training writes its checkpoints: torch.save({'state_dict': ...})."""
    path = Path(path)
    torch.save({"state_dict": {k: v.contiguous() for k, v in state_dict.items()}}, path)
    return path
