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
