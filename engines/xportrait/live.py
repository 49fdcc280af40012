"""The X-Portrait diffusion engine, live: the Engine protocol over the StreamingDenoiser.

Frame in, frame out S - 1 (+ K with look-ahead K) ticks later, S LCM steps in flight
(stream.py). On a GPU the whole tick (ControlNets, UNet with reference and temporal
attention, LCM update, VAE decode of the leaving frame) is one CUDA graph; the host copies
the new driving frame in and the rendered frame out. The offline engine is offline.py.

One tick per camera frame by default. With `--ticks-per-frame 2` (or `auto`, where it fits)
the stream ticks again on the same frame, the graph replayed with nothing copied in, so a
frame is out after S ticks of GPU time instead of S - 1 camera intervals; each frame is
shown once, by the first of its copies to leave, and a step shows the newest frame that left
during it.

With `--level-groups G` a tick steps the S levels in G passes of S / G frames each (stream.py):
the same frames, each out S / G - 1 camera intervals plus G passes after it came in, where the
G passes fit in a frame interval.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import nullcontext
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

AUTO_MARGIN = 0.05  # of the frame interval, kept free by auto's second tick (the host's work between steps)
AUTO_TICKS = 2  # auto ticks at most twice a frame: the temporal window then spans W / 2 distinct frames


def pass_cost(groups: int) -> float:
    """A guess the governor corrects: a tick's cost in G passes against one pass of the same
    frames (smaller batches are less efficient: 1.16 for 2 passes of 2 measured on the H200)."""
    return 1.0 + 0.16 * (groups - 1)


class TickPacer:
    """`--ticks-per-frame auto`: after each tick, whether another fits in what is left of the
    frame interval, by the last ticks' measured time (the slowest of the last few: a spike
    turns the second tick off for a while rather than making the next frame wait).

    The interval is the camera's, from the frames' own times: the shortest recent gap (a frame
    the pipeline dropped makes a gap of two intervals, never a shorter one), so a step that ran
    long cannot make room for itself. What is left is counted from the step's start, less how
    late the engine took this frame compared with the earliest it took any recent one (its
    start against the frame's time: clock offsets cancel), so a step that overran shortens the
    next instead of the stream drifting late until frames drop."""

    def __init__(self, margin: float = AUTO_MARGIN, history: int = 30, recent_ticks: int = 8):
        self.margin = margin
        self._gaps: deque[float] = deque(maxlen=history)
        self._offsets: deque[float] = deque(maxlen=history)
        self._ticks: deque[float] = deque(maxlen=recent_ticks)
        self._last_time: float | None = None
        self._start = self._tick_start = self._budget = 0.0

    def reset(self) -> None:
        """A new driving stream (its frame times may start anywhere)."""
        self._gaps.clear(), self._offsets.clear()
        self._last_time = None

    def start(self, frame_time: float, now: float) -> None:
        """A step begins: the frame's time (DrivingFrame.time, seconds) and now (perf_counter)."""
        if self._last_time is not None and frame_time > self._last_time:
            self._gaps.append(frame_time - self._last_time)
        self._last_time = frame_time
        self._offsets.append(now - frame_time)
        self._start = self._tick_start = now
        late = self._offsets[-1] - min(self._offsets)
        self._budget = min(self._gaps) * (1 - self.margin) - late if self._gaps else 0.0

    def another(self, now: float) -> bool:
        """A tick of this step has just finished (now): whether one more fits."""
        self._ticks.append(now - self._tick_start)
        self._tick_start = now
        return now - self._start + max(self._ticks) <= self._budget


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
    memory layout, the temporal attentions' weight-only terms, and every spatial attention's
    projections fused (after any dtype/layout change)."""
    from .weights import load_model

    key = (config, device, dtype, channels_last, tuple(sorted(weights.items())))
    if key not in _models:
        model = load_model(config, dtype=dtype, device=device, **weights)
        if channels_last:  # cuDNN's layout: no NCHW<->NHWC transposes
            model.to(memory_format=torch.channels_last)
        model.unet.motion.freeze_ring_projections()
        model.fuse_self_attention_projections()
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
                                  lookahead=live.lookahead, level_groups=live.level_groups,
                                  deep_levels=live.deep_levels, reuse_controls=live.reuse_controls,
                                  token_downsample=live.token_downsample)
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
        # the H100 a 1.4 ms shorter compiled tick (2.4 ms uncompiled). Deep levels need the parts.
        # With deep levels on a GPU, the reused entries beside the deep walk (a stream of their
        # own; live.reused_beside=False: in one batch, the bench's baseline).
        self._denoiser_args = dict(overlay=overlay, split=native and (cuda or bool(live.deep_levels)),
                                   reused_beside=live.reused_beside and cuda)
        self.waits_on_device = cuda
        self.cuda_graph = native and live.cuda_graph and cuda
        self.compile = live.compile and self.cuda_graph
        self.autotune = live.autotune and self.compile
        # Quality levels (engines.base.Governed), best first: with a tiny decoder, the options'
        # stream decoded by the full VAE, then by the tiny decoder (where the engine starts);
        # then without look-ahead, then one LCM step fewer at a time down to 2; with level groups,
        # each number of steps in the most groups up to the options' that divide it (the lower
        # latency) and then in one pass (the cheaper). Each level is its
        # own stream batch (and, on a GPU, its own CUDA graph), made when it is first set, or
        # ahead by make_quality on a thread of its own (on its own CUDA stream) while this
        # engine steps: _levels_lock guards the levels made and the sources they are made for.
        streams = [settings] + ([replace(settings, lookahead=0)] if settings.lookahead else [])
        for n in range(settings.steps, 1, -1):
            most = max(g for g in range(1, settings.level_groups + 1) if n % g == 0)
            for g in dict.fromkeys((most, 1)):
                s = replace(settings, steps=n, lookahead=0, level_groups=g,
                            deep_levels=tuple(level for level in settings.deep_levels if level < n))
                if s not in streams:
                    streams.append(s)
        vae = model.decode
        self._ladder = [(s, small or vae) for s in streams]  # (stream, decoder)
        self._two_decoders = small is not None
        if small is not None:
            self._ladder.insert(0, (settings, vae))
        self._level = 1 if small is not None else 0
        self.denoiser = self._new_denoiser(*self._ladder[self._level])
        self._denoisers = {self._level: self.denoiser}
        self._sources: torch.Tensor | None = None
        self._levels_lock, self._making = threading.Lock(), threading.Lock()  # the second: one level at a time
        self._build_stream = torch.cuda.Stream(self.device) if cuda else None
        # Pinned staging for the frame and its patch boxes, two slots: the host fills one while
        # the device may still be copying from the other (a tick that returns no frame does not
        # wait for the device).
        self._host_frames = torch.empty((2, size, size, 3), dtype=torch.uint8, pin_memory=cuda)
        self._host_boxes = torch.empty((2, 3, 4), dtype=torch.long, pin_memory=cuda)
        self._copied = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._slot = 0
        self._host_out = torch.empty((size, size, 3), dtype=torch.uint8, pin_memory=cuda)
        self._out_copied = torch.cuda.Event() if cuda else None  # the shown frame is on the host
        self._timings = Timings()
        # Ticks per frame: each frame's entries carry its number, so a frame is shown once.
        self._tick_done = None  # auto, on a GPU: when the last tick finished
        self._serial = self._shown = 0
        self.last_ticks = 0  # ticks the last step ran
        self.set_ticks_per_frame(live.ticks_per_frame)

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
        images = to_tensor([s.image for s in sources], self.device, self.dtype)
        with self._levels_lock:  # a level being made now sees these sources when it is done, and takes them
            self._sources = images
            made = list(self._denoisers.values())
        for denoiser in made:  # every level made so far: its graph stays valid
            self._prepare(denoiser, images)

    def _prepare(self, denoiser: StreamingDenoiser, sources: torch.Tensor) -> None:
        denoiser.prepare(sources)
        if self.cuda_graph and not denoiser.captured:
            denoiser.capture(compile=self.compile, autotune=self.autotune)

    def quality_levels(self) -> list[QualityLevel]:
        best, vae = self._ladder[0]
        levels = []
        for s, decode in self._ladder:
            name = f"{s.steps} steps" + (f" + look-ahead {s.lookahead}" if s.lookahead else "") \
                + (f" in {s.level_groups} passes" if s.level_groups > 1 else "") \
                + (f", deep at levels {','.join(map(str, s.deep_levels))}" if s.deep_levels else "") \
                + (", controls reused" if s.reuse_controls else "") \
                + (f", keys of {s.token_downsample}x{s.token_downsample} tokens" if s.token_downsample > 1 else "")
            cost = (s.steps + s.lookahead) / (best.steps + best.lookahead) \
                * pass_cost(s.level_groups) / pass_cost(best.level_groups)
            if self._two_decoders:  # a guess the governor corrects: the full VAE's decode, a third of a tick
                name += ", full VAE" if decode is vae else ", tiny decoder"
                cost *= 1.0 if decode is vae else 0.75
            levels.append(QualityLevel(name, cost=cost, latency_frames=self._latency_frames(s)))
        return levels

    def _latency_frames(self, settings: StreamSettings) -> int:
        """Camera frames a frame spends in flight: it leaves S - 1 + K ticks after entering on
        its frame's first tick (S / G - 1 in G level groups), n ticks a frame (auto: as for
        one, the most it can be)."""
        n = 1 if self.pacer is not None else self._most_ticks
        return (settings.steps // settings.level_groups - 1 + settings.lookahead) // n

    def quality_ready(self, level: int) -> bool:
        return level in self._denoisers

    def make_quality(self, level: int) -> None:
        """Any thread, while the engine steps: the level's stream batch, prepared for the
        current sources (and on a GPU its CUDA graph captured, compiled with --compile), on a
        CUDA stream of its own. It joins the levels only once its work on the device is done
        and the sources it was prepared for are still the engine's (else it is prepared again)."""
        with self._making:
            if level in self._denoisers:
                return
            with torch.cuda.stream(self._build_stream) if self._build_stream is not None else nullcontext():
                denoiser = self._new_denoiser(*self._ladder[level])
                prepared_for = None
                while True:
                    if self._build_stream is not None:
                        self._build_stream.synchronize()
                    with self._levels_lock:
                        if prepared_for is self._sources:
                            self._denoisers[level] = denoiser
                            return
                        prepared_for = self._sources
                    if self._build_stream is not None:  # the sources were made on the engine's stream
                        self._build_stream.wait_stream(torch.cuda.default_stream(self.device))
                    self._prepare(denoiser, prepared_for)

    def set_quality(self, level: int) -> None:
        """Between frames: the stream continues on that level's batch, empty (its frames in
        flight at the old level are dropped; the first leaves steps - 1 frames later)."""
        if level not in self._denoisers:
            self.make_quality(level)
        if self._denoisers[level] is not self.denoiser:
            self.denoiser = self._denoisers[level]
            self.denoiser.reset()
        self._level = level
        self.latency_frames = self._latency_frames(self._ladder[level][0])

    def set_ticks_per_frame(self, ticks: int | str) -> None:
        """Between frames: 1, 2 or "auto" ticks per frame from now on (as LiveOptions'
        ticks_per_frame); every level's batch and graph stay as they are."""
        self.options = replace(self.options, live=replace(self.options.live, ticks_per_frame=ticks))  # validated
        self.pacer = TickPacer() if ticks == "auto" else None
        self._most_ticks = AUTO_TICKS if ticks == "auto" else ticks
        if self.pacer is not None and self._tick_done is None and self.device.type == "cuda":
            self._tick_done = torch.cuda.Event()
        self.latency_frames = self._latency_frames(self._ladder[self._level][0])

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

    def _take(self, leaving):
        """The leaving frame's image, on its way to the host if that frame was not shown yet
        (a frame's repeats leave after it): its (number, tag), else None. The copy is queued
        behind the tick that decoded it, so the next tick may be queued before it is done."""
        if leaving is None or leaving[1][0] <= self._shown:
            return None
        self._shown = leaving[1][0]
        cuda = self._out_copied is not None
        self._host_out.copy_(self.denoiser.image, non_blocking=cuda)
        if cuda:
            self._out_copied.record()
        return leaving[1]

    def _rendered(self, taken) -> Rendered | None:
        if taken is None:
            return None
        if self._out_copied is not None:
            self._out_copied.synchronize()  # the one wait per frame: for the shown frame's tick, not later ones
        return Rendered(self._host_out.numpy(), taken[1])

    def _tick_finished(self) -> float:
        """When the tick just queued finished (auto measures it): on a GPU, waits for it."""
        if self._tick_done is not None:
            self._tick_done.record()
            self._tick_done.synchronize()
        return time.perf_counter()

    def step(self, frame: DrivingFrame) -> Rendered | None:
        if not self.denoiser.prepared:
            raise EngineError("prepare() the engine with a source first")
        if frame.image is None:
            raise EngineError("the xportrait engine needs the aligned driving image")
        t0 = time.perf_counter()
        pacer = self.pacer
        if pacer is not None:
            pacer.start(frame.time, t0)
        self._serial += 1
        entry = (self._serial, frame.tag)
        taken = self._take(self._tick(self._staged(frame), entry))
        ticks, first_done = 1, None
        while ticks < self._most_ticks:
            if pacer is not None:
                done = self._tick_finished()
                first_done = first_done or done
                if not pacer.another(done):
                    break
            taken = self._take(self.denoiser.tick_again(entry)) or taken  # the same frame, on the device already
            ticks += 1
        out = self._rendered(taken)
        self.last_ticks = ticks
        t1 = time.perf_counter()
        self._timings.record("engine", (t1 - t0) * 1e3)
        if pacer is not None:  # what auto's extra ticks took: room the frame interval had, not the frame's cost
            self._timings.record("spare", (t1 - first_done) * 1e3 if ticks > 1 else 0.0)
        self._timings.steps += 1
        return out

    def flush(self) -> list[Rendered]:
        """Every frame still in flight and not shown yet, in order (repeats run out unseen)."""
        out = []
        for _ in range(self.denoiser.entries - max(self.last_ticks, 1)):  # the last frame's first copy leaves last
            rendered = self._rendered(self._take(self._tick(None)))
            if rendered is not None:
                out.append(Rendered(rendered.image.copy(), rendered.tag))
        return out

    def reset(self) -> None:
        self.denoiser.reset()
        if self.pacer is not None:
            self.pacer.reset()
