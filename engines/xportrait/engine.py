"""The X-Portrait diffusion engine, offline: the Engine protocol over XPortraitPipeline.

The offline method needs the whole clip (windows overlap around every frame, and every
denoising step runs over all frames), so `step` keeps each aligned driving frame and its
local control image, and `flush` renders them all. The streaming engine, which renders
frame by frame, is a separate class.
"""

from __future__ import annotations

import time
from typing import Sequence

import cv2
import numpy as np
import torch

from ..base import DrivingFrame, EngineError, Rendered, SourcePortrait, Timings, check_sources
from ..face import local_patch_boxes
from .config import XPortraitConfig
from .pipeline import SamplerSettings, XPortraitPipeline
from .stream import StreamSettings, StreamingDenoiser, control_hints

RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS - NOT A REAL MODEL"
NEEDS_WEIGHTS = ("the xportrait engine needs --checkpoint (the released model_state-*.th) and --base "
                 "(Stable Diffusion 1.5), or --random-weights to measure cost without weights")


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"--device {device}: no CUDA GPU is available to torch here")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp16 on a GPU, fp32 on a CPU, unless asked."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def model_config(model_size: str, size: int) -> XPortraitConfig:
    if model_size not in ("sd15", "tiny"):
        raise EngineError(f"model size must be 'sd15' or 'tiny', got {model_size!r}")
    return (XPortraitConfig.tiny if model_size == "tiny" else XPortraitConfig.sd15)(resolution=size)


