"""Offline X-Portrait inference on the tiny model (random init): sampler, windows, caching."""

from __future__ import annotations

import pytest
import torch

from engines.xportrait.config import XPortraitConfig
from engines.xportrait.model import XPortraitModel
from engines.xportrait.pipeline import SamplerSettings, XPortraitPipeline, fuse_windows, make_scheduler, windows
from fixtures import compact_config, one_torch_thread, tiny_model  # tests/ is on sys.path
from released_layout import ddpm_buffers

RES = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model() -> XPortraitModel:
    return tiny_model(RES, config=compact_config(RES))


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


def released_windows(frames: int, offset: int, b: int = 16, num_overlap: int = 4) -> list[torch.Tensor]:
    """The released DDIMSampler_ReferenceOnly's windows for one step, as it writes them."""
    skip = b - num_overlap
    return [torch.arange(start, start + b) % frames for start in range(offset, offset + frames - num_overlap, skip)]


def released_fusion(frames: int, groups, predictions, like: torch.Tensor) -> torch.Tensor:
    """The release's fusion of window predictions, as it writes it."""
    out, counts = torch.zeros_like(like), torch.zeros(frames)
    for indices, eps in zip(groups, predictions):
        out[indices] += eps
        counts[indices] += 1
    return out / counts.reshape(-1, 1, 1, 1)


def test_windows_are_the_released_ones_for_every_clip_length():
    """16 frames from a random offset modulo the clip: above 16 frames windows of stride 12;
    at 16 one window, rotated; below, frames repeat to fill it."""
    g = torch.Generator().manual_seed(0)
    s = SamplerSettings()
    for n in (1, 2, 4, 5, 10, 15, 16, 17, 40, 100):
        for _ in range(3):  # a new offset each step
            state = g.get_state()
            groups = windows(n, s, g)
            offset = int(torch.randint(0, n, (1,), generator=torch.Generator().set_state(state)))
            expected = released_windows(n, offset)
            if n <= 4:  # the release has no window at all there (and divides 0 by 0): we run the one
                expected = [torch.arange(offset, offset + 16) % n]
            assert len(groups) == len(expected) and all(torch.equal(a, b) for a, b in zip(groups, expected)), n
            assert all(len(idx) == 16 for idx in groups)
            covered = torch.zeros(n)
            for idx in groups:
                covered[idx] += 1
            assert (covered >= 1).all()
    rotations = {int(windows(16, s, g)[0][0]) for _ in range(20)}
    assert len(rotations) > 5  # at exactly 16 frames the window's order rotates from step to step
    fixed = windows(40, SamplerSettings(offsets="fixed"), g)
    assert [int(w[0]) for w in fixed] == [0, 12, 24]
    assert int(fixed[-1][-1]) == 39
    assert [w.tolist() for w in windows(6, SamplerSettings(offsets="fixed"), g)] == [list(range(6))]

def test_fusion_averages_each_frame_over_its_windows():
    groups = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([5, 0, 1, 2])]
    like = torch.zeros(6, 1)
    # A prediction that depends on the window: the window's first index, for every frame in it.
    fused = fuse_windows(6, groups, lambda idx: torch.full((len(idx), 1), float(idx[0])), like)
    expected = {0: (0 + 5) / 2, 1: (0 + 5) / 2, 2: (0 + 2 + 5) / 3, 3: (0 + 2) / 2, 4: 2.0, 5: (2 + 5) / 2}
    assert fused[:, 0].tolist() == pytest.approx([expected[i] for i in range(6)])
    with pytest.raises(RuntimeError, match="left out"):
        fuse_windows(7, groups, lambda idx: torch.zeros(len(idx), 1), torch.zeros(7, 1))


def test_fusion_of_repeated_frames_is_the_releases():
    """A clip shorter than the window: each frame is in it two or three times; the release's
    `out[idx] += eps; counts[idx] += 1` keeps one prediction per frame, its last place's."""
    g = torch.Generator().manual_seed(4)
    for n in (3, 7, 10, 16, 30):
        like = torch.zeros(n, 4, 2, 2)
        groups = windows(n, SamplerSettings(), g)
        predictions = [torch.randn(len(idx), 4, 2, 2, generator=g) for idx in groups]
        calls = iter(predictions)
        fused = fuse_windows(n, groups, lambda idx: next(calls), like)
        torch.testing.assert_close(fused, released_fusion(n, groups, predictions, like), rtol=0, atol=1e-6)


