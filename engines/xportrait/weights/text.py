"""The text encoder: only the empty prompt's embedding is kept.

Both classifier-free-guidance branches of the released code condition on "" only, so the
CLIP text tower runs once, at load, and the model keeps its output (`model.text`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import XPortraitConfig

# CLIP's tokenisation of the empty prompt, padded to 77: <|startoftext|>, then <|endoftext|>
# (SD1.5's tokenizer pads with it).
EMPTY_PROMPT_IDS = [49406] + [49407] * 76


def clip(config: XPortraitConfig) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config.text_kwargs()))


def clip_keys(module: nn.Module) -> dict[str, str]:
    """Our text-encoder key (without "text_model.", as transformers 5 names them) -> the
    installed transformers' key; CLIP's constant position ids are not weights."""
    return {k.removeprefix("text_model."): k for k in module.state_dict() if not k.endswith("position_ids")}


def text_expected(config: XPortraitConfig) -> dict[str, torch.Size]:
    """The shapes of the text tower's tensors, as `text_encoder.<our key>`."""
    with torch.device("meta"):
        module = clip(config)
    sd = module.state_dict()
    return {"text_encoder." + ours: sd[theirs].shape for ours, theirs in clip_keys(module).items()}


@torch.no_grad()
def empty_prompt_embedding(config: XPortraitConfig, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, 77, D): the CLIP text tower's last hidden state for "" (FrozenCLIPEmbedder, layer "last")."""
    module = clip(config)
    names = clip_keys(module)
    sd = {names[k]: v for k, v in weights.items()}
    for k, v in module.state_dict().items():
        if k.endswith("position_ids"):  # persistent in older transformers
            sd[k] = v
    module.load_state_dict(sd, strict=True)
    ids = torch.tensor([EMPTY_PROMPT_IDS])
    return module.eval()(input_ids=ids).last_hidden_state.float()
