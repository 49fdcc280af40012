"""Typed options: each command's flags become one frozen object, validated where it is made,
with errors that name the flag; the engines take those objects (engines/options.py,
streamer/options.py). No engine is built here: these run in milliseconds."""

from __future__ import annotations

import dataclasses

import pytest

from engines.options import LIVE_STEPS, LiveOptions, OptionError, WarpOptions, XPortraitOptions
from streamer.cli import build_parser, main
from streamer.options import (
    AnimateOptions,
    BenchOptions,
    ClientOptions,
    ServeOptions,
    animate_options,
    bench_options,
    client_options,
    serve_options,
)

RANDOM = dict(random_weights=True, model_size="tiny")


def parsed(*argv: str):
    parser, _ = build_parser(list(argv))
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("make, message", [
    (lambda: WarpOptions(size=100), "--size must be a multiple of 8 and at least 64, got 100"),
    (lambda: WarpOptions(size=56), "--size must be a multiple of 8 and at least 64, got 56"),
    (lambda: XPortraitOptions(size=60, **RANDOM), "--size must be a multiple of 8"),
    (lambda: XPortraitOptions(steps=0, **RANDOM), "--steps must be at least 1, got 0"),
    (lambda: XPortraitOptions(window=0, **RANDOM), "--window must be at least 1, got 0"),
    (lambda: XPortraitOptions(sampler="euler", **RANDOM), "--sampler must be one of ddim, lcm, got 'euler'"),
    (lambda: XPortraitOptions(model_size="xl", random_weights=True), "--model-size must be one of sd15, tiny"),
    (lambda: XPortraitOptions(), "needs --checkpoint"),
    (lambda: LiveOptions(lookahead=-1), "--lookahead must be at least 0, got -1"),
    (lambda: LiveOptions(autotune=True), "--autotune tunes the compiled tick: give --compile too"),
    (lambda: LiveOptions(backend="onnx"), "--backend onnx needs --graphs DIR"),
    (lambda: LiveOptions(backend="onnx", graphs="g", lookahead=1), "--lookahead works with the torch backend only"),
    (lambda: LiveOptions(graphs="g"), "--graphs is for --backend onnx or tensorrt"),
    (lambda: LiveOptions(deep_levels=(1,)), "--deep-levels: increasing levels from 0 (e.g. 0 or 0,2), got 1"),
    (lambda: LiveOptions(deep_levels=(0, 2, 2)), "--deep-levels: increasing levels from 0"),
    (lambda: LiveOptions(deep_levels=(0,), lookahead=1), "--deep-levels works with the torch backend"),
    (lambda: LiveOptions(reuse_controls=True), "--reuse-controls reuses the ControlNets' residuals of a frame's "
                                               "last deep level: give --deep-levels too"),
    (lambda: LiveOptions(token_downsample=3), "--token-downsample must be one of 1, 2, 4, got 3"),
    (lambda: LiveOptions(backend="onnx", graphs="g", token_downsample=2),
     "--token-downsample works with the torch backend"),
    (lambda: XPortraitOptions(steps=2, live=LiveOptions(deep_levels=(0, 2)), **RANDOM),
     "--deep-levels: levels below --steps (2), got 0,2"),
    (lambda: XPortraitOptions(sampler="ddim", live=LiveOptions(), **RANDOM), "samples with LCM and no guidance"),
    (lambda: XPortraitOptions(guidance=5.0, live=LiveOptions(), **RANDOM), "samples with LCM and no guidance"),
    (lambda: XPortraitOptions(live=LiveOptions(tiny_decoder="random"), checkpoint="x.th"),
     "--tiny-decoder random is only for --random-weights"),
    (lambda: ServeOptions(max_sessions=0), "--max-sessions must be at least 1, got 0"),
    (lambda: ServeOptions(idle_timeout=0), "--idle-timeout must be positive, got 0"),
    (lambda: ServeOptions(engine=XPortraitOptions(**RANDOM)), "serve runs the live engine"),
    (lambda: BenchOptions(frames=10, warmup=10), "--frames must exceed --warmup, got 10 and 10"),
    (lambda: AnimateOptions(("a.jpg",), "d.mp4", "o.mp4", ref_frame=-1), "--ref-frame must be at least 0, got -1"),
    (lambda: ClientOptions("clip.mp4", loop=True), "--loop needs --duration"),
    (lambda: ClientOptions("clip.mp4", duration=-2.0), "--duration must be positive, got -2.0"),
])
def test_every_rule_names_the_flag(make, message):
    with pytest.raises(OptionError) as error:
        make()
    assert message in str(error.value)


def test_options_are_frozen_and_the_defaults_are_the_documented_ones():
    options = XPortraitOptions(**RANDOM)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 2
    assert options.stream_steps == LIVE_STEPS and XPortraitOptions(steps=2, **RANDOM).stream_steps == 2
    assert ServeOptions().max_sessions == 4  # the warp engine: four sessions
    assert ServeOptions(engine=XPortraitOptions(live=LiveOptions(), **RANDOM)).max_sessions == 1  # one GPU stream
    assert LiveOptions(backend="onnx", graphs="g") and XPortraitOptions(live=LiveOptions(backend="onnx", graphs="g"))


