"""`serve` beyond this machine: HTTPS (a given certificate, or a self-signed one made on
request), the refusal of plain HTTP on a network address, and a quiet log."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import running_server
from cryptography import x509
from live_helpers import FPS, Peer, Webcam, clip, configured, prepared, running, until  # noqa: F401

from streamer import server as serve_module
from streamer.cli import main
from streamer.tls import TLSError, fingerprint, self_signed, server_context


def serve(*argv: str) -> int:
    try:
        return main(["serve", *argv])
    except SystemExit as exit:  # a usage error
        return exit.code


@pytest.mark.parametrize("argv, words", [
    (["--host", "0.0.0.0"], ["plain HTTP", "--self-signed", "ssh -L 8080:127.0.0.1:8080", "--insecure", "camera"]),
    (["--host", "192.0.2.7", "--token", "t"], ["plain HTTP", "unencrypted"]),
    (["--tls-cert", "cert.pem"], ["--tls-key"]),
    (["--self-signed", "--tls-cert", "a", "--tls-key", "b"], ["either --self-signed"]),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], ["not found"]),
    (["--allow-origin", "evil.example"], ["scheme://host"]),
])
def test_serve_refuses_unsafe_or_broken_setups_before_loading_anything(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(serve_module.Server, "prepare", lambda self: pytest.fail("got as far as loading"))
    assert serve(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_a_self_signed_certificate_names_the_hosts_and_is_reused(tmp_path):
    cert_path, key_path = self_signed(["localhost", "127.0.0.1", "gpu-box", "192.0.2.7"], tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "gpu-box"}
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "192.0.2.7"}
    assert oct(os.stat(key_path).st_mode & 0o777) == "0o600"
    first = cert_path.read_bytes()
    assert self_signed(["localhost", "gpu-box"], tmp_path)[0].read_bytes() == first  # covered: reused
    assert self_signed(["localhost", "other-box"], tmp_path)[0].read_bytes() != first  # a new name: remade
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fingerprint(cert_path))
    server_context(cert_path, key_path)  # loads
    with pytest.raises(TLSError, match="cannot use the TLS certificate"):
        server_context(cert_path, tmp_path / "cert.pem")  # a certificate is no key


@pytest.mark.realtime
def test_https_serves_the_page_and_a_session(prepared, clip, tmp_path):
    cert_path, key_path = self_signed(["localhost", "127.0.0.1"], tmp_path)
    client_tls = ssl.create_default_context(cafile=str(cert_path))

    async def main():
        async with running(prepared, tls=server_context(cert_path, key_path), trust=client_tls) as https:
            port = https._base_url.port
            assert (await https.get("/")).status == 200
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], 2 * FPS))
            # The page's own origin over https passes the cross-site check; its http twin does not.
            response = await peer.offer(https, headers={"Origin": f"http://127.0.0.1:{port}"})
            assert response.status == 403
            response = await peer.offer(https, headers={"Origin": f"https://127.0.0.1:{port}"})
            assert response.status == 200, await response.text()
            await until(lambda: len(peer.received) >= 5, 20)
            await peer.close()
            async with aiohttp.ClientSession() as plain:  # plain HTTP to the TLS port gets nothing
                with pytest.raises(aiohttp.ClientError):
                    await plain.get(f"http://127.0.0.1:{port}/", timeout=aiohttp.ClientTimeout(total=5))
            await until(lambda: not prepared.sessions, 10)

    asyncio.run(main())


def test_serve_self_signed_prints_an_https_url_and_the_fingerprint(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    # The README's command, on a free port.
    process = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--host", "0.0.0.0", "--self-signed",
                                "--token", "SECRET", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines, url = [], None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"https://0\.0\.0\.0:(\d+)/", line)
            url = match and f"https://127.0.0.1:{match.group(1)}"
        assert url, lines
        cert = tmp_path / "xportrait" / "tls" / "cert.pem"
        assert any(fingerprint(cert) in line for line in lines), lines

        async def get() -> int:
            tls = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
                async with http.get(f"{url}/stats?token=SECRET") as response:
                    return response.status

        assert asyncio.run(get()) == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.realtime
def test_ice_chatter_stays_out_of_the_log_unless_verbose(prepared, clip, caplog):
    levels = {name: logging.getLogger(name).level for name in ("aioice", "aiortc")}

    async def one_session():
        async with running(prepared) as http:
            peer = Peer(Webcam(lambda i: clip[i % len(clip)], FPS))
            assert (await peer.offer(http)).status == 200
            await until(lambda: len(peer.received) >= 3, 20)
            await peer.close()
            await until(lambda: not prepared.sessions, 10)

    try:
        for verbose in (False, True):
            serve_module.configure_logging(verbose)
            caplog.clear()
            with caplog.at_level(logging.INFO):
                asyncio.run(one_session())
            webrtc = [r for r in caplog.records if r.name.split(".")[0] in ("aioice", "aiortc")
                      and r.levelno < logging.WARNING]
            ours = [r for r in caplog.records if r.name.startswith("xportrait.")]
            assert ours, "the server's own lines are logged"
            assert bool(webrtc) == verbose, [r.getMessage() for r in webrtc][:5]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


LOG_LEVELS = """
import json, logging
from streamer.server import configure_logging
configure_logging({verbose})
names = ("xportrait.server", "engines.xportrait.weights.lora", "matplotlib.font_manager", "aioice.ice", "aiohttp.web")
print(json.dumps({{name: logging.getLogger(name).isEnabledFor(logging.INFO) for name in names}}))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_only_our_own_lines_are_logged_at_info_unless_verbose(verbose):
    """As serve configures it, in a fresh interpreter: the server's and the engines' INFO lines
    (a LoRA fused, a session closed) are logged; other libraries' only from WARNING up unless
    --verbose (on a fresh machine mediapipe's import of pyplot logs matplotlib's font cache)."""
    result = subprocess.run([sys.executable, "-c", LOG_LEVELS.format(verbose=verbose)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    enabled = __import__("json").loads(result.stdout)
    assert enabled["xportrait.server"] and enabled["engines.xportrait.weights.lora"]
    others = {name: on for name, on in enabled.items() if not name.startswith(("xportrait.", "engines."))}
    assert others == {name: verbose for name in others}, others


def test_stats_and_offer_over_tls_refuse_a_missing_key_file(tmp_path):
    cert_path, _ = self_signed(["localhost"], tmp_path)
    with pytest.raises(TLSError, match="key file not found"):
        server_context(cert_path, Path(tmp_path) / "missing.pem")


def test_tunnel_offers_media_on_the_network_addresses(tmp_path):
    """Through `ssh -L` only the page and the signalling travel (TCP); the media (UDP) goes
    straight between the machines, so with --tunnel the answer names this machine's network
    addresses, not just 127.0.0.1."""
    import ifaddr

    addresses = {ip.ip for a in ifaddr.get_adapters() for ip in a.ips
                 if isinstance(ip.ip, str) and not ip.ip.startswith("127.")}
    if not addresses:
        pytest.skip("this machine has no network address besides loopback")
    with running_server("--tunnel") as (process, url):
        async def answer() -> str:
            peer = Peer(Webcam(lambda i: None, 0))
            async with aiohttp.ClientSession(url) as http:
                response = await peer.offer(http, answer=False)
                assert response.status == 200, await response.text()
                sdp = (await response.json())["sdp"]
            await peer.close()
            return sdp

        candidates = set(re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) \d+ typ host", asyncio.run(answer())))
        assert candidates & addresses, candidates
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
