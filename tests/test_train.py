"""Training (issue 14) on the CPU: the tiny model, synthetic talking-head clips of two
identities made from the bundled portraits (streamer.samples' puppet).

prepare-data on good and bad videos; the cross-identity pairs and their scaling; each stage
trains its own modules only; the loss falls on a set it can overfit; trained -> exported ->
loaded by the engine's loader -> the same output; stop and resume; two processes (gloo);
the causal stage's attention is the live engine's.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engines.face import FACE_OVAL, FaceTracker, head_box, head_roll, mouth_opening
from engines.xportrait.config import XPortraitConfig
from engines.xportrait.weights import load_model, random_model, to_released
from engines.xportrait.train.config import build_config
from engines.xportrait.train.data import ClipSet, DataError
from engines.xportrait.train.dataset import SampleSpec, TrainingSamples
from engines.xportrait.train.export import ExportError, export
from engines.xportrait.train.pairs import SCALE_RANGE, CrossIdentityControl
from engines.xportrait.train.stages import MODULES, STAGES, StageForward, freeze_for
from engines.xportrait.train.trainer import TrainError, save_checkpoint, train
from fixtures import compact_config  # tests/ is on sys.path
from released_layout import SD_PARTS, released_shapes, released_state_dict
from streamer.cli import main as cli
from streamer.samples import Pose, driving_clip
from streamer.video import write_video

TINY = XPortraitConfig.tiny()
FRAMES = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with other work: torch's second thread only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def talking(t: float) -> Pose:
    """Mouth, eyes and head roll all moving, at different rates."""
    return Pose(roll_deg=8 * math.sin(2 * math.pi * 0.7 * t), dx=6 * math.sin(2 * math.pi * 0.4 * t),
                mouth=0.5 - 0.5 * math.cos(2 * math.pi * 1.1 * t), blink=max(0.0, math.sin(2 * math.pi * 0.9 * t)))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    out = {}
    for name in ("astronaut", "grace_hopper"):
        frames = [f for f, _ in driving_clip(name, frames=FRAMES, size=(320, 240), script=talking)]
        out[name] = folder / f"{name}.mp4"
        write_video(out[name], frames)
    return out


def prepare(videos: list[Path], out: Path, *flags: str) -> int:
    return cli(["prepare-data", *map(str, videos), "--out", str(out), "--min-frames", "8", "--quiet", *flags])


@pytest.fixture(scope="module")
def data256(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "set256"
    assert prepare(list(videos.values()), out, "--size", "256") == 0
    return out


@pytest.fixture(scope="module")
def data64(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "set64"
    assert prepare(list(videos.values()), out, "--size", "64", "--format", "npy") == 0
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion 1.5 in the ldm single-file layout."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("base") / "tiny-sd15.safetensors"
    save_file(released_state_dict(TINY, parts=SD_PARTS, seed=7), str(path))
    return path


def run_config(data64, base, out, **changes):
    options = dict(stage="motion", data=str(data64), base=str(base), out=str(out), model="tiny", steps=3,
                   workers=0, checkpoint_every=1, lr=1e-3, warmup_steps=0)
    options.update(changes)
    return build_config(None, **options)


@pytest.fixture(scope="module")
def uninterrupted(data64, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a")
    config = run_config(data64, base, out, validate_every=3, validation_frames=4, validation_steps=2)
    return out, train(config, progress=False)


# ---------------------------------------------------------------------------------------------
# prepare-data
# ---------------------------------------------------------------------------------------------

def test_prepare_data_makes_one_clip_per_video_with_face_and_shoulders_in_the_crop(data256):
    clips = ClipSet(data256)
    assert len(clips) == 2 and len(clips.identities) == 2
    summary = json.loads((data256 / "summary.json").read_text())
    assert len(summary["kept"]) == 2 and summary["skipped"] == []
    for n, info in enumerate(clips.clips):
        assert info.frames == FRAMES and info.size == 256
        lms = clips.landmarks(n)
        assert lms.shape == (FRAMES, 478, 3)
        frame = clips.frame(n, FRAMES // 2)
        assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
        for lm in lms:
            box = head_box(lm)
            # The head (the mesh: brow to chin) is under 1/zoom of the crop's side (the crop
            # stops at the video's edges), with room for the hair above and the neck and
            # shoulders below the chin.
            assert 0.3 * 256 < box.height < 0.6 * 256
            assert box.x0 > 0.15 * 256 and box.x1 < 0.85 * 256 and box.y0 > 0.2 * 256
            assert lm[152, 1] < 0.85 * 256
        # The stored mesh is the face in the stored frame: mediapipe finds it where it says.
        with FaceTracker(video=False) as tracker:
            found = tracker.detect(frame)
        assert found is not None
        assert np.abs(found[:, :2] - lms[FRAMES // 2][:, :2]).mean() < 4.0


def test_prepare_data_splits_at_cuts_and_reports_faceless_and_unreadable_videos(videos, tmp_path):
    a = [f for f, _ in driving_clip("astronaut", frames=12, size=(320, 240), script=talking)]
    b = [f for f, _ in driving_clip("grace_hopper", frames=12, size=(320, 240), script=talking)]
    cut = tmp_path / "cut.mp4"
    write_video(cut, a + b)  # one video, two shots
    faceless = tmp_path / "faceless.mp4"
    rng = np.random.default_rng(0)
    write_video(faceless, [np.full((240, 320, 3), 90, np.uint8) + rng.integers(0, 30, (240, 320, 3), dtype=np.uint8)
                          for _ in range(10)])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 100)
    out = tmp_path / "set"
    assert prepare([cut, faceless, broken], out, "--size", "64", "--identity", "video") == 0
    clips = ClipSet(out)
    assert [c.frames for c in clips.clips] == [12, 12]  # split at the cut, no frame lost
    assert len(clips.identities) == 1  # --identity video: one person per video
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    reasons = {Path(s["video"]).name: s["reason"] for s in skipped}
    assert reasons["faceless.mp4"] == "no face"
    assert reasons["broken.mp4"].startswith("unreadable")


def test_prepare_data_refuses_empty_folders_and_videos_without_faces(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["prepare-data", str(empty), "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "no videos found" in capsys.readouterr().err
    faceless = tmp_path / "grey.mp4"
    write_video(faceless, [np.full((128, 128, 3), 128, np.uint8)] * 10)
    assert cli(["prepare-data", str(faceless), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no clip could be made" in err and "no face" in err
    with pytest.raises(DataError, match="not a training set"):
        ClipSet(empty)


# ---------------------------------------------------------------------------------------------
# Cross-identity control images
# ---------------------------------------------------------------------------------------------

def _face_colour(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.rint(landmarks[list(FACE_OVAL), :2]).astype(np.int32)], 1)
    return image[mask.astype(bool)].reshape(-1, 3).mean(axis=0)


def test_pairs_take_source_and_target_from_one_identity_and_the_control_from_another(data256):
    clips = ClipSet(data256)
    samples = TrainingSamples(clips, SampleSpec(frames=1), seed=1, length=64)
    scales = []
    for i in range(64):
        d = samples.draw(i)
        assert d["source"] != d["targets"][0]
        other, _ = d["other"]
        assert clips.clips[other].identity != clips.clips[d["clip"]].identity
        scales.append(d["scale"])
    scales = np.array(scales)
    lo, hi = SCALE_RANGE
    assert scales.min() >= lo and scales.max() <= hi
    assert scales.min() < 0.92 and scales.max() > 1.08  # the range is used
    assert np.abs(scales[:, 0] - scales[:, 1]).mean() > 0.03  # drawn per axis: heterogeneous
    assert samples.draw(5) == samples.draw(5)  # a sample is a function of its index


def test_the_control_image_follows_the_driving_motion_in_the_other_identitys_appearance(data256):
    clips = ClipSet(data256)
    driver, other = 1, 0  # grace_hopper drives, the astronaut is I_S'
    lms = clips.landmarks(driver)
    make = CrossIdentityControl(clips.frame(other, 0), np.asarray(clips.landmarks(other)[0]), np.asarray(lms[0]))
    measured, driving, closer = [], [], 0
    with FaceTracker(video=False) as tracker:
        for i in range(0, FRAMES, 2):
            control = make(np.asarray(lms[i]), (1.0, 1.0))
            found = tracker.detect(control.image)
            assert found is not None
            measured.append((mouth_opening(found), head_roll(found)))
            driving.append((mouth_opening(lms[i]), head_roll(lms[i])))
            own = _face_colour(control.image, found)
            closer += (np.abs(own - _face_colour(clips.frame(other, 0), clips.landmarks(other)[0])).sum()
                       < np.abs(own - _face_colour(clips.frame(driver, i), lms[i])).sum())
    measured, driving = np.array(measured), np.array(driving)
    assert np.corrcoef(measured[:, 0], driving[:, 0])[0, 1] > 0.8, "mouth opening does not follow I_D"
    assert np.corrcoef(measured[:, 1], driving[:, 1])[0, 1] > 0.8, "head roll does not follow I_D"
    assert np.abs(measured[:, 1] - driving[:, 1]).mean() < 3.0  # degrees
    assert closer == len(measured), "the face in I_C should have I_S' colours, not I_D's"


def test_scaling_is_the_same_for_the_control_image_and_its_local_patches(data256):
    clips = ClipSet(data256)
    lm = np.asarray(clips.landmarks(1)[3])
    make = CrossIdentityControl(clips.frame(0, 0), np.asarray(clips.landmarks(0)[0]), np.asarray(clips.landmarks(1)[0]))
    plain = make(lm, (1.0, 1.0))
    scaled = make(lm, (0.91, 1.09))
    assert scaled.scale == (0.91, 1.09)
    inside = (plain.local.max(axis=2) > 0).astype(np.uint8)
    assert inside.any() and (plain.local[inside.astype(bool)] == plain.image[inside.astype(bool)]).all()
    # The local image is the scaled control image wherever the scaled patches are (away from
    # their edges, where the two warps interpolate different neighbours).
    mask = cv2.erode((scaled.local.max(axis=2) > 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert mask.sum() > 500
    assert np.abs(scaled.local[mask].astype(int) - scaled.image[mask].astype(int)).max() <= 1
    ys, xs = np.nonzero(inside)
    ys2, xs2 = np.nonzero(scaled.local.max(axis=2) > 0)
    assert (xs2.max() - xs2.min()) / (xs.max() - xs.min()) == pytest.approx(0.91, abs=0.03)
    assert (ys2.max() - ys2.min()) / (ys.max() - ys.min()) == pytest.approx(1.09, abs=0.03)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def _batch(samples, index: int) -> dict:
    s = samples[index]
    out = {"source": s["source"][None], "target": s["target"][None], "uncond": s["uncond"][None]}
    if "control" in s:
        out["control"], out["local"] = s["control"][None], s["local"][None]
    return out


@pytest.fixture(scope="module")
def random_tiny():
    """The stages' own tests train the compact model (the same modules, a third of the cost);
    the trainer's runs below train tiny, from the tiny base."""
    return random_model(compact_config(), seed=0)


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_changes_only_its_own_parameters(stage, data64, random_tiny):
    from engines.xportrait.train.causal import live_pattern

    model = copy.deepcopy(random_tiny).train()
    spec = STAGES[stage]
    frames = {"temporal": 3, "causal": 4}.get(stage, 1)
    params = freeze_for(model, spec)
    pattern = live_pattern(frames, window=3, lookahead=1) if spec.causal else None
    net = StageForward(model, spec, pattern)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    samples = TrainingSamples(ClipSet(data64), SampleSpec(frames=frames, controls=spec.controls), seed=0, length=4)
    for step in range(2):
        loss = net(**_batch(samples, step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for path in MODULES:
        keys = [k for k in before if k.startswith(path + ".")]
        changed = [k for k in keys if not torch.equal(before[k], after[k])]
        if path in spec.trains:
            assert len(changed) > len(keys) // 4, f"{stage}: {path} barely trained ({len(changed)}/{len(keys)})"
        else:
            assert not changed, f"{stage} changed {path}: {changed[:3]}"
    assert torch.equal(before["unet.unet.conv_in.weight"], after["unet.unet.conv_in.weight"])


def test_gradient_checkpointing_and_bf16_train_the_same_thing(data64, random_tiny):
    """Checkpointing recomputes activations (R's recorded tokens leave its checkpointed blocks):
    loss and gradients must be those of the plain run. bf16 autocast with the frozen modules
    cast to bf16 gives a finite loss near the float32 one and gradients in float32."""
    from engines.xportrait.train.trainer import cast_frozen, enable_checkpointing

    stage = STAGES["appearance"]
    batch = _batch(TrainingSamples(ClipSet(data64), SampleSpec(controls=False), seed=2, length=1), 0)
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(random_tiny).train()
        params = freeze_for(model, stage)
        if checkpointing:
            enable_checkpointing(model)
            assert set(model.state_dict()) == set(random_tiny.state_dict())  # exports keep their names
        loss = StageForward(model, stage)(**batch, generator=torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in params if p.grad is not None])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    model = copy.deepcopy(random_tiny).train()
    params = freeze_for(model, stage)
    cast_frozen(model, stage.trains, torch.bfloat16)
    model.text = model.text.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = StageForward(model, stage)(**batch, generator=torch.Generator().manual_seed(3))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(results[0][0], rel=0.1)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params if p.grad is not None)


