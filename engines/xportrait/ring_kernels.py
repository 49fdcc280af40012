"""The streaming temporal attention over its rings as Triton kernels, for CUDA tensors.

Each query row meets its ring of W cached frames twice: scores[r, w] = q[r] . K[r, w] and
out[r] = sum_w p[r, w] V[r, w]. Both are pure reads of the rings (which dominate: at 64²
latents a ring is 168 MB a module), so the goal is HBM bandwidth. torch.compile's own
reductions reach 0.5-1.5 TB/s on them: the head dims (40, 80, 160) are not powers of two,
and the value sum reduces over the middle axis. These kernels tile [rows, W, d padded to a
power of two], with d masked, so every row of the ring is one contiguous, vectorised read
(2.4-3 TB/s on the H100).

`ring_attend` is the whole attention in one pass (position terms, mask, softmax in
registers): the live tick's path. `ring_scores` and `ring_values` are the two sums alone, for
look-ahead, whose extra frames join the softmax in torch.

Registered with `torch.library.triton_op`: torch.compile sees the kernels and keeps them inside
the compiled tick (and its CUDA graph). `available()` says whether they can run; callers fall
back to torch elsewhere (CPU, no Triton).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch sums serve
    triton = None

# Rows per program and warps, by padded head dim, from sweeps on the H100 at the tick's ring
# sizes (BENCHMARKS.md): `_ATTEND` the fastest for the one-pass kernel; `_LAUNCH` (the two sums,
# look-ahead only) within a few percent of the fastest, as most choices were.
_LAUNCH = {64: (8, 4), 128: (4, 4), 256: (2, 4)}
_ATTEND = {64: (1, 1), 128: (1, 1), 256: (2, 2)}


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on this tensor (CUDA, with Triton installed)."""
    return triton is not None and tensor.is_cuda


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _launch(w: int, d: int, table: dict = _LAUNCH) -> tuple[int, int, int, int]:
    """(W padded, d padded, rows per program, warps)."""
    d_pad = max(16, _pow2(d))
    block, warps = table.get(d_pad, (max(1, 512 // d_pad), 4))
    return _pow2(w), d_pad, block, warps


if triton is not None:

    @triton.jit
    def _scores_kernel(q_ptr, k_ptr, out_ptr, rows, W: tl.constexpr, W_PAD: tl.constexpr, D: tl.constexpr,
                       D_PAD: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w = tl.arange(0, W_PAD)
        d = tl.arange(0, D_PAD)
        row_ok, w_ok, d_ok = r < rows, w < W, d < D
        k = tl.load(k_ptr + r[:, None, None] * (W * D) + w[None, :, None] * D + d[None, None, :],
                    mask=row_ok[:, None, None] & w_ok[None, :, None] & d_ok[None, None, :], other=0.0)
        q = tl.load(q_ptr + r[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q.to(tl.float32)[:, None, :], axis=2)
        tl.store(out_ptr + r[:, None] * W + w[None, :], scores.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & w_ok[None, :])

    @triton.jit
    def _values_kernel(p_ptr, p_row_stride, v_ptr, out_ptr, rows, W: tl.constexpr, W_PAD: tl.constexpr,
                       D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w = tl.arange(0, W_PAD)
        d = tl.arange(0, D_PAD)
        row_ok, w_ok, d_ok = r < rows, w < W, d < D
        v = tl.load(v_ptr + r[:, None, None] * (W * D) + w[None, :, None] * D + d[None, None, :],
                    mask=row_ok[:, None, None] & w_ok[None, :, None] & d_ok[None, None, :], other=0.0)
        p = tl.load(p_ptr + r[:, None] * p_row_stride + w[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0.0)
        out = tl.sum(v.to(tl.float32) * p.to(tl.float32)[:, :, None], axis=1)
        tl.store(out_ptr + r[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, pos_k_ptr, pos_v_ptr, keep_ptr, out_ptr, rows, rows_per_clip, scale,
                       H: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, D: tl.constexpr,
                       D_PAD: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (query row, head) pairs
        w = tl.arange(0, W_PAD)
        d = tl.arange(0, D_PAD)
        row_ok, w_ok, d_ok = r < rows, w < W, d < D
        head, clip = r % H, (r // H) // rows_per_clip
        tile_ok = row_ok[:, None, None] & w_ok[None, :, None] & d_ok[None, None, :]
        ring = r[:, None, None] * (W * D) + w[None, :, None] * D + d[None, None, :]
        # Each slot's position term, (clips, W, H, D): a small table, read from cache.
        table = (clip[:, None, None] * W + w[None, :, None]) * (H * D) + head[:, None, None] * D + d[None, None, :]
        q = tl.load(q_ptr + r[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        key = (tl.load(k_ptr + ring, mask=tile_ok, other=0.0).to(tl.float32)
               + tl.load(pos_k_ptr + table, mask=tile_ok, other=0.0).to(tl.float32))
        scores = tl.sum(key * q.to(tl.float32)[:, None, :], axis=2) * scale
        keep = tl.load(keep_ptr + clip[:, None] * W + w[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0)
        scores = tl.where(keep != 0, scores, float("-inf"))
        weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        weights = weights / tl.sum(weights, axis=1)[:, None]
        value = (tl.load(v_ptr + ring, mask=tile_ok, other=0.0).to(tl.float32)
                 + tl.load(pos_v_ptr + table, mask=tile_ok, other=0.0).to(tl.float32))
        out = tl.sum(value * weights[:, :, None], axis=1)
        tl.store(out_ptr + r[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])

    @torch.library.triton_op("xportrait::ring_attend", mutates_args=())
    def ring_attend(query: torch.Tensor, key_ring: torch.Tensor, value_ring: torch.Tensor, pos_key: torch.Tensor,
                    pos_value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """temporal.ring_attention without look-ahead in one pass (each ring read once, the
        softmax in registers): query (n, h, d), rings (n, h, W, d), pos_key, pos_value
        (b, W, h, d), keep (b, W) bool, all contiguous -> (n, h, d)."""
        n, h, w, d = key_ring.shape
        out = torch.empty((n, h, d), device=key_ring.device, dtype=value_ring.dtype)
        w_pad, d_pad, block, warps = _launch(w, d, _ATTEND)
        grid = (triton.cdiv(n * h, block),)
        torch.library.wrap_triton(_attend_kernel)[grid](query, key_ring, value_ring, pos_key, pos_value, keep, out,
                                                        n * h, n // keep.shape[0], d ** -0.5, h, w, w_pad, d, d_pad,
                                                        block, num_warps=warps)
        return out

    @torch.library.triton_op("xportrait::ring_scores", mutates_args=())
    def ring_scores(query: torch.Tensor, key_ring: torch.Tensor) -> torch.Tensor:
        """query (n, h, d), key_ring (n, h, W, d), both contiguous -> (n, h, W): q . K per slot."""
        n, h, w, d = key_ring.shape
        out = torch.empty((n, h, w), device=key_ring.device, dtype=query.dtype)
        w_pad, d_pad, block, warps = _launch(w, d)
        grid = (triton.cdiv(n * h, block),)
        torch.library.wrap_triton(_scores_kernel)[grid](query, key_ring, out, n * h, w, w_pad, d, d_pad, block,
                                                        num_warps=warps)
        return out

    @torch.library.triton_op("xportrait::ring_values", mutates_args=())
    def ring_values(weights: torch.Tensor, value_ring: torch.Tensor) -> torch.Tensor:
        """weights (n * h, W) with unit stride along W, value_ring (n, h, W, d) contiguous ->
        (n, h, d): the weighted sum of the ring's values."""
        n, h, w, d = value_ring.shape
        out = torch.empty((n, h, d), device=value_ring.device, dtype=value_ring.dtype)
        w_pad, d_pad, block, warps = _launch(w, d)
        grid = (triton.cdiv(n * h, block),)
        torch.library.wrap_triton(_values_kernel)[grid](weights, weights.stride(0), value_ring, out, n * h, w, w_pad,
                                                        d, d_pad, block, num_warps=warps)
        return out
