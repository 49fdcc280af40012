"""`xportrait bench --stream --profile DIR`: where the live tick's GPU time goes.

After the timed run, the engine's tick (the same work its CUDA graph replays, compiled when
--compile) runs a few more times without the graph under torch.profiler, so that every kernel
shows. The kernels are summed by kind (GEMMs, convolutions, attention, the temporal ring
attention, pointwise and reduction kernels, copies) per tick; the table says which kind
costs what and how many launches it takes. DIR gets the profile as JSON and the trace (open it
in Perfetto or chrome://tracing).

Kernels are sorted by their names as the libraries give them: cuBLAS (`nvjet_*`, `*gemm*`),
cuDNN convolutions (`*fprop*`, `implicit_gemm`), cuDNN/flash attention (`*sdpa*`, `fmha`,
`flash`), our Triton ring kernels (ring_kernels.py), inductor's fused kernels (`triton_poi_*`
pointwise, `triton_red_*`/`triton_per_*` reductions) and eager torch's (`at::native::...`).
Inductor names a fused kernel after the ops it fused (`triton_poi_fused_convolution_silu_2` is
pointwise work after a convolution), so Triton names are sorted before the library ones.

The profile records the operators' shapes too, so the matrix work (matrix products,
convolutions, attention) is also summed by operator and shape, with the rate each reaches
(TFLOP/s, from the shapes): which sit far below the GPU's matrix rate. And by the split tick's
parts (their profiler ranges): each part's kernel time against its FLOP, e.g. the deep walk at a
batch of one against the reused entries' first and last levels.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

RING_KERNELS = ("_attend_kernel", "_scores_kernel", "_values_kernel")  # engines/xportrait/ring_kernels.py


_ATEN_REDUCTIONS = ("reduce_kernel", "norm", "moments", "computefusedparams", "softmax")
_COPIES = ("memcpy", "memset", "direct_copy_kernel", "catarraybatchedcopy")


def kernel_category(name: str) -> str:
    """The kind of work a GPU kernel (or copy) does, from its name."""
    n = name.lower()
    if n.startswith(("memcpy", "memset")) or ("at::native" in n and any(c in n for c in _COPIES)):
        return "copies and memsets"
    if name in RING_KERNELS:
        return "ring attention (Triton)"
    if n.startswith(("triton_red", "triton_per")) or ("at::native" in n and any(r in n for r in _ATEN_REDUCTIONS)):
        return "reductions (norms, softmax)"
    if n.startswith("triton") or "at::native" in n:  # inductor's fused kernels, or eager torch's
        return "pointwise"
    if "sdpa" in n or "fmha" in n or "flash" in n:
        return "attention"
    if "fprop" in n or "implicit_gemm" in n or "conv" in n:
        return "convolutions"
    if "nvjet" in n or "gemm" in n or "gemv" in n or "cutlass" in n:
        return "GEMMs"
    return "other"


@dataclass
class TickProfile:
    ticks: int
    kernels_per_tick: float
    kernel_ms: float  # per tick, all streams summed
    by_category: dict[str, dict[str, float]]  # kind -> {"ms": per tick, "launches": per tick}
    by_stream_ms: dict[str, float]
    top: list[dict] = field(default_factory=list)  # the costliest kernels: name, kind, launches and us per tick
    # The costliest matrix operators by shape: op, shape, calls and us per tick, TFLOP/s (traces with shapes only)
    by_shape: list[dict] = field(default_factory=list)
    # The ring attention's kernels by launch grid (one grid per latent size): kernel, grid, calls per tick, us a call
    ring_by_grid: list[dict] = field(default_factory=list)
    # The tick's parts (the split tick's): part, calls, kernel ms, launches, GFLOP per tick, TFLOP/s
    by_part: list[dict] = field(default_factory=list)


def _mm_flop(dims: list[list[int]], first: int) -> tuple[float, str]:
    (*batch, m, k), (*_, n) = dims[first], dims[first + 1]
    b = batch[0] if batch else 1
    return 2.0 * b * m * k * n, (f"{b} x " if batch else "") + f"{m}x{k} @ {k}x{n}"


def _conv_flop(dims: list[list[int]], concrete: list) -> tuple[float, str]:
    (n, _, *size), (out, per_group, *kernel) = dims[0], dims[1]
    given = [json.loads(v) if isinstance(v, str) and v else v for v in concrete[3:6]]
    if len(given) < 3 or not all(isinstance(v, list) for v in given):  # not recorded: stride 1, "same" padding
        given = [[1] * len(kernel), [(k - 1) // 2 for k in kernel], [1] * len(kernel)]
    stride, padding, dilation = given
    spatial = 1
    for i, (x, k) in enumerate(zip(size, kernel)):
        spatial *= (x + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
    taps = 1
    for k in kernel:
        taps *= k
    label = "x".join(map(str, dims[0])) + " * " + "x".join(map(str, dims[1]))
    return 2.0 * n * out * spatial * per_group * taps, label + (f" /{stride[0]}" if stride[0] != 1 else "")


def _attention_flop(dims: list[list[int]]) -> tuple[float, str]:
    (b, h, queries, d), (*_, keys, _), (*_, dv) = dims[0], dims[1], dims[2]
    return 2.0 * b * h * queries * keys * (d + dv), f"{b}x{h} heads, {queries} q x {keys} k, d {d}"


MATRIX_OPS = {"aten::mm": lambda d, c: _mm_flop(d, 0), "aten::bmm": lambda d, c: _mm_flop(d, 0),
              "aten::addmm": lambda d, c: _mm_flop(d, 1), "aten::baddbmm": lambda d, c: _mm_flop(d, 1),
              "aten::_scaled_mm": lambda d, c: _mm_flop(d, 0), "aten::convolution": lambda d, c: _conv_flop(d, c)}


def _matrix_op(name: str):
    if name.startswith("aten::_scaled_dot_product_") and "attention" in name:  # cudnn, flash, efficient, math
        return lambda d, c: _attention_flop(d)
    return MATRIX_OPS.get(name)


def _op_label(name: str) -> str:
    """aten::addmm -> addmm; aten::_scaled_dot_product_cudnn_attention -> attention (cudnn)."""
    name = name.removeprefix("aten::")
    if name.startswith("_scaled_dot_product_"):
        backend = "_".join(w for w in name.removeprefix("_scaled_dot_product_").split("_") if w and w != "attention")
        return f"attention ({backend})" if backend else "attention"
    return name


class _Launches:
    """Which GPU kernels a host call launched: a kernel belongs to the call whose time holds its
    launch, on the same thread (the launch and the kernel share a correlation id)."""

    def __init__(self, events: list[dict]):
        self.kernel_us = {e["args"]["correlation"]: e["dur"] for e in events
                          if e.get("ph") == "X" and e.get("cat") == "kernel" and "correlation" in e.get("args", {})}
        self.by_thread: dict = defaultdict(list)  # host thread -> [(time, correlation)], in time order
        for e in events:
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("args", {}).get("correlation") in self.kernel_us:
                self.by_thread[e["tid"]].append((e["ts"], e["args"]["correlation"]))
        for calls in self.by_thread.values():
            calls.sort()

    def inside(self, call: dict) -> list[float]:
        """The durations (us) of the kernels `call` (a trace event) launched."""
        calls = self.by_thread.get(call["tid"], [])
        first = bisect.bisect_left(calls, (call["ts"], -1))
        last = bisect.bisect_right(calls, (call["ts"] + call["dur"], float("inf")))
        return [self.kernel_us[c] for _, c in calls[first:last]]


def _matrix_calls(events: list[dict]) -> list[tuple[dict, float, str]]:
    """The matrix operators' host calls (outermost: attention's math path runs products inside
    one), each with its FLOP and shape, in (thread, time) order. Needs a trace with shapes."""
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and _matrix_op(e.get("name", ""))
                  and e.get("args", {}).get("Input Dims")), key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    calls, outer_end = [], {}  # host thread -> end of the last operator counted
    for e in ops:
        if e["ts"] < outer_end.get(e["tid"], -1.0):
            continue
        outer_end[e["tid"]] = e["ts"] + e["dur"]
        calls.append((e, *_matrix_op(e["name"])(e["args"]["Input Dims"], e["args"].get("Concrete Inputs", []))))
    return calls


def by_shape(events: list[dict], ticks: int, top: int = 25) -> list[dict]:
    """The GPU time of the matrix operators (products, convolutions, attention) by operator and
    shape, per tick, with the rate each reaches (a kernel is its launching call's: `_Launches`).
    Needs a trace recorded with shapes."""
    launches, rows = _Launches(events), {}
    for e, flop, shape in _matrix_calls(events):
        row = rows.setdefault((e["name"], shape), {"op": _op_label(e["name"]), "shape": shape,
                                                   "calls": 0.0, "us": 0.0, "flop": flop})
        row["calls"] += 1 / ticks
        row["us"] += sum(launches.inside(e)) / ticks
    costliest = sorted(rows.values(), key=lambda r: -r["us"])[:top]
    for row in costliest:
        row["tflops"] = row.pop("flop") * row["calls"] / (row["us"] * 1e-6) / 1e12 if row["us"] else 0.0
    return costliest


PART = "part: "  # the live tick's parts' profiler ranges (engines/xportrait/stream.py's `_named`)


def by_part(events: list[dict], ticks: int) -> list[dict]:
    """The tick by part (its "part: ..." ranges, in the order they first ran): per tick the
    calls, the GPU time and launches of the kernels each launched, and the FLOP of its matrix
    operators, with the rate its kernels reach on them. The parts on other streams overlap in
    time: a part's figure is its kernels' own time, not the tick's wall time."""
    launches = _Launches(events)
    parts = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith(PART)),
                   key=lambda e: (e["tid"], e["ts"]))
    flops = defaultdict(list)  # host thread -> [(time, FLOP)] of the matrix calls, in time order
    for e, flop, _ in _matrix_calls(events):
        flops[e["tid"]].append((e["ts"], flop))
    rows: dict = {}
    for e in sorted(parts, key=lambda e: e["ts"]):
        kernels = launches.inside(e)
        inside = flops.get(e["tid"], [])
        first = bisect.bisect_left(inside, (e["ts"], -1.0))
        last = bisect.bisect_right(inside, (e["ts"] + e["dur"], float("inf")))
        row = rows.setdefault(e["name"], {"part": e["name"].removeprefix(PART), "calls": 0.0, "ms": 0.0,
                                          "launches": 0.0, "gflop": 0.0})
        row["calls"] += 1 / ticks
        row["ms"] += sum(kernels) / 1e3 / ticks
        row["launches"] += len(kernels) / ticks
        row["gflop"] += sum(f for _, f in inside[first:last]) / 1e9 / ticks
    for row in rows.values():
        row["tflops"] = row["gflop"] / row["ms"] if row["ms"] else 0.0  # GFLOP / ms = TFLOP/s
    return list(rows.values())


