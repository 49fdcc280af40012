"""The temporal module M: AnimateDiff's "Vanilla" motion module, as X-Portrait runs it.

Each module attends over frames at every latent pixel: GroupNorm, a linear in, one block of
two temporal self-attentions (each on a positionally encoded input) and a feed-forward, a
linear out, plus the residual. Two details follow the released code rather than diffusers'
AnimateDiff: GroupNorm statistics are per frame, and the modules sit after every output
block of the UNet, after its upsampler (see unet.py).

Keys, values and positions are kept apart so that frames can come from a cache: with
to_k and to_v linear and bias-free, K(x + pe[p]) = K(x) + K(pe[p]); a frame's K(x), V(x)
are computed once, and its position in whatever window it later sits in is added then.
Parameter names match diffusers' MotionAdapter (`transformer_blocks.0.attn1.to_q`, ...),
so AnimateDiff-format weights load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from . import ring_kernels


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(1, length, dim): the standard sin/cos table, as AnimateDiff's PositionalEncoding."""
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_len, dim))


@dataclass
class FramesKV:
    """Per attention layer: position-free keys and values of frames, (N, frames, C), where N
    is clips x latent pixels. What a temporal cache holds."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class TemporalPast:
    """Earlier frames for one temporal module: FramesKV for its two attentions, and which
    cached frames are real, `valid` (clips, P) (None: all). Valid frames are the newest
    (right-aligned); they take positions 0..c-1 and the current frames follow."""

    kv: tuple[FramesKV, FramesKV]
    valid: torch.Tensor | None = None


@dataclass
class RingTick:
    """Shared by every module in one streaming tick: the ring slot the current frames take,
    which slots attend (`mask`, (clips, W)), and each slot's position in temporal order
    (`positions`, (clips, W): the number of attending frames older than it)."""

    slot: torch.Tensor  # (1,) long, on the device
    mask: torch.Tensor
    positions: torch.Tensor
    # Look-ahead: (clips, k) which of the k batch entries before each (the newer frames in
    # flight, entry i - 1 - o for o < k) it attends to; None without look-ahead.
    ahead: torch.Tensor | None = None


@dataclass
class LookAhead:
    """The k newer frames a streaming frame also attends to: keys and values (b, rows, h, k, d),
    position terms (b, k, h, d), and which of them exist (b, k)."""

    key: torch.Tensor
    value: torch.Tensor
    pos_key: torch.Tensor
    pos_value: torch.Tensor
    keep: torch.Tensor


def ring_attention(query: torch.Tensor, key_ring: torch.Tensor, value_ring: torch.Tensor, pos_key: torch.Tensor,
                   pos_value: torch.Tensor, keep: torch.Tensor, ahead: LookAhead | None = None) -> torch.Tensor:
    """One query frame per row against its ring of W cached frames (streaming), and the k
    newer frames in flight (`ahead`, look-ahead).

    query (n, h, d); key_ring, value_ring (n, h, W, d), position-free; pos_key, pos_value
    (b, W, h, d): each slot's position term for the b clips (n = b * rows); keep (b, W): the
    slots that attend. Positions enter as separate terms, q.K(pe) and p.V(pe), so nothing of
    size rows x W x C is materialised. Returns (n, h, d).
    """
    n, h, d = query.shape
    b, w = keep.shape
    rows = n // b
    q = query.view(b, rows, h, d)
    # On CUDA, Triton kernels that read the rings at full bandwidth (ring_kernels.py; the
    # compiled torch below reaches half of it): without look-ahead the whole attention is one
    # kernel, with it the two ring sums are. Elsewhere: multiply-and-sum, not a batched matmul
    # (with one query row per matmul cuBLAS runs thousands of near-empty tiles).
    kernels = ring_kernels.available(key_ring)
    if kernels and ahead is None:
        return torch.ops.xportrait.ring_attend(query.contiguous(), key_ring, value_ring, pos_key.contiguous(),
                                               pos_value.contiguous(), keep.contiguous())
    if kernels:
        scores = torch.ops.xportrait.ring_scores(query.contiguous(), key_ring).view(b, rows, h, w)
    else:
        scores = (query[:, :, None, :] * key_ring).sum(dim=-1).view(b, rows, h, w)
    scores = scores + torch.einsum("brhd,bwhd->brhw", q, pos_key)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    if ahead is not None:
        extra = (q[:, :, :, None, :] * ahead.key).sum(dim=-1) + torch.einsum("brhd,bkhd->brhk", q, ahead.pos_key)
        scores = torch.cat([scores, extra.masked_fill(~ahead.keep[:, None, None, :], float("-inf"))], dim=-1)
    weights = (scores * d ** -0.5).softmax(dim=-1)
    ring_weights = weights[..., :w]
    if kernels:
        out = torch.ops.xportrait.ring_values(ring_weights.reshape(n * h, w), value_ring).view(b, rows, h, d)
    else:
        out = (ring_weights.reshape(n, h, w, 1) * value_ring).sum(dim=-2).view(b, rows, h, d)
    out = out + torch.einsum("brhw,bwhd->brhd", ring_weights, pos_value)
    if ahead is not None:
        ahead_weights = weights[..., w:]
        out = out + (ahead_weights[..., None] * ahead.value).sum(dim=-2)
        out = out + torch.einsum("brhk,bkhd->brhd", ahead_weights, ahead.pos_value)
    return out.reshape(n, h, d)


@dataclass
class FramePattern:
    """Which frames of a clip each frame attends to, and at which temporal positions: the
    live engine's causal pattern laid out over a whole clip, for training (engines/xportrait/
    train/causal.py derives it from the streaming engine's own bookkeeping).

    mask (F, F) bool [query frame, key frame]; positions (F, F) long: the key frame's position
    in the query frame's window; query_positions (F,) long: the query frame's own position."""

    mask: torch.Tensor
    positions: torch.Tensor
    query_positions: torch.Tensor


@dataclass(frozen=True)
class RingProjections:
    """One temporal attention's weight-only terms for the streaming path."""

    qkv: torch.Tensor  # (3C, C): to_q, to_k, to_v stacked
    query: torch.Tensor  # (max_len, C): to_q of each position's encoding
    key: torch.Tensor
    value: torch.Tensor


