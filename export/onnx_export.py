"""Export every module of the streaming engine to ONNX, with a manifest.

One graph per module, as the streaming tick calls it (graphs.py says which tensors, in which
order). Each graph is traced by the TorchScript exporter in fp32 at the stream's shapes, with
the batch, the temporal past, the number of sources and the reference tokens left symbolic,
and passes `onnx.checker`. Graphs whose weights exceed `external_data_threshold` (protobuf's
2 GB limit: the SD1.5 UNet is 3.4 GB in fp32) keep them in one external file beside the graph.

`manifest.json` records, per graph, what the graph itself declares (input and output names,
shapes with symbolic axes by name, element types), the concrete shapes it was traced at, the
sha256 of the weights that produced it and of the graph files, and the opset.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from engines.xportrait.model import XPortraitModel

from .graphs import example_inputs, reference_layers, register_symbolics, specs, temporal_count, wrappers
from .manifest import FORMAT, GRAPHS, MANIFEST, ExportError, file_hash

OPSET = 17
TWO_GB = 2**31  # protobuf's limit on one serialised message


def weights_hash(module: nn.Module) -> str:
    """sha256 over every tensor the module holds (name, dtype, shape, bytes), in name order:
    what a graph traced from this module bakes in."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


ELEMENT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                 onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}


def describe_values(values) -> list[dict]:
    """Name, shape (ints, or the symbolic axis' name) and element type of graph inputs/outputs."""
    out = []
    for v in values:
        tensor = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": ELEMENT_TYPES.get(tensor.elem_type, str(tensor.elem_type))})
    return out


def _weights_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for t in proto.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
    return total


def export_graph(module: nn.Module, inputs: tuple, spec, path: Path, opset: int = OPSET,
                 external_data_threshold: int = TWO_GB) -> dict:
    """Trace one wrapper to `path` (plus `path`.data if its weights exceed the threshold),
    check it, and describe it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on python-side shape arithmetic
            torch.onnx.export(module, inputs, str(raw), input_names=spec.inputs, output_names=spec.outputs,
                              dynamic_axes=spec.dynamic_axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        proto = onnx.load(str(raw))  # joins whatever external files the exporter wrote
        external = _weights_bytes(proto) > external_data_threshold
        for stale in (path, path.with_name(data_name)):
            stale.unlink(missing_ok=True)
        onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    del proto
    try:
        onnx.checker.check_model(str(path))  # by path: works past 2 GB, checks external files
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name}: the exported graph does not pass onnx.checker: {e}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    files = [path] + ([path.with_name(data_name)] if external else [])
    return {
        "file": path.name,
        "external_data": data_name if external else None,
        "bytes": sum(f.stat().st_size for f in files),
        "graph_sha256": file_hash(*files),
        "weights_sha256": weights_hash(module),
        "inputs": describe_values(graph.input),
        "outputs": describe_values(graph.output),
        "traced_shapes": {name: list(t.shape) for name, t in zip(spec.inputs, inputs)},
    }


def export_all(model: XPortraitModel, out_dir: str | Path, steps: int, window: int,
               progress: Callable[[str], None] | None = None, opset: int = OPSET,
               external_data_threshold: int = TWO_GB, graphs=GRAPHS, show_progress: bool = False) -> dict:
    """Every graph of the streaming engine into `out_dir`, and `manifest.json` describing them.

    `model` must be in fp32 (graphs are fp32; runtimes lower precision themselves). Returns
    the manifest."""
    if steps < 1:
        raise ExportError("steps must be at least 1")
    if not 1 <= window <= model.config.motion_max_len:
        raise ExportError(f"window must be in [1, {model.config.motion_max_len}], got {window}")
    if next(model.parameters()).dtype != torch.float32:
        raise ExportError("export from an fp32 model (runtimes choose their own precision)")
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise ExportError(f"unknown graphs {sorted(unknown)}; the graphs are {', '.join(GRAPHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    register_symbolics(opset)
    model = model.eval()
    spec = specs(model)
    modules = wrappers(model)
    # Two sources (and two frames for the VAE): traced at batch 1, some of diffusers' shape
    # arithmetic folds into constants and the graph would take one only.
    inputs = example_inputs(model, steps, window, sources=2)
    manifest = {
        "format": FORMAT,
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "config": asdict(model.config),
        "steps": steps,
        "window": window,
        "reference_layers": reference_layers(model),
        "temporal_modules": temporal_count(model),
        "graphs": {},
    }
    chosen = [g for g in GRAPHS if g in graphs]
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc="export", unit="graph")
    try:
        for name in chosen:
            if bar is not None:
                bar.set_postfix_str(name)
            if progress:
                progress(name)
            t0 = time.perf_counter()
            entry = export_graph(modules[name], inputs[name], spec[name], out / f"{name}.onnx", opset,
                                 external_data_threshold)
            entry["export_s"] = round(time.perf_counter() - t0, 2)
            manifest["graphs"][name] = entry
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    text = json.dumps(manifest, indent=1)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / MANIFEST)  # a manifest is only ever complete
    return json.loads(text)  # as a reader sees it
