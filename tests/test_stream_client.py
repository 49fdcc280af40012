"""`xportrait client` against a real `xportrait serve` subprocess on 127.0.0.1.

Both ends are the installed commands (run as `python -m streamer ...`), speaking real WebRTC
over the loopback host; every wait is bounded. A command line refused before it connects to
anything (its flags, its files) runs in this process (`refused_here`): the same `main`.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import av
import pytest
from conftest import running_server

from streamer import samples
from streamer.video import write_video

pytestmark = pytest.mark.realtime

TOKEN = "test-token"
FPS = 25
SECONDS = 3


def xportrait(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", *args]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "webcam.mp4"
    frames = (frame for frame, _ in samples.driving_clip("astronaut", frames=SECONDS * FPS, fps=FPS))
    write_video(path, frames, fps=FPS)
    return str(path)


@pytest.fixture(scope="module")
def server():
    with running_server("--token", TOKEN, "--idle-timeout", "2", "--max-sessions", "2") as (process, url):
        yield url
    assert process.wait(timeout=30) == 0  # a clean shutdown, sessions closed


def server_stats(url: str) -> dict:
    request = urllib.request.Request(url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def run_client(url: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(xportrait("client", *args, "--server", url), capture_output=True, text=True,
                          timeout=timeout)


def run_at_once(*commands: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Independent commands side by side (each is mostly its interpreter's start-up, on one
    core): their results, in order."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def refused_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`xportrait ARGS` in this process, for a command line refused before it connects to
    anything (its flags, its files): the same `main`, no interpreter to start. Its exit status
    and what it said."""
    from streamer.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    said = capsys.readouterr()
    return subprocess.CompletedProcess(["xportrait", *args], code, said.out, said.err)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_client_measures_echo_then_animate_and_records_both(server, clip, tmp_path):
    output = tmp_path / "avatar.mp4"
    result = run_client(server, clip, "--mode", "both", "--token", TOKEN, "--output", str(output),
                        "--report", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for mode, path, size in (("echo", tmp_path / "avatar.echo.mp4", (640, 480)), ("animate", output, (512, 512))):
        run = report[mode]
        assert run["mode"] == mode and run["server"]["mode"] == mode
        assert run["frames_sent"] == SECONDS * FPS
        assert run["frames_unmatched"] == 0  # every frame that came back carried a webcam frame's pts
        assert run["frames_matched"] >= 0.8 * run["frames_sent"]
        assert run["dropped"] == run["frames_sent"] - run["frames_matched"]
        assert 0.8 * FPS < run["fps_received"] < 1.2 * FPS
        latency = run["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["max"] < 1500
        windows = run["latency_ms_per_window"]
        assert sum(w["frames"] for w in windows) == run["frames_matched"] and windows[0]["p50"] > 0
        with av.open(str(path)) as recording:
            stream = recording.streams.video[0]
            frames = sum(1 for _ in recording.decode(stream))
            assert (stream.width, stream.height) == size
        assert frames == run["frames_recorded"] == run["frames_received"]
    assert report["animate"]["server"]["stages_ms"]["engine"] > 0
    assert report["echo"]["server"]["stages_ms"]["face"] == 0
    assert "engine_cost_ms_p50" in report
    stats = wait_for(lambda: (s := server_stats(server))["sessions_active"] == 0 and s, 10, "sessions to end")
    assert stats["worker_threads"] == 0


def test_killed_client_frees_its_session_and_worker(server, clip):
    client = subprocess.Popen(
        xportrait("client", clip, "--server", server, "--token", TOKEN, "--loop", "--duration", "60"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(s["frames_in"] > 10 for s in server_stats(server)["sessions"]), 60, "frames to arrive")
        assert server_stats(server)["worker_threads"] == 2  # its prep and engine threads
    finally:
        client.send_signal(signal.SIGKILL)  # no goodbye: no DTLS close, no RTCP BYE
        client.wait(timeout=10)
    # The server notices the silence (--idle-timeout 2) and frees everything.
    stats = wait_for(lambda: (s := server_stats(server))["sessions_active"] == 0 and s, 15, "the session to be freed")
    assert stats["worker_threads"] == 0


def test_client_reports_refusals_and_bad_input(server, clip, tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    (tmp_path / "text.mp4").write_text("not a video")
    wrong_token, unreachable = run_at_once(
        xportrait("client", clip, "--token", "wrong", "--server", server),
        xportrait("client", clip, "--token", TOKEN, "--server", f"http://127.0.0.1:{closed_port}"))
    missing, not_a_video = (refused_here(capsys, "client", str(tmp_path / name), "--token", TOKEN, "--server", server)
                            for name in ("missing.mp4", "text.mp4"))
    assert wrong_token.returncode == 1
    assert "401" in wrong_token.stderr and "token" in wrong_token.stderr
    assert unreachable.returncode == 2 and "cannot reach the server" in unreachable.stderr
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert not_a_video.returncode == 2 and "cannot read video" in not_a_video.stderr
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(server + "/stats", timeout=5)
    assert refused.value.code == 401


def test_serve_refuses_a_bad_engine_and_a_taken_port(server, capsys):
    port = server.rsplit(":", 1)[1]
    bad_engine = refused_here(capsys, "serve", "--engine", "nope", "--port", "0")
    bad_size = refused_here(capsys, "serve", "--size", "100", "--port", "0")
    (taken,) = run_at_once(xportrait("serve", "--port", port))  # (a serve that did not refuse would serve on)
    assert bad_engine.returncode == 2 and "invalid choice: 'nope'" in bad_engine.stderr
    assert bad_size.returncode == 2 and "size must be a multiple of 8" in bad_size.stderr
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    assert "preparing" not in taken.stdout  # refused at once, before the engine was prepared


def test_server_without_a_scheme_means_http_and_bad_urls_are_refused_in_words(server, clip, capsys):
    bare = server.removeprefix("http://")  # 127.0.0.1:PORT, as users type it
    bad_urls = (("ftp://127.0.0.1:8080", "http:// or https://"), ("127.0.0.1:http", "port number"),
                ("http://", "such as http://127.0.0.1:8080"))
    (result,) = run_at_once(xportrait("client", clip, "--server", bare, "--token", TOKEN, "--duration", "1"),
                            timeout=90)
    refused = [refused_here(capsys, "client", clip, "--server", bad) for bad, _ in bad_urls]
    device = refused_here(capsys, "client", clip, "--server", server, "--output", "/dev/null")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["frames_sent"] == FPS and report["frames_received"] > 0
    for (bad, phrase), result in zip(bad_urls, refused):
        assert result.returncode == 2 and phrase in result.stderr, (bad, result.stderr)
        assert "Traceback" not in result.stderr
    assert device.returncode == 2 and "character device" in device.stderr, device.stderr