@dataclass
class TemporalRing:
    """One module's streaming cache: a ring of W frames per clip for each attention,
    K and V as (clips * HW, heads, W, head_dim). The current frame is written into the ring
    first and attends over it whole: no concatenation, no shifting."""

    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # K1, V1, K2, V2
    tick: RingTick


class TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.pos_embed = PositionalEncoding(dim, max_len)
        self._frozen: tuple[RingProjections, RingProjections] | None = None  # freeze_ring_projections

    def _attend(self, attn: Attention, x: torch.Tensor, past: FramesKV | None, valid: torch.Tensor | None,
                record: bool) -> tuple[torch.Tensor, FramesKV | None]:
        """Self-attention over frames. x: (N, f, C) normed; `past`: earlier frames' K(x), V(x).
        Returns the output and, with `record`, the current frames' K(x), V(x)."""
        n, f, c = x.shape
        pe = self.pos_embed.pe[0].to(x.dtype)  # (max_len, C)
        key, value = attn.to_k(x), attn.to_v(x)  # position-free: what a cache keeps
        recorded = FramesKV(key, value) if record else None
        p = 0 if past is None else past.key.shape[1]
        if p + f > pe.shape[0]:
            raise ValueError(f"a temporal window of {p + f} frames exceeds the module's {pe.shape[0]} positions")
        if past is not None:
            key = torch.cat([past.key, key], dim=1)
            value = torch.cat([past.value, value], dim=1)
        mask = None
        if valid is None:  # every frame real: positions 0..p+f-1 for all rows
            # to_k/to_v are bias-free, so projecting the table gives each position's term.
            key = key + attn.to_k(pe[: p + f])
            value = value + attn.to_v(pe[: p + f])
            query = attn.to_q(x + pe[p : p + f])
        else:  # per clip: its c real frames at 0..c-1, the current ones from c
            b = valid.shape[0]
            rows = n // b
            count = valid.sum(dim=1, keepdim=True)
            current = count + torch.arange(f, device=x.device)
            positions = torch.cat([(valid.cumsum(dim=1) - 1).clamp(min=0), current], dim=1)  # (b, p+f)
            key = (key.view(b, rows, p + f, c) + attn.to_k(pe)[positions][:, None]).view(n, p + f, c)
            value = (value.view(b, rows, p + f, c) + attn.to_v(pe)[positions][:, None]).view(n, p + f, c)
            query = attn.to_q((x.view(b, rows, f, c) + pe[current][:, None]).view(n, f, c))
            keep = torch.cat([valid, torch.ones(b, f, dtype=torch.bool, device=x.device)], dim=1)
            mask = keep.repeat_interleave(rows, dim=0)[:, None, None, :]  # (n, 1, 1, p+f)
        h, d = attn.heads, c // attn.heads
        q = query.view(n, f, h, d).transpose(1, 2)
        k = key.view(n, p + f, h, d).transpose(1, 2)
        v = value.view(n, p + f, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, f, c)
        return attn.to_out[0](out), recorded

    def _attend_pattern(self, attn: Attention, x: torch.Tensor, pattern: FramePattern) -> torch.Tensor:
        """Every frame of a clip at once, each over the frames `pattern` gives it, at the
        positions it gives: what streaming computes frame by frame, in one differentiable pass.
        x: (N, F, C) normed. Position terms enter per (query, key) pair, as in ring_attention."""
        n, f, c = x.shape
        h, d = attn.heads, c // attn.heads
        pe = self.pos_embed.pe[0].to(x.dtype)
        query = attn.to_q(x + pe[pattern.query_positions]).view(n, f, h, d)
        key, value = attn.to_k(x).view(n, f, h, d), attn.to_v(x).view(n, f, h, d)
        pos_key = attn.to_k(pe)[pattern.positions].view(f, f, h, d)  # bias-free: each position's term
        pos_value = attn.to_v(pe)[pattern.positions].view(f, f, h, d)
        scores = torch.einsum("nqhd,nkhd->nhqk", query, key) + torch.einsum("nqhd,qkhd->nhqk", query, pos_key)
        weights = (scores * d ** -0.5).masked_fill(~pattern.mask, float("-inf")).softmax(dim=-1)
        out = torch.einsum("nhqk,nkhd->nqhd", weights, value) + torch.einsum("nhqk,qkhd->nqhd", weights, pos_value)
        return attn.to_out[0](out.reshape(n, f, c))

    def freeze_ring_projections(self, enable: bool = True) -> None:
        """Precompute what the streaming path derives from the weights alone: each attention's
        q/k/v weights as one matrix (one GEMM reads x once) and its projected position table.
        Call again if the weights change (False: derive them on every call again)."""
        with torch.no_grad():
            self._frozen = (self._ring_projections(self.attn1), self._ring_projections(self.attn2)) if enable else None

    def _ring_projections(self, attn: Attention) -> "RingProjections":
        pe = self.pos_embed.pe[0].to(attn.to_q.weight.dtype)
        qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        # to_q/to_k/to_v are bias-free: a position's term is the projection of its table row.
        return RingProjections(qkv, attn.to_q(pe), attn.to_k(pe), attn.to_v(pe))

    def _attend_ring(self, attn: Attention, which: int, x: torch.Tensor, key_ring: torch.Tensor,
                     value_ring: torch.Tensor, tick: RingTick) -> torch.Tensor:
        """Write this frame's keys and values into its ring slot, then attend over the ring."""
        n, f, c = x.shape  # f == 1
        b, w = tick.mask.shape
        rows, h = n // b, attn.heads
        d = c // h
        proj = self._frozen[which] if self._frozen is not None else self._ring_projections(attn)
        query, key, value = F.linear(x.view(n, c), proj.qkv).split(c, dim=-1)
        key_ring.index_copy_(2, tick.slot, key.view(n, h, 1, d))
        value_ring.index_copy_(2, tick.slot, value.view(n, h, 1, d))
        current = tick.positions.gather(1, tick.slot.expand(b)[:, None])  # (b, 1)
        query = (query.view(b, rows, c) + proj.query[current]).view(n, h, d)
        pos_k = proj.key[tick.positions].view(b, w, h, d)  # each slot's position term, (b, W, h, d)
        pos_v = proj.value[tick.positions].view(b, w, h, d)
        ahead = None
        if tick.ahead is not None:  # entry i also sees entries i-1 .. i-k: the next frames, in flight
            k = tick.ahead.shape[1]
            key, value = key.view(b, rows, h, d), value.view(b, rows, h, d)
            # entry i's o-th newer frame is entry i - 1 - o (none before entry 0): (b, rows, h, k, d)
            shifted = lambda t: torch.stack([torch.cat([torch.zeros_like(t[: o + 1]), t[: b - o - 1]])
                                             for o in range(k)], dim=3)
            later = current + torch.arange(1, k + 1, device=x.device)  # their positions follow this frame's
            ahead = LookAhead(shifted(key), shifted(value), proj.key[later].view(b, k, h, d),
                              proj.value[later].view(b, k, h, d), tick.ahead)
        out = ring_attention(query, key_ring, value_ring, pos_k, pos_v, tick.mask, ahead)
        return attn.to_out[0](out.reshape(n, f, c))

    def forward(self, x: torch.Tensor, past: "TemporalPast | TemporalRing | FramePattern | None" = None,
                record: bool = False) -> tuple[torch.Tensor, tuple[FramesKV, FramesKV] | None]:
        """The block on (N, f, C) tokens, and with `record` its two attentions' position-free
        keys/values of these frames. A TemporalRing `past` is written at its tick's slot
        instead (the stream's cache: nothing to record); a FramePattern attends a whole clip
        at once the way the stream does (training: nothing to record)."""
        if isinstance(past, FramePattern):
            if record:
                raise ValueError("a frame pattern attends a whole clip: there is nothing to record")
            x = self._attend_pattern(self.attn1, self.norm1(x), past) + x
            x = self._attend_pattern(self.attn2, self.norm2(x), past) + x
            return self.ff(self.norm3(x)) + x, None
        if isinstance(past, TemporalRing):
            if record:
                raise ValueError("a temporal ring records the current frames itself")
            k1, v1, k2, v2 = past.tensors
            x = self._attend_ring(self.attn1, 0, self.norm1(x), k1, v1, past.tick) + x
            x = self._attend_ring(self.attn2, 1, self.norm2(x), k2, v2, past.tick) + x
            return self.ff(self.norm3(x)) + x, None
        kv = past.kv if past is not None else (None, None)
        valid = past.valid if past is not None else None
        out, first = self._attend(self.attn1, self.norm1(x), kv[0], valid, record)
        x = out + x
        out, second = self._attend(self.attn2, self.norm2(x), kv[1], valid, record)
        x = out + x
        return self.ff(self.norm3(x)) + x, ((first, second) if record else None)