def test_the_loss_falls_on_a_set_the_model_can_overfit(data64):
    """One sample, one timestep, one noise (a fixed generator each step): a deterministic
    regression target that the trained ControlNets (zero-initialised residual paths into a
    frozen UNet) can fit. 12 Adam steps at lr 3e-3 must at least halve the error; random
    changes of the weights would not lower it steadily, and an unplugged or frozen module
    would leave it exactly where it was."""
    config = compact_config()
    model = random_model(config, seed=0).train()
    from diffusers import ControlNetModel

    start = ControlNetModel.from_unet(model.unet.unet, conditioning_embedding_out_channels=config.conditioning_channels)
    model.pose_controlnet.load_state_dict(start.state_dict())
    model.local_controlnet.load_state_dict(start.state_dict())
    stage = STAGES["motion"]
    params = freeze_for(model, stage)
    net = StageForward(model, stage)
    batch = _batch(TrainingSamples(ClipSet(data64), SampleSpec(), seed=0, length=1), 0)
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0)
    losses = []
    for _ in range(12):
        loss = net(**batch, generator=torch.Generator().manual_seed(5))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


# ---------------------------------------------------------------------------------------------
# The trainer: export, resume, bad input
# ---------------------------------------------------------------------------------------------

def _trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.removeprefix("model."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}


