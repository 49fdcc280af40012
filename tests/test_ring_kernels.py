"""The Triton ring kernels (engines/xportrait/ring_kernels.py) equal torch, run in Triton's
interpreter on the CPU (a subprocess: the interpreter is chosen when the kernels are defined)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (pip install -e '.[test]' brings it on Linux x86-64)")

CHECK = textwrap.dedent("""
    import torch
    from engines.xportrait import ring_kernels, temporal
    assert ring_kernels.triton is not None
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).half()
    # The UNet's head dims (40, 80, 160), a window that is not a power of two, a row count
    # that is not a multiple of the rows per program.
    for n, h, w, d in [(7, 8, 16, 40), (5, 8, 12, 80), (3, 8, 16, 160)]:
        q, k, v = make(n, h, d), make(n, h, w, d), make(n, h, w, d)
        scores = torch.ops.xportrait.ring_scores(q, k)
        assert scores.shape == (n, h, w) and scores.dtype == torch.float16
        torch.testing.assert_close(scores.float(), (q[:, :, None].float() * k.float()).sum(-1), rtol=2e-3, atol=2e-2)
        # The softmax weights of the ring slots come strided when look-ahead slots follow them.
        p = torch.rand(n, h, w + 2, generator=g).half()[..., :w]
        out = torch.ops.xportrait.ring_values(p.reshape(n * h, w), v)
        torch.testing.assert_close(out.float(), (p[..., None].float() * v.float()).sum(-2), rtol=2e-3, atol=2e-2)
        assert not torch.allclose(out.float(), (p[..., None].float() * v.roll(1, 2).float()).sum(-2), atol=0.1)

    # Wired into the attention: the same result as torch, in one kernel (no look-ahead) or the
    # two sums (look-ahead).
    b, rows, h, w, d, k = 3, 5, 8, 16, 40, 2
    n = b * rows
    keep = torch.rand(b, w, generator=g) > 0.4
    keep[:, -1] = True
    args = (make(n, h, d), make(n, h, w, d), make(n, h, w, d), make(b, w, h, d), make(b, w, h, d), keep)
    ahead = temporal.LookAhead(make(b, rows, h, k, d), make(b, rows, h, k, d), make(b, k, h, d), make(b, k, h, d),
                               torch.tensor([[False, False], [True, False], [True, True]]))
    for extra in (None, ahead):
        ring_kernels.available = lambda tensor: False
        expected = temporal.ring_attention(*args, extra)
        ring_kernels.available = lambda tensor: True
        torch.testing.assert_close(temporal.ring_attention(*args, extra), expected, rtol=1e-2, atol=1e-2)
    print("kernels match")
""")


def test_the_triton_ring_sums_match_torch_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=240,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels match" in result.stdout