class TemporalModule(nn.Module):
    """One motion module on (batch * frames, C, H, W) features, frames contiguous per clip."""

    def __init__(self, channels: int, heads: int, max_len: int, norm_groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(channels, heads, max_len)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, frames: int, past: "TemporalPast | TemporalRing | None" = None,
                record: bool = False) -> tuple[torch.Tensor, tuple[FramesKV, FramesKV] | None]:
        """The module's output and, with `record`, its new frames' keys/values (TemporalBlock)."""
        bf, c, h, w = x.shape
        b = bf // frames
        y = self.norm(x)  # per frame, as the released code (a 4-D GroupNorm)
        y = y.permute(0, 2, 3, 1).reshape(b, frames, h * w, c).transpose(1, 2).reshape(b * h * w, frames, c)
        y = self.proj_in(y)
        (block,) = self.transformer_blocks  # one block, as released (its keys are what a cache keeps)
        y, keys = block(y, past, record)
        y = self.proj_out(y)
        y = y.reshape(b, h * w, frames, c).transpose(1, 2).reshape(bf, h, w, c).permute(0, 3, 1, 2)
        return x + y, keys


class MotionLevel(nn.Module):
    def __init__(self, channels: int, count: int, heads: int, max_len: int, norm_groups: int):
        super().__init__()
        self.motion_modules = nn.ModuleList(
            [TemporalModule(channels, heads, max_len, norm_groups) for _ in range(count)])


