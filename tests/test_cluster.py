"""`serve --workers N` / `--ray-address`: sessions on Ray workers (streamer/cluster).

One Ray head for the module (`ray start --head --block`, 2 CPUs, started and stopped here),
warp-engine workers of capacity 1, fronts as real `xportrait serve` processes, and "browsers"
that are aiortc peers in the test's event loop (tests/live_helpers.py), whose media goes
straight to the workers. A worker is killed as a crash would kill it: SIGKILL to its process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import running_server
from live_helpers import FPS, Peer, Webcam, clip, encoded, until  # noqa: F401

from streamer import samples

ray = pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
WORKERS = ("xportrait-worker-0", "xportrait-worker-1")
FRONT = ("--workers", "2", "--max-sessions", "1", "--idle-timeout", "5", "--connect-timeout", "10")

pytestmark = [pytest.mark.timeout(180), pytest.mark.realtime]  # a Ray head of 2 CPUs and live streams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on this machine (what `ray start --head` is on a cluster's first host): its
    address. Its processes are this fixture's children, and end with it."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=150000000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # the GCS listens once the head is up
        assert process.poll() is None, "ray start --head failed"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "ray start --head did not come up in 60 s"
            time.sleep(0.3)
    try:
        yield address
    finally:
        # `ray start --block` would drain for 30 s on SIGTERM: the head's processes (the GCS, the
        # raylet, its workers: all descendants of the process started here) are killed instead.
        for pid in [process.pid, *_descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=10)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def front(head):
    """`xportrait serve --ray-address HEAD --workers 2 --max-sessions 1`: (process, base URL)."""
    with running_server("--ray-address", head, *FRONT) as (process, url):
        yield process, url


def webcam_peer(clip, seconds: float = 30) -> Peer:
    return Peer(Webcam(lambda i: clip[i % len(clip)], int(seconds * FPS)))


async def stats(http: aiohttp.ClientSession) -> dict:
    response = await http.get("/stats")
    assert response.status == 200
    return await response.json()


async def eventually(http, condition, timeout: float, what: str) -> dict:
    """Poll /stats until `condition(stats)` holds: that /stats."""
    deadline = time.monotonic() + timeout
    while True:
        current = await stats(http)
        if condition(current):
            return current
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s; /stats: {current}"
        await asyncio.sleep(0.2)


def worker_of(current: dict, session: str) -> dict:
    name = next(s["worker"] for s in current["sessions"] if s["id"] == session)
    return next(w for w in current["workers"] if w["name"] == name)


async def close(*peers: Peer) -> None:
    for peer in peers:
        await peer.close()


# -- one machine: --workers N starts (and ends) a local Ray -------------------------------------------
def test_serve_workers_runs_a_local_ray_and_ends_it_with_the_sessions_told(clip):
    """`xportrait serve --workers 2`: a local Ray and two workers, both on /stats; a session
    streams; SIGTERM tells the session why on its data channel, ends the workers and Ray."""
    with running_server("--workers", "2", "--ray-cpus", "2", "--max-sessions", "1") as (process, url):
        async def main():
            async with aiohttp.ClientSession(url) as http:
                current = await stats(http)
                assert [w["name"] for w in current["workers"]] == list(WORKERS)
                assert all(w["state"] == "live" and w["pid"] != process.pid for w in current["workers"])
                assert current["max_sessions"] == 2 and current["max_sessions_per_worker"] == 1
                peer = webcam_peer(clip)
                assert (await peer.offer(http)).status == 200
                await until(lambda: len(peer.received) >= 5, 30)
                pids = [w["pid"] for w in current["workers"]]
                process.send_signal(signal.SIGTERM)
                await until(lambda: any(m.get("type") == "ended" for m in peer.stats), 20)
                ended = next(m for m in peer.stats if m.get("type") == "ended")
                assert "shutting down" in ended["reason"]
                await close(peer)
                return pids

        pids = asyncio.run(main())
        assert process.wait(timeout=30) == 0
        for pid in pids:  # the workers (and the local Ray) ended with the command
            deadline = time.monotonic() + 15
            while _alive(pid):
                assert time.monotonic() < deadline, f"worker pid {pid} outlived serve --workers"
                time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended


# -- a cluster: --ray-address ----------------------------------------------------------------------------
def test_sessions_spread_over_the_workers_and_a_third_is_refused_with_503(front, clip):
    _, url = front

    async def main():
        async with aiohttp.ClientSession(url) as http:
            current = await stats(http)
            assert [(w["name"], w["state"], w["capacity"]) for w in current["workers"]] == \
                [(name, "live", 1) for name in WORKERS]
            peers = [webcam_peer(clip), webcam_peer(clip)]
            try:  # closed whatever fails, so that the next test finds the workers free
                for peer in peers:
                    assert (await peer.offer(http)).status == 200
                third = webcam_peer(clip)
                response = await third.offer(http)
                assert response.status == 503
                assert "busy" in (await response.json())["error"]
                await close(third)
                await until(lambda: all(len(p.received) >= 10 for p in peers), 30)
                assert all(frame.shape == (512, 512, 3) for p in peers for _, _, frame in p.received[-3:])
                current = await stats(http)
                assert sorted(s["worker"] for s in current["sessions"]) == list(WORKERS)  # one on each
                assert all(s["frames_processed"] > 0 for s in current["sessions"])
                assert [w["sessions_active"] for w in current["workers"]] == [1, 1]
                # An upload reaches the session's worker, with the session's secret only.
                image = encoded(samples.portrait("grace_hopper"))
                wrong = await http.post(f"/avatar?session={peers[0].session}", data=image,
                                        headers={"X-Session-Secret": peers[1].secret, "Content-Type": "image/jpeg"})
                assert wrong.status == 403 and "secret" in (await wrong.json())["error"]
                upload = await http.post(f"/avatar?session={peers[0].session}", data=image,
                                         headers={**peers[0].control, "Content-Type": "image/jpeg"})
                assert upload.status == 200, await upload.text()
                assert (await upload.json())["portrait"] == "upload"
                portraits = lambda s: {x["id"]: x["portrait"] for x in s["sessions"]}  # noqa: E731
                await eventually(http, lambda s: portraits(s).get(peers[0].session) == "upload", 5,
                                 "/stats shows the uploaded portrait (it polls the workers)")
                not_an_image = await http.post(f"/avatar?session={peers[1].session}", data=b"hello",
                                               headers={**peers[1].control, "Content-Type": "text/plain"})
                refusal = (await not_an_image.json())["error"]
                assert not_an_image.status == 400 and "previous portrait is kept" in refusal
            finally:
                await close(*peers)
            await eventually(http, lambda s: not s["sessions"], 15, "the closed sessions ended on their workers")

    asyncio.run(main())


def test_a_killed_worker_ends_its_session_the_other_streams_and_it_comes_back(front, clip):
    _, url = front

    async def main():
        async with aiohttp.ClientSession(url) as http:
            doomed, survivor = webcam_peer(clip), webcam_peer(clip)
            for peer in (doomed, survivor):
                assert (await peer.offer(http)).status == 200
            await until(lambda: len(doomed.received) >= 5 and len(survivor.received) >= 5, 30)
            current = await stats(http)
            victim = worker_of(current, doomed.session)
            assert worker_of(current, survivor.session)["name"] != victim["name"]
            os.kill(victim["pid"], signal.SIGKILL)  # a crash: the process is gone

            current = await eventually(http, lambda s: any(e["id"] == doomed.session for e in s["ended"]), 10,
                                       "the dead worker's session is reported ended")
            ended = next(e for e in current["ended"] if e["id"] == doomed.session)
            assert ended["worker"] == victim["name"] and "died" in ended["reason"]
            assert doomed.session not in [s["id"] for s in current["sessions"]]
            # Its control requests say why; the other session is still controlled as before.
            state = await http.get(f"/session?session={doomed.session}", headers=doomed.control)
            assert state.status == 410
            message = (await state.json())["error"]
            assert victim["name"] in message and "died" in message and "start the stream again" in message
            switch = await http.post(f"/avatar?session={doomed.session}&portrait=grace_hopper", headers=doomed.control)
            assert switch.status == 410
            state = await http.get(f"/session?session={survivor.session}", headers=survivor.control)
            assert state.status == 200 and (await state.json())["state"] == "live"
            # Media: the dead worker's peer gets nothing more, the other keeps streaming.
            doomed_count, survivor_count = len(doomed.received), len(survivor.received)
            await asyncio.sleep(2.0)
            assert len(doomed.received) <= doomed_count + 1
            assert len(survivor.received) >= survivor_count + 10

            # Ray restarts the worker (a new process); it takes the next session.
            current = await eventually(
                http, lambda s: all(w["state"] == "live" for w in s["workers"]) and
                next(w for w in s["workers"] if w["name"] == victim["name"])["pid"] != victim["pid"], 30,
                "the killed worker is back")
            back = next(w for w in current["workers"] if w["name"] == victim["name"])
            assert back["restarts"] == 1 and back["instance"] != victim["instance"]
            newcomer = webcam_peer(clip)
            assert (await newcomer.offer(http)).status == 200
            await until(lambda: len(newcomer.received) >= 5, 30)
            current = await stats(http)
            assert worker_of(current, newcomer.session)["name"] == victim["name"]  # the other is full
            await close(doomed, survivor, newcomer)
            await eventually(http, lambda s: not s["sessions"], 15, "the sessions ended")

    asyncio.run(main())


def test_the_page_says_why_its_stream_stopped_when_its_worker_dies(front, tmp_path):
    """Chromium with a fake webcam streams through the front; its worker is killed; the page
    says that the worker died (the front's 410 for the session), not just "connection failed"."""
    from test_browser import CHROMIUM, CHROMIUM_FLAGS, PAGE_STATE, open_page, screenshot

    from streamer.video import write_video

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    _, url = front
    webcam = tmp_path / "webcam.y4m"
    write_video(webcam, (frame for frame, _ in samples.driving_clip("astronaut", frames=2 * FPS, fps=FPS)), fps=FPS)
    profile = tmp_path / "profile"
    profile.mkdir()
    browser = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                f"--use-file-for-fake-video-capture={webcam}", f"{url}/"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def page_state(page) -> dict | None:
        return json.loads(await page.evaluate(PAGE_STATE) or "null")

    async def main():
        async with aiohttp.ClientSession(url) as http, open_page(url, profile, browser) as page:
            deadline = time.monotonic() + 30
            while not ((state := await page_state(page)) and state["portraits"]):
                assert time.monotonic() < deadline, "no gallery"
                await asyncio.sleep(0.2)
            await page.evaluate("document.getElementById('start').click()")
            deadline = time.monotonic() + 60
            while not ((state := await page_state(page)) and state["frames"] >= 20):
                assert not state or not state["error"], state
                assert time.monotonic() < deadline, f"no avatar frames: {state}"
                await asyncio.sleep(0.3)
            victim = worker_of(await stats(http), state["session"])
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 45
            while not (state := await page_state(page))["error"]:
                assert time.monotonic() < deadline, f"the page said nothing: {state}"
                await asyncio.sleep(0.3)
            assert "died" in state["error"] and victim["name"] in state["error"], state["error"]
            assert state["session"] is None and state["status"].startswith("the stream ended")
            await screenshot(page, tmp_path / "worker-died.png")
            os.environ.get("XPORTRAIT_SHOTS") and shutil.copy(tmp_path / "worker-died.png",
                                                              os.environ["XPORTRAIT_SHOTS"])
            await eventually(http, lambda s: all(w["state"] == "live" for w in s["workers"]) and not s["sessions"],
                             30, "the worker back, no session left")

    try:
        asyncio.run(main())
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=15)
        except subprocess.TimeoutExpired:
            browser.kill()


