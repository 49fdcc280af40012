"""A command imports only what it runs: `serve` and `animate` with the warp engine load neither
torch, diffusers nor onnx; the live diffusion engine on the torch backend loads no onnx; the
two graph runtimes (ONNX Runtime, TensorRT) do not import each other. Each check runs the
command in a fresh interpreter and reads its `sys.modules` (the runtimes' each in a child
forked from one interpreter that has imported torch alone)."""

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


# Every check is a fresh interpreter that mostly imports, on one core: all of them start at
# once, when the first test asks (the module's other tests then read theirs); each test still
# asserts only on its own command.
LIVE_TORCH = ("serve", "--engine", "xportrait", "--random-weights", "--model-size", "tiny", "--size", "64",
              "--device", "cpu", "--steps", "1", "--port", "0")
RUNTIMES = [("export.ort", ("export.tensorrt", "onnx")), ("export.tensorrt", ("export.ort",)),
            ("export.graph_model", ("onnx",))]


# mediapipe's package imports matplotlib.pyplot for its drawing helpers: engines.face imports it
# with pyplot deferred (its code unrun until first used), and pyplot still works once used.
PYPLOT_DEFERRED = """
import sys
from engines.face import FaceTracker
with FaceTracker(video=False):
    pass
pyplot = sys.modules["matplotlib.pyplot"]
# (its own namespace, read past the module's attribute lookup, which would run it)
assert "figure" not in object.__getattribute__(pyplot, "__dict__"), "mediapipe's import ran matplotlib.pyplot"
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import pyplot as again
assert plt is again is pyplot is matplotlib.pyplot
figure = plt.figure(figsize=(2, 1))
assert plt.get_backend().lower() == "agg" and figure.get_size_inches().tolist() == [2.0, 1.0]
try:
    plt.no_such_name
except AttributeError:
    print("pyplot deferred")
"""


# The graph runtimes' checks: one interpreter imports torch (which all three import, and none
# of the names checked), then forks a child per check, which imports its module alone and
# reports which of its `never` names that loaded. Prints {module: [those names]} as JSON.
RUNTIME_CHECKS = """
import json, os, sys, traceback
import torch
checks = %r
assert not [n for _, never in checks for n in never if n in sys.modules], "torch loaded a name checked"
children = {}
for module, never in checks:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import, report, and never return into the loop
        try:
            os.close(read)
            __import__(module)
            os.write(write, json.dumps([n for n in never if n in sys.modules]).encode())
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(write)
    children[module] = (pid, read)
found = {}
for module, (pid, read) in children.items():
    with os.fdopen(read) as pipe:
        said = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and said, f"importing {module} failed (status {status})"
    found[module] = json.loads(said)
print(json.dumps(found))
"""


def _driving_clip(path) -> None:
    """Four frames of the astronaut, turning her head."""
    import av
    import cv2
    import skimage.data

    face = cv2.resize(skimage.data.astronaut(), (240, 240), interpolation=cv2.INTER_AREA)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 240, 240, "yuv420p"
        for angle in (0, 4, 8, 4):
            turned = cv2.warpAffine(face, cv2.getRotationMatrix2D((120, 80), angle, 1.0), (240, 240))
            container.mux(video.encode(av.VideoFrame.from_ndarray(turned, format="rgb24")))
        container.mux(video.encode(None))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> a function giving that command's CompletedProcess (waiting for it)."""
    import matplotlib.cbook

    folder = tmp_path_factory.mktemp("animate")
    portrait = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    _driving_clip(folder / "driving.mp4")
    commands = {
        "serve": [sys.executable, "-c", RUNNER, "serve", "--engine", "warp", "--port", "0"],
        "animate": [sys.executable, "-c", RUNNER, "animate", str(portrait), str(folder / "driving.mp4"), "-o",
                    str(folder / "out.mp4"), "--size", "128"],
        "live": [sys.executable, "-c", RUNNER, *LIVE_TORCH],
        "runtimes": [sys.executable, "-c", RUNTIME_CHECKS % (RUNTIMES,)],
        "pyplot": [sys.executable, "-c", PYPLOT_DEFERRED],
    }
    started = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, argv in commands.items()}
    done: dict[str, subprocess.CompletedProcess] = {}

    def result(name: str) -> subprocess.CompletedProcess:
        if name not in done:
            process = started[name]
            out, err = process.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        return done[name]

    result.folder = folder
    try:
        yield result
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def loaded(result: subprocess.CompletedProcess) -> list[str]:
    """The heavy packages the RUNNER's command had loaded."""
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_serve_with_the_warp_engine_loads_no_torch_diffusers_or_onnx(runs):
    assert loaded(runs("serve")) == []


def test_animate_with_the_warp_engine_loads_no_torch_diffusers_or_onnx(runs):
    assert loaded(runs("animate")) == []
    assert (runs.folder / "out.mp4").stat().st_size > 0


def test_the_live_engine_on_torch_loads_no_onnx(runs):
    modules = loaded(runs("live"))
    assert "torch" in modules and "diffusers" in modules
    assert "onnx" not in modules and "onnxruntime" not in modules


@pytest.mark.parametrize("module, never", RUNTIMES)
def test_the_graph_runtimes_import_neither_each_other_nor_the_exporter(module, never, runs):
    result = runs("runtimes")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])[module]
    assert loaded == [], f"importing {module} loaded {loaded}"


def test_mediapipe_is_imported_without_running_pyplot_which_works_once_used(runs):
    result = runs("pyplot")
    assert result.returncode == 0 and result.stdout.strip() == "pyplot deferred", result.stderr[-3000:]


def test_the_bench_reads_its_portrait_without_pyav():
    """The GPU image has no PyAV: `bench --source astronaut` (no driving video) must not need it,
    as it did once through offline.py's loader."""
    code = ("import sys; sys.modules['av'] = None; from streamer.bench import load_source; "
            "image = load_source('astronaut'); sys.exit(None if image.shape == (512, 512, 3) else str(image.shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
