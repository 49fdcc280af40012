"""Whether `serve` could listen on HOST:PORT, asked before anything slow is prepared."""

from __future__ import annotations

import socket


def check_can_listen(host: str, port: int) -> None:
    """Bind (and release) every address `host` resolves to on `port`, as the server's listening
    socket will (SO_REUSEADDR, IPv6 sockets IPv6 only): raises OSError when the port is taken
    or the address is not this machine's, so that `serve` refuses at once instead of after the
    engine has loaded. Port 0 (any free port) always can."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