def test_a_short_clip_runs_one_16_frame_window_in_rotating_order(model, monkeypatch):
    """6 frames and 16 frames: every UNet call sees 16 frames in cyclic order (what the
    temporal modules were trained on), starting where the step's offset says."""
    seen = []
    original = model.predict_noise

    def spy(sample, timestep, frames, reference, pose, local, guidance=1.0, **kw):
        seen.append((frames, pose))
        return original(sample, timestep, frames, reference, pose, local, guidance, **kw)

    monkeypatch.setattr(model, "predict_noise", spy)
    for n in (6, 16):
        seen.clear()
        sources, driving, local = clip(n)
        settings = SamplerSettings(sampler="ddim", steps=3, guidance=1.0)
        out = XPortraitPipeline(model, settings)(sources, driving, local)
        assert out.shape == (n, 3, RES, RES) and torch.isfinite(out).all()
        assert len(seen) == len(make_scheduler(model.config, settings).timesteps) == 3  # one window a step
        assert all(frames == 16 for frames, _ in seen)
        firsts = set()
        for _, pose in seen:
            order = [int(torch.nonzero((driving == row).flatten(1).all(1))[0]) for row in pose]
            assert all((b - a) % n == 1 for a, b in zip(order, order[1:]))  # cyclic, wrapping
            firsts.add(order[0])
        assert len(firsts) > 1  # the offset moves between steps

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
    """With the posterior mean (one reference latent for all frames)."""
    calls = []
    original = model.reference_net.forward
    monkeypatch.setattr(model.reference_net, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    sources, driving, local = clip(40)  # 3 windows a step
    pipe = XPortraitPipeline(model, SamplerSettings(sampler="ddim", steps=3, guidance=1.0, posterior="mean"))
    pipe(sources, driving, local)
    steps = len(make_scheduler(model.config, pipe.settings).timesteps)
    assert len(calls) == steps * len(sources) == pipe.reference_calls


def test_sampled_references_are_each_frames_own(model, monkeypatch):
    """As released: each frame has its own posterior draw of every source; a window's
    reference keys/values come from its frames' draws (a batch of 16 per source)."""
    latents = []
    original = model.reference_net.forward
    monkeypatch.setattr(model.reference_net, "forward",
                        lambda latent, *a, **k: latents.append(latent) or original(latent, *a, **k))
    sources, driving, local = clip(20)  # 2 windows a step
    pipe = XPortraitPipeline(model, SamplerSettings(sampler="ddim", steps=3, guidance=1.0))
    pipe(sources, driving, local)
    steps = len(make_scheduler(model.config, pipe.settings).timesteps)
    assert len(latents) == steps * 2 * len(sources) == pipe.reference_calls
    assert all(z.shape[0] == 16 for z in latents)
    scheduler = make_scheduler(model.config, pipe.settings)
    _, references = pipe.latents(sources, 20, scheduler, torch.Generator().manual_seed(pipe.settings.seed))
    first = latents[0]  # the first window of the first step, source 0: draws of 16 different frames
    rows = [int(torch.nonzero((references[0] == z).flatten(1).all(1))[0]) for z in first]
    assert len(set(rows)) == 16

def test_windowing_changes_nothing_when_frames_do_not_interact(model):
    """Invariant of the fusion: if the temporal modules are the identity (their output projection
    zero, as before training), every frame's prediction is its own, so any window layout, or none,
    gives the same frames. Windows only ever mix information through the temporal modules."""
    torch.manual_seed(3)
    identity = XPortraitModel(model.config).eval()
    identity.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in identity.unet.motion.in_order():
            m.proj_out.weight.zero_(), m.proj_out.bias.zero_()
    sources, driving, local = clip(10)
    base = SamplerSettings(sampler="ddim", steps=2, guidance=1.0)  # one 16-frame window: frames repeat, order rotates
    whole = XPortraitPipeline(identity, SamplerSettings(**{**base.__dict__, "offsets": "fixed"}))(sources, driving, local)
    windowed = XPortraitPipeline(identity, base)(sources, driving, local)
    small = XPortraitPipeline(identity, SamplerSettings(**{**base.__dict__, "window": 5, "overlap": 2}))(sources, driving, local)
    torch.testing.assert_close(windowed, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small, whole, rtol=1e-4, atol=1e-4)
    # With working temporal modules the layout does matter: the check above is not vacuous.
    mixed = XPortraitPipeline(model, base)(sources, driving, local)
    mixed_small = XPortraitPipeline(model, SamplerSettings(**{**base.__dict__, "window": 5, "overlap": 2}))(sources, driving, local)
    assert not torch.allclose(mixed, mixed_small, atol=1e-3)


def posterior_draws(model, images: torch.Tensor, frames: int, g: torch.Generator) -> list[torch.Tensor]:
    """ldm's DiagonalGaussianDistribution.sample, per image, `frames` draws: mean + std * N(0, 1)
    of the encoder's moments (logvar clamped to [-30, 20]), scaled."""
    moments = model.vae.quant_conv(model.vae.encoder(images))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return [(mean[i] + std[i] * torch.randn(frames, *mean.shape[1:], generator=g)) * 0.18215
            for i in range(len(images))]


def test_latents_are_the_releases_posterior_draws_forward_diffused_to_999(model):
    """Written from ldm: get_first_stage_encoding(encode_first_stage(x)) per frame, then
    q_sample(x0, t=999) = sqrt(ac[999]) x0 + sqrt(1 - ac[999]) noise with ldm's buffers."""
    sources, _, _ = clip(1)
    n = 5
    for sampler in (SamplerSettings.released(), SamplerSettings.lcm(4)):
        pipe = XPortraitPipeline(model, sampler)
        scheduler = make_scheduler(model.config, sampler)
        g = torch.Generator().manual_seed(sampler.seed)
        with torch.no_grad():
            x, references = pipe.latents(sources, n, scheduler, g)

            r = torch.Generator().manual_seed(sampler.seed)
            start_ref = posterior_draws(model, sources[:1], n, r)[0]
            noise = torch.randn(n, 4, RES // 8, RES // 8, generator=r)
            references_ref = posterior_draws(model, sources, n, r)
        buffers = ddpm_buffers(model.config)
        x_ref = buffers["sqrt_alphas_cumprod"][999] * start_ref + buffers["sqrt_one_minus_alphas_cumprod"][999] * noise
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)
        assert len(references) == 2
        for ours, theirs in zip(references, references_ref):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert not torch.allclose(references[0][0], references[0][1])  # one draw per frame
    assert scheduler.timesteps[0] == 999 and make_scheduler(model.config, SamplerSettings()).timesteps[0] == 991


def test_our_latent_options_are_the_mean_and_the_first_step(model):
    sources, _, _ = clip(1)
    settings = SamplerSettings(posterior="mean", start_noise="first-step")
    pipe = XPortraitPipeline(model, settings)
    scheduler = make_scheduler(model.config, settings)
    with torch.no_grad():
        x, references = pipe.latents(sources, 3, scheduler, torch.Generator().manual_seed(0))
        mean = model.vae.encode(sources).latent_dist.mean * 0.18215
    assert [r.shape[0] for r in references] == [1, 1] and torch.equal(references[1][0], mean[1])
    noise = torch.randn(3, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    a = ddpm_buffers(model.config)["alphas_cumprod"][991]  # the first of ldm's 31 "30" steps
    torch.testing.assert_close(x, a.sqrt() * mean[:1] + (1 - a).sqrt() * noise, rtol=0, atol=1e-5)
    shared = XPortraitPipeline(model, SamplerSettings(shared_noise=True))
    y = shared.initial_latents(scheduler, mean[:1].expand(3, -1, -1, -1), torch.Generator().manual_seed(0))
    assert torch.equal(y[0], y[2])
    with pytest.raises(ValueError, match="posterior"):
        SamplerSettings(posterior="mode").validate()
    with pytest.raises(ValueError, match="start_noise"):
        SamplerSettings(start_noise="991").validate()


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


def test_the_offline_engine_reports_each_denoising_step_to_its_progress():
    """`animate` shows a bar of the denoising steps while the diffusion engine renders the clip
    at the end: the engine says how many steps there are and when each is done."""
    import numpy as np

    from engines import XPortraitOptions, create_engine
    from engines.base import DrivingFrame, SourcePortrait

    calls = []
    options = XPortraitOptions(size=RES, model_size="tiny", random_weights=True, device="cpu", sampler="lcm", steps=3)
    engine = create_engine(options, model=tiny_model(RES), progress=lambda done, total: calls.append((done, total)))
    image = np.full((RES, RES, 3), 128, np.uint8)
    marks = np.full((478, 3), RES / 2, np.float32)
    engine.prepare([SourcePortrait(image, marks)])
    for k in range(3):
        engine.step(DrivingFrame(marks, marks, k / 25, image=image, tag=k))
    assert calls == []  # nothing is rendered before flush
    assert [r.tag for r in engine.flush()] == [0, 1, 2]
    assert calls == [(1, 3), (2, 3), (3, 3)]