class MotionModules(nn.Module):
    """All temporal modules of the UNet: `layers_per_block` per down level, one more per up
    level (one per output block), none in the middle; named as diffusers' MotionAdapter."""

    def __init__(self, block_out_channels: tuple[int, ...], layers_per_block: int, heads: int, max_len: int,
                 norm_groups: int = 32):
        super().__init__()
        self.down_blocks = nn.ModuleList(
            [MotionLevel(c, layers_per_block, heads, max_len, norm_groups) for c in block_out_channels])
        self.up_blocks = nn.ModuleList(
            [MotionLevel(c, layers_per_block + 1, heads, max_len, norm_groups) for c in reversed(block_out_channels)])

    @property
    def down_count(self) -> int:
        """How many modules the down path calls (the rest follow the up blocks)."""
        return sum(len(level.motion_modules) for level in self.down_blocks)

    def in_order(self) -> list[TemporalModule]:
        """Every module in the order the UNet's forward calls them."""
        return [m for level in (*self.down_blocks, *self.up_blocks) for m in level.motion_modules]

    def freeze_ring_projections(self, enable: bool = True) -> None:
        """TemporalBlock.freeze_ring_projections on every module (the live engine, once)."""
        for module in self.in_order():
            for block in module.transformer_blocks:
                block.freeze_ring_projections(enable)