def ring_by_grid(kernels: list[dict], ticks: int) -> list[dict]:
    """Our ring kernels' calls by launch grid, the largest grid first: the grid is the rows
    (query pixels x heads) over the rows a program takes, so each latent size has its own, and
    a call's time against its ring's bytes says how near the memory's rate it runs."""
    rows: dict = {}
    for e in kernels:
        if e["name"] in RING_KERNELS:
            grid = tuple(e.get("args", {}).get("grid", ()))
            row = rows.setdefault((e["name"], grid), {"kernel": e["name"], "grid": list(grid), "calls": 0.0, "us": 0.0})
            row["calls"] += 1 / ticks
            row["us"] += e["dur"] / ticks
    for row in rows.values():
        row["us"] /= row["calls"]  # a call
    return sorted(rows.values(), key=lambda r: (r["kernel"], -(r["grid"] or [0])[0]))


def summarize(events: list[dict], ticks: int, top: int = 25) -> TickProfile:
    """A chrome-trace event list (torch.profiler's export) -> the per-tick profile."""
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_category: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "launches": 0.0})
    by_stream: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in kernels:
        kind = kernel_category(e["name"])
        by_category[kind]["ms"] += e["dur"] / 1e3 / ticks
        by_category[kind]["launches"] += 1 / ticks
        by_stream[str(e.get("args", {}).get("stream", "?"))] += e["dur"] / 1e3 / ticks
        by_name[e["name"]][0] += 1 / ticks
        by_name[e["name"]][1] += e["dur"] / ticks
    costliest = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return TickProfile(
        ticks=ticks, kernels_per_tick=len(kernels) / ticks,
        kernel_ms=sum(c["ms"] for c in by_category.values()),
        by_category=dict(sorted(by_category.items(), key=lambda kv: -kv[1]["ms"])),
        by_stream_ms=dict(sorted(by_stream.items(), key=lambda kv: -kv[1])),
        top=[{"kernel": name, "kind": kernel_category(name), "launches": calls, "us": us}
             for name, (calls, us) in costliest],
        by_shape=by_shape(events, ticks, top), ring_by_grid=ring_by_grid(kernels, ticks),
        by_part=by_part(events, ticks))


