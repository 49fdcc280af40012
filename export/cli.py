"""`xportrait export`: every module of the streaming engine to ONNX, with a manifest.

    xportrait export --to DIR [--size 512] [--steps 4] [--window 16] (--checkpoint ... --base ... | --random-weights)

The graphs are the live engine's: its LCM steps (the stream batch) and temporal window.

With `--compare`, each graph then runs through ONNX Runtime next to the torch module on the
same inputs: the largest relative difference and the milliseconds per call of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from engines import EngineError
from engines.options import DEFAULT_WINDOW
from streamer.options import add_engine_arguments, export_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, metavar="DIR", help="folder for the graphs and manifest.json")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"temporal window of the stream (default: {DEFAULT_WINDOW})")
    parser.add_argument("--compare", action="store_true",
                        help="after export, run every graph in ONNX Runtime next to torch: difference and ms per call")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per module for --compare (default: 5)")
    add_engine_arguments(parser, choose_engine=False)  # --size, the weights, --steps, --seed


def compare(model, graph_dir: Path, steps: int, window: int, repeat: int, out=sys.stdout) -> dict[str, dict]:
    """Per graph: max relative difference of ONNX Runtime against torch, and the median ms
    per call of each, on the traced inputs, in this process."""
    from .graph_model import load_graphs
    from .graphs import example_inputs, wrappers

    runners = load_graphs(graph_dir, "onnx").runners
    modules = wrappers(model)
    inputs = example_inputs(model, steps, window, sources=1)
    results = {}
    print(f"{'graph':18s} {'max rel diff':>12s} {'torch ms':>9s} {'onnxrt ms':>9s}", file=out)
    for name, module in modules.items():
        args = inputs[name]
        with torch.no_grad():
            expected = module(*args)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = runners[name](args)
            diff = max(float((g - e).abs().max() / e.abs().max().clamp(min=1e-12)) for g, e in zip(got, expected))

            def median_ms(fn) -> float:
                fn()  # warm-up
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
                return statistics.median(times)

            torch_ms = median_ms(lambda: module(*args))
            ort_ms = median_ms(lambda: runners[name](args))
        results[name] = {"max_rel_diff": diff, "torch_ms": torch_ms, "onnxruntime_ms": ort_ms}
        print(f"{name:18s} {diff:12.2e} {torch_ms:9.2f} {ort_ms:9.2f}", file=out)
    return results


def run(args: argparse.Namespace) -> int:
    options = export_options(args)
    from engines.xportrait.weights import WeightsError, load_model
    from engines.xportrait.runtime import model_config

    from .onnx_export import export_all

    engine, out = options.engine, Path(options.to)
    if out.exists() and not out.is_dir():
        print(f"xportrait export: --to {out}: not a folder", file=sys.stderr)
        return 2
    steps, window = engine.stream_steps, engine.window
    try:
        t0 = time.perf_counter()
        model = load_model(model_config(engine.model_size, engine.size), dtype=torch.float32, device="cpu",
                           **engine.weights)
        print(f"model loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        manifest = export_all(model, out, steps=steps, window=window, show_progress=True)
    except WeightsError as e:  # missing or unusable weights: bad input
        print(f"xportrait export: {e}", file=sys.stderr)
        return 2
    except (EngineError, OSError) as e:
        print(f"xportrait export: {e}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    for name, entry in manifest["graphs"].items():
        external = f" + {entry['external_data']}" if entry["external_data"] else ""
        print(f"{name:18s} {entry['bytes'] / 2**20:9.1f} MiB  {entry['export_s']:6.1f} s  {entry['file']}{external}")
    print(f"exported {len(manifest['graphs'])} graphs to {out} in {total:.1f} s (opset {manifest['opset']}, "
          f"{steps} steps, window {window}, {engine.size} px)")
    if options.compare:
        compare(model, out, steps, window, options.repeat)
    return 0
