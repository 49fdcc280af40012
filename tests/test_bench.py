"""`xportrait bench`: the README's warp command as written, and `--engine xportrait --stream`
on the CPU with the tiny model: what it reports and the naive baseline beside it (the GPU
figures in BENCHMARKS.md come from this command)."""

from __future__ import annotations

import json

import pytest

from streamer.cli import main

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops on one torch thread (tests/fixtures.py says why)."""
    from fixtures import one_torch_thread

    with one_torch_thread():
        yield


TINY = ["bench", "--engine", "xportrait", "--stream", "--random-weights", "--model-size", "tiny", "--size", "64",
        "--frames", "7", "--warmup", "2", "--fast-only"]


def test_the_warp_bench_reports_its_run_next_to_the_textbook_baseline(capsys):
    assert main(["bench", "--engine", "warp", "--size", "128", "--frames", "12", "--warmup", "2",
                 "--baseline-frames", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "warp" and result["size"] == 128 and result["frames"] == 10
    assert result["fps"] > 0 and 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"]
    assert result["frames_without_face"] == 0  # the synthetic clip always shows a face
    assert result["baseline"]["frames"] == 1  # the flag's, not the default 5 (a baseline frame takes seconds)
    assert result["speedup_vs_baseline"] == pytest.approx(
        result["baseline"]["ms_per_frame"] / result["stages_ms"]["align+engine"])


def test_the_stream_bench_reports_its_run_next_to_the_naive_baseline(capsys):
    assert main(TINY + ["--baseline-frames", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == "RANDOM WEIGHTS" and result["lcm_steps"] == 4
    (run,) = result["runs"]  # --fast-only: the fastest configuration asked for
    assert run["frames"] == 5  # --frames less --warmup
    assert run["fps"] > 0 and 0 < run["tick_ms"]["p50"] <= run["tick_ms"]["p95"]
    # A frame leaves S - 1 ticks after it entered, so in->out spans several ticks.
    assert run["latency_ms"]["p50"] > run["tick_ms"]["p50"]
    baseline = result["baseline"]
    assert baseline["frames"] == 3 and abs(baseline["fps"] * baseline["ms_per_frame"] - 1e3) < 1e-6
    assert abs(result["speedup_vs_baseline"] - run["fps"] / baseline["fps"]) < 1e-9


def test_the_bench_times_reused_controls_against_the_controlnets_walked_and_the_whole_walk(capsys):
    """--deep-levels with --reuse-controls: its run, then the same deep levels with the
    ControlNets at every level and every level whole as baselines in the same run, and the
    predicted noise's error (the controls' reuse in it) at the levels that reuse."""
    assert main(TINY + ["--deep-levels", "0", "--reuse-controls", "--baseline-frames", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    runs = result["runs"]
    assert [(r["deep_levels"], r["reuse_controls"]) for r in runs] == [([0], True), ([0], False), ([], False)]
    assert runs[1]["engine"].endswith(", ControlNets at every level (baseline)")
    assert runs[2]["engine"].endswith(", every level whole (baseline)")
    error = result["noise_error"]
    assert error["reuse_controls"] and error["relative_l2_per_level"][0] == 0
    assert all(0 < e < 2 for e in error["relative_l2_per_level"][1:])


def test_the_bench_times_downsampled_tokens_against_every_token_and_the_whole_walk(capsys):
    """--token-downsample with --deep-levels: its run, then the same options over every token
    and every level whole over every token as baselines in the same run, and the predicted
    noise's error at every level (the listed one's attention pools too)."""
    assert main(TINY + ["--deep-levels", "0", "--token-downsample", "2", "--baseline-frames", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    runs = result["runs"]
    assert [(r["deep_levels"], r["token_downsample"]) for r in runs] == [([0], 2), ([0], 1), ([], 1)]
    assert runs[1]["engine"].endswith(", every token (baseline)")
    assert runs[2]["engine"].endswith(", every level whole (baseline)")
    error = result["noise_error"]
    assert error["token_downsample"] == 2 and all(0 < e < 2 for e in error["relative_l2_per_level"])


def test_no_baseline_frames_skips_the_baseline(capsys):
    # --compile --autotune on a CPU: the variants take both (no GPU: the tick runs eager again).
    assert main(TINY + ["--baseline-frames", "0", "--compile", "--autotune"]) == 0
    out = capsys.readouterr().out
    assert "fps; tick p50" in out and "baseline" not in out


@pytest.mark.parametrize("argv, message", [
    (TINY + ["--steps", "0"], "--steps must be at least 1, got 0"),
    (TINY + ["--frames", "2"], "--frames must exceed --warmup, got 2 and 2"),
    (TINY + ["--engine", "warp"], "--stream is for --engine xportrait"),
    (["bench", "--random-weights", "--model-size", "tiny"], "--random-weights, --model-size: only for --engine xportrait"),
    (["bench", "--engine", "xportrait", "--random-weights", "--lookahead", "1"],
     "--lookahead: only for the live engine (serve, bench --stream, eval --stream)"),
    (TINY + ["--backend", "onnx"], "--backend onnx needs --graphs DIR"),
])
def test_a_bad_bench_request_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as usage:
        main(argv)
    assert usage.value.code == 2
    assert f"xportrait bench: error: {message}" in capsys.readouterr().err


def test_the_bench_reads_its_portrait_with_the_one_loader(tmp_path, capsys):
    """--source goes through animate's loader: a file that is no image is refused in words,
    and a transparent PNG is flattened onto white (not onto black)."""
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert main(["bench", "--engine", "warp", "--size", "64", "--frames", "3", "--warmup", "1",
                 "--baseline-frames", "0", "--source", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"xportrait bench: error: cannot read source image {notes}: not an image format" in err, err

    import numpy as np
    from PIL import Image

    from streamer.bench import load_source

    clear = tmp_path / "clear.png"
    Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(clear)  # fully transparent
    assert (load_source(str(clear)) == 255).all()


@pytest.mark.parametrize("split, deep, reuse", [(False, (), False), (True, (), False), (True, (0,), False),
                                                (True, (0,), True)])
def test_the_module_timings_call_each_module_as_the_tick_holds_its_inputs(split, deep, reuse):
    """What the stream bench times module by module on a GPU (CUDA events there), called here
    once each: the split tick holds hint embeddings and level times, not hints and timesteps;
    with deep levels the UNet's parts (its deep rings hold the deep entries only)."""
    import torch

    from engines.xportrait.stream import StreamSettings, StreamingDenoiser
    from fixtures import compact_config, tiny_model
    from streamer.bench_xportrait import module_calls

    model = tiny_model(64, config=compact_config(64))
    settings = StreamSettings(steps=2, window=2, deep_levels=deep, reuse_controls=reuse)
    denoiser = StreamingDenoiser(model, settings, torch.device("cpu"), torch.float32, split=split)
    denoiser.prepare(torch.zeros(1, 3, 64, 64))
    denoiser.tick(torch.zeros(64, 64, 3, dtype=torch.uint8), torch.tensor([[8, 8, 24, 24]] * 3))
    calls = module_calls(model, denoiser)
    assert set(calls) == {"controlnets x2", "unet + reference + temporal", "vae decode (1 frame)",
                          "reference net (per source, per level)"}
    with torch.no_grad():
        controls = calls["controlnets x2"][0]()
        noise = calls["unet + reference + temporal"][0]()
    pose_mid = controls[0][1] if split else controls[1]
    assert noise.shape[0] == denoiser.entries and torch.isfinite(noise).all()
    assert pose_mid.shape[0] == (len(deep) if deep else denoiser.entries)  # the mid: the deep entries
    if reuse:  # the ControlNets walk the deep entries only
        assert controls[0][0][0].shape[0] == len(deep)
