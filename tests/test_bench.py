"""`xportrait bench --engine xportrait --stream` on the CPU with the tiny model: what it reports
and the naive baseline beside it (the GPU figures in BENCHMARKS.md come from this command)."""

from __future__ import annotations

import json

from streamer.cli import main

TINY = ["bench", "--engine", "xportrait", "--stream", "--random-weights", "--model-size", "tiny", "--size", "64",
        "--frames", "7", "--warmup", "2", "--fast-only"]


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


def test_no_baseline_frames_skips_the_baseline(capsys):
    assert main(TINY + ["--baseline-frames", "0"]) == 0
    out = capsys.readouterr().out
    assert "fps; tick p50" in out and "baseline" not in out


def test_a_bad_bench_request_is_a_clear_error(capsys):
    assert main(TINY + ["--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
