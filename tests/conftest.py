"""Everything the tests run stays on this machine: WebRTC media between in-process peers
goes over loopback, as it does for `xportrait serve` bound to 127.0.0.1 (the default)."""

import pytest

from streamer.rtp import keep_media_on_loopback


@pytest.fixture(autouse=True, scope="session")
def media_on_loopback():
    keep_media_on_loopback()
