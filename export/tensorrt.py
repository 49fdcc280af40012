"""TensorRT engines from the exported graphs, and a backend that runs them on torch CUDA tensors.

Thin by design, written to TensorRT 10's Python API: parse the ONNX graph
(`OnnxParser.parse_from_file`, which reads external weights), build in fp16 with one
optimisation profile spanning the shapes the streaming engine uses, serialise, and cache the
plan on disk under a key of (graph sha256, profile shapes, GPU name, TensorRT version): a
changed weight changes the graph's hash and so the key, and a stale plan is never loaded.
At run time inputs and outputs are bound by the device addresses of torch tensors
(`set_tensor_address`), on torch's current stream: no host copies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from engines.base import EngineError

from .manifest import GRAPHS

INSTALL_HINT = ("--backend tensorrt needs NVIDIA TensorRT 10 for Python and a CUDA GPU: "
                "pip install 'tensorrt>=10' (wheels come from NVIDIA's index, https://pypi.nvidia.com), "
                "or pip install 'xportrait[tensorrt]'")
MAX_SOURCES = 4  # reference portraits a plan accepts


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return tensorrt


def engine_key(graph_sha256: str, shapes: dict, gpu_name: str, trt_version: str) -> str:
    """The cache key of a built plan: everything a plan depends on."""
    blob = json.dumps({"graph": graph_sha256, "shapes": shapes, "gpu": gpu_name, "tensorrt": trt_version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def profile_shapes(entry: dict, max_sources: int = MAX_SOURCES) -> dict[str, list[list[int]]]:
    """[min, opt, max] per input: the traced shape, with each symbolic axis spanning what the
    streaming engine feeds. The batch (LCM steps) and the window are those exported; the
    sources (and reference tokens, which grow with them) go from 1 to `max_sources`; the VAE
    takes 1 frame to `max_sources`; the ring slot count stays the window."""
    traced = entry["traced_shapes"]
    out = {}
    for value in entry["inputs"]:
        name, shape = value["name"], traced[value["name"]]
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, dim in enumerate(value["shape"]):
            if not isinstance(dim, str):
                continue
            if dim in ("sources", "frames") or dim.startswith("reference_tokens_"):
                per = shape[axis] // 2  # traced at two sources (two frames for the VAE)
                lo[axis], opt[axis], hi[axis] = per, per, per * max_sources
        out[name] = [lo, opt, hi]
    return out


def build_engine(graph_path: Path, entry: dict, cache_dir: Path, max_sources: int = MAX_SOURCES) -> bytes:
    """The fp16 plan for one graph, from the cache or built (and cached)."""
    trt = require_tensorrt()
    shapes = profile_shapes(entry, max_sources)
    key = engine_key(entry["graph_sha256"], shapes, torch.cuda.get_device_name(), trt.__version__)
    plan_path = cache_dir / f"{graph_path.stem}-{key}.plan"
    if plan_path.is_file():
        return plan_path.read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {graph_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine from {graph_path} (see its log above)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(plan))
    os.replace(tmp, plan_path)
    return plan_path.read_bytes()


class TrtRunner:
    """One engine: binds torch CUDA tensors by address and runs on torch's current stream.
    Outputs are allocated once per input shape and reused (valid until the next call)."""

    def __init__(self, plan: bytes, entry: dict):
        trt = require_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.inputs = [i["name"] for i in entry["inputs"]]
        self.outputs = [o["name"] for o in entry["outputs"]]
        self._types = {name: self._torch_type(self.engine.get_tensor_dtype(name)) for name in self.inputs + self.outputs}
        self._buffers: dict[tuple, list[torch.Tensor]] = {}

    def _torch_type(self, dtype) -> torch.dtype:
        trt = self.trt
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                trt.int32: torch.int32, trt.bool: torch.bool}[dtype]

    def __call__(self, inputs) -> list[torch.Tensor]:
        bound = []
        for name, tensor in zip(self.inputs, inputs):
            t = tensor.to(self._types[name]).contiguous()  # a device cast where the dtypes differ
            bound.append(t)  # alive until the launch is queued
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        key = tuple(tuple(t.shape) for t in bound)
        if key not in self._buffers:
            device = bound[0].device
            self._buffers[key] = [torch.empty(tuple(self.context.get_tensor_shape(name)), device=device,
                                              dtype=self._types[name]) for name in self.outputs]
        outputs = self._buffers[key]
        for name, t in zip(self.outputs, outputs):
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError("TensorRT failed to enqueue the engine")
        return list(outputs)


def trt_runners(graph_dir: Path, manifest: dict, device: torch.device, cache_dir: str | Path | None = None,
                max_sources: int = MAX_SOURCES) -> dict[str, TrtRunner]:
    """One TensorRT engine per graph of `graph_dir` (built once, cached under `cache_dir`,
    default `graph_dir`/tensorrt), as the runners of a GraphModel (graph_model.py)."""
    require_tensorrt()
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineError("--backend tensorrt runs on a CUDA GPU: none is available to torch here")
    cache = Path(cache_dir) if cache_dir else graph_dir / "tensorrt"
    runners = {}
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        runners[name] = TrtRunner(build_engine(graph_dir / entry["file"], entry, cache, max_sources), entry)
    return runners
