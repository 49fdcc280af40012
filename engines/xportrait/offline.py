"""The X-Portrait diffusion engine, offline: the Engine protocol over XPortraitPipeline.

The offline method needs the whole clip (windows overlap around every frame, and every
denoising step runs over all frames), so `step` keeps each aligned driving frame and its
local control image, and `flush` renders them all. The live engine, which renders frame by
frame, is live.py.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..base import DrivingFrame, EngineError, Rendered, SourcePortrait, Timings, check_sources
from ..face import local_patch_boxes
from ..options import XPortraitOptions
from .pipeline import SamplerSettings, XPortraitPipeline
from .runtime import RANDOM_WEIGHTS_LABEL, model_config, pick_device, resolve_dtype, stamp, to_images, to_tensor
from .stream import control_hints


def sampler_settings(options: XPortraitOptions) -> SamplerSettings:
    """The sampler the options ask for. LCM sampling needs LCM weights; without them the
    released sampler is the default (--sampler lcm with --random-weights measures the cost of
    the few-step path); unset steps and guidance are that sampler's defaults."""
    sampler = options.sampler or ("lcm" if options.lcm_lora else "ddim")
    defaults = SamplerSettings.lcm() if sampler == "lcm" else SamplerSettings.released()
    settings = SamplerSettings(
        sampler=sampler, steps=defaults.steps if options.steps is None else options.steps,
        guidance=defaults.guidance if options.guidance is None else options.guidance,
        window=options.window, overlap=options.overlap, offsets=options.offsets,
        shared_noise=options.shared_noise, seed=options.seed)
    try:
        settings.validate()
    except ValueError as e:
        raise EngineError(str(e)) from None
    return settings


class XPortraitEngine:
    name = "xportrait"
    needs_driving_image = True
    waits_on_device = False  # offline: frames are kept, not rendered, until flush

    def __init__(self, options: XPortraitOptions, model=None, settings: SamplerSettings | None = None,
                 progress: Callable[[int, int], None] | None = None):
        """`model`: an XPortraitModel already loaded (not loaded again); `settings`: the
        sampler, when not the one the options describe (the bench times several on one model);
        `progress(done, total)`: called after each denoising step of `flush`."""
        if options.live is not None:
            raise EngineError("these are the live engine's options (live is set): create_engine builds that one")
        self.options = options
        self.size = options.size
        self.random_weights = options.random_weights
        self.device = pick_device(options.device)
        self.dtype, config = resolve_dtype(options.dtype, self.device), model_config(options.model_size, options.size)
        self.settings = settings or sampler_settings(options)
        self._progress = progress

        if model is None:
            from .weights import load_model

            model = load_model(config, dtype=self.dtype, device=self.device, **options.weights)
        elif model.config != config:
            raise EngineError(f"the given model is not the {options.model_size} model at {options.size} px")
        self.model = model
        try:
            self.pipeline = XPortraitPipeline(self.model, self.settings)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self._sources: torch.Tensor | None = None
        self._driving: list[np.ndarray] = []
        self._boxes: list[np.ndarray] = []
        self._tags: list = []
        self._timings = Timings()

    @property
    def timings(self) -> Timings:
        return self._timings

    def prepare(self, sources: Sequence[SourcePortrait]) -> None:
        check_sources(sources, self.size, self.name)
        self._sources = to_tensor([s.image for s in sources], self.device, self.dtype)
        self.reset()

    def step(self, frame: DrivingFrame) -> None:
        if self._sources is None:
            raise EngineError("prepare() the engine with a source first")
        if frame.image is None:
            raise EngineError("the xportrait engine needs the aligned driving image")
        self._driving.append(frame.image.copy())  # the caller reuses its buffer
        self._boxes.append(local_patch_boxes(frame.landmarks, self.size))
        self._tags.append(frame.tag)
        return None

    def flush(self) -> list[Rendered]:
        if not self._driving:
            return []
        t0 = time.perf_counter()
        pose, local = control_hints(torch.from_numpy(np.stack(self._driving)).to(self.device),
                                    torch.from_numpy(np.stack(self._boxes)).to(self.device), self.dtype)
        frames = self.pipeline(self._sources, pose, local, progress=self._progress)
        images = to_images(frames)
        elapsed = (time.perf_counter() - t0) * 1e3
        self._timings.record("pipeline", elapsed)
        self._timings.record("per_frame", elapsed / len(images))
        self._timings.steps += len(images)
        if self.random_weights:
            images = [stamp(np.ascontiguousarray(im), RANDOM_WEIGHTS_LABEL) for im in images]
        out = [Rendered(im, tag) for im, tag in zip(images, self._tags)]
        self.reset()
        return out

    def reset(self) -> None:
        self._driving, self._boxes, self._tags = [], [], []


