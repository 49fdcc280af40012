"""Run the streaming engine's modules from exported graphs instead of torch.

`GraphModel` has the part of `XPortraitModel`'s interface that `StreamingDenoiser` calls
(`config`, `encode`, `decode`, `reference_features`, `predict_noise`), and runs each from its
graph through a `Runner`: ONNX Runtime here (`OrtRunner`), TensorRT in tensorrt.py. So a
denoiser is pointed at a backend with `StreamingDenoiser(GraphModel(...), settings, ...)`,
and `stream_engine` puts one under the live engine.

Tensors cross as torch tensors: ONNX Runtime gets numpy views of them (free on the CPU),
TensorRT binds their device memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch

from engines.base import EngineError
from engines.xportrait.config import XPortraitConfig

from engines.xportrait.stream import StreamingDenoiser
from engines.xportrait.temporal import RingTick, TemporalRing

from .graphs import GRAPHS, KV_PARTS
from .onnx_export import ExportError, file_hash, read_manifest

BACKENDS = ("torch", "onnx", "tensorrt")


class Runner(Protocol):
    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The graph's outputs, in manifest order, for its inputs in manifest order."""


NUMPY_TYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
               "bool": torch.bool}


class OrtRunner:
    """One graph in an onnxruntime InferenceSession. On a CPU the inputs are numpy views of the
    torch tensors and the outputs torch views of ORT's arrays: no copies either way."""

    def __init__(self, path: Path, entry: dict, providers: list[str], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.names = [i["name"] for i in entry["inputs"]]
        self.types = [NUMPY_TYPES[i["dtype"]] for i in entry["inputs"]]
        self.outputs = [o["name"] for o in entry["outputs"]]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {name: t.detach().to("cpu", dtype).contiguous().numpy()
                 for name, dtype, t in zip(self.names, self.types, inputs)}
        return [torch.from_numpy(o) for o in self.session.run(self.outputs, feeds)]


def ort_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EngineError("--backend onnx on a GPU needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                              f"this onnxruntime offers {', '.join(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def config_from_manifest(manifest: dict) -> XPortraitConfig:
    return XPortraitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items()})


def verify_files(graph_dir: Path, manifest: dict) -> None:
    """Every graph the manifest lists is there, unchanged (its sha256 matches)."""
    for name in GRAPHS:
        entry = manifest["graphs"].get(name)
        if entry is None:
            raise ExportError(f"{graph_dir}: the manifest lists no {name} graph (export all graphs)")
        files = [graph_dir / entry["file"]] + ([graph_dir / entry["external_data"]] if entry["external_data"] else [])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{graph_dir}: missing {', '.join(missing)}: export again")
        if file_hash(*files) != entry["graph_sha256"]:
            raise ExportError(f"{graph_dir / entry['file']}: changed since export (sha256 differs from the manifest)")


class GraphModel:
    """XPortraitModel's streaming interface, run from exported graphs by `runners`."""

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

    # -- XPortraitModel's interface ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._out(self.runners["vae_encoder"]([images]))[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, small: bool = False) -> torch.Tensor:
        if small:
            raise EngineError("no small-decoder graph is exported: decode with the VAE decoder graph")
        return self._out(self.runners["vae_decoder"]([latents]))[0]

    @torch.no_grad()
    def reference_features(self, source_latents: Sequence[torch.Tensor], timestep: torch.Tensor):
        latents = torch.cat(list(source_latents))
        t = torch.as_tensor(timestep, device=latents.device).reshape(1).long()
        out = self._out(self.runners["reference"]([latents, t]))
        return {name: (out[2 * i], out[2 * i + 1]) for i, name in enumerate(self.layers)}

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
                      temporal_past=None, temporal_record=None) -> torch.Tensor:
        """As XPortraitModel.predict_noise for the streaming call: one frame per sample
        (`frames` 1), no guidance, `temporal_past` the stream's TemporalRings (into which the
        current frames' keys/values are written at the tick's slot, as the torch model does),
        or None for no past."""
        if frames != 1 or guidance != 1.0 or temporal_record is not None:
            raise EngineError("exported graphs run the streaming call only (frames=1, guidance=1, temporal rings)")
        b = sample.shape[0]
        t = self._timesteps(timestep, b)
        down, mid = self.controls(sample, t, pose_hint, local_hint)
        refs = []
        for name in self.layers:
            k, v = reference[name]
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


def load_onnx(graph_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32, verify: bool = True,
              threads: int | None = None) -> GraphModel:
    """A GraphModel running every graph of `graph_dir` through ONNX Runtime (CUDA EP on a GPU)."""
    graph_dir = Path(graph_dir)
    manifest = read_manifest(graph_dir)
    if verify:
        verify_files(graph_dir, manifest)
    providers = ort_providers(torch.device(device))
    runners = {name: OrtRunner(graph_dir / manifest["graphs"][name]["file"], manifest["graphs"][name], providers,
                               threads) for name in GRAPHS}
    return GraphModel(manifest, runners, device, dtype)


def load_backend(backend: str, graph_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32, **kw):
    if backend == "onnx":
        return load_onnx(graph_dir, device, dtype, **kw)
    if backend == "tensorrt":
        from .tensorrt import load_tensorrt

        return load_tensorrt(graph_dir, device, dtype, **kw)
    raise EngineError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def use_backend(engine, backend: str, graph_dir: str | Path, **kw):
    """Point a live XPortraitStreamEngine's denoiser at exported graphs (no CUDA graph capture:
    the runtime owns the launches). Returns the engine."""
    if backend == "torch":
        return engine
    model = load_backend(backend, graph_dir, engine.device, engine.dtype, **kw)
    old = engine.denoiser
    if model.config.resolution != engine.size:
        raise EngineError(f"{graph_dir}: graphs are for {model.config.resolution} px, the engine is {engine.size} px")
    denoiser = StreamingDenoiser(model, old.settings, engine.device, engine.dtype)
    denoiser.decode = old.decode
    denoiser.small_decoder = False  # no small-decoder graph
    engine.denoiser = denoiser
    engine.model = model
    engine.cuda_graph = engine.compile = False
    return engine


def live_engine_options(args) -> dict:
    """engines.engine_options(args, live=True) with --backend resolved: for onnx/tensorrt the
    exported graphs, loaded here, become the engine's model (engines cannot import export)."""
    from engines import engine_options
    from engines.xportrait.engine import pick_device

    options = engine_options(args, live=True)
    backend, graphs = options.pop("backend", "torch"), options.pop("graphs", None)
    if backend != "torch":
        options["model"] = load_backend(backend, graphs, pick_device(options.get("device")))
    return options
