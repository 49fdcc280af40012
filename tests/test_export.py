"""Export to ONNX: every graph checks, runs in ONNX Runtime like torch, is described truly by
its manifest; the streaming engine on the ONNX backend renders the torch frames; TensorRT's
cache key follows the weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines.base import EngineError
from engines.xportrait.weights import load_model
from engines.xportrait.stream import DenoiserModel, SplitDenoiserModel, StreamSettings, StreamingDenoiser
from export.graph_model import load_graphs
from export.graphs import example_inputs, specs, wrappers
from export.manifest import GRAPHS, ExportError, file_hash
from export.onnx_export import describe_values, export_all, export_graph, weights_hash
from export.tensorrt import engine_key, profile_shapes
from fixtures import compact_config  # tests/ is on sys.path

RES, STEPS, WINDOW = 64, 3, 4
TOLERANCE = 1e-4  # relative, fp32
CONFIG = compact_config(RES)  # every block kind the export meets, a third of the tiny model's tracing


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(CONFIG, random_weights=True, seed=3)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    manifest = export_all(model, out, steps=STEPS, window=WINDOW)
    return out, manifest


def relative_error(got, expected) -> float:
    return max(float(np.abs(np.asarray(g) - e.detach().numpy()).max() / np.abs(e.detach().numpy()).max())
               for g, e in zip(got, expected))


def test_every_graph_checks_and_matches_torch(model, exported):
    out, manifest = exported
    assert set(manifest["graphs"]) == set(GRAPHS)
    spec, modules = specs(model), wrappers(model)
    # One source, a batch of 2 and a window of 3: not the traced shapes (2 sources, 3, 4), so
    # the symbolic axes are exercised too.
    inputs = example_inputs(model, steps=2, window=3, sources=1, seed=11)
    for name in GRAPHS:
        path = out / manifest["graphs"][name]["file"]
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: t.detach().numpy() for n, t in zip(spec[name].inputs, inputs[name])})
        with torch.no_grad():
            expected = modules[name](*inputs[name])
        expected = expected if isinstance(expected, tuple) else (expected,)
        assert len(got) == len(expected) == len(spec[name].outputs)
        assert relative_error(got, expected) <= TOLERANCE, name


def test_manifest_describes_the_graphs(exported):
    out, manifest = exported
    for name, entry in manifest["graphs"].items():
        path = out / entry["file"]
        proto = onnx.load(str(path))
        assert entry["inputs"] == describe_values(proto.graph.input)
        assert entry["outputs"] == describe_values(proto.graph.output)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [manifest["opset"]]
        assert entry["graph_sha256"] == file_hash(path) and entry["bytes"] == path.stat().st_size
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in entry["outputs"]]
        for value, described in zip(session.get_inputs(), entry["inputs"]):
            assert value.type == f"tensor({'float' if described['dtype'] == 'float32' else described['dtype']})"
            assert value.shape == described["shape"]
            traced = entry["traced_shapes"][value.name]
            assert len(traced) == len(described["shape"])
            assert all(d == t for d, t in zip(described["shape"], traced) if isinstance(d, int))
    denoiser = {i["name"]: i for i in manifest["graphs"]["denoiser"]["inputs"]}
    assert denoiser["sample"]["shape"] == ["batch", 4, RES // 8, RES // 8]
    assert denoiser["ring_mask"]["dtype"] == "bool" and denoiser["timesteps"]["dtype"] == "int64"
    assert len([n for n in denoiser if n.startswith("ring_") and n[5].isdigit()]) == 4 * manifest["temporal_modules"]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def stream(denoiser, sources, driving, boxes):
    denoiser.prepare(sources)
    latents, images, tags = [], [], []
    for i in range(driving.shape[0] + denoiser.entries - 1):  # and drain the frames in flight
        frame = (driving[i], boxes[i]) if i < driving.shape[0] else (None, None)
        leaving = denoiser.tick(*frame, tag=i)
        if leaving is not None:
            latents.append(leaving[0].clone()), images.append(denoiser.image.clone()), tags.append(leaving[1])
    return torch.cat(latents), torch.stack(images), tags


def test_streaming_on_onnx_runtime_renders_the_torch_frames(model, exported):
    out, _ = exported
    g = torch.Generator().manual_seed(5)
    sources = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    driving = torch.randint(0, 256, (6, RES, RES, 3), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, RES // 4, RES // 4], [RES // 2, 0, 3 * RES // 4, RES // 4],
                          [RES // 4, RES // 2, RES // 2, 3 * RES // 4]]).expand(6, 3, 4)
    settings = StreamSettings(steps=STEPS, window=WINDOW)  # 6 frames: the window slides
    torch_latents, torch_images, torch_tags = stream(
        StreamingDenoiser(model, settings, "cpu", torch.float32, decode=model.decode), sources, driving, boxes)
    graphs = load_graphs(out)
    onnx_latents, onnx_images, onnx_tags = stream(
        StreamingDenoiser(graphs, settings, "cpu", torch.float32, decode=graphs.decode), sources, driving, boxes)
    # Both meet the denoiser's protocol; only the torch model comes in parts (the split tick).
    assert isinstance(model, SplitDenoiserModel) and isinstance(graphs, DenoiserModel)
    assert not isinstance(graphs, SplitDenoiserModel)
    assert onnx_tags == torch_tags == list(range(6))
    assert float((onnx_latents - torch_latents).abs().max() / torch_latents.abs().max()) <= TOLERANCE
    assert int((onnx_images.int() - torch_images.int()).abs().max()) <= 1  # uint8 rounding at most
    # Level groups run the same graphs at a batch of S / G: the same frames, sooner.
    grouped = StreamingDenoiser(graphs, replace(settings, level_groups=STEPS), "cpu", torch.float32,
                                decode=graphs.decode)
    grouped_latents, _, grouped_tags = stream(grouped, sources, driving, boxes)
    assert grouped.entries == 1 and grouped_tags == list(range(6))  # each frame out on the tick it entered
    assert float((grouped_latents - torch_latents).abs().max() / torch_latents.abs().max()) <= TOLERANCE
    # The graphs attend over every token: pooled keys (--token-downsample) are refused in words, both ways in.
    with pytest.raises(EngineError, match="exported graphs attend over every token"):
        StreamingDenoiser(graphs, replace(settings, token_downsample=2), "cpu", torch.float32).prepare(sources)
    pooled = model.reference_features([model.encode(sources[:1])], torch.tensor([999]), token_downsample=2)
    x = torch.zeros((1, 4, RES // 8, RES // 8))
    with pytest.raises(EngineError, match="exported graphs attend over every token"):
        graphs.predict_noise(x, torch.tensor([999]), 1, pooled, sources[:1], sources[:1])


def test_the_live_engine_runs_on_the_graphs_chosen_by_its_flags(model, exported):
    """Through the Engine protocol, as serve runs it: `--backend onnx --graphs DIR` gives the
    live engine the exported graphs, and its frames are the torch engine's."""
    import argparse

    import numpy as np

    from engines import create_engine
    from engines.base import DrivingFrame, SourcePortrait
    from export.graph_model import GraphModel, graph_model
    from streamer.options import add_engine_arguments, engine_options

    out, _ = exported
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    options = engine_options(parser.parse_args(["--engine", "xportrait", "--size", str(RES), "--backend", "onnx",
                                                "--graphs", str(out), "--device", "cpu", "--steps", str(STEPS),
                                                "--model-size", "tiny"]), live=True, window=WINDOW)
    graphs = graph_model(options)
    assert isinstance(graphs, GraphModel)
    rng = np.random.default_rng(0)
    portrait = SourcePortrait(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), np.zeros((478, 3), np.float32))
    landmarks = np.full((478, 3), RES / 2, np.float32)
    frames = [DrivingFrame(landmarks, landmarks, i / 25, image=rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8), tag=i)
              for i in range(6)]

    def run(engine):
        engine.prepare([portrait])
        rendered = [r for r in (engine.step(f) for f in frames) if r is not None]
        rendered = [(r.image.copy(), r.tag) for r in rendered] + [(r.image, r.tag) for r in engine.flush()]
        return np.stack([im for im, _ in rendered]).astype(int), [tag for _, tag in rendered]

    on_graphs, tags = run(create_engine(options, model=graphs))
    on_torch, torch_tags = run(create_engine(options, model=model))  # the same engine on the torch modules
    assert tags == torch_tags == list(range(6))
    assert np.abs(on_graphs - on_torch).max() <= 1  # uint8 rounding at most


