"""The one protocol every engine meets, and the data that crosses it.

The streamer and the offline `animate` command know only this module: an engine is prepared
once per source (one or more portraits), then stepped once per driving frame. Engines may
hold frames in flight (a streaming diffusion engine denoises several at once), so `step`
may return nothing yet, and `flush` drains what is left at the end of a clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class SourcePortrait:
    """A portrait cropped to the engine's square resolution, with its face mesh.

    `landmarks` is the 478-point mediapipe mesh in crop pixels (x, y, z; z on x's scale).
    """

    image: np.ndarray  # (size, size, 3) uint8 RGB
    landmarks: np.ndarray  # (478, 3) float32
    faces: int = 1  # faces found in the portrait; the largest is the one cropped


@dataclass
class DrivingFrame:
    """One driving frame, already aligned to the source head box (paper, section 3.4).

    `landmarks` and `reference` are in the same aligned crop pixels as the source. The
    reference is the driving frame that stands for the source's own pose and expression:
    motion is measured relative to it, so the portrait keeps its own face shape.
    `image` is None for engines that do not ask for driving pixels (see `needs_driving_image`).
    `tag` is the caller's and comes back unchanged on the frame rendered from this one.
    The caller reuses the arrays' buffers for the next frame: an engine copies what it keeps.
    """

    landmarks: np.ndarray  # (478, 3) float32
    reference: np.ndarray  # (478, 3) float32
    time: float  # seconds; drives the temporal filters
    image: np.ndarray | None = None  # (size, size, 3) uint8 RGB
    tag: Any = None


@dataclass
class Rendered:
    """An output frame. `image` may be the engine's own buffer: it is valid until the
    engine's next step; copy it (or encode it) before stepping again."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    tag: Any = None


@dataclass
class Timings:
    """Milliseconds per stage of the last step, and running totals for averages."""

    last: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def record(self, stage: str, ms: float) -> None:
        self.last[stage] = ms
        self.total[stage] = self.total.get(stage, 0.0) + ms

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.total.items()}


@runtime_checkable
class Engine(Protocol):
    name: str
    size: int  # square output resolution
    needs_driving_image: bool  # False lets the caller skip warping driving pixels
    # True when `step` mostly waits on another device (a GPU) with the GIL released: a live
    # caller then tracks the next frame meanwhile. False for engines that compute on the CPU,
    # where tracking alongside would only compete with the step for the same cores.
    waits_on_device: bool

    def prepare(self, sources: Sequence[SourcePortrait]) -> None:
        """Do all per-source work once. The first source is the one animated."""

    def step(self, frame: DrivingFrame) -> Rendered | None:
        """Take one driving frame; return a rendered frame when one leaves the engine."""

    def flush(self) -> list[Rendered]:
        """Return the frames still in flight (end of a clip)."""

    def reset(self) -> None:
        """Forget driving state (filters, caches, frames in flight); keep the source."""

    @property
    def timings(self) -> Timings: ...


@dataclass(frozen=True)
class QualityLevel:
    """One rung of an engine's quality ladder (`Governed`), best first.

    `cost` is the rung's per-frame cost relative to the best (1.0), as the engine expects it:
    the live governor starts from it and learns the real ratios as it measures them.
    `latency_frames` is how many frames a frame spends in flight at this rung (the diffusion
    engine's LCM steps - 1 + look-ahead; 0 for a frame-in, frame-out engine)."""

    name: str
    cost: float = 1.0
    latency_frames: int = 0


@runtime_checkable
class Governed(Protocol):
    """An engine with cheaper settings to fall back on (streamer/governor.py moves along them).
    Engines without levels simply are not governed. `set_quality` is called between frames,
    on the thread that steps the engine, never during a step; `make_quality` on another."""

    def quality_levels(self) -> Sequence[QualityLevel]:
        """The ladder, best first. An engine starts at the level its options ask for (level 0,
        or with the diffusion engine's --tiny-decoder level 1: the full VAE is the rung above);
        a governor starts at the best."""

    def set_quality(self, level: int) -> None:
        """Render the next frames at `levels[level]`, making it first if it is not ready.
        Frames in flight may be dropped (a streaming engine starts its batch again); a level
        already made costs no rebuild."""

    def make_quality(self, level: int) -> None:
        """Make a level ready without moving to it: on a thread of its own, while the engine
        steps (the diffusion engine's stream batch and CUDA graph: with --compile, minutes on
        a cold compile cache). A level already made returns at once."""

    def quality_ready(self, level: int) -> bool:
        """Whether a level is made (any thread): a move to it costs no rebuild."""


class EngineError(RuntimeError):
    """A user-facing engine failure (missing weights, missing backend, bad configuration)."""


def check_sources(sources: Sequence[SourcePortrait], size: int, engine: str) -> None:
    """What every engine's prepare() asks of its sources: at least one, at its resolution."""
    if not sources:
        raise EngineError(f"the {engine} engine needs at least one source portrait")
    for s in sources:
        if s.image.shape[:2] != (size, size):
            raise EngineError(f"source is {s.image.shape[1]}x{s.image.shape[0]}, engine is {size}")
