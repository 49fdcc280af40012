"""The appearance reference module R: source features joined into the UNet's self-attention.

The reference net (a UNet of SD1.5's shape, no output conv) runs on the clean source latent
at the current timestep and records, at each of its 16 transformer blocks, the input of the
block's self-attention. The denoising UNet's self-attention then attends over its own tokens
and those recorded tokens together: keys and values of [own ; reference ; more references],
projected with the denoising UNet's own weights (released code: attn1(x, context=cat(x, bank))).

Those reference keys and values depend only on the source and the timestep, so they are
computed once per source per timestep (`XPortraitModel.reference_features`) and every frame
reuses them: the UNet's caller hands them in (`reference`), and diffusers passes them down to
every attention processor of a transformer block (its `cross_attention_kwargs`).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


def self_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """Every spatial self-attention (attn1 of a transformer block), by module name. Names are
    the same in the reference net and the denoising UNet, which pairs them."""
    return {name: module for name, module in unet.named_modules()
            if name.endswith("transformer_blocks.0.attn1") and isinstance(module, Attention)}


class RecordInput:
    """attn1 processor of the reference net: keep the attention's input, then attend as usual."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]):
        self.name, self.store = name, store

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        self.store[self.name] = hidden_states
        return _attention(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))


ReferenceKV = dict[str, tuple[torch.Tensor, torch.Tensor]]  # per self-attention layer: keys, values


class ReadReference:
    """attn1 processor of the denoising UNet: own keys/values plus the reference's, when the
    call has a `reference`; plain self-attention otherwise (the CFG branch)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, reference: ReferenceKV | None = None) -> torch.Tensor:
        if attn.fused_projections:  # q, k and v as one product (XPortraitModel.fuse_self_attention_projections)
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        kv = reference.get(self.name) if reference is not None else None
        if kv is not None:
            ref_key, ref_value = kv
            b = hidden_states.shape[0]
            if ref_key.shape[0] != b:  # one source's features broadcast over the batch
                ref_key, ref_value = ref_key.expand(b, -1, -1), ref_value.expand(b, -1, -1)
            key = torch.cat([key, ref_key], dim=1)
            value = torch.cat([value, ref_value], dim=1)
        return _attention(attn, query, key, value)


def _attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    b, n, c = query.shape
    h = attn.heads
    d = c // h
    q = query.view(b, n, h, d).transpose(1, 2)
    k = key.view(b, -1, h, d).transpose(1, 2)
    v = value.view(b, -1, h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    return attn.to_out[0](out)


class WithoutReference:
    """attn2 (cross-attention) processor of the denoising UNet: its own processor, unchanged;
    it takes the `reference` that diffusers hands every attention of a block, and leaves it."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, reference: ReferenceKV | None = None) -> torch.Tensor:
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def reference_kwargs(reference: ReferenceKV | None) -> dict | None:
    """The `cross_attention_kwargs` of a transformer block that carry the reference."""
    return None if reference is None else {"reference": reference}


def install_reference_attention(reference_net: nn.Module, unet: nn.Module) -> dict[str, torch.Tensor]:
    """Put the recording processors on the reference net and the reading ones on the UNet.
    Returns the reference net's record: each self-attention's input, by layer name."""
    recorded: dict[str, torch.Tensor] = {}
    ref_layers, unet_layers = self_attention_layers(reference_net), self_attention_layers(unet)
    if set(ref_layers) != set(unet_layers):
        raise ValueError("the reference net and the UNet do not have the same transformer blocks")
    for name, layer in ref_layers.items():
        layer.set_processor(RecordInput(name, recorded))
    for name, layer in unet_layers.items():
        layer.set_processor(ReadReference(name))
    for name, module in unet.named_modules():
        if name.endswith("transformer_blocks.0.attn2") and isinstance(module, Attention):
            module.set_processor(WithoutReference(module.processor))
    return recorded


def project_reference(unet: nn.Module, recorded: Iterable[dict[str, torch.Tensor]]) -> ReferenceKV:
    """The denoising UNet's keys and values of the recorded reference tokens; several
    references (one dict each) are joined along the tokens, as the released code does."""
    layers = self_attention_layers(unet)
    recorded = list(recorded)
    out = {}
    for name, attn in layers.items():
        tokens = torch.cat([r[name] for r in recorded], dim=1)
        out[name] = (attn.to_k(tokens), attn.to_v(tokens))
    return out
