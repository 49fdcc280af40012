"""The streaming denoiser equals the offline causal definition, frame for frame."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch

from engines.xportrait.model import XPortraitModel
from engines.xportrait.stream import StreamSettings, StreamingDenoiser, control_hints, lossy_noise_error, render_causal
from fixtures import compact_config, one_torch_thread, tiny_model  # tests/ is on sys.path

RES = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model() -> XPortraitModel:
    return tiny_model(RES, config=compact_config(RES))


@pytest.fixture(scope="module")
def hinted(model) -> XPortraitModel:
    """The tiny model with hints that matter: its ControlNets embed them at N(0, 0.05^2) (the
    zero-initialised convolution given weights), which moves their residuals by ~1e-4 of their
    size; scaled up a hundredfold here, a frame's own hint is far above the tests' tolerances."""
    hinted = copy.deepcopy(model)
    with torch.no_grad():
        for net in (hinted.pose_controlnet, hinted.local_controlnet):
            net.controlnet_cond_embedding.conv_out.weight.mul_(100)
    return hinted


def random_frames(frames: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 driving frames (N, RES, RES, 3) and eye/mouth patch boxes (N, 3, 4) inside them."""
    images = torch.randint(0, 256, (frames, RES, RES, 3), generator=generator, dtype=torch.uint8)
    half = RES // 8
    centres = torch.randint(half, RES - half + 1, (frames, 3, 2), generator=generator)
    return images, torch.cat([centres - half, centres + half], dim=-1)


def inputs(frames: int):
    """Source images, then driving frames with boxes (what the live engine ticks on)."""
    g = torch.Generator().manual_seed(7)
    sources = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    return (sources, *random_frames(frames, g))


def stream(model, settings, sources, driving, boxes, split=False, **options):
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=split, **options)
    denoiser.prepare(sources)
    out, tags = [], []
    for i in range(driving.shape[0]):
        leaving = denoiser.tick(driving[i], boxes[i], tag=i)
        if leaving is not None:
            out.append(leaving[0].clone()), tags.append(leaving[1])
    for _ in range(denoiser.entries - 1):  # drain the frames still in flight (S - 1 + K; S / G - 1)
        leaving = denoiser.tick(None, None)
        if leaving is not None:
            out.append(leaving[0].clone()), tags.append(leaving[1])
    return torch.cat(out), tags


@pytest.mark.parametrize("steps, window", [(3, 4), (2, 1)])
def test_streaming_equals_the_offline_causal_frames(model, steps, window):
    settings = StreamSettings(steps=steps, window=window)
    frames = 7  # longer than the window: the sliding window and the warm-up are both exercised
    sources, driving, boxes = inputs(frames)
    streamed, tags = stream(model, settings, sources, driving, boxes)
    reference = render_causal(model, settings, sources, *control_hints(driving, boxes, torch.float32))
    assert tags == list(range(frames))  # every frame leaves once, in order, S - 1 ticks late
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps, groups, split", [(4, 2, False), (4, 2, True), (3, 3, False), (2, 2, True)])
def test_level_groups_render_the_same_frames_sooner(model, steps, groups, split):
    """G passes a tick, S / G frames in flight each: the frames G = 1 renders (the offline
    causal ones), each out S / G - 1 ticks after it entered instead of S - 1."""
    settings = StreamSettings(steps=steps, window=3, level_groups=groups)
    frames = 6
    sources, driving, boxes = inputs(frames)
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=split)
    denoiser.prepare(sources)
    left = [denoiser.tick(driving[i], boxes[i], tag=i) for i in range(frames)]
    late = steps // groups - 1
    assert [None if x is None else x[1] for x in left] == [None] * late + list(range(frames - late))
    streamed, _ = stream(model, settings, sources, driving, boxes, split=split)
    reference = render_causal(model, StreamSettings(steps=steps, window=3), sources,
                              *control_hints(driving, boxes, torch.float32))
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)


def test_level_groups_must_divide_the_steps_and_do_not_take_a_lookahead(model):
    with pytest.raises(ValueError, match="--level-groups must divide --steps"):
        StreamingDenoiser(model, StreamSettings(steps=4, window=3, level_groups=3), "cpu", torch.float32)
    with pytest.raises(ValueError, match="do not combine"):
        StreamingDenoiser(model, StreamSettings(steps=4, window=3, level_groups=2, lookahead=1), "cpu", torch.float32)


