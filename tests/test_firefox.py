"""The page in headless Firefox: it connects to a real `xportrait serve`, receives avatar
frames and shows the live stats.

Firefox is driven over WebDriver BiDi (its built-in remote protocol) with aiohttp's
websocket client: no driver to install. Its fake camera shows a test pattern, not a face,
so the avatar is the portrait held in its own pose: the point here is the browser's side
(getUserMedia, WebRTC negotiation, the data channel, the overlay). The face path is the
Chromium test's. Needs Debian's `firefox-esr`; skipped with a reason when it is missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import time

import aiohttp
import pytest
from conftest import running_server, stop

FIREFOX = os.environ.get("FIREFOX") or shutil.which("firefox-esr") or shutil.which("firefox")
pytestmark = [pytest.mark.skipif(FIREFOX is None, reason="firefox is not installed (Debian: apt-get install firefox-esr)"),
              pytest.mark.realtime]

TOKEN = "firefox-token"
# A fake camera and no permission prompt; loopback ICE candidates (the server offers only
# those); and nothing that would reach out to Mozilla's services on a closed network.
PREFS = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,  # plain addresses, not mDNS names
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.newtabpage.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "extensions.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}

PAGE_STATE = """(() => {
  const avatar = document.getElementById('avatar');
  if (!avatar || !window.xportrait) return null;
  return JSON.stringify({status: xportrait.status, error: xportrait.error, frames: xportrait.avatarFrames,
                         stats: xportrait.stats, width: avatar.videoWidth, height: avatar.videoHeight,
                         overlay: (document.getElementById('overlay') || {}).textContent || '',
                         glass: xportrait.glassToGlass});
})()"""


class BiDi:
    def __init__(self, websocket):
        self.websocket = websocket
        self.ids = itertools.count(1)

    async def call(self, method: str, params: dict) -> dict:
        message_id = next(self.ids)
        await self.websocket.send_json({"id": message_id, "method": method, "params": params})
        while True:
            reply = await asyncio.wait_for(self.websocket.receive_json(), 20)
            if reply.get("id") == message_id:
                if reply.get("type") == "error":
                    raise AssertionError(f"{method}: {reply.get('error')}: {reply.get('message')}")
                return reply["result"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    with running_server("--token", TOKEN, "--idle-timeout", "3") as (process, url):
        yield url
    process.wait(timeout=30)


def test_page_streams_in_firefox(server, tmp_path):
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "user.js").write_text("".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in PREFS.items()))
    port = free_port()
    browser = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile),
                                f"--remote-debugging-port={port}", f"{server}/?token={TOKEN}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(drive(server, port, browser))
    finally:
        stop(browser)


async def drive(url: str, port: int, browser: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while True:  # Firefox opens its remote port a moment after starting
            assert browser.poll() is None, f"firefox exited with status {browser.returncode}"
            try:
                websocket = await http.ws_connect(f"ws://127.0.0.1:{port}/session", max_msg_size=0)
                break
            except aiohttp.ClientError:
                assert time.monotonic() < deadline, "firefox did not open its remote port"
                await asyncio.sleep(0.3)
        async with websocket:
            bidi = BiDi(websocket)
            await bidi.call("session.new", {"capabilities": {}})
            context = None
            while context is None:
                tree = await bidi.call("browsingContext.getTree", {})
                context = next((c["context"] for c in tree["contexts"] if c["url"].startswith(url)), None)
                assert context or time.monotonic() < deadline, f"the page did not open: {tree}"
                await asyncio.sleep(0.2)

            async def state() -> dict | None:
                result = await bidi.call("script.evaluate", {"expression": PAGE_STATE, "target": {"context": context},
                                                             "awaitPromise": False})
                value = result.get("result", {}).get("value")
                return json.loads(value) if isinstance(value, str) else None

            while (await state()) is None:
                assert time.monotonic() < deadline, "the page did not load"
                await asyncio.sleep(0.2)
            await bidi.call("script.evaluate", {"expression": "document.getElementById('start').click()",
                                                "target": {"context": context}, "awaitPromise": False})
            deadline = time.monotonic() + 90
            while True:
                page = await state()
                assert not page["error"], f"the page reports an error: {page['error']}"
                if page["frames"] >= 30 and page["stats"] and page["stats"]["frames_out"] >= 30:
                    break
                assert time.monotonic() < deadline, f"timed out waiting for avatar frames; page state: {page}"
                await asyncio.sleep(0.5)
            assert page["status"] == "streaming"
            assert (page["width"], page["height"]) == (512, 512)
            stats = page["stats"]
            assert stats["mode"] == "animate" and stats["errors"] == 0 and stats["fps_out"] > 5
            assert "fps" in page["overlay"] and "p50" in page["overlay"]
            # Glass-to-glass: a plausible figure where Firefox gives capture times and RTP
            # timestamps to requestVideoFrameCallback, n/a where it does not; never a wrong number.
            await asyncio.sleep(3)
            page = await state()
            if page["glass"] is None:
                assert "glass-to-glass n/a" in page["overlay"], page["overlay"]
            else:
                assert page["stats"]["latency_ms"]["p50"] < page["glass"] < 5000, page
            async with http.get(f"{url}/stats", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert (await response.json())["sessions_active"] == 1