def test_a_front_restart_loses_no_session(front, head, clip):
    """The front is killed (SIGKILL) mid-session; a new front on the same cluster finds the
    workers and the session, which streamed on meanwhile, and controls it with its secret."""
    process, url = front

    async def main():
        peer = webcam_peer(clip)
        async with aiohttp.ClientSession(url) as http:
            assert (await peer.offer(http)).status == 200
        await until(lambda: len(peer.received) >= 5, 30)
        process.kill()
        process.wait(timeout=10)
        count = len(peer.received)
        await asyncio.sleep(1.0)
        assert len(peer.received) >= count + 5  # no front, media flows on
        return peer

    async def again(peer, url2):
        async with aiohttp.ClientSession(url2) as http:
            current = await stats(http)
            assert [w["name"] for w in current["workers"]] == list(WORKERS)
            assert current["max_sessions"] == 2  # the workers' own capacity: --max-sessions was theirs
            assert [s["id"] for s in current["sessions"]] == [peer.session]
            state = await http.get(f"/session?session={peer.session}", headers=peer.control)
            assert state.status == 200
            wrong = await http.get(f"/session?session={peer.session}", headers={"X-Session-Secret": "guess"})
            assert wrong.status == 403
            switch = await http.post(f"/avatar?session={peer.session}&portrait=grace_hopper", headers=peer.control)
            assert switch.status == 200 and (await switch.json())["portrait"] == "grace_hopper"
            count = len(peer.received)
            await until(lambda: len(peer.received) >= count + 5, 10)
            await close(peer)
            await eventually(http, lambda s: not s["sessions"], 15, "the session ended")

    loop = asyncio.new_event_loop()
    try:
        peer = loop.run_until_complete(main())
        # As a restarted front is started: --ray-address alone takes the workers that run there.
        with running_server("--ray-address", head) as (_, url2):
            loop.run_until_complete(again(peer, url2))
    finally:
        loop.close()