def test_temporal_window_matters(model):
    """Not vacuous: a different window gives different frames."""
    sources, driving, boxes = inputs(5)
    hints = control_hints(driving, boxes, torch.float32)
    a = render_causal(model, StreamSettings(steps=2, window=4), sources, *hints)
    b = render_causal(model, StreamSettings(steps=2, window=1), sources, *hints)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # the first frame has no past either way
    assert not torch.allclose(a[3], b[3], atol=1e-4)


def test_the_offline_engine_with_causal_windows_renders_the_streamed_frames(model):
    """The offline pipeline's causal mode is the live engine's definition: same decoded frames."""
    from engines.xportrait.pipeline import SamplerSettings, XPortraitPipeline

    settings = StreamSettings(steps=2, window=3)
    sources, driving, boxes = inputs(5)
    streamed, _ = stream(model, settings, sources, driving, boxes)
    offline = XPortraitPipeline(model, SamplerSettings(sampler="lcm", steps=2, guidance=1.0, window=3,
                                                       offsets="causal"))(sources, *control_hints(driving, boxes, torch.float32))
    torch.testing.assert_close(offline, model.decode(streamed), rtol=1e-4, atol=1e-4)


def test_control_hints_keep_the_frame_and_only_the_patches():
    frames = torch.full((1, 64, 64, 3), 200, dtype=torch.uint8)
    frames[0, :, :, 1] = 100
    boxes = torch.tensor([[[4, 6, 20, 22], [40, 6, 56, 22], [10, 40, 26, 56]]])
    pose, local = control_hints(frames, boxes, torch.float32)
    expected_pose = torch.tensor([200, 100, 200]) / 127.5 - 1
    assert torch.allclose(pose[0, :, 30, 30], expected_pose)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes[0].tolist():
        inside[y0:y1, x0:x1] = True  # x1, y1 exclusive, as numpy slicing
    assert int(inside.sum()) == 3 * 16 * 16
    assert torch.equal(local[0][:, inside], pose[0][:, inside])
    assert bool((local[0][:, ~inside] == -1).all())  # black, scaled to [-1, 1]


def test_frozen_ring_projections_render_the_same_frames(model):
    """The live engine precomputes the temporal attentions' fused q/k/v weights and position
    tables once; the frames must not change."""
    settings = StreamSettings(steps=2, window=3)
    sources, driving, boxes = inputs(5)
    plain, _ = stream(model, settings, sources, driving, boxes)
    model.unet.motion.freeze_ring_projections()
    try:
        frozen, _ = stream(model, settings, sources, driving, boxes)
    finally:
        model.unet.motion.freeze_ring_projections(False)
    torch.testing.assert_close(frozen, plain, rtol=1e-5, atol=1e-6)


def test_fused_self_attention_projections_render_the_same_frames():
    """The live engine's model has each self-attention's q/k/v as one product (and the
    ControlNets' cross-attention k/v): the same frames, split tick too."""
    model = tiny_model(RES, config=compact_config(RES))
    settings = StreamSettings(steps=2, window=3)
    sources, driving, boxes = inputs(5)
    plain, _ = stream(model, settings, sources, driving, boxes)
    model.fuse_self_attention_projections()
    from engines.xportrait.reference import self_attention_layers

    assert all(a.fused_projections for a in self_attention_layers(model.unet.unet).values())
    assert not any(a.fused_projections for a in self_attention_layers(model.reference_net.unet).values())
    fused, _ = stream(model, settings, sources, driving, boxes)
    split, _ = stream(model, settings, sources, driving, boxes, split=True)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split, plain, rtol=1e-4, atol=1e-5)


def test_the_live_engine_burns_the_random_weights_label_into_every_frame():
    import numpy as np

    from engines import LiveOptions, XPortraitOptions, create_engine
    from engines.base import DrivingFrame, SourcePortrait
    from engines.xportrait.runtime import RANDOM_WEIGHTS_LABEL, label_overlay

    engine = create_engine(XPortraitOptions(size=RES, random_weights=True, model_size="tiny", device="cpu", steps=2,
                                            window=4, live=LiveOptions()))
    rng = np.random.default_rng(1)
    engine.prepare([SourcePortrait(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))])
    landmarks = np.full((478, 3), RES / 2, np.float32)
    frames = [DrivingFrame(landmarks, landmarks, i / 25, image=rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), tag=i)
              for i in range(3)]
    rendered = [r for r in (engine.step(f) for f in frames) if r is not None]
    rendered = [r.image.copy() for r in rendered] + [r.image for r in engine.flush()]
    assert len(rendered) == 3
    mask, pixels = label_overlay(RES, RES, RANDOM_WEIGHTS_LABEL)
    label = mask[..., 0]
    assert 0 < label.mean() < 0.5  # a corner, not the frame
    for image in rendered:
        assert np.array_equal(image[label], pixels[label])
        assert image[~label].std() > 1  # the render shows around it


