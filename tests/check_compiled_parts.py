"""On the CPU (not part of the suite: ~6 minutes on 2 cores cold, ~1.5 from inductor's cache):
the split tick's parts through torch.compile as `StreamingDenoiser.capture(compile=True)`
compiles them (inductor's CPU backend here, Triton's on a GPU), with `--deep-levels 0` beside
and in one batch, on the tiny model: no graph break, one graph a part and a shape (no
recompiles from the row runs), and the frames of the uncompiled parts. A check before spending
device time on a compiled bench.

    PYTHONPATH=. python tests/check_compiled_parts.py [--reuse-controls] [--token-downsample N]

With --reuse-controls the ControlNets walk the deep entry only (their residuals held for the rest).
With --token-downsample the reference attention at the latents' size pools its keys (the same graphs).
Exits 1 with what differs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from fixtures import compact_config, tiny_model
from test_xportrait_stream import RES, inputs
from torch._dynamo.utils import counters

from engines.xportrait.stream import StreamingDenoiser, StreamSettings

OPTIONS = {"conv_1x1_as_mm": True, "freezing": True}  # capture()'s
# Parts a tick calls: enter, finish, two embeddings, then beside: each ControlNet's first level on
# two runs and its deeper levels, the UNet's first level on two runs, down and up the deep
# levels, its last level on two runs; in one batch: both ControlNets, down, up. With reused controls
# each ControlNet's first level on the deep run only: two graphs fewer beside.
GRAPHS = {True: 16, False: 8}


def frames(denoiser: StreamingDenoiser, sources, driving, boxes) -> torch.Tensor:
    denoiser.prepare(sources)
    out = []
    with torch.no_grad():
        for i in range(len(driving) + denoiser.entries - 1):
            entering = i < len(driving)
            leaving = denoiser.tick(driving[i] if entering else None, boxes[i] if entering else None)
            if leaving is not None:
                out.append(leaving[0].clone())
    return torch.cat(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse-controls", action="store_true")
    parser.add_argument("--token-downsample", type=int, default=1)
    args = parser.parse_args()
    reuse = args.reuse_controls
    graphs_of = {True: GRAPHS[True] - 2 * reuse, False: GRAPHS[False]}
    torch.set_num_threads(1)
    model = tiny_model(RES, config=compact_config(RES))
    sources, driving, boxes = inputs(6)
    settings = StreamSettings(steps=4, window=4, deep_levels=(0,), reuse_controls=reuse,
                              token_downsample=args.token_downsample)
    rendered, failures = {}, []
    for beside in (True, False):
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=True,
                                         reused_beside=beside)
            if compiled:  # what _advance runs: the compiled parts, as capture() makes them
                denoiser._parts = denoiser._split_parts(lambda fn: torch.compile(fn, dynamic=False, options=OPTIONS))
            begin = time.perf_counter()
            rendered[beside, compiled] = frames(denoiser, sources, driving, boxes)
            graphs, breaks = counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
            print(f"beside {beside}, compiled {compiled}: {time.perf_counter() - begin:.0f} s, {graphs} graphs, "
                  f"{breaks} graph breaks {dict(counters['graph_break'])}", flush=True)
            if compiled and (breaks or graphs != graphs_of[beside]):
                failures.append(f"beside {beside}: {graphs} graphs (expected {graphs_of[beside]}), {breaks} breaks")
    scale = rendered[False, False].abs().max().item()
    checks = (("beside, compiled against eager", (True, True), (True, False), 1e-3),
              ("one batch, compiled against eager", (False, True), (False, False), 1e-3),
              ("compiled, beside against one batch", (True, True), (False, True), 1e-5))
    for name, a, b, tolerance in checks:
        a, b = rendered[a], rendered[b]
        error = (a - b).abs().max().item() / scale
        print(f"{name}: max difference {error:.2e} of the largest value", flush=True)
        if error > tolerance:
            failures.append(f"{name}: {error:.2e} > {tolerance:g}")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