def to_tensor(images: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 RGB (H, W, 3) images -> (N, 3, H, W) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
    return batch.to(dtype) / 127.5 - 1.0


def to_images(frames: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 RGB (N, H, W, 3)."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def label_overlay(height: int, width: int, text: str) -> tuple[np.ndarray, np.ndarray]:
    """A label in the top-left corner: (mask (H, W, 1) bool, pixels (H, W, 3) uint8)."""
    scale = max(width / 900, 0.3)
    thickness = max(1, round(scale * 2))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pixels = np.zeros((height, width, 3), np.uint8)  # the label's box is black
    cv2.putText(pixels, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 64, 64), thickness, cv2.LINE_AA)
    mask = np.zeros((height, width, 1), bool)
    mask[: th + 11, : min(width, tw + 9)] = True
    return mask, pixels


def stamp(image: np.ndarray, text: str) -> np.ndarray:
    """Burn a label into a frame, so that no output of random weights passes for a result."""
    mask, pixels = label_overlay(*image.shape[:2], text)
    np.copyto(image, pixels, where=mask)
    return image


class XPortraitEngine:
    name = "xportrait"
    needs_driving_image = True
    waits_on_device = False  # offline: frames are kept, not rendered, until flush

    def __init__(self, size: int = 512, base: str | None = None, checkpoint: str | None = None,
                 lcm_lora: str | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None,
                 random_weights: bool = False, model_size: str = "sd15", device: str | None = None,
                 dtype: str | None = None, seed: int = 999, window: int = 16, overlap: int = 4,
                 offsets: str = "random", shared_noise: bool = False, allow_hub: bool = False,
                 trust_checkpoint: bool = False):
        if not random_weights and checkpoint is None:
            raise EngineError(NEEDS_WEIGHTS)
        self.size = size
        self.random_weights = random_weights
        self.device = pick_device(device)
        self.dtype, config = resolve_dtype(dtype, self.device), model_config(model_size, size)
        # LCM sampling needs LCM weights; without them the released sampler is the default
        # (--sampler lcm with --random-weights measures the cost of the few-step path).
        sampler = sampler or ("lcm" if lcm_lora else "ddim")
        defaults = SamplerSettings.lcm() if sampler == "lcm" else SamplerSettings.released()
        self.settings = SamplerSettings(
            sampler=sampler, steps=defaults.steps if steps is None else steps,
            guidance=defaults.guidance if guidance is None else guidance,
            window=window, overlap=overlap, offsets=offsets, shared_noise=shared_noise, seed=seed)
        try:
            self.settings.validate()
        except ValueError as e:
            raise EngineError(str(e)) from None

        from .weights import load_model

        self.model = load_model(config, base=base, checkpoint=checkpoint, lcm_lora=lcm_lora,
                                random_weights=random_weights, seed=seed, dtype=self.dtype, device=self.device,
                                allow_hub=allow_hub, trust_checkpoint=trust_checkpoint)
        self.pipeline = XPortraitPipeline(self.model, self.settings)
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
        frames = self.pipeline(self._sources, pose, local)
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


_models: dict[tuple, torch.nn.Module] = {}


def load_small_decoder(path: str, random_weights: bool = False):
    """TAESD (diffusers AutoencoderTiny) from a local folder; 'random' with --random-weights."""
    from diffusers import AutoencoderTiny

    if path == "random":
        if not random_weights:
            raise EngineError("--tiny-decoder random is only for --random-weights")
        torch.manual_seed(0)
        return AutoencoderTiny()
    try:
        return AutoencoderTiny.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot load the tiny decoder from {path}: {e}") from None


def shared_model(config: XPortraitConfig, device: torch.device, dtype: torch.dtype, **weights):
    """One model per set of weights in this process: live sessions share it (each has its own
    stream state), so a second connection loads nothing."""
    from .weights import load_model

    key = (config, device, dtype, tuple(sorted(weights.items())))
    if key not in _models:
        _models[key] = load_model(config, dtype=dtype, device=device, **weights)
    return _models[key]


class XPortraitStreamEngine:
    """The live engine: frame in, frame out S - 1 (+ k with look-ahead k) frames later (S LCM steps in flight).

    On a GPU the whole tick (ControlNets, UNet with reference and temporal attention, LCM
    update, VAE decode of the leaving frame) is one CUDA graph; the host copies the new
    driving frame in and the rendered frame out.
    """

    name = "xportrait"
    needs_driving_image = True

    def __init__(self, size: int = 512, base: str | None = None, checkpoint: str | None = None,
                 lcm_lora: str | None = None, steps: int | None = None, window: int = 16,
                 random_weights: bool = False, model_size: str = "sd15", device: str | None = None,
                 dtype: str | None = None, seed: int = 999, cuda_graph: bool = True, compile: bool = False,
                 tiny_decoder: str | None = None, channels_last: bool = True, model=None, allow_hub: bool = False,
                 sampler: str | None = None, guidance: float | None = None, lookahead: int = 0,
                 trust_checkpoint: bool = False):
        if sampler not in (None, "lcm") or guidance not in (None, 1.0):
            raise EngineError("the live xportrait engine samples with LCM and no guidance (--sampler lcm, --guidance 1)")
        if model is None and not random_weights and checkpoint is None:
            raise EngineError(NEEDS_WEIGHTS)
        self.size = size
        self.random_weights = random_weights
        self.device = pick_device(device)
        # `model`: anything with XPortraitModel's inference interface, e.g. exported graphs run by
        # ONNX Runtime or TensorRT (export.backend); those own their launches: no CUDA graph here.
        self.dtype, config = resolve_dtype(dtype, self.device), model_config(model_size, size)
        settings = StreamSettings(steps=4 if steps is None else steps, window=window, seed=seed, lookahead=lookahead)
        try:
            settings.validate(config.motion_max_len)
        except ValueError as e:
            raise EngineError(str(e)) from None
        native = model is None
        if native:
            model = shared_model(config, self.device, self.dtype, base=base, checkpoint=checkpoint,
                                 lcm_lora=lcm_lora, random_weights=random_weights, seed=seed, allow_hub=allow_hub,
                                 trust_checkpoint=trust_checkpoint)
        elif lookahead:
            raise EngineError("--lookahead works with the torch backend only (the exported graphs attend causally)")
        elif model.config.resolution != size:
            raise EngineError(f"the given model renders {model.config.resolution} px, the engine is {size} px")
        self.model = model
        if tiny_decoder is not None:
            if not native:
                raise EngineError("--tiny-decoder works with the torch backend only")
            self.model.set_small_decoder(load_small_decoder(tiny_decoder, random_weights))
        if native and channels_last and self.device.type == "cuda":  # cuDNN's layout: no NCHW<->NHWC transposes
            self.model.to(memory_format=torch.channels_last)
        if native:  # weight-only terms of the temporal attentions, once (after any dtype/layout change)
            self.model.unet.motion.freeze_ring_projections()
        self.denoiser = StreamingDenoiser(self.model, settings, self.device, self.dtype)
        self.denoiser.decode = True
        self.denoiser.small_decoder = tiny_decoder is not None
        # The ControlNets beside the UNet's down path on three streams: same frames, and on the
        # H100 a 1.4 ms shorter compiled tick (2.4 ms uncompiled).
        self.denoiser.split = native and self.device.type == "cuda"
        if random_weights:  # the label is burnt in on the device, inside the tick
            mask, pixels = label_overlay(size, size, RANDOM_WEIGHTS_LABEL)
            self.denoiser.overlay = (torch.from_numpy(mask).to(self.device), torch.from_numpy(pixels).to(self.device))
        self.waits_on_device = self.device.type == "cuda"
        self.cuda_graph = native and cuda_graph and self.device.type == "cuda"
        self.compile = compile and self.cuda_graph
        self.latency_frames = settings.steps - 1 + lookahead
        # Pinned staging for the frame and its patch boxes, two slots: the host fills one while
        # the device may still be copying from the other (a tick that returns no frame does not
        # wait for the device).
        pinned = self.device.type == "cuda"
        self._host_frames = torch.empty((2, size, size, 3), dtype=torch.uint8, pin_memory=pinned)
        self._host_boxes = torch.empty((2, 3, 4), dtype=torch.long, pin_memory=pinned)
        self._copied = [torch.cuda.Event() for _ in range(2)] if pinned else None
        self._slot = 0
        self._host_out = torch.empty((size, size, 3), dtype=torch.uint8, pin_memory=pinned)
        self._timings = Timings()

    @property
    def timings(self) -> Timings:
        return self._timings

    def prepare(self, sources: Sequence[SourcePortrait]) -> None:
        check_sources(sources, self.size, self.name)
        self.denoiser.prepare(to_tensor([s.image for s in sources], self.device, self.dtype))
        if self.cuda_graph and self.denoiser._graph is None:
            self.denoiser.capture(compile=self.compile)

    def _staged(self, frame: DrivingFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame and its patch boxes in pinned memory; the tick builds both hints from them."""
        slot = self._slot = 1 - self._slot
        if self._copied is not None:
            self._copied[slot].synchronize()  # the device has read this slot's previous frame
        frames, boxes = self._host_frames[slot], self._host_boxes[slot]
        frames.numpy()[:] = frame.image
        boxes.numpy()[:] = local_patch_boxes(frame.landmarks, self.size)
        return frames, boxes

    def _tick(self, staged: tuple[torch.Tensor, torch.Tensor] | None, tag=None):
        leaving = self.denoiser.tick(*(staged or (None, None)), tag=tag)
        if self._copied is not None:
            self._copied[self._slot].record()
        return leaving

    def _rendered(self, leaving) -> Rendered | None:
        if leaving is None:
            return None
        self._host_out.copy_(self.denoiser.image)  # waits for the tick: the one sync per frame
        return Rendered(self._host_out.numpy(), leaving[1])

    def step(self, frame: DrivingFrame) -> Rendered | None:
        if self.denoiser.reference is None:
            raise EngineError("prepare() the engine with a source first")
        if frame.image is None:
            raise EngineError("the xportrait engine needs the aligned driving image")
        t0 = time.perf_counter()
        out = self._rendered(self._tick(self._staged(frame), frame.tag))
        self._timings.record("engine", (time.perf_counter() - t0) * 1e3)
        self._timings.steps += 1
        return out

    def flush(self) -> list[Rendered]:
        out = []
        for _ in range(self.latency_frames):
            rendered = self._rendered(self._tick(None))
            if rendered is not None:
                out.append(Rendered(rendered.image.copy(), rendered.tag))
        return out

    def reset(self) -> None:
        self.denoiser.reset()
