"""Offline X-Portrait inference on the tiny model (random init): sampler, windows, caching."""

from __future__ import annotations

import pytest
import torch

from engines.xportrait.config import XPortraitConfig
from engines.xportrait.model import XPortraitModel
from engines.xportrait.pipeline import SamplerSettings, XPortraitPipeline, fuse_windows, make_scheduler, windows

RES = 64


@pytest.fixture(scope="module")
def model() -> XPortraitModel:
    torch.manual_seed(0)
    m = XPortraitModel(XPortraitConfig.tiny(RES)).eval()
    # Zero-initialised output projections (as trained modules start) would make the temporal
    # modules and ControlNets no-ops; random ones make every path matter.
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return m


def clip(frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sources = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    driving = torch.rand(frames, 3, RES, RES, generator=g) * 2 - 1
    local = torch.rand(frames, 3, RES, RES, generator=g) * 2 - 1
    return sources, driving, local


def test_released_ddim_timesteps_are_ldm_uniform():
    s = make_scheduler(XPortraitConfig.tiny(), SamplerSettings.released())
    t = s.timesteps.tolist()
    assert len(t) == 31 and t[0] == 991 and t[1] == 958 and t[-1] == 1  # "30 steps" in ldm is 31
    lcm = make_scheduler(XPortraitConfig.tiny(), SamplerSettings.lcm(4))
    assert lcm.timesteps.tolist() == [999, 759, 499, 259]


def test_windows_cover_every_frame_and_follow_the_released_layout():
    g = torch.Generator().manual_seed(0)
    s = SamplerSettings()
    for n in (16, 17, 40, 100):
        groups = windows(n, s, g)
        covered = torch.zeros(n)
        for idx in groups:
            assert len(idx) == min(n, 16)
            covered[idx] += 1
        assert (covered >= 1).all()
        if n > 16:  # stride 12 from a random offset, wrapping around
            assert len(groups) == -(-(n - 4) // 12)
            assert all(int(b[0]) == (int(a[0]) + 12) % n for a, b in zip(groups, groups[1:]))
    fixed = windows(40, SamplerSettings(offsets="fixed"), g)
    assert [int(w[0]) for w in fixed] == [0, 12, 24]
    assert int(fixed[-1][-1]) == 39


def test_fusion_averages_each_frame_over_its_windows():
    groups = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([5, 0, 1, 2])]
    like = torch.zeros(6, 1)
    # A prediction that depends on the window: the window's first index, for every frame in it.
    fused = fuse_windows(6, groups, lambda idx: torch.full((len(idx), 1), float(idx[0])), like)
    expected = {0: (0 + 5) / 2, 1: (0 + 5) / 2, 2: (0 + 2 + 5) / 3, 3: (0 + 2) / 2, 4: 2.0, 5: (2 + 5) / 2}
    assert fused[:, 0].tolist() == pytest.approx([expected[i] for i in range(6)])
    with pytest.raises(RuntimeError, match="left out"):
        fuse_windows(7, groups, lambda idx: torch.zeros(len(idx), 1), torch.zeros(7, 1))


def test_same_seed_same_frames_other_seed_other_frames(model):
    sources, driving, local = clip(20)
    settings = SamplerSettings.lcm(2)
    a = XPortraitPipeline(model, settings)(sources, driving, local)
    b = XPortraitPipeline(model, settings)(sources, driving, local)
    c = XPortraitPipeline(model, SamplerSettings(**{**settings.__dict__, "seed": 5}))(sources, driving, local)
    assert a.shape == (20, 3, RES, RES)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_reference_features_are_computed_once_per_step_not_per_window_or_frame(model, monkeypatch):
    calls = []
    original = model.reference_net.forward
    monkeypatch.setattr(model.reference_net, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    sources, driving, local = clip(40)  # 3 windows a step
    pipe = XPortraitPipeline(model, SamplerSettings(sampler="ddim", steps=3, guidance=1.0))
    pipe(sources, driving, local)
    steps = len(make_scheduler(model.config, pipe.settings).timesteps)
    assert len(calls) == steps * len(sources) == pipe.reference_calls


def test_windowing_changes_nothing_when_frames_do_not_interact(model):
    """Invariant of the fusion: if the temporal modules are the identity (their output projection
    zero, as before training), every frame's prediction is its own, so any window layout, or none,
    gives the same frames. Windows only ever mix information through the temporal modules."""
    torch.manual_seed(3)
    identity = XPortraitModel(XPortraitConfig.tiny(RES)).eval()
    identity.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in identity.unet.motion.in_order():
            m.proj_out.weight.zero_(), m.proj_out.bias.zero_()
    sources, driving, local = clip(24)
    base = SamplerSettings(sampler="ddim", steps=2, guidance=1.0)
    whole = XPortraitPipeline(identity, SamplerSettings(**{**base.__dict__, "window": 24}))(sources, driving, local)
    windowed = XPortraitPipeline(identity, base)(sources, driving, local)
    small = XPortraitPipeline(identity, SamplerSettings(**{**base.__dict__, "window": 5, "overlap": 2}))(sources, driving, local)
    torch.testing.assert_close(windowed, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small, whole, rtol=1e-4, atol=1e-4)
    # With working temporal modules the layout does matter: the check above is not vacuous.
    mixed = XPortraitPipeline(model, base)(sources, driving, local)
    mixed_small = XPortraitPipeline(model, SamplerSettings(**{**base.__dict__, "window": 5, "overlap": 2}))(sources, driving, local)
    assert not torch.allclose(mixed, mixed_small, atol=1e-3)


def test_initial_latents_are_the_forward_diffused_source(model):
    pipe = XPortraitPipeline(model, SamplerSettings.lcm(4))
    scheduler = make_scheduler(model.config, pipe.settings)
    z = torch.randn(1, 4, RES // 8, RES // 8)
    x = pipe.initial_latents(scheduler, z, 3, torch.Generator().manual_seed(0))
    a = scheduler.alphas_cumprod[999]
    noise = (x - a.sqrt() * z) / (1 - a).sqrt()
    assert noise.std() == pytest.approx(1.0, abs=0.25)  # what is left is unit noise
    assert not torch.allclose(x[0], x[1])  # one noise per frame by default (released)
    shared = XPortraitPipeline(model, SamplerSettings(**{**pipe.settings.__dict__, "shared_noise": True}))
    y = shared.initial_latents(scheduler, z, 3, torch.Generator().manual_seed(0))
    assert torch.equal(y[0], y[2])


def test_several_references_join_the_attention_tokens(model):
    sources, driving, local = clip(4)
    z = model.encode(sources)
    t = torch.tensor(500)
    one = model.reference_features([z[:1]], t)
    two = model.reference_features([z[:1], z[1:]], t)
    name = next(iter(one))
    assert two[name][0].shape[1] == 2 * one[name][0].shape[1]
    x = torch.randn(4, 4, RES // 8, RES // 8)
    assert not torch.allclose(model.predict_noise(x, t, 4, one, driving, local),
                              model.predict_noise(x, t, 4, two, driving, local))


def test_guidance_uses_the_plain_unet_as_the_unconditional_branch(model):
    sources, driving, local = clip(4)
    z = model.encode(sources[:1])
    t = torch.tensor(400)
    ref = model.reference_features([z], t)
    x = torch.randn(4, 4, RES // 8, RES // 8)
    cond = model.predict_noise(x, t, 4, ref, driving, local, guidance=1.0)
    plain = model.unet(x, t, model.text, 4)
    guided = model.predict_noise(x, t, 4, ref, driving, local, guidance=5.0)
    torch.testing.assert_close(guided, plain + 5.0 * (cond - plain), rtol=1e-4, atol=1e-5)