def test_trained_weights_export_in_the_released_layout_and_load_into_the_engine(uninterrupted, base):
    out, result = uninterrupted
    assert result["step"] == 3
    th, st = result["exports"]
    assert th.name == "model_state-3.th" and st.name == "model_state-3.safetensors"
    trained = _trained_weights(result["checkpoint"])
    released = torch.load(th, map_location="cpu", weights_only=True)["state_dict"]
    layout = released_shapes(TINY)
    assert set(released) <= set(layout)  # every exported key is a released one...
    assert all(tuple(v.shape) == layout[k] for k, v in released.items())
    assert not {k for k in layout if k.startswith(("model.", "pose_", "local_", "first_stage"))} - set(released)
    for path in (th, st):  # ...and the engine's loader takes it with every key accounted
        model = load_model(TINY, base=base, checkpoint=path)
        sd = model.state_dict()
        assert set(sd) == set(trained)
        for k, v in trained.items():
            assert torch.equal(sd[k], v), k
    # The engine renders with the trained weights: its noise prediction is the trained model's.
    reference = random_model(TINY, seed=0)
    reference.load_state_dict(trained)
    reference.text = model.text
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor(500)
    refs = [reference.encode(hint[:1])]
    a = model.predict_noise(x, t, 2, model.reference_features(refs, t), hint, hint)
    b = reference.predict_noise(x, t, 2, reference.reference_features(refs, t), hint, hint)
    # The same weights (bit for bit, above), two separately built modules: float32 rounding apart
    # (1.3e-6 at most on outputs up to ~2, run to run exact), not a weight's difference (O(1)).
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3]


