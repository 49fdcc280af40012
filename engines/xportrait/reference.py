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

Keys and values downsampled (`token_downsample`, lossy, behind an option; ToDo, Smith et al.
2024): at the latents' own size, where neighbouring tokens are most alike and the attention
costs most (4096 queries over 8192 keys at 512²), each 2x2 block of tokens is averaged before
the keys and values are taken, the denoising UNet's own and the reference's alike, so each
side keeps its share of the softmax; the queries stay whole. The reference's side is pooled
once per source, with its features; an entry says so (`LayerKV.pool`), and the attention then
pools its own tokens the same way.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

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


class TokenPool(NamedTuple):
    """The grid a layer's tokens lie on (rows first) and the side of the blocks averaged."""

    height: int
    width: int
    factor: int


class LayerKV(NamedTuple):
    """One self-attention layer's reference keys and values, (batch, tokens, C) each; `pool`:
    they were taken from averaged blocks of tokens, and the layer's own keys and values are
    to be taken so too (None: every token)."""

    key: torch.Tensor
    value: torch.Tensor
    pool: TokenPool | None = None

    def rows(self, index) -> LayerKV:
        """The entries `index` (a slice: views; a tensor: a copy) of the batch."""
        return self._replace(key=self.key[index], value=self.value[index])


ReferenceKV = dict[str, LayerKV]  # per self-attention layer


def reference_rows(reference: ReferenceKV, index) -> ReferenceKV:
    """Every layer's entries `index` of the batch."""
    return {name: kv.rows(index) for name, kv in reference.items()}


def downsample_tokens(tokens: torch.Tensor, pool: TokenPool) -> torch.Tensor:
    """(B, height * width, C) tokens -> the means of their factor x factor blocks (B, n', C),
    rows first (blocks at the grid's edge average what they hold)."""
    b, n, c = tokens.shape
    if n != pool.height * pool.width:
        raise ValueError(f"{n} tokens do not lie on a {pool.height}x{pool.width} grid")
    grid = tokens.transpose(1, 2).reshape(b, c, pool.height, pool.width)
    return F.avg_pool2d(grid, pool.factor, ceil_mode=True).flatten(2).transpose(1, 2)


class ReadReference:
    """attn1 processor of the denoising UNet: own keys/values plus the reference's, when the
    call has a `reference`; plain self-attention otherwise (the CFG branch)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, reference: ReferenceKV | None = None) -> torch.Tensor:
        kv = reference.get(self.name) if reference is not None else None
        if kv is not None and kv.pool is not None:  # queries of every token, keys and values of blocks
            query, key, value = _pooled_projections(attn, hidden_states, downsample_tokens(hidden_states, kv.pool))
        elif attn.fused_projections:  # q, k and v as one product (XPortraitModel.fuse_self_attention_projections)
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if kv is not None:
            ref_key, ref_value = kv.key, kv.value
            b = hidden_states.shape[0]
            if ref_key.shape[0] != b:  # one source's features broadcast over the batch
                ref_key, ref_value = ref_key.expand(b, -1, -1), ref_value.expand(b, -1, -1)
            key = torch.cat([key, ref_key], dim=1)
            value = torch.cat([value, ref_value], dim=1)
        return _attention(attn, query, key, value)


def _pooled_projections(attn: Attention, tokens: torch.Tensor, pooled: torch.Tensor):
    """q of `tokens`, k and v of `pooled`, by the layer's own weights (fused or not)."""
    if not attn.fused_projections:
        return attn.to_q(tokens), attn.to_k(pooled), attn.to_v(pooled)
    weight, bias = attn.to_qkv.weight, attn.to_qkv.bias
    c = weight.shape[0] // 3
    query = F.linear(tokens, weight[:c], None if bias is None else bias[:c])
    key, value = F.linear(pooled, weight[c:], None if bias is None else bias[c:]).chunk(2, dim=-1)
    return query, key, value


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


def project_reference(unet: nn.Module, recorded: Iterable[dict[str, torch.Tensor]],
                      grid: tuple[int, int] | None = None, token_downsample: int = 1) -> ReferenceKV:
    """The denoising UNet's keys and values of the recorded reference tokens; several
    references (one dict each) are joined along the tokens, as the released code does.
    `token_downsample` > 1: at the layers whose tokens lie on `grid` (the latents' size),
    each reference's tokens are averaged in blocks of that side first (see the module's
    docstring)."""
    layers = self_attention_layers(unet)
    recorded = list(recorded)
    if token_downsample < 1:
        raise ValueError(f"token_downsample must be at least 1, got {token_downsample}")
    if token_downsample > 1 and grid is None:
        raise ValueError("downsampling the tokens needs the grid they lie on")
    out = {}
    for name, attn in layers.items():
        pool = None
        if token_downsample > 1 and recorded[0][name].shape[1] == grid[0] * grid[1]:
            pool = TokenPool(grid[0], grid[1], token_downsample)
        tokens = torch.cat([r[name] if pool is None else downsample_tokens(r[name], pool) for r in recorded], dim=1)
        out[name] = LayerKV(attn.to_k(tokens), attn.to_v(tokens), pool)
    return out