def test_the_split_tick_renders_the_same_frames(model):
    """ControlNets beside the UNet's down path (three streams on a GPU), each from a frame's hint
    embedding made once when it enters, is the same arithmetic: the embedding at batch 1 rather
    than at every level's batch rounds differently, fp32 rounding through 3 levels at most."""
    settings = StreamSettings(steps=3, window=4)
    sources, driving, boxes = inputs(6)
    whole, _ = stream(model, settings, sources, driving, boxes)
    split, _ = stream(model, settings, sources, driving, boxes, split=True)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)


def test_lookahead_lets_a_frame_see_the_next_frames_and_costs_k_frames_of_latency(model):
    settings = StreamSettings(steps=2, window=3, lookahead=1)
    sources, driving, boxes = inputs(5)
    out, tags = stream(model, settings, sources, driving, boxes)
    assert tags == list(range(5))  # every frame leaves once, in order

    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32)
    denoiser.prepare(sources)
    held = [denoiser.tick(driving[i], boxes[i], tag=i) for i in range(3)]
    assert held[:2] == [None, None] and held[2][1] == 0  # out S - 1 + k = 2 ticks after entering

    # Frame 0 depends on frame 1 with look-ahead, not without.
    changed = driving.clone()
    changed[1] = 255 - changed[1]
    causal = StreamSettings(steps=2, window=3)
    plain, _ = stream(model, causal, sources, driving, boxes)
    for lookahead_settings, a, should_change in ((settings, out, True), (causal, plain, False)):
        b, _ = stream(model, lookahead_settings, sources, changed, boxes)
        assert torch.allclose(a[0], b[0], atol=1e-6) != should_change
    # With no look-ahead the engine is the causal one, frame for frame.
    torch.testing.assert_close(plain, render_causal(model, causal, sources, *control_hints(driving, boxes, torch.float32)),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_lookahead_is_bounded_by_the_temporal_positions(model):
    max_len = model.config.motion_max_len
    with pytest.raises(ValueError, match="look-ahead"):
        StreamingDenoiser(model, StreamSettings(steps=2, window=max_len, lookahead=1), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="look-ahead"):
        StreamingDenoiser(model, StreamSettings(steps=2, window=3, lookahead=-1), torch.device("cpu"), torch.float32)


def test_the_live_engine_takes_a_lookahead_and_flushes_every_frame():
    import numpy as np

    from engines import EngineError, LiveOptions, XPortraitOptions, create_engine
    from engines.base import DrivingFrame, SourcePortrait

    options = XPortraitOptions(size=RES, random_weights=True, model_size="tiny", device="cpu", steps=2, window=4,
                               live=LiveOptions(lookahead=2))
    engine = create_engine(options)
    assert engine.latency_frames == 3
    rng = np.random.default_rng(2)
    engine.prepare([SourcePortrait(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))])
    landmarks = np.full((478, 3), RES / 2, np.float32)
    tags = []
    for i in range(5):
        rendered = engine.step(DrivingFrame(landmarks, landmarks, i / 25, tag=i,
                                            image=rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)))
        tags.append(None if rendered is None else rendered.tag)
    assert tags == [None, None, None, 0, 1]
    assert [r.tag for r in engine.flush()] == [2, 3, 4]
    with pytest.raises(EngineError, match="--lookahead must be in"):
        create_engine(XPortraitOptions(size=RES, random_weights=True, model_size="tiny", device="cpu", window=4,
                                       live=LiveOptions(lookahead=99)))


