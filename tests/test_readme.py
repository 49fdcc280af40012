"""Every command the README shows is run by a test, as written.

The README's shell blocks are read here; each `xportrait ...` / `make ...` line (with its
continuation lines, comments dropped, `.venv/bin/` taken as the installed console script)
must have an entry in COMMANDS, and every entry must still be in the README. An optional
`[...]` part makes two commands: without the optional parts and with all of them. An entry
says how the command is run:

- RunHere: run here as written, by the real console script, in a fresh folder (the
  quick start: `--version`, `sample-clip`, `animate` on the sample clip);
- NeedsWeights: run here as written (in-process, so torch loads once); with no weights, no
  graphs and no GPU on this machine it must refuse in one clear line with exit status 2;
- RunBy: run by the named test, which must exist and run that command (its source names the
  subcommand and the command's flags); used where the command is a server or needs one.

A NeedsWeights entry may carry `known`, a defect of a command owned elsewhere: the check is
then an expected failure (xfail, not strict: when it passes, pytest reports XPASS and the
mark goes).
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPT = Path(sys.executable).with_name("xportrait")


# -- the README's commands --------------------------------------------------------------------------
def _expand_optional(command: str) -> list[str]:
    """`a [b] [c]` -> ["a", "a b c"]: as written without the optional parts, and with all."""
    if "[" not in command:
        return [command]
    bare = re.sub(r"\s*\[[^\]]*\]", "", command)
    full = re.sub(r"\[([^\]]*)\]", r"\1", command)
    return [" ".join(bare.split()), " ".join(full.split())]


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```(?:sh|bash|shell|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()  # a trailing comment
            if line.startswith("#") or not line:
                continue
            line = line.removeprefix(".venv/bin/")
            if line.split()[0] in ("xportrait", "make"):
                commands.extend(_expand_optional(" ".join(line.split())))
    return list(dict.fromkeys(commands))


@dataclass(frozen=True)
class RunHere:
    pass


@dataclass(frozen=True)
class NeedsWeights:
    message: str  # a regular expression the one-line refusal matches
    known: str | None = None
    run: bool = True  # False: the command does not refuse and would run for minutes


@dataclass(frozen=True)
class RunBy:
    test: str  # "tests/test_x.py::test_name"
    flags: tuple[str, ...]  # what the test's source must name besides the subcommand


WEIGHTS = r"(needs|not found|no such|no manifest|GPU|CUDA|TensorRT)"

COMMANDS = {
    # The quick start.
    "make serve": RunBy("tests/test_readme.py::test_make_targets_run_what_the_readme_says", ("serve",)),
    "make test": RunBy("tests/test_readme.py::test_make_targets_run_what_the_readme_says", ("test",)),
    "xportrait --version": RunHere(),
    "xportrait sample-clip driving.mp4": RunHere(),
    "xportrait animate grace_hopper driving.mp4 -o out.mp4": RunHere(),
    "xportrait animate portrait.jpg driving.mp4 -o out.mp4": RunHere(),
    # Serving and measuring the live path: a server, then a client against it.
    "xportrait serve": RunBy("tests/conftest.py::running_server", ("serve", "--port", "0")),
    "xportrait serve --host 127.0.0.1 --port 8080 --token SECRET --max-sessions 4":
        RunBy("tests/test_stream_client.py::server", ("running_server", "--token", "--max-sessions")),
    "xportrait client clip.mp4 --server http://127.0.0.1:8080 --mode both --output avatar.mp4":
        RunBy("tests/test_stream_client.py::test_client_measures_echo_then_animate_and_records_both",
              ("client", "--mode", "both", "--output")),
    # The diffusion engine, which needs weights (and, live, a GPU).
    "xportrait animate portrait.jpg driving.mp4 -o out.mp4 --engine xportrait --base stable-diffusion-v1-5/ "
    "--checkpoint model_state-415001.th": NeedsWeights(WEIGHTS),
    "xportrait animate portrait.jpg driving.mp4 -o out.mp4 --engine xportrait --base stable-diffusion-v1-5/ "
    "--checkpoint model_state-415001.th --lcm-lora lcm-lora-sdv1-5.safetensors --steps 4": NeedsWeights(WEIGHTS),
    "xportrait serve --engine xportrait --base ... --checkpoint ... --lcm-lora ...": NeedsWeights(WEIGHTS),
    "xportrait serve --engine xportrait --base ... --checkpoint ... --lcm-lora ... --compile "
    "--tiny-decoder taesd/": NeedsWeights(WEIGHTS),
    "xportrait export --to graphs/ --size 512 --steps 4 --window 16 --base ... --checkpoint ...":
        NeedsWeights(WEIGHTS),
    "xportrait serve --engine xportrait --backend onnx --graphs graphs/": NeedsWeights(WEIGHTS),
    "xportrait eval portrait.jpg puppet:grace_hopper --engine xportrait --base ... --checkpoint ... --lcm-lora ... "
    "--stream": NeedsWeights(WEIGHTS),
    "xportrait eval portrait.jpg puppet:grace_hopper --engine xportrait --base ... --checkpoint ... --lcm-lora ... "
    "--stream --deep-levels 0": NeedsWeights(WEIGHTS),
    "xportrait eval portrait.jpg puppet:grace_hopper --engine xportrait --base ... --checkpoint ... --lcm-lora ... "
    "--stream --deep-levels 0 --reuse-controls --token-downsample 2 --judge": NeedsWeights(WEIGHTS),
    "xportrait bench --engine warp --size 512": RunBy(
        "tests/test_readme.py::test_bench_warp_runs_as_written", ("bench --engine warp --size 512",)),
    # Serving to another machine over HTTPS.
    "xportrait serve --host 0.0.0.0 --self-signed --token SECRET": RunBy(
        "tests/test_serve_tls.py::test_serve_self_signed_prints_an_https_url_and_the_fingerprint",
        ("0.0.0.0", "--self-signed", "--token")),
    # Ray workers (tests/test_cluster.py: a Ray head of its own, warp workers).
    "xportrait serve --workers 2": RunBy(
        "tests/test_cluster.py::test_serve_workers_runs_a_local_ray_and_ends_it_with_the_sessions_told",
        ("--workers", "2")),
    "xportrait serve --ray-address HEAD:6379 --workers 8 --engine xportrait --base ... --checkpoint ... "
    "--lcm-lora ...": RunBy(
        "tests/test_cluster.py::test_the_diffusion_engine_on_a_cluster_without_gpus_is_refused_in_one_line",
        ("--ray-address", "--workers", "--engine", "xportrait", "--base", "--checkpoint", "--lcm-lora")),
    "xportrait serve --ray-address HEAD:6379": RunBy(
        "tests/test_cluster.py::test_a_front_restart_loses_no_session", ("running_server", "--ray-address")),
    # The virtual camera: a camera is needed, so the tests run them on a video file as the camera.
    "make cam": RunBy("tests/test_readme.py::test_make_targets_run_what_the_readme_says", ("cam",)),
    "xportrait cam --server https://gpu-box:8080 --token SECRET": RunBy(
        "tests/test_cam.py::test_remote_mode_holds_the_last_frame_shows_the_portrait_and_reconnects",
        ("server", "token")),
    "xportrait cam --portrait my-avatar.png --portrait astronaut": RunBy(
        "tests/test_cam.py::test_the_preview_window_shows_what_the_call_sees", ("--portrait", "my-avatar.png")),
    # Evaluation.
    "xportrait eval astronaut puppet:grace_hopper --frames 50 --json report.json --plot curves.png": RunBy(
        "tests/test_eval.py::test_the_eval_command_writes_json_and_a_plot",
        ("astronaut", "puppet:grace_hopper", "--frames", "--json", "--plot")),
    # Training: needs Stable Diffusion 1.5 and talking-head videos.
    "xportrait prepare-data videos/ --out data/": NeedsWeights(WEIGHTS),
    "xportrait train --stage appearance --data data/ --base sd15/ --out runs/r/": NeedsWeights(WEIGHTS),
    "xportrait train --stage motion --data data/ --base sd15/ --init runs/r/model_state-30000.th --out runs/c/":
        NeedsWeights(WEIGHTS),
    "xportrait train --stage temporal --data data/ --base sd15/ --init runs/c/model_state-30000.th --out runs/m/":
        NeedsWeights(WEIGHTS),
    "xportrait train --stage causal --data data/ --base sd15/ --init runs/m/model_state-30000.th --out runs/live/":
        NeedsWeights(WEIGHTS),
    "xportrait bench --engine xportrait --random-weights --stream --compile": NeedsWeights(WEIGHTS),
}


def test_every_readme_command_has_an_entry_and_every_entry_is_in_the_readme():
    shown = readme_commands(README.read_text())
    assert shown, "no commands found in README.md"
    missing = [c for c in shown if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in shown]
    assert not missing, f"README commands no test runs: {missing}"
    assert not stale, f"entries for commands the README no longer shows: {stale}"


def test_readme_commands_are_read_as_a_shell_would():
    text = "```sh\n.venv/bin/xportrait a b \\\n    --c d [--e f] [--g]   # note\n# a comment\nls -l\nmake x\n```\n"
    assert readme_commands(text) == ["xportrait a b --c d", "xportrait a b --c d --e f --g", "make x"]


def _marks(entry) -> list:
    if isinstance(entry, NeedsWeights) and entry.known:
        return [pytest.mark.xfail(reason=entry.known, strict=False, run=getattr(entry, "run", True))]
    return []


def _params(kind) -> list:
    return [pytest.param(c, e, id=c[:70], marks=_marks(e)) for c, e in COMMANDS.items() if isinstance(e, kind)]


# -- run here: the quick start, as a new user types it ----------------------------------------------
def _start(command: str, cwd: Path) -> subprocess.Popen:
    argv = shlex.split(command)
    assert argv[0] == "xportrait"
    return subprocess.Popen([str(SCRIPT), *argv[1:]], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def readme_bench(tmp_path_factory):
    """The README's warp bench, as written, by the installed script, started once for the
    module: the quick start runs beside it (the bench is one thread, and so is `sample-clip`,
    with the machine's second core idle in a serial suite) and test_bench_warp_runs_as_written
    reads what it said. Its figures are not asserted (timings are the benchmarks' business)."""
    folder = tmp_path_factory.mktemp("bench")
    argv = shlex.split("xportrait bench --engine warp --size 512")
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:  # (no pipe to fill meanwhile)
        process = subprocess.Popen([str(SCRIPT), *argv[1:]], cwd=folder, stdout=out, stderr=err)
    yield process, folder
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.usefixtures("readme_bench")  # the bench runs meanwhile
def test_quick_start_runs_as_written(tmp_path):
    """`--version`, then `sample-clip driving.mp4`, then `animate` on it (a bundled portrait's
    name, then a portrait file of one's own), in a fresh folder, by the installed script.

    The two `animate` commands run at once, each in its folder with the sample clip (the
    machine's second core, idle in a serial suite, takes one): the portrait file's beside an
    earlier out.mp4, which it replaces as a user's second run does."""
    from importlib.metadata import version

    from engines.face import FaceTracker
    from streamer.samples import portrait

    here = [c for c, e in COMMANDS.items() if isinstance(e, RunHere)]
    assert here == ["xportrait --version", "xportrait sample-clip driving.mp4",
                    "xportrait animate grace_hopper driving.mp4 -o out.mp4",
                    "xportrait animate portrait.jpg driving.mp4 -o out.mp4"]
    assert SCRIPT.exists(), "the project's console script is not installed"
    second = tmp_path / "second"
    second.mkdir()
    Image.fromarray(portrait("grace_hopper")).save(second / "portrait.jpg")  # a portrait of one's own
    (second / "out.mp4").write_bytes(b"an earlier run's output")

    def check(command: str, result: subprocess.CompletedProcess) -> None:
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "W0000" not in result.stderr, (command, result.stderr)

    results = {}
    for command in here[:2]:
        results[command] = _finish(_start(command, tmp_path))
        check(command, results[command])
    shutil.copy(tmp_path / "driving.mp4", second / "driving.mp4")
    folders = {here[2]: tmp_path, here[3]: second}
    running = {command: _start(command, folder) for command, folder in folders.items()}
    for command, process in running.items():
        results[command] = _finish(process)
    with FaceTracker(video=False) as tracker:
        for command, folder in folders.items():
            result = results[command]
            check(command, result)
            with av.open(str(folder / "out.mp4")) as container:
                stream = container.streams.video[0]
                count, frames = 0, {}
                for frame in container.decode(stream):  # every frame decoded; those looked at, as RGB
                    if count in (0, 60, 125, 249):
                        frames[count] = frame.to_ndarray(format="rgb24")
                    count += 1
            assert (stream.width, stream.height, count) == (512, 512, 250)
            assert all(tracker.detect(frames[i]) is not None for i in (0, 125, 249))
            # Not a still: the head moves as the driving clip's does.
            assert np.abs(frames[60].astype(np.int16) - frames[0]).mean() > 3
            assert "250 frames" in result.stdout
    assert results["xportrait --version"].stdout.strip() == f"xportrait {version('xportrait')}"
    with av.open(str(tmp_path / "driving.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.frames, stream.average_rate) == (640, 480, 250, 25)


# Right after the quick start: pytest-xdist's load scheduling (make test) then gives both to one
# process, which runs the bench once, beside the quick start, instead of once for each.
def test_bench_warp_runs_as_written(readme_bench):
    process, folder = readme_bench
    assert process.args == [str(SCRIPT), *shlex.split("xportrait bench --engine warp --size 512")[1:]]
    code = process.wait(timeout=300)
    out, err = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    assert code == 0, err[-2000:]  # (it once died of an UnboundLocalError)
    assert "Traceback" not in err
    assert out.startswith("engine warp at 512x512 on ")
    assert "  290 frames: " in out  # the default 300, less the 10 warm-up frames
    assert "baseline (scikit-image PiecewiseAffineTransform warp)" in out


# -- needs weights: refused in one clear line, exit 2 ---------------------------------------------
@pytest.mark.parametrize("command, entry", _params(NeedsWeights))
def test_commands_that_need_weights_refuse_in_one_line(command, entry, tmp_path, monkeypatch, capsys):
    from streamer.cli import main

    from streamer.samples import driving_clip, portrait
    from streamer.video import write_video

    monkeypatch.chdir(tmp_path)  # a fresh folder: a portrait and a driving clip, no weights, no graphs
    Image.fromarray(portrait("grace_hopper")).save(tmp_path / "portrait.jpg")
    write_video(tmp_path / "driving.mp4", (frame for frame, _ in driving_clip("astronaut", frames=3)))
    try:
        code = main(shlex.split(command)[1:])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("xportrait ")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert ours and re.search(entry.message, ours[-1]), err[-2000:]


# -- run by another test ------------------------------------------------------------------------------
@pytest.mark.parametrize("command, entry", _params(RunBy))
def test_commands_run_by_other_tests(command, entry):
    path, name = entry.test.split("::")
    module = importlib.import_module(Path(path).stem)
    target = getattr(module, name, None)
    assert target is not None, f"{entry.test} does not exist"
    source = inspect.getsource(getattr(target, "__wrapped__", target))
    subcommand = shlex.split(command)[1]
    for word in (subcommand, *entry.flags):
        assert word in source, f"{entry.test} does not run `{command}` ({word!r} not in it)"


def test_make_targets_run_what_the_readme_says():
    """`make serve` sets up and serves on 127.0.0.1:8080; `make test` sets up, then runs pytest
    (this suite, as CI's .ci/run does): the recipes, as make would run them."""
    plan = subprocess.run(["make", "-n", "-B", "serve", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "pip install -q -e ." in plan.stdout
    assert "/nonexistent-venv/bin/xportrait serve --host 127.0.0.1 --port 8080" in plan.stdout
    plan = subprocess.run(["make", "-n", "-B", "test", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "pip install -q -e '.[test]'" in plan.stdout
    # Two passes: all but the realtime tests on two processes, then the realtime ones alone.
    assert '/nonexistent-venv/bin/python -m pytest -q -n 2 -m "not realtime"\n' in plan.stdout
    assert "/nonexistent-venv/bin/python -m pytest -q -m realtime\n" in plan.stdout
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    plan = subprocess.run(["make", "-n", "-B", "cam", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "pip install -q -e '.[cam]'" in plan.stdout
    assert "/nonexistent-venv/bin/xportrait cam" in plan.stdout
