"""The X-Portrait diffusion engine, live: the Engine protocol over the StreamingDenoiser.

Frame in, frame out S - 1 (+ K with look-ahead K) frames later, S LCM steps in flight
(stream.py). On a GPU the whole tick (ControlNets, UNet with reference and temporal
attention, LCM update, VAE decode of the leaving frame) is one CUDA graph; the host copies
the new driving frame in and the rendered frame out. The offline engine is offline.py.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import torch

from ..base import DrivingFrame, EngineError, QualityLevel, Rendered, SourcePortrait, Timings, check_sources
from ..face import local_patch_boxes
from ..options import XPortraitOptions
from .config import XPortraitConfig
from .runtime import RANDOM_WEIGHTS_LABEL, label_overlay, model_config, pick_device, resolve_dtype, to_tensor
from .stream import DenoiserModel, StreamingDenoiser, StreamSettings

_models: dict[tuple, torch.nn.Module] = {}


def load_small_decoder(path: str, device: torch.device, dtype: torch.dtype, channels_last: bool = False):
    """TAESD (diffusers AutoencoderTiny) from a local folder, or 'random' (XPortraitOptions
    allows it with random weights only): latents -> images in [-1, 1], as the denoiser decodes."""
    from diffusers import AutoencoderTiny

    if path == "random":
        torch.manual_seed(0)
        decoder = AutoencoderTiny()
    else:
        try:
            decoder = AutoencoderTiny.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot load the tiny decoder from {path}: {e}") from None
    decoder = decoder.to(device, dtype).eval()
    if channels_last:  # as the model it decodes for
        decoder.to(memory_format=torch.channels_last)
    # TAESD takes the scaled latents as they are.
    return lambda latents: decoder.decode(latents).sample.clamp(-1, 1)


def shared_model(config: XPortraitConfig, device: torch.device, dtype: torch.dtype, channels_last: bool, **weights):
    """One model per set of weights in this process: live sessions share it (each has its own
    stream state), so a second connection loads nothing. Made ready for the stream once: the
    memory layout, and the temporal attentions' weight-only terms (after any dtype/layout change)."""
    from .weights import load_model

    key = (config, device, dtype, channels_last, tuple(sorted(weights.items())))
    if key not in _models:
        model = load_model(config, dtype=dtype, device=device, **weights)
        if channels_last:  # cuDNN's layout: no NCHW<->NHWC transposes
            model.to(memory_format=torch.channels_last)
        model.unet.motion.freeze_ring_projections()
        _models[key] = model
    return _models[key]


