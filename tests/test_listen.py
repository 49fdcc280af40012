"""`serve`'s early check that it could listen (streamer/listen.py): a taken port is refused
before anything is prepared; a free port, or port 0, passes and stays free."""

from __future__ import annotations

import socket

import pytest

from streamer.listen import check_can_listen


def test_a_taken_port_is_refused_and_a_free_one_passes_and_stays_free():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as refused:
            check_can_listen("127.0.0.1", port)
        assert refused.value.errno is not None and "in use" in str(refused.value).lower()
    check_can_listen("127.0.0.1", port)  # closed: free again
    check_can_listen("127.0.0.1", 0)
    with socket.socket() as again:  # the check left nothing bound
        again.bind(("127.0.0.1", port))
