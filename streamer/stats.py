"""Per-session live statistics: frame rates, drops, per-stage timings and latency percentiles.

Only the event loop writes these (the session's threads hand their timings back with each
frame), so nothing here needs a lock. Windows are fixed-size rings: a session that runs for
hours keeps the same small memory, and percentiles describe the recent past, not the whole run.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

# Stages of one frame, in order. The VP8 decode itself happens inside aiortc's decoder
# thread and is not observable from here; `wait` is how long a decoded frame sat in the
# newest-frame slot before the prep thread took it; `face` is everything that thread does
# after the colour conversion (face mesh, alignment, smoothing, the aligned driving image);
# `wait_engine` is how long the prepared frame then waited for the engine thread.
STAGES = ("wait", "convert_in", "face", "wait_engine", "engine", "convert_out", "encode_send")


class Ring:
    """The last `capacity` samples of one quantity."""

    def __init__(self, capacity: int):
        self._values = np.zeros(capacity, np.float64)
        self._count = 0

    def add(self, value: float) -> None:
        self._values[self._count % len(self._values)] = value
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, len(self._values))

    def _filled(self) -> np.ndarray:
        return self._values[: len(self)]

    def mean(self) -> float | None:
        return float(self._filled().mean()) if len(self) else None

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self._filled(), q)) if len(self) else None


class RateMeter:
    """Events per second over the last `window` seconds."""

    def __init__(self, window: float = 2.0):
        self.window = window
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], self._times[-1] - self._times[0])
        return (len(self._times) - 1) / span if span > 0 else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class SessionStats:
    """A pipeline's counters and timings (the WebRTC session adds its connection state)."""

    def __init__(self, window: int = 300):
        self.started = time.monotonic()
        self.frames_in = 0  # decoded frames taken from the webcam track
        self.frames_processed = 0  # frames the engine thread turned into output
        self.frames_out = 0  # frames handed to the encoder
        self.dropped_stale = 0  # input frames replaced by a newer one before the prep thread took them
        self.dropped_prepared = 0  # prepared frames replaced by a newer one before the engine thread took them
        self.dropped_output = 0  # output frames replaced before the encoder asked for one
        self.frames_without_face = 0
        self.resolution_changes = 0  # input frames whose size differed from the frame before
        self.errors = 0  # frames a stage failed on (logged)
        self.last_input_at: float | None = None
        self.output_pts_origin: int | None = None  # pts of the first frame sent (see stream_client)
        self.stages = {stage: Ring(window) for stage in STAGES}
        self.latency = Ring(window)  # ms from a decoded input frame to its output being sent
        self.fps_in = RateMeter()
        self.fps_out = RateMeter()

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "uptime_s": round(now - self.started, 2),
            "fps_in": round(self.fps_in.rate(now), 2),
            "fps_out": round(self.fps_out.rate(now), 2),
            "frames_in": self.frames_in,
            "frames_processed": self.frames_processed,
            "frames_out": self.frames_out,
            "dropped": self.dropped_stale + self.dropped_prepared + self.dropped_output,
            "dropped_stale": self.dropped_stale,
            "dropped_prepared": self.dropped_prepared,
            "dropped_output": self.dropped_output,
            "frames_without_face": self.frames_without_face,
            "resolution_changes": self.resolution_changes,
            "errors": self.errors,
            "latency_ms": {
                "p50": _round(self.latency.percentile(50)),
                "p95": _round(self.latency.percentile(95)),
                "samples": len(self.latency),
            },
            "stages_ms": {stage: _round(ring.mean()) for stage, ring in self.stages.items()},
            "output_pts_origin": self.output_pts_origin,
        }
