"""`xportrait bench --stream --profile`: the tick's kernels summed by kind."""

from __future__ import annotations

import json

import pytest
import torch

from streamer.cli import main
from streamer.tickprofile import format_profile, kernel_category, summarize

TINY = ["bench", "--engine", "xportrait", "--stream", "--random-weights", "--model-size", "tiny", "--size", "64",
        "--frames", "6", "--warmup", "2", "--baseline-frames", "0"]

# Kernel names from a profile of the compiled live tick on an H200 (BENCHMARKS.md, session 5).
H200_KERNELS = {
    "nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN": "GEMMs",
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroupsize2x1x1_g1_execute_"
    "segment_k_off_kernel__5x_cudnn": "convolutions",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_64x64_64x5_nhwc_align8>": "convolutions",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0": "attention",
    "_attend_kernel": "ring attention (Triton)",
    "triton_poi_fused_gelu_mul_split_view_118": "pointwise",
    # inductor names fused kernels after their ops: these are not convolutions or attention
    "triton_poi_fused_clone_convolution_native_group_norm_silu_109": "pointwise",
    "triton_poi_fused__scaled_dot_product_cudnn_attention__unsafe_view_cat_transpose_view_115": "pointwise",
    "triton_per_fused_add_clone_convolution_native_group_norm_silu_unsqueeze_30": "reductions (norms, softmax)",
    "triton_red_fused_add_native_layer_norm_view_28": "reductions (norms, softmax)",
    # eager torch (the tick without --compile), same machine
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::CUDAFunctor_add<c10::Half> "
    ">(at::TensorIteratorBase&)": "pointwise",
    "void at::native::vectorized_elementwise_kernel<8, at::native::(anonymous namespace)::silu_kernel": "pointwise",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, c10::Half, c10::Half const*, "
    "c10::Half*, c10::Half*)": "reductions (norms, softmax)",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, false>": "reductions (norms, softmax)",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda"
    "(at::TensorIteratorBase&)": "copies and memsets",
    "Memset (Device)": "copies and memsets",
    "Memcpy HtoD (Pinned -> Device)": "copies and memsets",
}


@pytest.mark.parametrize("name, kind", H200_KERNELS.items())
def test_kernels_are_sorted_by_the_work_they_do(name, kind):
    assert kernel_category(name) == kind


def test_a_trace_sums_to_per_tick_kinds_streams_and_the_costliest_kernels():
    def kernel(name, dur, stream=7, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "dur": dur, "ts": 0, "args": {"stream": stream}}

    gemm, ring = "nvjet_sm90_hsh_80x128_64x8_2x1_v_bz_bias_TNN", "_attend_kernel"
    events = ([kernel(gemm, 100.0), kernel(gemm, 300.0), kernel(ring, 50.0), kernel(ring, 50.0),
               kernel("Memset (Device)", 2.0, cat="gpu_memset"), kernel(gemm, 40.0, stream=13)]
              + [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 1e6, "ts": 0}])  # host events don't count
    profile = summarize(events, ticks=2)
    assert profile.kernels_per_tick == 3.0
    assert profile.by_category["GEMMs"] == {"ms": pytest.approx(0.22), "launches": 1.5}
    assert profile.by_category["ring attention (Triton)"] == {"ms": pytest.approx(0.05), "launches": 1.0}
    assert list(profile.by_category)[0] == "GEMMs"  # costliest first
    assert profile.kernel_ms == pytest.approx(0.271)
    assert profile.by_stream_ms == {"7": pytest.approx(0.251), "13": pytest.approx(0.02)}
    assert profile.top[0] == {"kernel": gemm, "kind": "GEMMs", "launches": 1.5, "us": pytest.approx(220.0)}
    table = "\n".join(format_profile(profile))
    assert "GEMMs" in table and "81.2%" in table


