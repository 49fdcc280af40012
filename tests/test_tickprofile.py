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
