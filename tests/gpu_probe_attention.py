"""On a CUDA device (not part of the suite): the live tick's attention shapes on each of
PyTorch's fused attention kernels (flash, memory-efficient, cuDNN), fp16, timed alone, with
each one's largest difference from the math kernel in fp32.

The shapes are SD1.5's at 512² with one reference, per pass of a 2-level group (batch 2):
self-attention with the reference's keys appended (tokens x 2 keys) at each latent size,
the ControlNets' plain self-attention, and the cross-attention on the prompt's 77 tokens.

    python tests/gpu_probe_attention.py [--batch 2]

Prints one line per shape and kernel: us, TFLOP/s, max |difference|. On the lent H200
(torch 2.11, cuDNN 9.19, 2026-12-02) cuDNN's kernel is 1.6-1.9x flash's at the 64² and 32²
shapes (64² with the reference: 309 us against 537), and it is the one PyTorch already picks
there: the compiled tick's profile shows only cuDNN's attention kernels (BENCHMARKS.md,
"Session 13"), so no option chooses it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION}


def shapes(batch: int):
    for side, channels in ((64, 320), (32, 640), (16, 1280), (8, 1280)):
        n, d = side * side, channels // 8
        yield f"{side}² self + reference", (batch, 8, n, d), 2 * n
        yield f"{side}² self (ControlNet)", (batch, 8, n, d), n
        yield f"{side}² cross (77 tokens)", (batch, 8, n, d), 77


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.__version__, torch.cuda.get_device_name(), "cuDNN", torch.backends.cudnn.version())
    for name, (b, h, n, d), keys in shapes(args.batch):
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, h, keys, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, h, keys, d, device="cuda", dtype=torch.float16)
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flop = 4 * b * h * n * keys * d
        for label, backend in KERNELS.items():
            try:
                with sdpa_kernel(backend):
                    got = F.scaled_dot_product_attention(q, k, v)
                    ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300)
            except RuntimeError as error:
                print(f"{name:24} {label:9} not available: {str(error).splitlines()[0][:80]}")
                continue
            err = (got.float() - want).abs().max().item()
            print(f"{name:24} {label:9} {ms * 1e3:8.1f} us {flop / ms / 1e9:7.1f} TFLOP/s  max|diff| {err:.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
