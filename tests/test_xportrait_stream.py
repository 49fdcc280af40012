"""The streaming denoiser equals the offline causal definition, frame for frame."""

from __future__ import annotations

import pytest
import torch

from engines.xportrait.config import XPortraitConfig
from engines.xportrait.model import XPortraitModel
from engines.xportrait.stream import StreamSettings, StreamingDenoiser, render_causal

RES = 64


@pytest.fixture(scope="module")
def model() -> XPortraitModel:
    torch.manual_seed(0)
    m = XPortraitModel(XPortraitConfig.tiny(RES)).eval()
    with torch.no_grad():  # zero-initialised projections would hide the temporal path
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def inputs(frames: int):
    g = torch.Generator().manual_seed(7)
    sources = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    driving = torch.rand(frames, 3, RES, RES, generator=g) * 2 - 1
    local = torch.rand(frames, 3, RES, RES, generator=g) * 2 - 1
    return sources, driving, local


def stream(model, settings, sources, driving, local):
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32)
    denoiser.prepare(sources)
    out, tags = [], []
    for i in range(driving.shape[0]):
        leaving = denoiser.tick(driving[i : i + 1], local[i : i + 1], tag=i)
        if leaving is not None:
            out.append(leaving[0].clone()), tags.append(leaving[1])
    for _ in range(settings.steps - 1):  # drain the frames still in flight
        leaving = denoiser.tick(None, None)
        if leaving is not None:
            out.append(leaving[0].clone()), tags.append(leaving[1])
    return torch.cat(out), tags


@pytest.mark.parametrize("steps, window", [(3, 4), (2, 1)])
def test_streaming_equals_the_offline_causal_frames(model, steps, window):
    settings = StreamSettings(steps=steps, window=window)
    frames = 7  # longer than the window: the sliding window and the warm-up are both exercised
    sources, driving, local = inputs(frames)
    streamed, tags = stream(model, settings, sources, driving, local)
    reference = render_causal(model, settings, sources, driving, local)
    assert tags == list(range(frames))  # every frame leaves once, in order, S - 1 ticks late
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)


def test_temporal_window_matters(model):
    """Not vacuous: a different window gives different frames."""
    sources, driving, local = inputs(5)
    a = render_causal(model, StreamSettings(steps=2, window=4), sources, driving, local)
    b = render_causal(model, StreamSettings(steps=2, window=1), sources, driving, local)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # the first frame has no past either way
    assert not torch.allclose(a[3], b[3], atol=1e-4)


def test_the_offline_engine_with_causal_windows_renders_the_streamed_frames(model):
    """The offline pipeline's causal mode is the live engine's definition: same decoded frames."""
    from engines.xportrait.pipeline import SamplerSettings, XPortraitPipeline

    settings = StreamSettings(steps=2, window=3)
    sources, driving, local = inputs(5)
    streamed, _ = stream(model, settings, sources, driving, local)
    offline = XPortraitPipeline(model, SamplerSettings(sampler="lcm", steps=2, guidance=1.0, window=3,
                                                       offsets="causal"))(sources, driving, local)
    torch.testing.assert_close(offline, model.decode(streamed), rtol=1e-4, atol=1e-4)
