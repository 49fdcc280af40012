"""Rate limits: a token bucket, for what a peer may ask of the server (portrait changes,
data-channel commands)."""

from __future__ import annotations

import time


class TokenBucket:
    """`burst` events at once, then one per `interval` seconds."""

    def __init__(self, burst: int, interval: float):
        self.burst, self.interval = burst, interval
        self._tokens, self._at = float(burst), time.monotonic()

    def take(self) -> float:
        """0 when an event may happen now (and counts it), else seconds until one may."""
        wait = self.wait()
        if not wait:
            self._tokens -= 1
        return wait

    def wait(self) -> float:
        """0 when an event may happen now, else seconds until one may (nothing counted)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval)
        self._at = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * self.interval
