"""A command imports only what it runs: `serve` and `animate` with the warp engine load neither
torch, diffusers nor onnx; the live diffusion engine on the torch backend loads no onnx; the
two graph runtimes (ONNX Runtime, TensorRT) do not import each other. Each check runs the
command in a fresh interpreter and reads its `sys.modules`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt")

# Runs `xportrait ARGS` in this interpreter; `serve` stops where it would start listening.
# Prints the heavy packages then loaded, as JSON, and exits with the command's status.
RUNNER = """
import json, sys
import streamer.server
from streamer.cli import main

async def listening(server, host, port):  # the command got as far as serving: stop here
    print("ready to serve", flush=True)

streamer.server.serve = listening
code = main(sys.argv[1:])
print(json.dumps(sorted(name for name in %r if name in sys.modules)))
sys.exit(code)
""" % (HEAVY,)


def loaded(*argv: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_serve_with_the_warp_engine_loads_no_torch_diffusers_or_onnx():
    assert loaded("serve", "--engine", "warp", "--port", "0") == []


def test_animate_with_the_warp_engine_loads_no_torch_diffusers_or_onnx(tmp_path):
    import av
    import cv2
    import matplotlib.cbook
    import skimage.data

    portrait = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    driving = tmp_path / "driving.mp4"
    face = cv2.resize(skimage.data.astronaut(), (240, 240), interpolation=cv2.INTER_AREA)
    with av.open(str(driving), "w") as container:  # four frames of the astronaut, turning her head
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 240, 240, "yuv420p"
        for angle in (0, 4, 8, 4):
            turned = cv2.warpAffine(face, cv2.getRotationMatrix2D((120, 80), angle, 1.0), (240, 240))
            container.mux(video.encode(av.VideoFrame.from_ndarray(turned, format="rgb24")))
        container.mux(video.encode(None))
    assert loaded("animate", str(portrait), str(driving), "-o", str(tmp_path / "out.mp4"), "--size", "128") == []
    assert (tmp_path / "out.mp4").stat().st_size > 0


def test_the_live_engine_on_torch_loads_no_onnx():
    modules = loaded("serve", "--engine", "xportrait", "--random-weights", "--model-size", "tiny", "--size", "64",
                     "--device", "cpu", "--steps", "1", "--port", "0")
    assert "torch" in modules and "diffusers" in modules
    assert "onnx" not in modules and "onnxruntime" not in modules


@pytest.mark.parametrize("module, never", [("export.ort", ("export.tensorrt", "onnx")),
                                           ("export.tensorrt", ("export.ort",)), ("export.graph_model", ("onnx",))])
def test_the_graph_runtimes_import_neither_each_other_nor_the_exporter(module, never):
    code = (f"import sys, {module}; loaded = [n for n in {never!r} if n in sys.modules]; "
            "sys.exit(str(loaded) if loaded else None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} loaded {result.stderr.strip()[-500:]}"


def test_the_bench_reads_its_portrait_without_pyav():
    """The GPU image has no PyAV: `bench --source astronaut` (no driving video) must not need it,
    as it did once through offline.py's loader."""
    code = ("import sys; sys.modules['av'] = None; from streamer.bench import load_source; "
            "image = load_source('astronaut'); sys.exit(None if image.shape == (512, 512, 3) else str(image.shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