def profile_ticks(denoiser, out_dir: str | Path, ticks: int = 5, warmup: int = 2) -> TickProfile:
    """Profile `ticks` ticks of a streaming denoiser on its CUDA device, without its graph;
    writes tick-profile.json and tick-trace.json to `out_dir`. The ticks advance the stream."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for _ in range(warmup):
            denoiser.advance()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(ticks):
                denoiser.advance()
            torch.cuda.synchronize()
    trace = out / "tick-trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace) as f:
        result = summarize(json.load(f)["traceEvents"], ticks)
    (out / "tick-profile.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def format_profile(p: TickProfile, shapes: int = 15) -> list[str]:
    lines = [f"  tick profile ({p.ticks} ticks without the graph): {p.kernels_per_tick:.0f} kernels, "
             f"{p.kernel_ms:.2f} ms of kernel time a tick (streams summed: "
             + ", ".join(f"{ms:.2f}" for ms in p.by_stream_ms.values()) + ")"]
    for kind, c in p.by_category.items():
        share = 100 * c["ms"] / p.kernel_ms if p.kernel_ms else 0.0
        lines.append(f"    {kind:<36} {c['ms']:7.2f} ms {share:5.1f}%  {c['launches']:5.0f} launches")
    if p.by_shape:
        lines.append("  costliest matrix work by shape (a tick: calls, us, TFLOP/s):")
        for row in p.by_shape[:shapes]:
            lines.append(f"    {row['op']:<28.28} {row['shape']:<40.40} {row['calls']:4.0f} {row['us']:8.1f} "
                         f"{row['tflops']:6.0f}")
    if p.by_part:
        lines.append("  by part of the tick (a tick: calls, kernel ms, launches, GFLOP, TFLOP/s at its kernels' time):")
        for row in p.by_part:
            lines.append(f"    {row['part']:<46.46} {row['calls']:3.0f} {row['ms']:7.2f} {row['launches']:6.0f} "
                         f"{row['gflop']:8.1f} {row['tflops']:6.0f}")
    if p.ring_by_grid:
        lines.append("  ring attention by launch grid (a tick: calls, us a call):")
        for row in p.ring_by_grid:
            lines.append(f"    {row['kernel']:<28} grid {'x'.join(map(str, row['grid'])) or '?':<32} "
                         f"{row['calls']:4.0f} {row['us']:8.1f}")
    return lines
