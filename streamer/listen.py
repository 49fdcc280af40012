"""Whether `serve` could listen on HOST:PORT, asked before anything slow is prepared."""

from __future__ import annotations

import errno
import socket


def check_can_listen(host: str, port: int) -> None:
    """Bind (and release) the addresses `host` resolves to on `port` as asyncio's server will
    (SO_REUSEADDR, IPv6 sockets IPv6-only; an address family the machine lacks is passed over,
    as asyncio passes it over): raises OSError when the port is taken or not ours to take, so
    that `serve` refuses at once instead of after the engine has loaded. Port 0 (any free port)
    always can."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