def test_flags_map_onto_the_options_once():
    serve = serve_options(parsed("serve", "--engine", "xportrait", "--random-weights", "--model-size", "tiny",
                                 "--size", "64", "--lookahead", "2", "--max-upload-mb", "1", "--token", ""))
    assert serve.engine == XPortraitOptions(size=64, live=LiveOptions(lookahead=2), **RANDOM)
    assert serve.max_upload_bytes == 2**20 and serve.token is None and serve.max_sessions == 1
    animate = animate_options(parsed("animate", "a.jpg", "b.jpg", "d.mp4", "-o", "o.mp4", "--ref-frame", "3"))
    assert animate == AnimateOptions(("a.jpg", "b.jpg"), "d.mp4", "o.mp4", WarpOptions(), 3)
    bench = bench_options(parsed("bench", "--engine", "xportrait", "--stream", "--random-weights", "--compile",
                                 "--autotune", "--offline-steps", "2, 6"))
    assert bench.stream and bench.engine.live.compile and bench.engine.live.autotune
    assert bench.offline_steps == (2, 6)
    deep = serve_options(parsed("serve", "--engine", "xportrait", "--random-weights", "--deep-levels", "0,2"))
    assert deep.engine.live.deep_levels == (0, 2) and not deep.engine.live.reuse_controls
    reuse = serve_options(parsed("serve", "--engine", "xportrait", "--random-weights", "--deep-levels", "0",
                                 "--reuse-controls"))
    assert reuse.engine.live == LiveOptions(deep_levels=(0,), reuse_controls=True)
    tokens = serve_options(parsed("serve", "--engine", "xportrait", "--random-weights", "--token-downsample", "2"))
    assert tokens.engine.live == LiveOptions(token_downsample=2)
    client = client_options(parsed("client", "clip.mp4", "--loop", "--duration", "3"))
    assert client == ClientOptions("clip.mp4", loop=True, duration=3.0)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--engine", "warp", "--steps", "4", "--lcm-lora", "x"], "--lcm-lora, --steps: only for --engine xportrait"),
    (["serve", "--reuse-controls"], "--reuse-controls: only for --engine xportrait"),
    (["serve", "--token-downsample", "2"], "--token-downsample: only for --engine xportrait"),
    (["animate", "a.jpg", "d.mp4", "-o", "o.mp4", "--engine", "xportrait", "--random-weights", "--compile"],
     "--compile: only for the live engine (serve, bench --stream, eval --stream)"),
    (["animate", "a.jpg", "d.mp4", "-o", "o.mp4", "--size", "100"], "--size must be a multiple of 8"),
    (["serve", "--max-upload-mb", "0"], "--max-upload-mb must be positive"),
    (["serve", "--engine", "xportrait", "--random-weights", "--autotune"], "--autotune tunes the compiled tick"),
    (["serve", "--autotune"], "--autotune: only for --engine xportrait"),
    (["serve", "--engine", "xportrait", "--random-weights", "--deep-levels", "0,x"],
     "argument --deep-levels: levels as integers separated by commas (e.g. 0,2), got '0,x'"),
    (["serve", "--deep-levels", "0"], "--deep-levels: only for --engine xportrait"),
    (["serve", "--engine", "xportrait", "--random-weights", "--backend", "tensorrt"], "--backend tensorrt needs --graphs"),
    (["client", "clip.mp4", "--loop"], "--loop needs --duration"),
    (["export", "--to", "g", "--random-weights", "--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["export", "--to", "g", "--random-weights", "--lookahead", "1"], "--lookahead: not for export"),
])
def test_a_broken_option_is_a_usage_error_of_its_command(argv, message, capsys):
    with pytest.raises(SystemExit) as usage:
        main(argv)
    err = capsys.readouterr().err
    assert usage.value.code == 2
    assert err.startswith(f"usage: xportrait {argv[0]} ") and f"xportrait {argv[0]}: error: {message}" in err


def test_every_square_size_is_checked_by_the_one_rule():
    """Engines, prepare-data's crops and a training config's resolution refuse a size in the
    same words (the rule is written once, in engines/options.py)."""
    from engines.options import SIZE_RULE
    from engines.xportrait.train.config import ConfigError, TrainConfig
    from engines.xportrait.train.data import DataError, PrepareOptions

    with pytest.raises(OptionError) as engine:
        WarpOptions(size=100)
    with pytest.raises(DataError) as crops:
        PrepareOptions(size=100)
    with pytest.raises(ConfigError) as config:
        TrainConfig(data="d", base="b", out="o", resolution=100)
    assert str(engine.value) == str(crops.value) == f"--size must be {SIZE_RULE}, got 100"
    assert str(config.value) == f"resolution must be {SIZE_RULE}, got 100"
    assert PrepareOptions(size=64).size == 64 and TrainConfig(data="d", base="b", out="o", resolution=72)