def test_a_reset_stream_renders_what_a_fresh_one_does(model):
    """After reset() (a new driving stream) nothing of the old one is left: not the frames in
    flight, not the temporal rings, not the ring slot the device advances each tick."""
    settings = StreamSettings(steps=2, window=3)
    sources, driving, boxes = inputs(5)
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32)
    denoiser.prepare(sources)
    for i in range(4):  # a stream broken off mid-window, with a frame still in flight
        denoiser.tick(driving[4 - i], boxes[4 - i])
    denoiser.reset()
    again = []
    for i in range(5):
        leaving = denoiser.tick(driving[i], boxes[i], tag=i)
        again.append(None if leaving is None else (leaving[0].clone(), leaving[1]))  # the buffer is reused
    fresh, _ = stream(model, settings, sources, driving, boxes)
    assert again[0] is None and [t for _, t in again[1:]] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.cat([x for x, _ in again[1:]]), fresh[:4], rtol=1e-5, atol=1e-6)


def test_the_reference_is_an_argument_of_each_call_not_state_left_behind(model, caplog):
    """Reference keys/values travel with the call (diffusers hands them to the attention
    processors), so interleaved calls with other references cannot see each other's, and no
    attention processor is handed an argument it ignores with a warning."""
    import logging

    sources, driving, boxes = inputs(2)
    pose, local = control_hints(driving, boxes, torch.float32)
    latents = model.encode(sources)
    t = torch.tensor(500)
    first = model.reference_features([latents[:1]], t)
    second = model.reference_features([latents[1:]], t)
    x = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING):
        a = model.predict_noise(x, t, 2, first, pose, local)
        b = model.predict_noise(x, t, 2, second, pose, local)
        again = model.predict_noise(x, t, 2, first, pose, local, guidance=3.0)  # the CFG branch has none
    assert not torch.allclose(a, b, atol=1e-4)
    plain = model.unet(x, t, model.text, 2)  # no reference, no controls: the unconditional branch
    torch.testing.assert_close(again, plain + 3.0 * (a - plain), rtol=1e-5, atol=1e-5)
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]