class XPortraitLiveEngine:
    """The live engine. `model`: a DenoiserModel to run instead of the torch model the options
    name, e.g. exported graphs run by ONNX Runtime or TensorRT (export.graph_model); those own their
    launches: no CUDA graph here."""

    name = "xportrait"
    needs_driving_image = True

    def __init__(self, options: XPortraitOptions, model: DenoiserModel | None = None):
        live = options.live
        if live is None:
            raise EngineError("the live engine needs live options (XPortraitOptions(live=LiveOptions(...)))")
        if model is None and live.backend != "torch":
            raise EngineError(f"--backend {live.backend}: load the graphs (export.graph_model.graph_model) and pass "
                              "them as the model")
        self.options = options
        size = self.size = options.size
        self.random_weights = options.random_weights
        self.device = pick_device(options.device)
        self.dtype, config = resolve_dtype(options.dtype, self.device), model_config(options.model_size, size)
        cuda = self.device.type == "cuda"
        settings = StreamSettings(steps=options.stream_steps, window=options.window, seed=options.seed,
                                  lookahead=live.lookahead)
        native = model is None
        if native:
            model = shared_model(config, self.device, self.dtype, live.channels_last and cuda, **options.weights)
        else:
            if model.config.resolution != size:
                raise EngineError(f"the given model renders {model.config.resolution} px, the engine is {size} px")
            if live.lookahead and not isinstance(model, torch.nn.Module):
                raise EngineError("--lookahead works with the torch backend only (the exported graphs attend causally)")
        if live.tiny_decoder is not None and not isinstance(model, torch.nn.Module):
            raise EngineError("--tiny-decoder works with the torch backend only")
        self.model = model
        small = None if live.tiny_decoder is None else \
            load_small_decoder(live.tiny_decoder, self.device, self.dtype, native and live.channels_last and cuda)
        overlay = None
        if options.random_weights:  # the label is burnt in on the device, inside the tick
            mask, pixels = label_overlay(size, size, RANDOM_WEIGHTS_LABEL)
            overlay = (torch.from_numpy(mask).to(self.device), torch.from_numpy(pixels).to(self.device))
        # The ControlNets beside the UNet's down path on three streams: same frames, and on
        # the H100 a 1.4 ms shorter compiled tick (2.4 ms uncompiled).
        self._denoiser_args = dict(overlay=overlay, split=native and cuda)
        self.waits_on_device = cuda
        self.cuda_graph = native and live.cuda_graph and cuda
        self.compile = live.compile and self.cuda_graph
        # Quality levels (engines.base.Governed), best first: with a tiny decoder, the options'
        # stream decoded by the full VAE, then by the tiny decoder (where the engine starts);
        # then without look-ahead, then one LCM step fewer at a time down to 2. Each level is its
        # own stream batch (and, on a GPU, its own CUDA graph), made the first time it is set.
        streams = [settings] + ([replace(settings, lookahead=0)] if settings.lookahead else [])
        streams += [replace(settings, steps=n, lookahead=0) for n in range(settings.steps - 1, 1, -1)]
        vae = model.decode
        self._ladder = [(s, small or vae) for s in streams]  # (stream, decoder)
        self._two_decoders = small is not None
        if small is not None:
            self._ladder.insert(0, (settings, vae))
        self._level = 1 if small is not None else 0
        self.denoiser = self._new_denoiser(*self._ladder[self._level])
        self._denoisers = {self._level: self.denoiser}
        self.latency_frames = settings.steps - 1 + settings.lookahead
        self._sources: torch.Tensor | None = None
        # Pinned staging for the frame and its patch boxes, two slots: the host fills one while
        # the device may still be copying from the other (a tick that returns no frame does not
        # wait for the device).
        self._host_frames = torch.empty((2, size, size, 3), dtype=torch.uint8, pin_memory=cuda)
        self._host_boxes = torch.empty((2, 3, 4), dtype=torch.long, pin_memory=cuda)
        self._copied = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._slot = 0
        self._host_out = torch.empty((size, size, 3), dtype=torch.uint8, pin_memory=cuda)
        self._timings = Timings()

    def _new_denoiser(self, settings: StreamSettings, decode) -> StreamingDenoiser:
        try:
            return StreamingDenoiser(self.model, settings, self.device, self.dtype, decode=decode,
                                     **self._denoiser_args)
        except ValueError as e:
            raise EngineError(str(e)) from None

    @property
    def timings(self) -> Timings:
        return self._timings

    def prepare(self, sources: Sequence[SourcePortrait]) -> None:
        check_sources(sources, self.size, self.name)
        self._sources = to_tensor([s.image for s in sources], self.device, self.dtype)
        for denoiser in self._denoisers.values():  # every level made so far: its graph stays valid
            self._prepare(denoiser)

    def _prepare(self, denoiser: StreamingDenoiser) -> None:
        denoiser.prepare(self._sources)
        if self.cuda_graph and not denoiser.captured:
            denoiser.capture(compile=self.compile)

    def quality_levels(self) -> list[QualityLevel]:
        best, vae = self._ladder[0]
        levels = []
        for s, decode in self._ladder:
            name = f"{s.steps} steps" + (f" + look-ahead {s.lookahead}" if s.lookahead else "")
            cost = (s.steps + s.lookahead) / (best.steps + best.lookahead)
            if self._two_decoders:  # a guess the governor corrects: the full VAE's decode, a third of a tick
                name += ", full VAE" if decode is vae else ", tiny decoder"
                cost *= 1.0 if decode is vae else 0.75
            levels.append(QualityLevel(name, cost=cost, latency_frames=s.steps - 1 + s.lookahead))
        return levels

    def set_quality(self, level: int) -> None:
        """Between frames: the stream continues on that level's batch, empty (its frames in
        flight at the old level are dropped; the first leaves steps - 1 frames later)."""
        if level not in self._denoisers:
            self._denoisers[level] = denoiser = self._new_denoiser(*self._ladder[level])
            if self._sources is not None:
                self._prepare(denoiser)
        if self._denoisers[level] is not self.denoiser:
            self.denoiser = self._denoisers[level]
            self.denoiser.reset()
        self._level = level
        settings, _ = self._ladder[level]
        self.latency_frames = settings.steps - 1 + settings.lookahead

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