def test_the_ring_kernels_are_timed_per_launch_grid():
    """One grid per latent size (rows over rows a program): calls a tick and the time of one."""
    def ring(dur, grid):
        return {"ph": "X", "cat": "kernel", "name": "_attend_kernel", "dur": dur, "ts": 0,
                "args": {"stream": 7, "grid": grid}}

    events = [ring(60.0, [65536, 1, 1]), ring(50.0, [65536, 1, 1]), ring(20.0, [16384, 1, 1]),
              ring(70.0, [65536, 1, 1]), ring(22.0, [16384, 1, 1]), ring(58.0, [65536, 1, 1])]
    profile = summarize(events, ticks=2)
    assert profile.ring_by_grid == [
        {"kernel": "_attend_kernel", "grid": [65536, 1, 1], "calls": 2.0, "us": pytest.approx(59.5)},
        {"kernel": "_attend_kernel", "grid": [16384, 1, 1], "calls": 1.0, "us": pytest.approx(21.0)}]
    table = "\n".join(format_profile(profile))
    assert "ring attention by launch grid" in table and "65536x1x1" in table and "59.5" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_profiling_without_a_gpu_is_a_clear_error_before_any_work(tmp_path, capsys):
    assert main(TINY + ["--profile", str(tmp_path / "profile")]) == 2
    assert "--profile needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "profile").exists()


def test_profile_is_only_for_the_live_engine(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # an option error is a usage error
        main(["bench", "--engine", "warp", "--profile", str(tmp_path / "p")])
    assert stop.value.code == 2
    assert "--profile is for --engine xportrait --stream" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="profiles CUDA kernels")
def test_the_stream_bench_profiles_its_tick_on_a_gpu(tmp_path, capsys):
    assert main(TINY + ["--profile", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    profile = json.loads((tmp_path / "tick-profile.json").read_text())
    assert result["profile"] == profile and (tmp_path / "tick-trace.json").exists()
    assert profile["kernels_per_tick"] > 10
    assert sum(c["ms"] for c in profile["by_category"].values()) == pytest.approx(profile["kernel_ms"])


def test_matrix_work_is_summed_by_shape_with_the_rate_it_reaches(tmp_path):
    """The operators' shapes as torch.profiler records them (a real CPU trace), each given GPU
    kernels the way a CUDA trace links them (a launch inside the host call, a shared correlation
    id): time per operator and shape, FLOP from the shapes, and the rate."""
    from torch.profiler import ProfilerActivity, profile

    x, w = torch.randn(2, 8, 16, 16), torch.randn(4, 8, 3, 3)
    a, b, bias = torch.randn(32, 8), torch.randn(8, 5), torch.randn(5)
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 10, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):  # two "ticks"
            torch.nn.functional.conv2d(x, w, stride=2, padding=1)
            torch.addmm(bias, a, b)
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    us = {"aten::convolution": 4.0, "aten::addmm": 2.0}
    linked = []
    for e in [e for e in events if e.get("cat") == "cpu_op"]:
        name = "attention" if e["name"].startswith("aten::_scaled_dot_product_") else e["name"]
        if name in us or name == "attention":
            correlation = len(linked)
            linked.append({"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "tid": e["tid"],
                           "ts": e["ts"] + e["dur"] / 2, "dur": 0.1, "args": {"correlation": correlation}})
            linked.append({"ph": "X", "cat": "kernel", "name": "nvjet_x", "tid": 7, "ts": 0,
                           "dur": us.get(name, 1.0), "args": {"correlation": correlation, "stream": 7}})
    profile_ = summarize(events + linked, ticks=2)
    rows = {row["op"]: row for row in profile_.by_shape}
    conv = rows["convolution"]
    assert conv["shape"] == "2x8x16x16 * 4x8x3x3 /2" and conv["calls"] == 1.0 and conv["us"] == pytest.approx(4.0)
    assert conv["tflops"] == pytest.approx(2 * 2 * 4 * 8 * 8 * 8 * 9 / 4e-6 / 1e12)  # 8x8 out: stride 2, padding 1
    assert rows["addmm"]["shape"] == "32x8 @ 8x5"
    assert rows["addmm"]["tflops"] == pytest.approx(2 * 32 * 8 * 5 / 2e-6 / 1e12)
    (attention,) = [row for op, row in rows.items() if op.startswith("attention (")]  # (flash_for_cpu) here
    assert attention["shape"] == "1x2 heads, 6 q x 10 k, d 4" and attention["calls"] == 1.0
    assert attention["tflops"] == pytest.approx(2 * 2 * 6 * 10 * 8 / 1e-6 / 1e12)
    assert list(rows) == ["convolution", "addmm", attention["op"]]  # costliest first
    table = "\n".join(format_profile(profile_))
    assert "costliest matrix work by shape" in table and "32x8 @ 8x5" in table


def _linked_kernels(events: list[dict], us: dict[str, float]) -> list[dict]:
    """For each listed operator's host call in a CPU trace, a launch inside it and a GPU kernel
    of `us` microseconds with the launch's correlation id, as a CUDA trace links them."""
    linked = []
    for e in [e for e in events if e.get("cat") == "cpu_op" and e["name"] in us]:
        correlation = len(linked)
        linked.append({"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "tid": e["tid"],
                       "ts": e["ts"] + e["dur"] / 2, "dur": 0.1, "args": {"correlation": correlation}})
        linked.append({"ph": "X", "cat": "kernel", "name": "nvjet_x", "tid": 7, "ts": 0, "dur": us[e["name"]],
                       "args": {"correlation": correlation, "stream": 7}})
    return linked


def test_the_tick_is_summed_by_part_its_kernels_time_against_its_flop(tmp_path):
    """Each "part: ..." range (a real CPU trace) gets the kernels launched inside it and the
    FLOP of the matrix operators called inside it, per tick; outside any part, nothing."""
    from torch.profiler import ProfilerActivity, profile, record_function

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):  # two "ticks"
            with record_function("part: unet down"):
                torch.mm(a, b), torch.mm(a, b)
            with record_function("part: finish"):
                torch.relu(a)
            torch.mm(a, b)  # in no part
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    result = summarize(events + _linked_kernels(events, {"aten::mm": 3.0, "aten::relu": 1.0}), ticks=2)
    rows = {row["part"]: row for row in result.by_part}
    assert list(rows) == ["unet down", "finish"]  # in the order they ran
    down, finish = rows["unet down"], rows["finish"]
    assert down["calls"] == 1 and down["launches"] == 2 and down["ms"] == pytest.approx(6e-3)
    assert down["gflop"] == pytest.approx(2 * (2 * 64 * 32 * 16) / 1e9)
    assert down["tflops"] == pytest.approx(down["gflop"] / 6e-3)
    assert finish["launches"] == 1 and finish["ms"] == pytest.approx(1e-3) and finish["gflop"] == 0
    assert "by part of the tick" in "\n".join(format_profile(result))


