"""The quality governor: holds a live session to `--target-fps` and/or `--max-latency-ms` by
moving its engine along the engine's ladder of cheaper settings (engines.base.Governed) and
back, with hysteresis.

    governor = Governor(GovernorOptions(target_fps=25), engine.quality_levels())
    governor.observe(now, latency_ms, cost_ms)         # each frame handed out
    move = governor.decide(now, fps_in, dropped)        # a level to set between frames, or None

What it watches, over the last `window_s` seconds measured at the current level (the last
MIN_FRAMES frames at least: a slower stream's window is longer; frames from before a move, or
from the settling right after it, never count):
  - the output rate against the target (or the camera's rate, when the camera is slower:
    no rung makes frames the camera did not send),
  - the latency of a frame, input to output (p50), against the maximum,
  - the per-frame cost of the pipeline's bottleneck (`cost_ms`: the engine step, plus the
    face mesh where both share the CPU), and the drops, for the reason it gives.

Down: over the target (fps short, or latency over) for `down_after_s`. Up: only when the rung
above is *predicted* to fit comfortably (its cost, scaled from the current one by the ratio
the ladder states and then by the ratios measured at each move, within `headroom` of the frame
budget; its latency, with its extra frames in flight, within `headroom` of the maximum) for
`up_after_s`, longer. So a steady load settles on one rung: the rung above would not fit, and
the governor knows it without trying. Where the prediction was wrong (a step up followed by a
step down soon after), the wait before the next step up doubles, up to `MAX_UP_WAIT_S`.

It moves only to levels the engine has made (`quality_ready`): a session starts at once on the
best level that is ready, while a LevelMaker makes the others on a thread of their own (with
--compile, minutes each on a cold compile cache), while no session streams or when a governor
waits for one; a move to a level not made yet waits for it (`/stats` says which).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engines.base import Governed, QualityLevel
from engines.options import OptionError

MAX_TARGET_FPS = 240.0
MAX_UP_WAIT_S = 120.0
SETTLE_S = 0.3  # after a move, frames still made at (or filling in from) the old level
MIN_FRAMES = 6  # measurements needed before judging a window
FPS_TOLERANCE = 0.9  # fps short: under this share of the target
FAILED_UP_S = 15.0  # a step down this soon after a step up: the step up failed
EVALUATE_EVERY_S = 0.2  # decide() judges the window this often (it is called per frame)
SLOW_LEVEL_S = 1.0  # make_levels logs a level that took this long to make
# While levels are made (torch.compile: minutes of Python on one thread), the GIL changes hands
# this often (sys.setswitchinterval; Python's default is 5 ms): the stream's threads then wait
# for it a fraction of a millisecond at each of their many takes a frame, not up to 5 ms.
MAKING_SWITCH_S = 0.0002

log = logging.getLogger("xportrait.governor")


@dataclass(frozen=True)
class GovernorOptions:
    """`--target-fps` and/or `--max-latency-ms` (one at least), and the hysteresis."""

    target_fps: float | None = None
    max_latency_ms: float | None = None
    window_s: float = 2.0
    down_after_s: float = 1.5
    up_after_s: float = 6.0
    headroom: float = 0.8

    def __post_init__(self):
        if self.target_fps is None and self.max_latency_ms is None:
            raise OptionError("the governor needs --target-fps or --max-latency-ms")
        if self.target_fps is not None and not 0 < self.target_fps <= MAX_TARGET_FPS:
            raise OptionError(f"--target-fps must lie in (0, {MAX_TARGET_FPS:g}], got {self.target_fps:g}")
        if self.max_latency_ms is not None and not 1 <= self.max_latency_ms <= 60_000:
            raise OptionError(f"--max-latency-ms must lie in [1, 60000], got {self.max_latency_ms:g}")
        for name in ("window_s", "down_after_s", "up_after_s"):
            if not getattr(self, name) > 0:
                raise OptionError(f"the governor's {name} must be positive, got {getattr(self, name)}")
        if self.up_after_s <= self.down_after_s:
            raise OptionError("the governor steps up only after longer than it steps down: "
                              f"up_after_s {self.up_after_s} <= down_after_s {self.down_after_s}")
        if not 0 < self.headroom < 1:
            raise OptionError(f"the governor's headroom must lie in (0, 1), got {self.headroom}")


def governed_engine(stage: Any) -> Governed | None:
    """The engine of a pipeline stage (or an Animator), if it has quality levels to govern
    (echo has none)."""
    animator = getattr(stage, "animator", stage)
    engine = getattr(animator, "engine", None)
    if isinstance(engine, Governed) and len(engine.quality_levels()) > 1:
        return engine
    return None


class LevelMaker:
    """Makes an engine's levels that are not made yet, on a thread of its own (`make_levels`:
    one per engine). Making one costs the stream: torch.compile is minutes of Python, and on the
    H200 a 25 fps session got 20 fps back while a level compiled. So levels are made while no
    session streams on the engine, and during a session only a cheaper level its governor
    waits for to hold its target (`want`). The cheaper levels first, nearest first (under load
    a governor needs the rungs down), then the better. Each slow level is logged as it is ready
    (a server's log says what its start-up is still doing); one that fails is logged, and no
    governor moves there."""

    def __init__(self, engine: Governed):
        self.engine: Governed | None = engine  # until its thread takes it
        self._changed = threading.Condition()
        self._streaming = 0  # sessions streaming on the engine
        self._wanted: set[int] = set()
        self.making: int | None = None  # the level being made now (/stats says which)
        self.failed: set[int] = set()  # levels that could not be made: a governor passes over them
        levels = engine.quality_levels()
        start = best_ready(engine)
        self._pending = [level for level in [*range(start + 1, len(levels)), *reversed(range(start))]
                         if not engine.quality_ready(level)]
        self.thread = threading.Thread(target=self._run, daemon=True, name="xportrait-levels")

    def streaming(self, on: bool) -> None:
        """A session on this engine starts (True) or ends (False) streaming."""
        with self._changed:
            self._streaming += 1 if on else -1
            self._changed.notify()

    def want(self, level: int) -> None:
        """A governor waits for this level: it is made next, session or not."""
        with self._changed:
            if level not in self._wanted:
                self._wanted.add(level)
                self._changed.notify()

    def _next(self) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self._streaming <= 0 or self._wanted & set(self._pending))
            wanted = [level for level in self._pending if level in self._wanted]
            level = (wanted or self._pending)[0]
            self._pending.remove(level)
            return level

    def _run(self) -> None:
        engine, self.engine = self.engine, None  # the registry's weak key stays the only other reference
        levels = engine.quality_levels()
        while self._pending:
            level = self.making = self._next()
            started = time.perf_counter()
            try:
                with _quick_gil():
                    engine.make_quality(level)
            except Exception:
                log.exception("quality level %d of %d (%s) could not be made", level + 1, len(levels),
                              levels[level].name)
                self.failed.add(level)
                continue
            finally:
                self.making = None
            seconds = time.perf_counter() - started
            if seconds >= SLOW_LEVEL_S:
                log.info("quality level %d of %d (%s) ready in %.0f s", level + 1, len(levels), levels[level].name,
                         seconds)


_makers: "weakref.WeakKeyDictionary[Any, LevelMaker]" = weakref.WeakKeyDictionary()
_makers_lock = threading.Lock()


def make_levels(engine: Governed, streaming: bool = False) -> LevelMaker:
    """The engine's LevelMaker, started (once per engine: a second call returns the same one).
    `streaming`: a session starts streaming on the engine (counted before the maker can start
    a level); it calls `streaming(False)` when it ends."""
    with _makers_lock:
        maker = _makers.get(engine)
        new = maker is None
        if new:
            maker = _makers[engine] = LevelMaker(engine)
    if streaming:
        maker.streaming(True)
    if new:
        maker.thread.start()
    return maker


_making = 0  # levels being made now, in all engines (under _makers_lock)
_switch_before = 0.0  # the switch interval before the first of them began


@contextmanager
def _quick_gil():
    """MAKING_SWITCH_S while a level is made. The interval is the process's: set by the first
    maker, restored by the last."""
    global _making, _switch_before
    with _makers_lock:
        if _making == 0:
            _switch_before = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_before, MAKING_SWITCH_S))
        _making += 1
    try:
        yield
    finally:
        with _makers_lock:
            _making -= 1
            if _making == 0:
                sys.setswitchinterval(_switch_before)


def best_ready(engine: Governed) -> int:
    """The best level the engine has made (its own level at least is always made)."""
    return next(level for level in range(len(engine.quality_levels())) if engine.quality_ready(level))


class Governor:
    """Decides; never touches an engine (the pipeline sets the level it returns, between frames)."""

    def __init__(self, options: GovernorOptions, levels: Sequence[QualityLevel], start: int = 0,
                 ready: Callable[[int], bool] = lambda level: True, failed: Callable[[int], bool] = lambda level: False):
        """`start`: the level the engine is at (a ready one); `ready(level)`: whether a level
        is made (Governed.quality_ready): the governor moves only to those; `failed(level)`:
        whether it could not be made (LevelMaker.failed): the governor passes over it to the
        next rung, as if the ladder had none there."""
        if not levels:
            raise ValueError("a governor needs at least one quality level")
        if not 0 <= start < len(levels):
            raise ValueError(f"no quality level {start} in a ladder of {len(levels)}")
        self.options = options
        self.levels = list(levels)
        self.level = start
        self.ready, self.failed = ready, failed
        self.waiting: int | None = None  # a level it would move to, not made yet
        self.reason = "start: the best level" if start == 0 else "start: the best level made so far"
        self.changes = 0
        # cost(level i) / cost(level i + 1): the ladder's word first, measured at each move.
        self._stated = [max(a.cost, 1e-6) / max(b.cost, 1e-6) for a, b in zip(self.levels, self.levels[1:])]
        self._ratio = list(self._stated)
        self._frames: deque[tuple[float, float, float]] = deque()  # (time, latency ms, cost ms)
        self._drops: deque[tuple[float, int]] = deque()
        self._moved_at: float | None = None
        self._before_move: tuple[int, float] | None = None  # (level, mean cost) just before the last move
        self._over_since: float | None = None
        self._room_since: float | None = None
        self._up_wait = options.up_after_s
        self._last_up: float | None = None
        self.measured: dict[str, float | None] = {}
        self._evaluated_at = -math.inf

    # -- measurements ---------------------------------------------------------------------------
    def observe(self, now: float, latency_ms: float, cost_ms: float) -> None:
        """One frame handed out: its input-to-output latency and its cost at the bottleneck."""
        if self._moved_at is not None and now - self._moved_at < SETTLE_S:
            return
        self._frames.append((now, latency_ms, cost_ms))
        self._trim(self._frames, now)

    def _trim(self, ring: deque, now: float) -> None:
        """Entries older than the window, but never the last MIN_FRAMES: a stream too slow to
        fill a window with them (a diffusion engine at 1 fps) is judged over a longer one."""
        while len(ring) > MIN_FRAMES and ring[0][0] < now - self.options.window_s:
            ring.popleft()

    def _window(self, now: float, fps_in: float, dropped: int) -> dict | None:
        self._trim(self._frames, now)
        self._drops.append((now, dropped))
        self._trim(self._drops, now)
        frames = self._frames
        if len(frames) < MIN_FRAMES:
            return None
        span = frames[-1][0] - frames[0][0]
        if span < self.options.window_s / 2:
            return None
        latencies = np.fromiter((f[1] for f in frames), float, len(frames))
        costs = np.fromiter((f[2] for f in frames), float, len(frames))
        drop_span = self._drops[-1][0] - self._drops[0][0]
        return {"fps": (len(frames) - 1) / span, "fps_in": fps_in,
                "latency_ms": float(np.percentile(latencies, 50)), "cost_ms": float(costs.mean()),
                "drops_per_s": (self._drops[-1][1] - self._drops[0][1]) / drop_span if drop_span > 0 else 0.0}

    # -- the decision -----------------------------------------------------------------------------
    def decide(self, now: float, fps_in: float, dropped: int = 0) -> int | None:
        """The level to move to now (one rung), or None to stay. `fps_in`: the input's rate;
        `dropped`: the pipeline's drops so far (a running count)."""
        if now - self._evaluated_at < EVALUATE_EVERY_S:
            return None
        self._evaluated_at = now
        m = self._window(now, fps_in, dropped)
        if m is None:
            return None
        self.measured = {k: round(v, 2) for k, v in m.items()}
        self._learn(m)
        over = self._over(m)
        self._over_since = (self._over_since or now) if over else None
        down, up = self._next(self.level, +1), self._next(self.level, -1)
        room = None if over or up is None else self._room(m, up)
        self._room_since = (self._room_since or now) if room else None
        if self._last_up is not None and now - self._last_up > 2 * FAILED_UP_S:
            self._up_wait = self.options.up_after_s  # the last step up held: trust predictions again
        self.waiting = None
        if over and down is not None and now - self._over_since >= self.options.down_after_s:
            if not self.ready(down):
                self.waiting = down  # still being made: down as soon as it is
                return None
            if self._last_up is not None and now - self._last_up < FAILED_UP_S:
                self._up_wait = min(2 * self._up_wait, MAX_UP_WAIT_S)
            return self._move(now, down, over, m)
        if room and now - self._room_since >= self._up_wait:
            if not self.ready(up):
                self.waiting = up
                return None
            self._last_up = now
            return self._move(now, up, room, m)
        return None

    def _next(self, level: int, step: int) -> int | None:
        """The next rung down (step +1) or up (-1) from `level`, past any that could not be made."""
        level += step
        while 0 <= level < len(self.levels) and self.failed(level):
            level += step
        return level if 0 <= level < len(self.levels) else None

    def _over(self, m: dict) -> str | None:
        """Why this window misses the target, or None."""
        o = self.options
        if o.target_fps is not None:
            expected = min(o.target_fps, m["fps_in"]) if m["fps_in"] > 0 else o.target_fps
            if m["fps"] < FPS_TOLERANCE * expected:
                return (f"fps {m['fps']:.1f} under {expected:.1f} (cost {m['cost_ms']:.1f} ms a frame, "
                        f"{m['drops_per_s']:.1f} drops/s)")
        if o.max_latency_ms is not None and m["latency_ms"] > o.max_latency_ms:
            return f"latency {m['latency_ms']:.0f} ms over {o.max_latency_ms:g} ms"
        return None

    def _room(self, m: dict, up: int) -> str | None:
        """Why the rung above (`up`) is predicted to fit comfortably, or None."""
        o = self.options
        cost_up = m["cost_ms"] * math.prod(self._ratio[up:self.level])  # past a failed rung: both ratios
        parts = []
        if o.target_fps is not None:
            budget = 1e3 / o.target_fps
            if cost_up > o.headroom * budget:
                return None
            parts.append(f"{self.levels[up].name} predicted {cost_up:.1f} ms of a {budget:.1f} ms budget")
        if o.max_latency_ms is not None:
            interval = 1e3 / m["fps_in"] if m["fps_in"] > 0 else 0.0
            extra = self.levels[up].latency_frames - self.levels[self.level].latency_frames
            latency_up = m["latency_ms"] + (cost_up - m["cost_ms"]) + extra * interval
            if latency_up > o.headroom * o.max_latency_ms:
                return None
            parts.append(f"latency predicted {latency_up:.0f} of {o.max_latency_ms:g} ms")
        return "room: " + ", ".join(parts)

    def _learn(self, m: dict) -> None:
        """The first full window after a move measures the two levels' cost ratio."""
        if self._before_move is None:
            return
        level, cost = self._before_move
        self._before_move = None
        upper, lower = min(level, self.level), max(level, self.level)
        if abs(upper - lower) != 1 or cost <= 0 or m["cost_ms"] <= 0:
            return
        measured = cost / m["cost_ms"] if level == upper else m["cost_ms"] / cost
        if math.isfinite(measured):
            # Within a factor of two of the ladder's word (and a cheaper rung never costs more):
            # a load that changed right at the move must not convince it of anything wilder.
            stated = self._stated[upper]
            blended = 0.5 * self._ratio[upper] + 0.5 * measured
            self._ratio[upper] = float(np.clip(blended, max(1.0, stated / 2), max(1.0, stated * 2)))

    def _move(self, now: float, level: int, why: str, m: dict) -> int:
        direction = "down" if level > self.level else "up"
        self._before_move = (self.level, m["cost_ms"])
        self.level = level
        self.reason = f"{direction} to {self.levels[level].name}: {why}"
        self.changes += 1
        self._moved_at = now
        self._frames.clear()
        self._over_since = self._room_since = None
        return level

    def snapshot(self, making: int | None = None) -> dict:
        """What /stats and the page show; `making`: the level a LevelMaker makes now, if any."""
        name = lambda level: None if level is None else self.levels[level].name  # noqa: E731
        return {"level": self.level, "name": name(self.level),
                "levels": [level.name for level in self.levels], "reason": self.reason, "changes": self.changes,
                "ready": [self.ready(level) for level in range(len(self.levels))],
                "waiting_for": name(self.waiting), "making": name(making),
                "failed": [self.failed(level) for level in range(len(self.levels))],
                "target_fps": self.options.target_fps, "max_latency_ms": self.options.max_latency_ms,
                "measured": self.measured}