def test_the_split_ticks_parts_are_diffusers_forwards(model):
    """The split tick's parts start from what repeats, made once: each ControlNet from a frame's
    hint embedding (unet.control_walk) and every resnet from its level's time projection
    (unet.project_times, ResnetTimes). The same residuals as diffusers' ControlNetModel.forward
    on the hint, and the same noise as the whole UNet's walk, fused projections too."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, RES // 8, RES // 8, generator=g)
    t = torch.tensor([999, 499])
    pose, local = (torch.rand(2, 3, RES, RES, generator=g) * 2 - 1 for _ in range(2))
    fused = tiny_model(RES, config=compact_config(RES))
    fused.fuse_self_attention_projections()
    close = dict(rtol=1e-6, atol=1e-6)
    for m in (model, fused):
        with torch.no_grad():
            times = m.level_times(t)
            pose_embedding, local_embedding = m.embed_pose_hint(pose), m.embed_local_hint(local)
            assert pose_embedding.shape == (2, m.hint_embedding_channels, RES // 8, RES // 8)
            for net, embedding, hint, part in ((m.pose_controlnet, pose_embedding, pose, m.pose_control),
                                               (m.local_controlnet, local_embedding, local, m.local_control)):
                down, mid = part(x, times, embedding)
                want_down, want_mid = m.control(net, x, t, hint)
                assert len(down) == len(want_down)
                for got, want in zip(down, want_down):
                    torch.testing.assert_close(got, want, **close)
                torch.testing.assert_close(mid, want_mid, **close)
            residuals = m.controls(x, t, pose, local)
            no_past = [None] * len(m.unet.motion.in_order())
            halves = m.unet_up(*m.unet_down(x, times, None, no_past), times, None, *residuals, no_past)
            torch.testing.assert_close(halves, m.unet(x, t, m.text, 1, *residuals), **close)
    # Not vacuous: the parts follow what they are given (no hint, or another level's times).
    with torch.no_grad():
        mine, none = (m.pose_control(x, times, e)[1] for e in (pose_embedding, torch.zeros_like(pose_embedding)))
        later = m.unet_up(*m.unet_down(x, m.level_times(t.flip(0)), None, no_past), m.level_times(t.flip(0)),
                          None, *residuals, no_past)
    assert (none - mine).abs().max() > 1e-2 * mine.abs().max() > 0
    assert (later - halves).abs().max() > 1e-2 * halves.abs().max()


@pytest.mark.parametrize("reuse", [False, True], ids=["controls walked", "controls reused"])
@pytest.mark.parametrize("beside", [False, True])
@pytest.mark.parametrize("steps, groups, deep", [(3, 1, (0,)), (4, 1, (0, 2)), (4, 2, (0,)), (4, 2, (0, 3)),
                                                 (4, 4, (0, 1))])
def test_deep_levels_stream_their_offline_frames(hinted, steps, groups, deep, beside, reuse):
    """Deep features reused: at the levels not listed a frame walks only the UNet's (and the
    ControlNets') first and last levels, on its deep features from its last listed level. The
    stream (the deep features moving down the levels with the frames, each pass's deep entries
    walking the deep levels, whose modules' rings hold only those entries; a pass may have
    none) renders the offline definition's frames, in level groups too, and they are not the
    plain ones; with the reused entries' last level beside the deep walk too (on a CPU in
    order: the same parts and rows as on a GPU's streams). With reused controls the
    ControlNets' first-level residuals also move down with the frames from their deep levels:
    the offline definition's frames again, and other frames than with the ControlNets walked
    (hints that matter: `hinted`, so a frame's controls taken from another row would show)."""
    model = hinted
    settings = StreamSettings(steps=steps, window=4, deep_levels=deep, level_groups=groups, reuse_controls=reuse)
    sources, driving, boxes = inputs(6)
    hints = control_hints(driving, boxes, torch.float32)
    streamed, tags = stream(model, settings, sources, driving, boxes, split=True, reused_beside=beside)
    offline = render_causal(model, dataclasses.replace(settings, level_groups=1), sources, *hints)
    plain = render_causal(model, StreamSettings(steps=steps, window=4), sources, *hints)
    assert tags == list(range(6))
    torch.testing.assert_close(streamed, offline, rtol=1e-4, atol=1e-5)
    assert (offline - plain).abs().max() > 1e-3 * plain.abs().max()  # lossy: other frames
    if reuse:
        walked = render_causal(model, dataclasses.replace(settings, level_groups=1, reuse_controls=False), sources,
                               *hints)
        assert (offline - walked).abs().max() > 1e-4 * walked.abs().max()


@pytest.mark.parametrize("beside", [False, True])
def test_reused_controls_walk_the_controlnets_at_the_deep_levels_only(model, beside):
    """What --reuse-controls saves: over a clip, each ControlNet walks a frame once per deep
    level (its first level too), not once per level; the UNet's first level still walks every
    frame at every level."""
    rows = {"pose": 0, "local": 0, "unet": 0}

    def counting(name):
        def hook(module, args, output):
            rows[name] += args[0].shape[0]
        return hook

    handles = [model.pose_controlnet.conv_in.register_forward_hook(counting("pose")),
               model.local_controlnet.conv_in.register_forward_hook(counting("local")),
               model.unet.unet.conv_in.register_forward_hook(counting("unet"))]
    try:
        sources, driving, boxes = inputs(5)
        for reuse in (False, True):
            settings = StreamSettings(steps=4, window=4, deep_levels=(0, 2), reuse_controls=reuse)
            for name in rows:
                rows[name] = 0
            stream(model, settings, sources, driving, boxes, split=True, reused_beside=beside)
            ticks = 5 + 3  # the clip, then the drain: each tick walks every entry (4) of one pass
            assert rows["unet"] == 4 * ticks
            # Reused: the deep entries (levels 0 and 2) only, each tick; walked: every entry.
            assert rows["pose"] == rows["local"] == (2 if reuse else 4) * ticks
    finally:
        for handle in handles:
            handle.remove()


def test_the_reused_entries_walk_beside_the_deep_walk_where_each_is_one_run(model):
    """Which passes walk their reused entries beside the deep ones (`DeepRows.runs`: the deep
    entries', the reused entries'): those whose deep and reused entries are each one run of
    entries; on a CPU only when asked (there is no stream to run them beside)."""
    def runs(steps, groups, deep, **options):
        settings = StreamSettings(steps=steps, window=4, deep_levels=deep, level_groups=groups)
        denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=True, **options)
        return [group.deep.runs for group in denoiser.groups]

    assert runs(4, 1, (0,), reused_beside=True) == [(slice(0, 1), slice(1, 4))]
    # Two groups, deep at 0 and 3: pass 0 holds levels 0 and 2, pass 1 levels 1 and 3 (deep second).
    assert runs(4, 2, (0, 3), reused_beside=True) == [(slice(0, 1), slice(1, 2)), (slice(1, 2), slice(0, 1))]
    assert runs(4, 1, (0, 2), reused_beside=True) == [None]  # deep 0 and 2, reused 1 and 3: not runs
    assert runs(4, 4, (0, 1), reused_beside=True) == [None] * 4  # one entry a pass: nothing beside it
    assert runs(4, 1, (0,)) == runs(4, 1, (0,), reused_beside=False) == [None]  # a CPU's default: in one walk


