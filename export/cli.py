"""`xportrait export`: every module of the streaming engine to ONNX, with a manifest.

    xportrait export --to DIR [--size 512] [--steps 4] [--window 16] (--checkpoint ... --base ... | --random-weights)

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

from engines import EngineError, add_engine_arguments

DEFAULT_STEPS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, metavar="DIR", help="folder for the graphs and manifest.json")
    parser.add_argument("--size", type=int, default=512, help="square resolution the graphs take (default: 512)")
    parser.add_argument("--window", type=int, default=16, help="temporal window of the stream (default: 16)")
    parser.add_argument("--compare", action="store_true",
                        help="after export, run every graph in ONNX Runtime next to torch: difference and ms per call")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per module for --compare (default: 5)")
    add_engine_arguments(parser)  # weights (--checkpoint/--base/--lcm-lora or --random-weights), --steps, --seed


def compare(model, graph_dir: Path, steps: int, window: int, repeat: int, out=sys.stdout) -> dict[str, dict]:
    """Per graph: max relative difference of ONNX Runtime against torch, and the median ms
    per call of each, on the traced inputs, in this process."""
    from .backend import load_onnx
    from .graphs import example_inputs, wrappers

    runners = load_onnx(graph_dir).runners
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
    from engines.xportrait.config import XPortraitConfig
    from engines.xportrait.weights import load_model

    from .onnx_export import ExportError, export_all

    out = Path(args.to)
    if out.exists() and not out.is_dir():
        print(f"xportrait export: --to {out}: not a folder", file=sys.stderr)
        return 2
    if args.size < 64 or args.size % 8:
        print(f"xportrait export: --size must be a multiple of 8 and at least 64, got {args.size}", file=sys.stderr)
        return 2
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 1:
        print(f"xportrait export: --steps must be at least 1, got {steps}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("xportrait export: --repeat must be at least 1", file=sys.stderr)
        return 2
    config = (XPortraitConfig.tiny if args.model_size == "tiny" else XPortraitConfig.sd15)(resolution=args.size)
    if not args.random_weights and args.checkpoint is None:
        print("xportrait export: pass --checkpoint (the released model_state-*.th) and --base (SD1.5), "
              "or --random-weights", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        model = load_model(config, base=args.base, checkpoint=args.checkpoint, lcm_lora=args.lcm_lora,
                           random_weights=args.random_weights, seed=args.seed, dtype=torch.float32, device="cpu",
                           allow_hub=args.allow_hub, trust_checkpoint=args.trust_checkpoint)
        print(f"model loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        manifest = export_all(model, out, steps=steps, window=args.window, show_progress=True)
    except (EngineError, ExportError, OSError) as e:
        print(f"xportrait export: {e}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    for name, entry in manifest["graphs"].items():
        external = f" + {entry['external_data']}" if entry["external_data"] else ""
        print(f"{name:18s} {entry['bytes'] / 2**20:9.1f} MiB  {entry['export_s']:6.1f} s  {entry['file']}{external}")
    print(f"exported {len(manifest['graphs'])} graphs to {out} in {total:.1f} s (opset {manifest['opset']}, "
          f"{steps} steps, window {args.window}, {args.size} px)")
    if args.compare:
        compare(model, out, steps, args.window, args.repeat)
    return 0
