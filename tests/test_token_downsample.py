"""Keys and values of averaged blocks of tokens (--token-downsample, ToDo): the reference
attention at the latents' size, its own side and the reference's pooled alike."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from engines.xportrait.reference import LayerKV, ReadReference, TokenPool, downsample_tokens, self_attention_layers
from fixtures import compact_config, one_torch_thread, tiny_model  # tests/ is on sys.path

RES = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def test_blocks_are_averaged_rows_first():
    tokens = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).reshape(2, 4 * 6, 3)  # a 4x6 grid, 3 channels
    pooled = downsample_tokens(tokens, TokenPool(4, 6, 2))
    grid = tokens.reshape(2, 4, 6, 3)
    want = grid.reshape(2, 2, 2, 3, 2, 3).mean(dim=(2, 4)).reshape(2, 6, 3)  # (row block, col block) means
    torch.testing.assert_close(pooled, want)
    # A grid the blocks do not tile: the edge blocks average what they hold.
    odd = downsample_tokens(tokens[:, :20], TokenPool(4, 5, 2))
    assert odd.shape == (2, 6, 3)
    torch.testing.assert_close(odd[:, 2], tokens[:, :20].reshape(2, 4, 5, 3)[:, :2, 4].mean(dim=1))
    with pytest.raises(ValueError, match="24 tokens do not lie on a 5x5 grid"):
        downsample_tokens(tokens, TokenPool(5, 5, 2))


def blocky(batch: int, side: int, channels: int, factor: int, generator: torch.Generator) -> torch.Tensor:
    """Tokens on a side x side grid, each factor x factor block of them alike."""
    coarse = torch.randn(batch, channels, side // factor, side // factor, generator=generator)
    return coarse.repeat_interleave(factor, 2).repeat_interleave(factor, 3).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_pooled_attention_keeps_each_sides_share(fused, factor):
    """Where every block of tokens (the layer's own and the reference's) is alike, the
    pooled attention is the whole one: a pooled key stands for factor² keys on both sides,
    so the softmax gives each side the share it had. On other tokens it is another
    attention, with the same queries (one output per token)."""
    g = torch.Generator().manual_seed(3)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(ReadReference("layer"))
    if fused:
        attn.fuse_projections()
    side, refs = 8, 2
    own = blocky(3, side, 16, factor, g)
    recorded = torch.cat([blocky(1, side, 16, factor, g) for _ in range(refs)], dim=1)
    pool = TokenPool(side, side, factor)
    pooled_ref = torch.cat([downsample_tokens(r, pool) for r in recorded.split(side * side, dim=1)], dim=1)
    with torch.no_grad():
        whole = attn(own, reference={"layer": LayerKV(attn.to_k(recorded), attn.to_v(recorded))})
        pooled_kv = LayerKV(attn.to_k(pooled_ref), attn.to_v(pooled_ref), pool)
        pooled = attn(own, reference={"layer": pooled_kv})
        torch.testing.assert_close(pooled, whole, rtol=1e-5, atol=1e-6)
        # Only the reference pooled (the layer's own keys whole): the reference's share quartered.
        one_side = attn(own, reference={"layer": pooled_kv._replace(pool=None)})
        assert (one_side - whole).abs().max() > 1e-2 * whole.abs().max()
        rough = torch.randn(3, side * side, 16, generator=g)
        other = attn(rough, reference={"layer": pooled_kv})
        assert other.shape == rough.shape
        assert (other - attn(rough, reference={"layer": LayerKV(attn.to_k(recorded), attn.to_v(recorded))})
                ).abs().max() > 1e-3


def test_reference_features_pool_the_latents_size_layers_only():
    model = tiny_model(RES, config=compact_config(RES))
    g = torch.Generator().manual_seed(5)
    latents = [torch.randn(1, 4, RES // 8, RES // 8, generator=g) for _ in range(2)]
    t = torch.tensor([499])
    whole, pooled = model.reference_features(latents, t), model.reference_features(latents, t, token_downsample=2)
    tokens = (RES // 8) ** 2
    outer = [name for name, kv in whole.items() if kv.key.shape[1] == 2 * tokens]
    assert outer and len(outer) < len(whole) == len(self_attention_layers(model.unet.unet))
    for name, kv in pooled.items():
        if name in outer:  # each reference's 8x8 tokens as 4x4 means of 2x2 blocks, the two joined
            assert kv.pool == TokenPool(RES // 8, RES // 8, 2) and kv.key.shape[1] == 2 * tokens // 4
        else:
            assert kv.pool is None and whole[name].pool is None
            torch.testing.assert_close(kv.key, whole[name].key, rtol=0, atol=0)
    with pytest.raises(ValueError, match="token_downsample must be at least 1"):
        model.reference_features(latents, t, token_downsample=0)
