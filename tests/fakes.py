"""Shared test fakes (tests/ is on sys.path): an engine with nothing behind it, for the tests of
what drives an engine (the Animator, the live pipeline, the server, the governor, eval)."""

from __future__ import annotations

import numpy as np

from engines.base import DrivingFrame, Rendered, SourcePortrait, Timings


class PortraitEngine:
    """The smallest engines.base.Engine: every step renders the source portrait, unchanged.
    A test subclasses it for what it watches (the frames it is given, a cost per step)."""

    name = "portrait"
    size = 512
    needs_driving_image = False
    waits_on_device = False

    def __init__(self, size: int | None = None):
        if size is not None:
            self.size = size
        self.portrait: np.ndarray | None = None
        self._timings = Timings()

    @property
    def timings(self) -> Timings:
        return self._timings

    def prepare(self, sources: list[SourcePortrait]) -> None:
        self.portrait = sources[0].image

    def step(self, frame: DrivingFrame) -> Rendered:
        return Rendered(self.portrait, frame.tag)

    def flush(self) -> list[Rendered]:
        return []

    def reset(self) -> None:
        pass
