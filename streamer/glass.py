"""Glass-to-glass on the page: the camera's capture clock, carried back to the browser.

The browser stamps each camera frame's RTP timestamp from the frame's capture time, and its
RTCP sender reports map those RTP timestamps to its own wall clock (NTP). The server returns
every avatar frame with its input frame's timestamp (plus the sender's random RTP origin). So
one linear map takes an avatar frame's RTP timestamp to the moment the browser captured the
camera frame it was made from, in the browser's own clock:

    capture_unix_ms = unix_ms + signed32(rtp_timestamp - rtp) / 90

`capture_clock(session)` gives {"rtp", "unix_ms"} (None until the browser's first sender
report); the page (client/app.js) reads each displayed avatar frame's RTP timestamp with
requestVideoFrameCallback, checks the capture moment against its own camera video's frame
capture times, and shows display time minus capture time. aiortc keeps neither a receiver's
last sender report nor its RTP origins in public: `record_sender_reports` keeps the report,
the rest is read where aiortc holds it (and, where a later aiortc moves it, the map is None:
the page shows n/a, never a wrong number).
"""

from __future__ import annotations

import functools

from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.rtcrtpreceiver import RtcpSrPacket

NTP_TO_UNIX_S = 2_208_988_800
RTP_CLOCK = 90_000  # video


def record_sender_reports() -> None:
    """Each RTCRtpReceiver keeps the last RTCP sender report's (NTP, RTP) pair; idempotent."""
    handle = RTCRtpReceiver._handle_rtcp_packet
    if getattr(handle, "keeps_sender_reports", False):
        return

    @functools.wraps(handle)
    async def keep(self, packet):
        if isinstance(packet, RtcpSrPacket):
            self.xportrait_sender_report = (packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
        await handle(self, packet)

    keep.keeps_sender_reports = True
    RTCRtpReceiver._handle_rtcp_packet = keep


def sender_rtp(sender: RTCRtpSender | None) -> int | None:
    """The RTP timestamp of the last packet `sender` sent (None where aiortc has none)."""
    return getattr(sender, "_RTCRtpSender__rtp_timestamp", None) if sender is not None else None


def receiver_origin(receiver: RTCRtpReceiver | None) -> int | None:
    """The RTP timestamp aiortc made pts 0 of the frames it decodes (its first frame's)."""
    mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
    return getattr(mapper, "_origin", None)


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def capture_clock(report: tuple[int, int] | None, camera_origin: int | None, avatar_origin: int | None) -> dict | None:
    """The map from an avatar frame's RTP timestamp to its camera frame's capture time.

    `report`: the browser's last sender report for the camera (NTP 64-bit, RTP); `camera_origin`:
    the camera RTP timestamp of pts 0; `avatar_origin`: avatar RTP timestamp minus pts."""
    if report is None or camera_origin is None or avatar_origin is None:
        return None
    ntp, rtp = report
    pts = _signed32(rtp - camera_origin)  # the report's moment as a pts of the camera's frames
    unix_ms = ((ntp >> 32) - NTP_TO_UNIX_S + (ntp & 0xFFFFFFFF) / 2**32) * 1e3
    return {"rtp": (pts + avatar_origin) & 0xFFFFFFFF, "unix_ms": round(unix_ms, 3)}