def test_the_diffusion_engine_on_a_cluster_without_gpus_is_refused_in_one_line(head):
    """`serve --ray-address HEAD --workers 2 --engine xportrait ...` where no host has a GPU."""
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--ray-address", head, "--workers", "2", "--engine", "xportrait",
         "--base", "sd15/", "--checkpoint", "model_state-415001.th", "--lcm-lora", "lcm-lora-sdv1-5.safetensors"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "one GPU each" in result.stderr and "has no GPU" in result.stderr


# -- options, and plain serve untouched ----------------------------------------------------------------
def test_plain_serve_imports_no_ray():
    code = ("import sys; from streamer.cli import build_parser; from streamer.options import serve_options; "
            "import streamer.server; args = build_parser(['serve'])[0].parse_args(['serve']); "
            "o = serve_options(args); assert o.cluster is None and o.ice_servers == (); "
            "assert 'ray' not in sys.modules, 'plain serve imported ray'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--ray-address", " "], "--ray-address must name a cluster"),
    (["--ray-cpus", "2"], "--ray-cpus: only with --workers or --ray-address"),
    (["--ray-address", "auto", "--ray-cpus", "2"], "--ray-cpus is for the local Ray"),
    (["--workers", "2", "--worker-cpus", "0"], "--worker-cpus must be positive"),
    (["--ice-server", "http://stun.example"], "give stun:HOST"),
    (["--ice-server", "turn:turn.example:3478"], "needs a user and a password"),
    (["--ice-server", "stun:u:p@stun.example"], "takes no user or password"),
])
def test_cluster_and_ice_flags_are_checked(flags, message, capsys):
    from streamer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_ice_servers_reach_aiortc_and_the_page():
    from streamer.options import IceServer, ServeOptions
    from streamer.server import Server, rtc_configuration

    turn = IceServer.parse("turn:alice:s3cret@turn.example:3478?transport=tcp")
    stun = IceServer.parse("stun:stun.example:19302")
    assert (turn.url, turn.username, turn.credential) == ("turn:turn.example:3478?transport=tcp", "alice", "s3cret")
    config = rtc_configuration((stun, turn))
    assert [(s.urls, s.username, s.credential) for s in config.iceServers] == [
        ("stun:stun.example:19302", None, None), ("turn:turn.example:3478?transport=tcp", "alice", "s3cret")]
    assert rtc_configuration(()).iceServers == []
    server = Server(ServeOptions(ice_servers=(stun, turn), token="t"))

    async def main():
        from aiohttp import web

        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
                assert (await http.get("/ice-servers")).status == 401  # TURN credentials: the token's holders only
                listed = await (await http.get("/ice-servers", headers={"Authorization": "Bearer t"})).json()
                assert listed == [{"urls": "stun:stun.example:19302"},
                                  {"urls": "turn:turn.example:3478?transport=tcp", "username": "alice",
                                   "credential": "s3cret"}]
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_the_kuberay_example_starts_serve_with_flags_serve_takes():
    import yaml

    from streamer.cli import build_parser
    from streamer.options import serve_options

    cluster, service = yaml.safe_load_all((ROOT / "docs" / "kuberay.yaml").read_text())
    assert (cluster["kind"], service["kind"]) == ("RayCluster", "Service")
    head_pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    front = next(c for c in head_pod["containers"] if c["name"] == "front")
    args = [a.replace("$(XPORTRAIT_TOKEN)", "SECRET").replace("$(TURN)", "turn:u:p@turn.example.com:3478")
            for a in front["args"]]
    options = serve_options(build_parser(args)[0].parse_args(args))
    assert options.cluster.address == "auto" and options.cluster.workers == 4
    assert options.engine.name == "xportrait" and options.ice_servers[0].username == "u"
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
