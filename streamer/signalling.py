"""What an /offer body must be, checked before the server spends anything on it.

A WebRTC offer that aiortc would accept and then never connect (no DTLS fingerprint, a port
that is not a number) would hold one of the server's few session slots until the connect
timeout; one that aiortc's parser rejects would surface as "AssertionError: " or
"KeyError: 'junk'". So the offer is read here first and every fault is said in words.
"""

from __future__ import annotations

import re

from aiortc import sdp as aiortc_sdp

MAX_SDP_CHARS = 64 * 1024  # a browser's offer is 2-8 KB
_LINE = re.compile(r"^[a-z]=.*$")
_MEDIA = re.compile(r"^m=(\S+) (\S+) (\S+)(?: (\S+))+$")
_PORT = re.compile(r"^(\d{1,5})(?:/\d{1,5})?$")
# The DTLS certificate digests aiortc checks (aiortc.rtcdtlstransport), as bytes per digest.
_DIGEST_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
_FINGERPRINT = re.compile(r"^(\S+) ([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*)$")


class OfferError(ValueError):
    """The offer cannot be used; the message says why."""


def check_offer(text: str) -> None:
    """Raise OfferError unless `text` is an SDP offer with a usable video section."""
    if len(text) > MAX_SDP_CHARS:
        raise OfferError(f"the SDP offer is {len(text)} characters long; at most {MAX_SDP_CHARS} are accepted")
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    if not lines or lines[0] != "v=0":
        raise OfferError("the SDP offer must start with the line v=0")
    for number, line in enumerate(lines, 1):
        if not _LINE.match(line) or "\x00" in line:
            raise OfferError(f"SDP line {number} is not of the form x=value: {line[:60]!r}")
    sections: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    session, media = sections[0], sections[1:]
    if not media:
        raise OfferError("the SDP offer has no media section (no m= line)")
    for section in media:
        match = _MEDIA.match(section[0])
        if match is None:
            raise OfferError(f"malformed media line {section[0][:60]!r}: expected m=KIND PORT PROTOCOL FORMATS")
        port = _PORT.match(match.group(2))
        if port is None or int(port.group(1)) > 65535:
            raise OfferError(f"the media line {section[0][:60]!r} has no valid port number")
    video = [s for s in media if s[0].startswith("m=video ") and not s[0].startswith("m=video 0 ")]
    if not video:
        raise OfferError("the offer has no video track: send the webcam as a video track")

    def attribute(name: str, section: list[str]) -> bool:
        return any(line.startswith(f"a={name}:") for line in (*session, *section))

    for section in media:
        if not section[0].startswith("m=video ") and not section[0].startswith("m=application "):
            continue  # audio and others are drained, not negotiated with care
        if not attribute("fingerprint", section):
            raise OfferError("the SDP offer has no DTLS fingerprint (a=fingerprint): "
                             "WebRTC media cannot be encrypted without it")
        _check_fingerprints([line for line in (*session, *section) if line.startswith("a=fingerprint:")])
        if not (attribute("ice-ufrag", section) and attribute("ice-pwd", section)):
            raise OfferError("the SDP offer has no ICE credentials (a=ice-ufrag and a=ice-pwd)")
    try:
        parsed = aiortc_sdp.SessionDescription.parse(text)
    except Exception:  # its parser raises AssertionError, KeyError, ValueError, IndexError...
        raise OfferError("the SDP offer could not be parsed: one of its lines is malformed") from None
    if not any(m.kind == "video" and m.rtp.codecs for m in parsed.media):
        raise OfferError("the offer's video section lists no codec (no a=rtpmap line)")
    # aiortc matches transceivers and the BUNDLE group by a=mid: a repeated or a missing one
    # fails only once the answer is made (an AttributeError deep in aiortc).
    mids = [m.rtp.muxId for m in parsed.media]
    for mid in mids:
        if not mid:
            raise OfferError("a media section has no a=mid line: each needs its own")
        if mids.count(mid) > 1:
            raise OfferError(f"two media sections have the same a=mid {mid[:40]!r}: each needs its own")
    for group in parsed.group:
        for item in group.items:
            if item not in mids:
                raise OfferError(f"a=group:{group.semantic[:20]} names the a=mid {str(item)[:40]!r}, which no media "
                                 "section has")


def _check_fingerprints(lines: list[str]) -> None:
    """Each a=fingerprint of a digest aiortc checks must be that digest's hex bytes, and one
    such must be there: a DTLS handshake against anything else can only fail."""
    usable = 0
    for line in lines:
        match = _FINGERPRINT.match(line[len("a=fingerprint:"):])
        if match is None:
            raise OfferError(f"malformed DTLS fingerprint {line[:60]!r}: expected a=fingerprint:ALGORITHM "
                             "HEX:HEX:...")
        algorithm, value = match.group(1).lower(), match.group(2)
        if algorithm in _DIGEST_BYTES:
            if len(value.split(":")) != _DIGEST_BYTES[algorithm]:
                raise OfferError(f"the {algorithm} DTLS fingerprint has {len(value.split(':'))} bytes, "
                                 f"not {_DIGEST_BYTES[algorithm]}")
            usable += 1
    if not usable:
        raise OfferError(f"the SDP offer has no DTLS fingerprint of a digest this server checks "
                         f"({', '.join(_DIGEST_BYTES)})")
