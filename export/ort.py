"""ONNX Runtime: one InferenceSession per exported graph, as the `Runner`s of a GraphModel
(graph_model.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from engines.base import EngineError

from .manifest import GRAPHS

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


def ort_runners(graph_dir: Path, manifest: dict, device: torch.device, threads: int | None = None) -> dict[str, OrtRunner]:
    """One runner per graph of `graph_dir` (CUDA EP on a GPU)."""
    providers = ort_providers(device)
    return {name: OrtRunner(graph_dir / manifest["graphs"][name]["file"], manifest["graphs"][name], providers, threads)
            for name in GRAPHS}