def test_validation_renders_the_fixed_clip_and_logs_motion_accuracy(uninterrupted):
    from streamer.video import probe

    out, _ = uninterrupted
    video = out / "validation" / "step-000003.mp4"
    info = probe(video)
    assert info.frames == 4 and (info.width, info.height) == (128, 64)  # driving | rendered
    record = json.loads((out / "validation.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["frames"] == 4
    assert {"mouth_corr", "eyes_corr", "roll_corr", "faces_found"} <= set(record)
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard


def test_a_stopped_run_resumes_exactly(uninterrupted, data64, base, tmp_path):
    """The run stopped after step 2 (its folder as it was then: the step-2 checkpoint is the
    last) and resumed: step 3 is the uninterrupted run's step 3, bit for bit."""
    import shutil

    out, full = uninterrupted
    shutil.copytree(out / "checkpoints" / "step-000002", tmp_path / "checkpoints" / "step-000002")
    resumed = train(run_config(data64, base, tmp_path, resume="latest"), progress=False)
    assert [r["step"] for r in resumed["losses"]] == [3]
    assert resumed["losses"][0]["loss"] == full["losses"][2]["loss"]  # bit for bit
    assert resumed["losses"][0]["lr"] == full["losses"][2]["lr"]
    trained, again = _trained_weights(full["checkpoint"]), _trained_weights(resumed["checkpoint"])
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    with pytest.raises(TrainError, match="not a training checkpoint"):
        train(run_config(data64, base, tmp_path, resume=str(tmp_path)), progress=False)


def test_bad_training_inputs_get_clear_messages(uninterrupted, data64, base, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["train", "--stage", "motion", "--data", str(empty), "--base", str(base), "--out", str(tmp_path / "x"),
                "--model", "tiny", "--quiet"]) == 2
    assert "not a training set (index.jsonl is missing" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text('stage = "motion"\nlearning_rate = 1e-4\n')
    assert cli(["train", "--config", str(config), "--data", "d", "--base", "b", "--out", "o"]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err
    with pytest.raises(TrainError, match="not a training set"):
        train(run_config(empty, base, tmp_path / "a"), progress=False)
    # A base that is not SD1.5 (of the configured size): other widths.
    from safetensors.torch import save_file

    other = tmp_path / "not-sd15.safetensors"
    save_file(released_state_dict(dataclasses.replace(TINY, cross_attention_dim=48),
                                  parts=SD_PARTS), str(other))
    with pytest.raises(TrainError, match="(?s)--base does not fit X-Portrait on Stable Diffusion 1.5.*has shape \\[16, 48\\].*needs \\[16, 32\\].*and \\d+ more"):
        train(run_config(data64, other, tmp_path / "b"), progress=False)
    # A checkpoint of another stage.
    out, result = uninterrupted
    with pytest.raises(TrainError, match="checkpoint of the 'motion' stage; this run trains 'appearance'"):
        train(run_config(data64, base, tmp_path / "c", stage="appearance", resume=str(result["checkpoint"])),
              progress=False)
    with pytest.raises(Exception, match="frames: the motion stage trains on single frames"):
        run_config(data64, base, tmp_path / "d", frames=4)


def test_cached_controls_train_without_the_face_models(videos, base, tmp_path, capsys, monkeypatch):
    """`prepare-data --control-cache` renders I_C once; `train --cached-controls` reads it and
    never runs a face model (a GPU host need not have mediapipe). Without the cache: exit 2."""
    from engines.xportrait.train.dataset import CACHE, cached_control

    data = tmp_path / "set"
    assert prepare(list(videos.values()), data, "--size", "64", "--format", "npy", "--control-cache") == 0
    clips = ClipSet(data)
    frames = sum(c.frames for c in clips.clips)
    assert f"control cache: {frames} control images" in capsys.readouterr().out
    assert len(list((data / CACHE).glob("*/*.jpg"))) == frames

    import engines.matte

    def no_face_models(*args, **kwargs):
        raise AssertionError("a face model ran in the loader")

    monkeypatch.setattr(engines.matte, "segment_person", no_face_models)
    samples = TrainingSamples(clips, SampleSpec(frames=1, scale=False, cached=True), seed=0, length=4)
    drawn = samples.draw(2)
    cached = cached_control(clips, drawn["clip"], drawn["targets"][0], drawn["scale"])
    assert np.array_equal(samples[2]["control"][0].numpy(), cached.image)
    argv = ["train", "--stage", "motion", "--data", str(data), "--base", str(base), "--model", "tiny", "--steps", "2",
            "--workers", "0", "--quiet", "--cached-controls"]
    assert cli([*argv, "--out", str(tmp_path / "run")]) == 0
    assert "motion: step 2, loss" in capsys.readouterr().out

    for folder in (data / CACHE).iterdir():  # a cache with a clip missing: refused at the start
        import shutil

        shutil.rmtree(folder)
        break
    assert cli([*argv, "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "no cached control images for 1 of" in err and "prepare-data --control-cache" in err


def test_the_papers_config_file_reads_and_flags_override_it():
    path = Path("engines/xportrait/train/paper.toml")
    config = build_config(path, stage="temporal", data="d", base="b", out="o", lr=2e-5)
    assert (config.steps, config.mixed_precision, config.gradient_checkpointing) == (30000, "bf16", True)
    assert config.lr == 2e-5 and config.clip_frames == 16
    assert build_config(path, stage="causal", data="d", base="b", out="o").clip_frames == 24


def test_a_full_disk_leaves_no_half_written_checkpoint_or_export(tmp_path, monkeypatch):
    model = random_model(TINY, seed=0)

    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ExportError, match="disk is full"):
        export(model, tmp_path / "exports", step=7, stage="motion", formats=("th",))
    assert list((tmp_path / "exports").iterdir()) == []

    class FullAccelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            os.makedirs(folder, exist_ok=True)  # as accelerate does
            Path(folder, "optimizer.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    config = build_config(None, stage="motion", data="d", base="b", out=str(tmp_path))
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000001" / "train_state.json").write_text("{}")
    with pytest.raises(TrainError, match="disk is full; the last whole checkpoint is kept"):
        save_checkpoint(FullAccelerator(), tmp_path, 2, config, keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]


def test_export_names_every_key_the_released_way():
    released = to_released(TINY, random_model(TINY, seed=1))
    layout = released_shapes(TINY)
    assert set(released) <= set(layout)
    missing = {k.split(".")[0] for k in set(layout) - set(released)}
    # Not ours to write: CLIP (the model keeps only the empty prompt's embedding), the schedule
    # buffers, the reference net's unused hint encoder.
    assert missing <= {"cond_stage_model", "appearance_control_model", *released_layout_buffers()}
    assert not [k for k in set(layout) - set(released) if k.startswith("appearance_control_model.")
                and "input_hint_block" not in k]


def test_export_refuses_weights_that_would_not_load_back():
    """The exporter's check is the loader's: a tensor with no released name, or one the
    loader would read back with another value, stops the export before anything is written."""
    from engines.xportrait.train.export import check_loads_back, released_weights

    model = random_model(TINY, seed=1)
    ours = model.state_dict()
    released = released_weights(TINY, model)
    check_loads_back(TINY, ours, released)  # the model's own export loads back
    name = next(k for k in released if k.startswith("pose_control_model."))
    bad = dict(released, **{name: released[name] + 1})
    with pytest.raises(ExportError, match="load back with other values"):
        check_loads_back(TINY, ours, bad)
    with pytest.raises(ExportError, match="(?s)would not load back.*no weights for 1 "):
        check_loads_back(TINY, ours, {k: v for k, v in released.items() if k != name})
    model.register_parameter("stray", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ExportError, match="(?s)no released name.*stray"):
        released_weights(TINY, model)


def released_layout_buffers():
    from released_layout import DDPM_BUFFERS

    return DDPM_BUFFERS


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------

def test_two_processes_average_gradients_and_keep_parameters_equal(data64, base, tmp_path):
    """The trainer under torchrun's launcher, two processes on the CPU (gloo), as `accelerate
    launch` starts it on GPUs: the code does not change. (The ranks are forked by the launcher
    from a process that has imported the trainer once: see train_ddp_check.py.)"""
    report = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path.cwd()), str(Path(__file__).parent)]))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("train_ddp_check.py")), str(data64), str(base),
                           str(tmp_path / "run"), str(report)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-12000:]
    for rank in (0, 1):
        result = json.loads(Path(f"{report}.rank{rank}").read_text())
        assert result["ranks"] == 2 and len(result["steps"]) == 2 and len(result["losses"]) == 2
        for step in result["steps"]:
            assert step["grad_vs_local"] > 1e-3 * step["grad_scale"]  # the ranks' own gradients differ...
            assert step["grad_vs_mean"] <= 1e-6 * step["grad_scale"]  # ...and DDP applied their mean
        assert result["params_spread"] == 0.0 and result["parameters"] > 100
    # One run folder, written once: a line per step, one checkpoint, one export of each kind.
    lines = (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run").glob("model_state-*")) == ["model_state-2.safetensors",
                                                                               "model_state-2.th"]