def test_each_part_on_a_run_of_entries_is_its_rows_of_the_one_batch_part(model):
    """What the pass beside is made of, part by part: the ControlNets' first level, the UNet's
    first and last levels on a run of entries give that run's rows of the same part on every
    entry (their hints, rings, reference features, time projections and deep features are the
    run's rows). A tighter check than the frames: in the tiny model a hint moves them little."""
    settings = StreamSettings(steps=4, window=4, deep_levels=(0,))
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=True, reused_beside=True)
    sources, driving, boxes = inputs(6)
    denoiser.prepare(sources)
    with torch.no_grad():
        for i in range(6):  # every entry a frame with its deep features, the rings part full
            denoiser.tick(driving[i], boxes[i])
        group = denoiser.groups[0]
        x, t, reference, rings = group.x, group.times, group.reference, group.rings
        every = slice(0, denoiser.entries)
        firsts = [denoiser._pose_first(every, x, t), denoiser._local_first(every, x, t)]
        _, skips = denoiser._in_rows(every, x, t, reference, denoiser._ring_rows(rings, every))
        out = denoiser._out_rows(every, skips, t, [f[1] for f in firsts], reference, denoiser._ring_rows(rings, every))
        close = dict(rtol=1e-5, atol=1e-5)
        for run in group.deep.runs:
            mine = [denoiser._pose_first(run, x, t), denoiser._local_first(run, x, t)]
            for (h, residuals), (h_all, residuals_all) in zip(mine, firsts, strict=True):
                torch.testing.assert_close(h, h_all[run], **close)
                for r, r_all in zip(residuals, residuals_all, strict=True):
                    torch.testing.assert_close(r, r_all[run], **close)
            _, my_skips = denoiser._in_rows(run, x, t, reference, denoiser._ring_rows(rings, run))
            for skip, skip_all in zip(my_skips, skips, strict=True):
                torch.testing.assert_close(skip, skip_all[run], **close)
            torch.testing.assert_close(denoiser._out_rows(run, my_skips, t, [m[1] for m in mine], reference,
                                                          denoiser._ring_rows(rings, run)), out[run], **close)
    # Not vacuous: the entries' hints, and so the parts' rows, differ.
    residual = firsts[0][1][0]
    assert (residual[0] - residual[1]).abs().max() > 1e-2 * residual.abs().max()
    assert (out[0] - out[1]).abs().max() > 1e-2 * out.abs().max()


def test_held_controls_are_each_frames_from_its_deep_level_and_a_run_reads_its_rows(hinted):
    """Reused controls, tighter than the frames (a hint moves the tiny model's little): each
    entry holds its frame's ControlNets' first-level residuals from level 0 (the deep level:
    every frame is there at the entering latent, with its own hint), and the last level on a
    run of entries reads that run's rows of them (hints that matter: `hinted`)."""
    model = hinted
    settings = StreamSettings(steps=4, window=4, deep_levels=(0,), reuse_controls=True)
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=True, reused_beside=True)
    sources, driving, boxes = inputs(6)
    denoiser.prepare(sources)
    entries, close = denoiser.entries, dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for i in range(6):
            denoiser.tick(driving[i], boxes[i])
        at_zero = model.level_times(denoiser.levels.timesteps[:1].expand(entries))
        x0 = denoiser.entering.expand(entries, -1, -1, -1)
        pose = model.control_in("pose", x0, at_zero, denoiser.pose)[1]
        local = model.control_in("local", x0, at_zero, denoiser.local)[1]
        for held, p, l in zip(denoiser.first_controls, pose, local, strict=False):
            torch.testing.assert_close(held, p + l, **close)
        held = denoiser.first_controls[0]
        assert (held[1] - held[2]).abs().max() > 1e-3 * held.abs().max()  # each frame its own (100x the tolerance)
        group = denoiser.groups[0]
        x, t, reference, rings = group.x, group.times, group.reference, group.rings
        every = slice(0, entries)
        _, skips = denoiser._in_rows(every, x, t, reference, denoiser._ring_rows(rings, every))
        out = denoiser._out_rows(every, skips, t, None, reference, denoiser._ring_rows(rings, every))
        for run in group.deep.runs:
            _, mine = denoiser._in_rows(run, x, t, reference, denoiser._ring_rows(rings, run))
            torch.testing.assert_close(denoiser._out_rows(run, mine, t, None, reference,
                                                          denoiser._ring_rows(rings, run)), out[run], **close)


