"""The training samples of a stage, drawn from a prepared ClipSet, in the loader's workers.

Sample i is a pure function of (seed, i): the clip, the frames, the other identity, the
scaling, all come from a generator seeded with both. The loader reads the samples in order
(no shuffling sampler: the draw is already random), so "the data position" of a run is the
number of samples it has consumed, which is what makes a resumed run continue exactly
(accelerate skips the consumed batches without loading them), on any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import ClipSet, DataError
from .pairs import Control, CrossIdentityControl, controls_of, draw_scale

CACHE = "controls"  # DIR/controls/<clip>/<frame>.jpg: I_C unscaled; DIR/controls/<clip>/others.npy


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3), as they are: a quarter of float32 through the loader's shared
    memory and the host-to-device copy; the model's side makes them floats (stages.as_input)."""
    return torch.from_numpy(np.array(images, copy=True))  # a copy: memory maps are read-only


@dataclass(frozen=True)
class SampleSpec:
    frames: int = 1  # driving frames per sample (consecutive when > 1)
    controls: bool = True  # make I_C and I_C^l (not needed by the appearance stage)
    scale: bool = True  # random heterogeneous scaling of the control images
    uncond_prob: float = 0.0
    cached: bool = False  # read I_C from build_control_cache's files instead of rendering it


class TrainingSamples(Dataset):
    def __init__(self, clips: ClipSet, spec: SampleSpec, seed: int, length: int):
        self.clips, self.spec, self.seed, self.length = clips, spec, seed, length
        usable = [n for n, c in enumerate(clips.clips) if c.frames >= max(spec.frames, 2)]
        if not usable:
            raise DataError(f"{clips.root}: no clip has the {max(spec.frames, 2)} frames a sample needs "
                            f"(longest: {max(c.frames for c in clips.clips)})")
        if spec.controls and len(clips.identities) < 2:
            raise DataError(f"{clips.root}: cross-identity control images need clips of at least two identities; "
                            f"the set has one ({clips.identities[0]})")
        if spec.controls and spec.cached:
            missing = [c.id for c in clips.clips if not (clips.root / CACHE / c.id / "other.npy").is_file()]
            if missing:
                raise DataError(f"{clips.root}: no cached control images for {len(missing)} of {len(clips)} clips "
                                f"(first: {missing[0]}); build them with `xportrait prepare-data --control-cache`, "
                                "or train without --cached-controls")
        self.usable = usable

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> dict:
        """What sample `index` is made of (clip, frames, other identity, scale)."""
        rng = np.random.default_rng([self.seed, index])
        spec = self.spec
        clip = self.usable[int(rng.integers(len(self.usable)))]
        n = self.clips.clips[clip].frames
        if spec.frames == 1:
            source, target = (int(x) for x in rng.choice(n, size=2, replace=False))
            targets = [target]
        else:
            start = int(rng.integers(n - spec.frames + 1))
            targets = list(range(start, start + spec.frames))
            source = int(rng.integers(n))
        out = {"clip": clip, "source": source, "targets": targets, "scale": draw_scale(rng, spec.scale),
               "uncond": bool(rng.random() < spec.uncond_prob)}
        if spec.controls:
            others = self.clips.clips_of_other_identities(clip)
            other = others[int(rng.integers(len(others)))]
            out["other"] = (other, int(rng.integers(self.clips.clips[other].frames)))
        return out

    def __getitem__(self, index: int) -> dict:
        d = self.draw(index)
        clips, clip = self.clips, d["clip"]
        sample = {
            "source": to_tensor(clips.frame(clip, d["source"])),
            "target": to_tensor(np.stack([clips.frame(clip, i) for i in d["targets"]])),
            "scale": torch.tensor(d["scale"]),
            "uncond": torch.tensor(d["uncond"]),
            "index": torch.tensor(index),
        }
        if self.spec.controls:
            landmarks = clips.landmarks(clip)
            if self.spec.cached:
                controls = [cached_control(clips, clip, i, d["scale"]) for i in d["targets"]]
            else:
                other, frame = d["other"]
                make = CrossIdentityControl(clips.frame(other, frame), np.asarray(clips.landmarks(other)[frame]),
                                            np.asarray(landmarks[d["source"]]))
                controls = [make(np.asarray(landmarks[i]), d["scale"]) for i in d["targets"]]
            sample["control"] = to_tensor(np.stack([c.image for c in controls]))
            sample["local"] = to_tensor(np.stack([c.local for c in controls]))
        return sample


def build_control_cache(clips: ClipSet, seed: int = 0, progress: bool = True) -> int:
    """Render I_C once per frame (one other-identity frame per clip, drawn from `seed`) into
    the data folder; the loader then only scales it and cuts its patches. Fewer pairings
    than drawing I_S' anew for every sample, in exchange for no rendering in the loader."""
    import cv2
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    written = 0
    for clip in tqdm(range(len(clips)), desc="control cache", disable=not progress):
        others = clips.clips_of_other_identities(clip)
        if not others:
            raise DataError(f"{clips.root}: cross-identity control images need clips of at least two identities")
        other = others[int(rng.integers(len(others)))]
        frame = int(rng.integers(clips.clips[other].frames))
        landmarks = clips.landmarks(clip)
        make = CrossIdentityControl(clips.frame(other, frame), np.asarray(clips.landmarks(other)[frame]),
                                    np.asarray(landmarks[0]))
        folder = clips.root / CACHE / clips.clips[clip].id
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(clips.clips[clip].frames):
            image = make(np.asarray(landmarks[i]), (1.0, 1.0)).image
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            (folder / f"{i:06d}.jpg").write_bytes(data.tobytes())
            written += 1
        np.save(folder / "other.npy", np.array([other, frame]))
    return written


def cached_control(clips: ClipSet, clip: int, index: int, scale: tuple[float, float]) -> Control:
    import cv2

    path = clips.root / CACHE / clips.clips[clip].id / f"{index:06d}.jpg"
    data = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if data is None:
        raise DataError(f"{path}: no cached control image (build the cache first)")
    image = cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    return controls_of(image, np.asarray(clips.landmarks(clip)[index]), scale)
