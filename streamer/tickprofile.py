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
"""

from __future__ import annotations

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
             for name, (calls, us) in costliest])


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
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(ticks):
                denoiser.advance()
            torch.cuda.synchronize()
    trace = out / "tick-trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace) as f:
        result = summarize(json.load(f)["traceEvents"], ticks)
    (out / "tick-profile.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def format_profile(p: TickProfile) -> list[str]:
    lines = [f"  tick profile ({p.ticks} ticks without the graph): {p.kernels_per_tick:.0f} kernels, "
             f"{p.kernel_ms:.2f} ms of kernel time a tick (streams summed: "
             + ", ".join(f"{ms:.2f}" for ms in p.by_stream_ms.values()) + ")"]
    for kind, c in p.by_category.items():
        share = 100 * c["ms"] / p.kernel_ms if p.kernel_ms else 0.0
        lines.append(f"    {kind:<36} {c['ms']:7.2f} ms {share:5.1f}%  {c['launches']:5.0f} launches")
    return lines