def test_deep_levels_at_every_level_are_the_plain_frames(model):
    """Every level listed: the parts and the deep features' bookkeeping, and nothing reused."""
    settings = StreamSettings(steps=3, window=4)
    sources, driving, boxes = inputs(5)
    plain = render_causal(model, settings, sources, *control_hints(driving, boxes, torch.float32))
    every = dataclasses.replace(settings, deep_levels=(0, 1, 2))
    streamed, _ = stream(model, every, sources, driving, boxes, split=True)
    # fp32 rounding: the deep walk runs on the pass's rows gathered (other product shapes, and
    # under the suite's load other thread splits of the CPU's sums): seen once 1.8e-5 off on an element of 0.02.
    torch.testing.assert_close(streamed, plain, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(render_causal(model, every, sources, *control_hints(driving, boxes, torch.float32)),
                               plain, rtol=0, atol=0)


def test_lossy_noise_error_on_the_predicted_noise(model):
    """The bench's report: per level, the reused walk's noise against the whole walk's from the
    same input; nothing at the listed levels, all levels listed: nothing anywhere."""
    sources, driving, boxes = inputs(4)
    hints = control_hints(driving, boxes, torch.float32)
    errors = lossy_noise_error(model, StreamSettings(steps=4, window=3, deep_levels=(0, 2)), sources, *hints)
    assert errors[0] == errors[2] == 0.0
    assert 1e-3 < errors[1] < 2 and 1e-3 < errors[3] < 2
    assert lossy_noise_error(model, StreamSettings(steps=2, window=3, deep_levels=(0, 1)), sources, *hints) == [0, 0]
    # With the controls reused too: another error at the reused levels, still none at the listed ones.
    reused = lossy_noise_error(model, StreamSettings(steps=4, window=3, deep_levels=(0, 2), reuse_controls=True),
                              sources, *hints)
    assert reused[0] == reused[2] == 0.0
    assert 1e-3 < reused[1] < 2 and reused[1] != errors[1] and reused[3] != errors[3]


@pytest.mark.parametrize("settings, message", [
    (dict(steps=3, deep_levels=(1, 2)), "--deep-levels must be increasing levels from 0, each below --steps (3), got 1,2"),
    (dict(steps=3, deep_levels=(0, 3)), "each below --steps (3), got 0,3"),
    (dict(steps=4, deep_levels=(0,), lookahead=1), "--deep-levels and --lookahead do not combine"),
    (dict(steps=4, reuse_controls=True), "--reuse-controls reuses the ControlNets' residuals of a frame's last deep "
                                         "level: give --deep-levels too"),
])
def test_deep_levels_are_checked(model, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StreamSettings(**settings).validate(model.config.motion_max_len)


def test_reused_controls_stand_for_the_first_level_only(model):
    sources, driving, boxes = inputs(1)
    pose, local = control_hints(driving, boxes, torch.float32)
    x = torch.zeros((1, 4, model.config.latent_size, model.config.latent_size))
    first = [torch.zeros((1, *model.first_level_shape)) for _ in range(model.first_level_skips)]
    with pytest.raises(ValueError, match="reused controls stand for the first level only: give the deep features"):
        model.predict_noise_reusing(x, torch.tensor(999), None, pose, local, controls=first)


def test_deep_levels_need_the_split_tick(model):
    with pytest.raises(ValueError, match="--deep-levels needs the split tick and a model whose parts split"):
        StreamingDenoiser(model, StreamSettings(steps=2, deep_levels=(0,)), torch.device("cpu"), torch.float32)


def test_the_live_engine_reuses_deep_features_on_a_cpu_too():
    """`--deep-levels` (and `--token-downsample`) through the engine: the split tick on the CPU
    as well (the parts need it), every frame out, other frames than the plain stream's, and
    its quality ladder names what each level walks."""
    import numpy as np

    from engines import LiveOptions, XPortraitOptions, create_engine
    from engines.base import DrivingFrame, SourcePortrait

    rng = np.random.default_rng(2)
    portrait = SourcePortrait(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))
    landmarks = np.full((478, 3), RES / 2, np.float32)
    images = [rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for _ in range(4)]
    options = {"plain": LiveOptions(), "deep": LiveOptions(deep_levels=(0,)),
               "controls": LiveOptions(deep_levels=(0,), reuse_controls=True), "tokens": LiveOptions(token_downsample=2)}
    rendered, ladders = {}, {}
    for name, live in options.items():
        engine = create_engine(XPortraitOptions(size=RES, random_weights=True, model_size="tiny", device="cpu",
                                                steps=3, window=4, live=live))
        engine.prepare([portrait])
        frames = [DrivingFrame(landmarks, landmarks, i / 25, image=image, tag=i) for i, image in enumerate(images)]
        out = [r.image.copy() for r in (engine.step(f) for f in frames) if r is not None]
        rendered[name] = out + [r.image for r in engine.flush()]
        ladders[name] = [level.name for level in engine.quality_levels()]
        settings = engine.denoiser.settings
        assert engine.denoiser.split == bool(live.deep_levels) and settings.reuse_controls == live.reuse_controls
        assert settings.token_downsample == live.token_downsample
    assert [len(frames) for frames in rendered.values()] == [4, 4, 4, 4]
    for name in ("deep", "tokens"):
        assert any(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(rendered["plain"], rendered[name]))
    assert ladders["deep"] == ["3 steps, deep at levels 0", "2 steps, deep at levels 0"]
    assert ladders["controls"] == ["3 steps, deep at levels 0, controls reused", "2 steps, deep at levels 0, controls reused"]
    assert ladders["tokens"] == ["3 steps, keys of 2x2 tokens", "2 steps, keys of 2x2 tokens"]


@pytest.mark.parametrize("steps, groups, deep, reuse, split", [
    (3, 1, (), False, False), (4, 2, (), False, True), (3, 1, (0,), True, True), (4, 2, (0,), False, True)])
def test_downsampled_tokens_stream_their_offline_frames(hinted, steps, groups, deep, reuse, split):
    """--token-downsample: the reference attention at the latents' size over averaged blocks
    of tokens (each level's reference keys pooled once, at prepare; the frames' own in the
    attention). The stream renders the offline definition's frames with it, in the plain tick,
    the split one, level groups and with deep levels (its reused entries beside the deep walk),
    and they are not the frames of every token."""
    settings = StreamSettings(steps=steps, window=4, level_groups=groups, deep_levels=deep, reuse_controls=reuse,
                              token_downsample=2)
    sources, driving, boxes = inputs(5)
    hints = control_hints(driving, boxes, torch.float32)
    streamed, tags = stream(hinted, settings, sources, driving, boxes, split=split, reused_beside=bool(deep))
    offline = render_causal(hinted, dataclasses.replace(settings, level_groups=1), sources, *hints)
    every = render_causal(hinted, dataclasses.replace(settings, level_groups=1, token_downsample=1), sources, *hints)
    assert tags == list(range(5))
    torch.testing.assert_close(streamed, offline, rtol=1e-4, atol=5e-5)
    assert (offline - every).abs().max() > 1e-3 * every.abs().max()


def test_lossy_noise_error_of_downsampled_tokens(model):
    """The bench's report for --token-downsample: an error at every level (every level's
    attention pools), and with deep levels at the listed ones too, another one at the rest."""
    sources, driving, boxes = inputs(4)
    hints = control_hints(driving, boxes, torch.float32)
    tokens = lossy_noise_error(model, StreamSettings(steps=3, window=3, token_downsample=2), sources, *hints)
    assert all(1e-4 < e < 2 for e in tokens)
    deep = StreamSettings(steps=4, window=3, deep_levels=(0, 2))
    both = lossy_noise_error(model, dataclasses.replace(deep, token_downsample=2), sources, *hints)
    alone = lossy_noise_error(model, deep, sources, *hints)
    assert 1e-4 < both[0] < 2 and 1e-4 < both[2] < 2 and alone[0] == alone[2] == 0
    assert both[1] != alone[1] and both[3] != alone[3]


def test_token_downsample_is_checked(model):
    with pytest.raises(ValueError, match="--token-downsample must be at least 1, got 0"):
        StreamSettings(token_downsample=0).validate(model.config.motion_max_len)