def test_a_weight_change_changes_the_hash_and_the_engine_key(model, exported, tmp_path):
    out, manifest = exported
    entry = manifest["graphs"]["vae_decoder"]
    decoder = wrappers(model)["vae_decoder"]
    assert weights_hash(decoder) == entry["weights_sha256"]
    key = engine_key(entry["graph_sha256"], profile_shapes(entry), "NVIDIA H100", "10.9.0")
    weight = model.vae.decoder.conv_out.bias
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0] += 1e-3
        changed = export_all(model, tmp_path, steps=STEPS, window=WINDOW, graphs=("vae_decoder",))["graphs"]["vae_decoder"]
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert changed["weights_sha256"] != entry["weights_sha256"]
    assert changed["graph_sha256"] != entry["graph_sha256"]
    assert engine_key(changed["graph_sha256"], profile_shapes(changed), "NVIDIA H100", "10.9.0") != key
    # and the key covers the GPU and TensorRT's version
    assert engine_key(entry["graph_sha256"], profile_shapes(entry), "NVIDIA H200", "10.9.0") != key
    assert engine_key(entry["graph_sha256"], profile_shapes(entry), "NVIDIA H100", "10.10.0") != key


def test_tensorrt_profiles_span_the_stream_shapes(exported):
    _, manifest = exported
    shapes = profile_shapes(manifest["graphs"]["denoiser"])
    assert shapes["sample"] == [[STEPS, 4, RES // 8, RES // 8]] * 3  # the batch is the LCM steps
    assert shapes["ring_mask"] == [[STEPS, WINDOW]] * 3
    lo, opt, hi = shapes["reference_key_0"]
    assert lo[1] == opt[1] == (RES // 8) ** 2 and hi[1] == 4 * lo[1]  # one to four sources
    lo, _, hi = profile_shapes(manifest["graphs"]["reference"])["source_latents"]
    assert lo[0] == 1 and hi[0] == 4


def test_graphs_over_the_limit_keep_their_weights_outside(model, tmp_path):
    spec = specs(model)["vae_decoder"]
    inputs = example_inputs(model, STEPS, WINDOW)["vae_decoder"]
    entry = export_graph(wrappers(model)["vae_decoder"], inputs, spec, tmp_path / "vae_decoder.onnx",
                         external_data_threshold=0)
    assert entry["external_data"] == "vae_decoder.onnx.data"
    assert (tmp_path / "vae_decoder.onnx.data").stat().st_size > (tmp_path / "vae_decoder.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "vae_decoder.onnx"))
    session = ort.InferenceSession(str(tmp_path / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"latents": inputs[0].numpy()})
    with torch.no_grad():
        assert relative_error(got, (wrappers(model)["vae_decoder"](*inputs),)) <= TOLERANCE


def test_missing_or_changed_graphs_are_clear_errors(exported, tmp_path):
    with pytest.raises(ExportError, match="no manifest.json"):
        load_graphs(tmp_path)
    out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "vae_encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="changed since export"):
        load_graphs(copy)
    (copy / "denoiser.onnx").unlink()
    with pytest.raises(ExportError, match="missing"):
        load_graphs(copy)
    with pytest.raises(EngineError, match="unknown backend"):
        load_graphs(out, "tflite")


def test_tensorrt_without_tensorrt_names_what_to_install(exported):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match=r"pip install 'tensorrt>=10'"):
            load_graphs(exported[0], "tensorrt", device="cuda")
    else:
        pytest.skip("tensorrt is installed: the error for its absence cannot be shown here")


def test_tensorrt_engine_runs_like_onnx_runtime(exported):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'tensorrt>=10' from NVIDIA's index)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    out, manifest = exported
    trt_model = load_graphs(out, "tensorrt", device="cuda", dtype=torch.float32)
    onnx_model = load_graphs(out)
    latents = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(1))
    got = trt_model.decode(latents.cuda()).cpu()
    expected = onnx_model.decode(latents)
    assert float((got - expected).abs().max()) < 2e-2  # fp16 engine


def test_cli_export_and_its_errors(tmp_path, capsys):
    from streamer.cli import main

    with pytest.raises(SystemExit) as usage:  # a broken option is a usage error
        main(["export", "--to", str(tmp_path / "g"), "--size", "64", "--model-size", "tiny"])
    assert usage.value.code == 2 and "--random-weights" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["export", "--to", str(tmp_path / "file"), "--size", "64", "--model-size", "tiny",
                 "--random-weights"]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["export", "--to", str(tmp_path / "g"), "--size", "60", "--model-size", "tiny", "--random-weights"])
    assert usage.value.code == 2 and "--size must be a multiple of 8" in capsys.readouterr().err
    assert main(["export", "--to", str(tmp_path / "g"), "--size", "64", "--model-size", "tiny", "--random-weights",
                 "--window", "99"]) == 1
    assert "window must be in" in capsys.readouterr().err
