"""The streaming temporal attention over a ring equals plain masked attention."""

from __future__ import annotations

import torch

from engines.xportrait.temporal import ring_attention


def random_case(b=2, rows=5, h=8, w=16, d=40, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = b * rows
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    keep = torch.rand(b, w, generator=g) > 0.4
    keep[:, -1] = True  # the current slot always attends
    return (make(n, h, d), make(n, h, w, d), make(n, h, w, d), make(b, w, h, d), make(b, w, h, d), keep.to(device))


def plain_attention(query, key_ring, value_ring, pos_key, pos_value, keep):
    """Materialise keys and values with their positions, then softmax attention with a mask."""
    n, h, d = query.shape
    b, w = keep.shape
    rows = n // b
    clip = torch.arange(n) // rows
    keys = key_ring + pos_key[clip].permute(0, 2, 1, 3)  # (n, h, W, d)
    values = value_ring + pos_value[clip].permute(0, 2, 1, 3)
    mask = keep[clip][:, None, None, :]  # (n, 1, 1, W)
    return torch.nn.functional.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=mask)[:, :, 0]


def test_the_definition_is_masked_attention_over_positioned_keys():
    case = random_case()
    out = ring_attention(*case)
    torch.testing.assert_close(out, plain_attention(*case), rtol=1e-5, atol=1e-5)
    # Not vacuous: the mask and the positions both change the result.
    q, k, v, pk, pv, keep = case
    assert not torch.allclose(out, ring_attention(q, k, v, pk, pv, torch.ones_like(keep)), atol=1e-3)
    assert not torch.allclose(out, ring_attention(q, k, v, pk * 0, pv, keep), atol=1e-3)


def test_the_look_ahead_frames_join_the_same_softmax():
    from engines.xportrait.temporal import LookAhead

    q, k, v, pk, pv, keep = random_case(b=3, rows=4, w=5)
    b, rows, h, d, ahead = 3, 4, 8, 40, 2
    g = torch.Generator().manual_seed(1)
    make = lambda *shape: torch.randn(*shape, generator=g)
    la = LookAhead(make(b, rows, h, ahead, d), make(b, rows, h, ahead, d), make(b, ahead, h, d), make(b, ahead, h, d),
                   torch.tensor([[False, False], [True, False], [True, True]]))
    out = ring_attention(q, k, v, pk, pv, keep, la)
    # Plain attention over the ring slots and the look-ahead frames as extra slots.
    key_ring = torch.cat([k, la.key.reshape(b * rows, h, ahead, d)], dim=2)
    value_ring = torch.cat([v, la.value.reshape(b * rows, h, ahead, d)], dim=2)
    expected = plain_attention(q, key_ring, value_ring, torch.cat([pk, la.pos_key], dim=1),
                               torch.cat([pv, la.pos_value], dim=1), torch.cat([keep, la.keep], dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[:rows], ring_attention(q, k, v, pk, pv, keep)[:rows], atol=1e-6)  # clip 0 sees none