# ---------------------------------------------------------------------------------------------
# The causal stage is the live engine
# ---------------------------------------------------------------------------------------------

def _stream_frames(n: int, size: int = 64):
    frames = []
    from engines.face import local_patch_boxes

    for f, _ in driving_clip("astronaut", frames=n, size=(size, size), script=talking):
        frames.append(torch.from_numpy(f))
    lm = np.zeros((478, 3), np.float32)
    lm[:, :2] = size / 2
    return torch.stack(frames), torch.from_numpy(local_patch_boxes(lm, size))[None].expand(n, -1, -1)


@pytest.mark.parametrize("window, lookahead", [(3, 0), (3, 1)])
def test_the_causal_pattern_is_the_one_the_live_engine_attends_with(window, lookahead):
    """Tick a real streaming engine and read, every tick, which ring slots its level attends
    to and at which positions; the training pattern must say the same of the same frames."""
    from engines.xportrait.stream import StreamingDenoiser, StreamSettings
    from engines.xportrait.train.causal import live_pattern

    model = random_model(compact_config(), seed=0)
    n = 5
    pattern = live_pattern(n, window, lookahead)
    denoiser = StreamingDenoiser(model, StreamSettings(steps=1, window=window, lookahead=lookahead), "cpu",
                                 torch.float32)
    denoiser.prepare(torch.zeros(1, 3, 64, 64))
    frames, boxes = _stream_frames(n)
    for tick in range(n + lookahead):
        denoiser.tick(frames[tick] if tick < n else None, boxes[0] if tick < n else None)
        f = tick - lookahead
        if f < 0:
            continue
        live = denoiser._tick
        slot, k = int(live.slot), lookahead
        live_positions = sorted(int(p) for p, m in zip(live.positions[k], live.mask[k]) if m)
        ours = sorted(int(p) for p, m in zip(pattern.positions[f], pattern.mask[f]) if m)
        ahead = int(live.ahead[k].sum()) if lookahead else 0
        assert ours == live_positions + [int(live.positions[k, slot]) + 1 + o for o in range(ahead)]
        assert int(pattern.query_positions[f]) == int(live.positions[k, slot])
        expected = set(range(max(0, f - window + 1), min(n, f + lookahead + 1)))
        assert set(torch.nonzero(pattern.mask[f]).flatten().tolist()) == expected


