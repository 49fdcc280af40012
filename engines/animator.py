"""Drives any engine with raw video frames: the per-frame loop that `animate` and the
streamer share.

raw frame -> face mesh -> alignment to the source head box -> One-Euro smoothing -> engine.
The alignment (translation + scale) and the motion reference are fixed by one driving frame:
the first frame with a face unless the caller chooses one (offline, the released code picks
the frame closest to the source). A frame with no face holds the last good pose.
"""

from __future__ import annotations

import time as _time
from typing import Any, Sequence

import cv2
import numpy as np

from .base import DrivingFrame, Engine, Rendered, SourcePortrait
from .face import (
    FaceTracker,
    OneEuroFilter,
    alignment_affine,
    as_rgb,
    head_box,
    prepare_source,
    transform_landmarks,
)

_MISSING = object()


class Animator:
    def __init__(self, engine: Engine, tracker: FaceTracker | None = None, smoothing: bool = True):
        self.engine = engine
        self.size = engine.size
        self.tracker = tracker or FaceTracker(video=True)
        self.smoother = OneEuroFilter() if smoothing else None
        self.sources: list[SourcePortrait] = []
        self.frames = 0
        self.frames_without_face = 0
        self.face_ms = 0.0  # last frame's face tracking time
        self._affine: np.ndarray | None = None
        self._reference: np.ndarray | None = None
        self._last: DrivingFrame | None = None
        self._aligned = np.empty((478, 3), np.float32)
        self._driving_image = np.empty((self.size, self.size, 3), np.uint8)

    # -- per source ---------------------------------------------------------------------------
    def set_sources(self, images: Sequence[np.ndarray]) -> None:
        """Crop and mesh each portrait (raises NoFaceError), then prepare the engine once.
        On error the previous sources stay in place."""
        if not images:
            raise ValueError("at least one source portrait is needed")
        with FaceTracker(video=False) as still:
            sources = [prepare_source(image, self.size, still) for image in images]
        self.engine.prepare(sources)
        self.sources = sources
        self.recalibrate()

    def recalibrate(self) -> None:
        """Make the next frame with a face the new alignment and motion reference."""
        self._affine = self._reference = self._last = None
        if self.smoother:
            self.smoother.reset()
        self.engine.reset()

    def set_reference(self, landmarks: np.ndarray) -> None:
        """Fix alignment and motion reference from a driving frame's raw landmarks."""
        self._affine = alignment_affine(head_box(self.sources[0].landmarks), head_box(landmarks))
        self._reference = transform_landmarks(landmarks, self._affine)

    @property
    def reference(self) -> np.ndarray | None:
        """The reference driving frame's landmarks, aligned (None until a face was seen)."""
        return self._reference

    def align(self, landmarks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Raw driving landmarks -> source crop pixels; the first call fixes the reference."""
        if self._affine is None:
            self.set_reference(landmarks)
        return transform_landmarks(landmarks, self._affine, out=out)

    # -- per frame ----------------------------------------------------------------------------
    def drive(self, frame: np.ndarray, time: float, tag: Any = None, landmarks: Any = _MISSING) -> Rendered | None:
        """Animate the source with one raw RGB driving frame taken at `time` seconds.

        Pass `landmarks` (or None for 'no face') to skip tracking when they are known.
        """
        if not self.sources:
            raise RuntimeError("set_sources() first")
        self.frames += 1
        if landmarks is _MISSING:
            t0 = _time.perf_counter()
            landmarks = self.tracker.detect(as_rgb(frame))
            self.face_ms = (_time.perf_counter() - t0) * 1e3
        if landmarks is None:
            self.frames_without_face += 1
            if self._last is None:  # nothing to hold yet: the portrait as it is
                return Rendered(self.sources[0].image, tag)
            held = self._last
            held.time, held.tag = time, tag
            return self.engine.step(held)
        aligned = self.align(landmarks, out=self._aligned)
        if self.smoother:
            aligned = self.smoother(aligned, time)
        image = None
        if self.engine.needs_driving_image:
            image = cv2.warpAffine(frame, self._affine, (self.size, self.size), dst=self._driving_image,
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self._last = DrivingFrame(landmarks=aligned, reference=self._reference, time=time, image=image, tag=tag)
        return self.engine.step(self._last)

    def flush(self) -> list[Rendered]:
        return self.engine.flush()

    def close(self) -> None:
        self.tracker.close()