def test_the_live_ticks_parts_are_named_with_their_runs_of_entries(tmp_path):
    """The split tick's parts as a profile sees them (a CPU tick of the tiny model with deep
    features reused, the reused entries beside): each part once a tick, the runs of entries
    named, and the matrix work where it is: the first level on 3 entries does 3 times the one
    entry's, the deep walk happens in its own parts."""
    from torch.profiler import ProfilerActivity, profile

    from engines.xportrait.stream import StreamSettings, StreamingDenoiser
    from fixtures import compact_config, tiny_model

    model = tiny_model(64, config=compact_config(64))
    model.unet.motion.freeze_ring_projections()  # as the live engine does: no per-call work that is not per entry
    denoiser = StreamingDenoiser(model, StreamSettings(steps=4, window=2, deep_levels=(0,)), torch.device("cpu"),
                                 torch.float32, split=True, reused_beside=True)
    denoiser.prepare(torch.zeros(1, 3, 64, 64))
    for _ in range(4):
        denoiser.tick(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8), torch.tensor([[8, 8, 24, 24]] * 3))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        denoiser.advance()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    rows = {row["part"]: row for row in summarize(json.loads((tmp_path / "trace.json").read_text())["traceEvents"],
                                                   ticks=1).by_part}
    assert set(rows) == {"enter", "pose hint embedding", "local hint embedding", "finish",
                         "pose first level (1 of the entries)", "pose first level (3 of the entries)",
                         "local first level (1 of the entries)", "local first level (3 of the entries)",
                         "pose deeper levels", "local deeper levels",
                         "unet first level (1 of the entries)", "unet first level (3 of the entries)",
                         "unet deeper down", "unet deep up",
                         "unet last level (1 of the entries)", "unet last level (3 of the entries)"}
    assert all(row["calls"] == 1 for row in rows.values())
    for part in ("unet first level", "unet last level", "pose first level"):
        one, three = rows[f"{part} (1 of the entries)"]["gflop"], rows[f"{part} (3 of the entries)"]["gflop"]
        assert one > 0 and three == pytest.approx(3 * one, rel=1e-6)
    assert rows["unet deeper down"]["gflop"] > 0 and rows["unet deep up"]["gflop"] > 0