def test_the_causal_forward_of_a_clip_is_what_the_live_engine_streams():
    """All frames of a clip at one timestep in one pass with the pattern = the streaming
    engine's frames, one at a time through its rings (one LCM step, no look-ahead). In float64:
    the two paths sum in different orders (the stream's fused q/k/v and ring sums), which in
    float32 leaves rounding of ~6e-7 of the latents' scale; in float64 any other difference shows."""
    from engines.xportrait.stream import LCMLevels, StreamingDenoiser, StreamSettings, control_hints
    from engines.xportrait.train.causal import live_pattern

    dtype = torch.float64
    model = random_model(compact_config(), seed=0).to(dtype)
    n, window = 6, 3
    settings = StreamSettings(steps=1, window=window)
    frames, boxes = _stream_frames(n)
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype) * 2 - 1
    denoiser = StreamingDenoiser(model, settings, "cpu", dtype)
    denoiser.prepare(source)
    streamed = [denoiser.tick(frames[i], boxes[i])[0].clone() for i in range(n)]

    levels = LCMLevels(model, settings, "cpu", dtype)
    t = levels.timesteps[0]
    latent = model.encode(source)
    x = levels.enter(latent).expand(n, -1, -1, -1)
    pose, local = control_hints(frames, boxes, dtype)
    reference = model.reference_features([latent], t)
    past = [live_pattern(n, window)] * len(model.unet.motion.in_order())
    eps = model.predict_noise(x, t, n, reference, pose, local, temporal_past=past)
    clean = levels.denoise(x, eps, slice(0, 1))
    torch.testing.assert_close(clean, torch.cat(streamed), rtol=1e-4, atol=1e-5)
