"""Everything the tests run stays on this machine: WebRTC media between in-process peers
goes over loopback, as it does for `xportrait serve` bound to 127.0.0.1 (the default)."""

import contextlib
import re
import signal
import subprocess
import sys
import time

import pytest

from streamer.rtp import keep_media_on_loopback


@pytest.fixture(autouse=True, scope="session")
def media_on_loopback():
    keep_media_on_loopback()


@contextlib.contextmanager
def running_server(*args: str):
    """`xportrait serve --port 0 ARGS` in a subprocess: yields (process, base URL) once it listens;
    SIGTERM on the way out (the caller may check the exit code)."""
    process = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        url = match and match.group(1)
    if url is None:
        process.kill()
        pytest.fail("xportrait serve did not start")
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a browser (or any child), killing it if it will not go."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
