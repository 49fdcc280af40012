"""Run the streaming engine's modules from exported graphs instead of torch.

`GraphModel` meets the `DenoiserModel` protocol that `StreamingDenoiser` runs
(engines/xportrait/stream.py) and runs each call from its graph through a `Runner`: ONNX
Runtime (ort.py) or TensorRT (tensorrt.py); those two know nothing of each other, or of this
module. `graph_model(options)` loads what `--backend onnx|tensorrt --graphs DIR` name, for
`create_engine(options, model=...)`: engines do not import export.

Tensors cross as torch tensors: ONNX Runtime gets numpy views of them (free on the CPU),
TensorRT binds their device memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch

from engines.base import EngineError
from engines.options import BACKENDS, XPortraitOptions
from engines.xportrait.config import XPortraitConfig
from engines.xportrait.reference import LayerKV
from engines.xportrait.temporal import RingTick, TemporalRing

from .manifest import KV_PARTS, read_manifest, verify_files


class Runner(Protocol):
    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The graph's outputs, in manifest order, for its inputs in manifest order."""


def config_from_manifest(manifest: dict) -> XPortraitConfig:
    return XPortraitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items()})


class GraphModel:
    """A `DenoiserModel` (engines/xportrait/stream.py): XPortraitModel's streaming interface,
    run from exported graphs by `runners` (one per graph, in GRAPHS)."""

    def __init__(self, manifest: dict, runners: dict[str, Runner], device, dtype: torch.dtype):
        self.manifest = manifest
        self.config = config_from_manifest(manifest)
        self.runners = runners
        self.device, self.dtype = torch.device(device), dtype
        self.layers: list[str] = manifest["reference_layers"]
        self.modules: int = manifest["temporal_modules"]
        traced = manifest["graphs"]["denoiser"]["traced_shapes"]
        batch = traced["sample"][0]
        # Per temporal module: (latent pixels, channels, heads), from the shapes it was traced at.
        self.temporal_shapes = []
        for m in range(self.modules):
            rows, heads, _, head_dim = traced[f"ring_{m}_key1"]
            self.temporal_shapes.append((rows // batch, heads * head_dim, heads))
        self._no_past: dict[tuple, list] = {}

    def _out(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device) for t in tensors]

    # -- the DenoiserModel protocol ----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._out(self.runners["vae_encoder"]([images]))[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._out(self.runners["vae_decoder"]([latents]))[0]

    @torch.no_grad()
    def reference_features(self, source_latents: Sequence[torch.Tensor], timestep: torch.Tensor,
                           token_downsample: int = 1):
        if token_downsample != 1:
            raise EngineError("exported graphs attend over every token (no --token-downsample)")
        latents = torch.cat(list(source_latents))
        t = torch.as_tensor(timestep, device=latents.device).reshape(1).long()
        out = self._out(self.runners["reference"]([latents, t]))
        return {name: LayerKV(out[2 * i], out[2 * i + 1]) for i, name in enumerate(self.layers)}

    @torch.no_grad()
    def controls(self, sample: torch.Tensor, timestep: torch.Tensor, pose_hint: torch.Tensor,
                 local_hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        t = self._timesteps(timestep, sample.shape[0])
        pose = self.runners["pose_controlnet"]([sample, t, pose_hint])
        local = self.runners["local_controlnet"]([sample, t, local_hint])
        summed = [p.add_(l) for p, l in zip(pose, local)]  # the model adds them unscaled
        return summed[:-1], summed[-1]

    @torch.no_grad()
    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, frames: int, reference,
                      pose_hint: torch.Tensor, local_hint: torch.Tensor, guidance: float = 1.0,
                      temporal_past=None) -> torch.Tensor:
        """As XPortraitModel.predict_noise for the streaming call: one frame per sample
        (`frames` 1), no guidance, `temporal_past` the stream's TemporalRings (into which the
        current frames' keys/values are written at the tick's slot, as the torch model does),
        or None for no past."""
        if frames != 1 or guidance != 1.0:
            raise EngineError("exported graphs run the streaming call only (frames=1, guidance=1, temporal rings)")
        b = sample.shape[0]
        t = self._timesteps(timestep, b)
        down, mid = self.controls(sample, t, pose_hint, local_hint)
        refs = []
        for name in self.layers:
            k, v, pool = reference[name]
            if pool is not None:
                raise EngineError("exported graphs attend over every token (no --token-downsample)")
            if k.shape[0] != b:  # one set broadcast over the batch (the graph takes one per sample)
                k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)
            refs += [k, v]
        rings = temporal_past if temporal_past is not None else self._empty_rings(sample)
        if len(rings) != self.modules or not all(isinstance(r, TemporalRing) for r in rings):
            raise EngineError(f"the denoiser graph takes {self.modules} TemporalRings")
        tick = rings[0].tick
        inputs = [sample, t, *down, mid, *refs, *[x for r in rings for x in r.tensors],
                  tick.slot, tick.mask, tick.positions]
        out = self._out(self.runners["denoiser"](inputs))
        for m, ring in enumerate(rings):  # what the torch model writes in place
            for tensor, record in zip(ring.tensors, out[1 + 4 * m : 5 + 4 * m]):
                tensor.index_copy_(2, tick.slot, record)
        return out[0]

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _timesteps(timestep: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(timestep).reshape(-1)
        return (t.expand(batch) if t.numel() == 1 else t).long()

    def _empty_rings(self, sample: torch.Tensor) -> list[TemporalRing]:
        """No past: rings of one slot, the current frame's own: plain attention over it."""
        b, device = sample.shape[0], sample.device
        key = (b, device)
        if key not in self._no_past:
            tick = RingTick(torch.zeros(1, dtype=torch.long, device=device),
                            torch.ones(b, 1, dtype=torch.bool, device=device),
                            torch.zeros(b, 1, dtype=torch.long, device=device))
            self._no_past[key] = [TemporalRing(tuple(torch.zeros(b * pixels, heads, 1, channels // heads,
                                                                 device=device, dtype=sample.dtype)
                                                     for _ in KV_PARTS), tick)
                                  for pixels, channels, heads in self.temporal_shapes]
        return self._no_past[key]


def load_graphs(graph_dir: str | Path, backend: str = "onnx", device="cpu", dtype: torch.dtype = torch.float32,
                verify: bool = True, **kw) -> GraphModel:
    """A GraphModel running every graph of `graph_dir` on `backend`: "onnx" (ONNX Runtime; its
    CUDA EP on a GPU; `threads`), or "tensorrt" (engines built once and cached; `cache_dir`,
    `max_sources`)."""
    if backend == "onnx":
        from .ort import ort_runners as runners
    elif backend == "tensorrt":
        from .tensorrt import trt_runners as runners
    else:
        raise EngineError(f"unknown backend {backend!r}; the graph backends are: {', '.join(BACKENDS[1:])}")
    graph_dir = Path(graph_dir)
    manifest = read_manifest(graph_dir)
    if verify:
        verify_files(graph_dir, manifest)
    return GraphModel(manifest, runners(graph_dir, manifest, torch.device(device), **kw), device, dtype)


def graph_model(options: XPortraitOptions) -> GraphModel | None:
    """The exported graphs the live options name (--backend onnx|tensorrt --graphs DIR), on
    the options' device; None for the torch backend (the engine loads the torch model)."""
    from engines.xportrait.runtime import pick_device

    live = options.live
    if live is None or live.backend == "torch":
        return None
    model = load_graphs(live.graphs, live.backend, pick_device(options.device))
    if model.config.resolution != options.size:
        raise EngineError(f"--graphs {live.graphs}: the graphs are for {model.config.resolution} px, "
                          f"--size is {options.size}")
    return model
