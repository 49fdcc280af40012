"""A video frame leaves aiortc's jitter buffer as soon as its last packet is in.

aiortc's JitterBuffer knows a video frame is complete only when the first packet of the
*next* frame arrives (a new RTP timestamp), so every aiortc receiver holds each frame back
by one frame interval: 33 ms at 30 fps, twice per round trip when both ends are aiortc.
The sender marks a frame's last packet with the RTP marker bit (RFC 3550; aiortc's own
sender and browsers do), so a frame whose packets run without a gap from the buffer's
start up to a marked packet is complete at once. Everything else (loss, reordering,
overflow, key-frame requests) stays aiortc's.
"""

from __future__ import annotations

import aiortc.rtcrtpreceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame


class MarkerJitterBuffer(JitterBuffer):
    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        frame = super()._remove_frame(sequence_number)
        if frame is not None or not self._is_video:
            return frame
        first = None
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None  # a gap: wait for the missing packet (or the next frame)
            if first is None:
                first = packet
            elif packet.timestamp != first.timestamp:
                return None
            if packet.marker:
                packets = [self._packets[(self._origin + i) % self._capacity] for i in range(count + 1)]
                self.remove(count + 1)
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=first.timestamp)
        return None


def complete_frames_on_marker() -> None:
    """Make every RTCRtpReceiver created from now on use MarkerJitterBuffer (idempotent)."""
    aiortc.rtcrtpreceiver.JitterBuffer = MarkerJitterBuffer


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def keep_media_on_loopback() -> None:
    """Offer ICE host candidates on 127.0.0.1 only (idempotent).

    aioice leaves loopback out of its candidates, so media between two programs on one
    machine would go over the machine's network address even when signalling is on
    127.0.0.1. A server bound to loopback serves this machine alone: its media stays on
    loopback too, and so does a client talking to such a server.
    """
    import aioice.ice

    aioice.ice.get_host_addresses = _loopback_addresses


def _loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return (["127.0.0.1"] if use_ipv4 else []) + (["::1"] if use_ipv6 and not use_ipv4 else [])
