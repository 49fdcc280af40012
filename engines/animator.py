"""Drives any engine with raw video frames: the per-frame loop that `animate` and the
streamer share.

raw frame -> face mesh -> alignment to the source head box -> One-Euro smoothing ->
retargeting (the user's controls, engines/retarget.py) -> engine.
The alignment (translation + scale) and the motion reference are fixed by one driving frame:
the first frame with a face unless the caller chooses one (offline, the released code picks
the frame closest to the source). A frame with no face holds the last good pose.

`drive` does it all for one frame. `track` and `render` are its two halves, for a caller that
runs them on two threads (the streamer: frame n+1 is tracked while frame n is in the engine).
`track` writes each driving frame into one of `buffers` sets of arrays and the frame keeps its
set until `render` (or `release`) gives it back, so the engine never reads arrays that the
next frame is being written into.
"""

from __future__ import annotations

import dataclasses
import threading
import time as _time
from typing import Any, Sequence

import cv2
import numpy as np

from .base import DrivingFrame, Engine, Rendered, SourcePortrait
from .face import (
    NUM_LANDMARKS,
    FaceTracker,
    OneEuroFilter,
    alignment_affine,
    as_rgb,
    head_box,
    prepare_source,
    transform_landmarks,
)
from .retarget import NEUTRAL, DrivingReposer, Retargeter, Retargeting

_MISSING = object()


class _BufferSets:
    """The arrays behind the DrivingFrames that `Animator.track` hands out, in a few sets.

    A set is busy from its hand-out until every frame handed out on it is released: a held
    pose hands out the last good frame's set again, so each set counts its users. Only the
    tracking thread picks and hands out sets; releases may come from any thread.
    """

    def __init__(self, count: int, size: int, with_image: bool):
        if count < 1:
            raise ValueError("at least one set of driving buffers is needed")
        self.landmarks = [np.empty((NUM_LANDMARKS, 3), np.float32) for _ in range(count)]
        self.images = [np.empty((size, size, 3), np.uint8) if with_image else None for _ in range(count)]
        self._users = [0] * count
        self._lock = threading.Lock()

    def idle(self, held: DrivingFrame | None) -> int:
        """A set nobody uses, other than the held pose's if there is a choice: the held pose
        stays intact even if this frame fails half-written."""
        with self._lock:
            idle = [i for i, users in enumerate(self._users) if users == 0]
        if not idle:
            raise RuntimeError(f"all {len(self._users)} sets of driving buffers are in use: "
                               "render() or release() each frame that track() hands out")
        return next((i for i in idle if held is None or self.landmarks[i] is not held.landmarks), idle[0])

    def hand_out(self, frame: DrivingFrame) -> DrivingFrame:
        with self._lock:
            self._users[self._index(frame)] += 1
        return frame

    def release(self, frame: DrivingFrame) -> None:
        with self._lock:
            index = self._index(frame)
            if self._users[index] == 0:
                raise RuntimeError("a driving frame was released twice")
            self._users[index] -= 1

    def _index(self, frame: DrivingFrame) -> int:
        for index, landmarks in enumerate(self.landmarks):
            if landmarks is frame.landmarks:
                return index
        raise ValueError("not a driving frame of this animator")


class Animator:
    def __init__(self, engine: Engine, tracker: FaceTracker | None = None, smoothing: bool = True,
                 buffers: int = 1, retargeting: Retargeting = NEUTRAL):
        """`buffers`: how many driving frames may be handed out by `track` and not yet
        rendered or released (one for `drive`; a pipelined caller needs one per frame in
        flight plus the one being tracked). `retargeting`: the controls' first values
        (`retarget` changes them)."""
        self.engine = engine
        self.size = engine.size
        self.tracker = tracker or FaceTracker(video=True)
        self.smoother = OneEuroFilter() if smoothing else None
        self.sources: list[SourcePortrait] = []
        self.frames = 0
        self.frames_without_face = 0
        self.face_ms = 0.0  # last frame's face tracking time
        self._affine: np.ndarray | None = None
        self._realign = False  # re-derive the alignment at the next face, the reference kept
        self._reference: np.ndarray | None = None
        self._last: DrivingFrame | None = None
        self._aligned = np.empty((NUM_LANDMARKS, 3), np.float32)  # before smoothing
        self._buffers = _BufferSets(buffers, self.size, engine.needs_driving_image)
        self.retargeter = Retargeter(retargeting)
        self._reposer: DrivingReposer | None = None  # F's source frame, for engines that read pixels

    # -- per source ---------------------------------------------------------------------------
    def set_sources(self, images: Sequence[np.ndarray]) -> None:
        """Crop and mesh each portrait (raises NoFaceError), then prepare the engine once.
        On error the previous sources stay in place."""
        self.use_sources(prepare_sources(images, self.size))

    def use_sources(self, sources: Sequence[SourcePortrait]) -> None:
        """Prepare the engine with sources made by `prepare_sources` (which may run on another
        thread, beside the frames); on error the previous sources stay in place."""
        self.engine.prepare(sources)
        self.sources = list(sources)
        self.recalibrate()

    def recalibrate(self) -> None:
        """Make the next frame with a face the new alignment and motion reference."""
        self._affine = self._reference = self._last = None
        self._forget_reference()
        if self.smoother:
            self.smoother.reset()
        self.engine.reset()

    def realign(self) -> None:
        """Re-derive the alignment from the next frame with a face, keeping the motion reference,
        the smoothing and the engine's state: for a driving video that changed size (a webcam
        switching resolution), where the head is now elsewhere in pixels."""
        self._realign = True

    def set_reference(self, landmarks: np.ndarray, image: np.ndarray | None = None) -> None:
        """Fix alignment and motion reference from a driving frame's raw landmarks. `image`:
        that frame, for an engine that reads driving pixels while the retargeting controls
        edit them (F re-poses it; without it, the first frame driven after this is used)."""
        self._affine = alignment_affine(head_box(self.sources[0].landmarks), head_box(landmarks))
        self._reference = transform_landmarks(landmarks, self._affine)
        self._forget_reference()
        if image is not None and self.engine.needs_driving_image:
            aligned = cv2.warpAffine(as_rgb(image), self._affine, (self.size, self.size), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE)
            self._reposer = DrivingReposer(aligned, self._reference)

    # -- retargeting (engines/retarget.py) ------------------------------------------------------
    def retarget(self, settings: Retargeting) -> None:
        """New values for the controls, from any thread: the next frames ramp to them."""
        self.retargeter.settings = settings

    def _forget_reference(self) -> None:
        self.retargeter.reset()
        self._reposer = None

    def _retarget(self, aligned: np.ndarray, unedited: np.ndarray, image: np.ndarray | None) -> None:
        """Edit the aligned driving mesh in place; for an engine that reads driving pixels,
        re-pose `image` (in place) to it with F. Nothing is touched while the controls are neutral."""
        if image is not None and self._reposer is None:  # F's source: the first face since the reference
            self._reposer = DrivingReposer(image, unedited)
        if self.retargeter.apply(aligned, self._reference) and image is not None:
            self._reposer.render(aligned, image, self.retargeter.engaged, out=image)

    @property
    def reference(self) -> np.ndarray | None:
        """The reference driving frame's landmarks, aligned (None until a face was seen)."""
        return self._reference

    def align(self, landmarks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Raw driving landmarks -> source crop pixels; the first call fixes the reference."""
        if self._affine is None:
            self.set_reference(landmarks)
        elif self._realign:
            self._affine = alignment_affine(head_box(self.sources[0].landmarks), head_box(landmarks))
        self._realign = False
        return transform_landmarks(landmarks, self._affine, out=out)

    # -- per frame ----------------------------------------------------------------------------
    def drive(self, frame: np.ndarray, time: float, tag: Any = None, landmarks: Any = _MISSING) -> Rendered | None:
        """Animate the source with one raw RGB driving frame taken at `time` seconds.

        Pass `landmarks` (or None for 'no face') to skip tracking when they are known.
        """
        return self.render(self.track(frame, time, tag, landmarks))

    def track(self, frame: np.ndarray, time: float, tag: Any = None,
              landmarks: Any = _MISSING) -> DrivingFrame | Rendered:
        """Everything `drive` does before the engine: face mesh, alignment, smoothing and the
        aligned driving image of one raw RGB frame taken at `time` seconds.

        Returns the DrivingFrame to `render`, or, while no face has been seen since the last
        recalibration, the portrait as it is (a Rendered: there is nothing to step the engine
        with). A frame with no face holds the last good pose. Pass `landmarks` (or None for
        'no face') to skip tracking when they are known.
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
            # A new frame on the same arrays: the last one may still be in the engine.
            return self._buffers.hand_out(dataclasses.replace(self._last, time=time, tag=tag))
        buffers = self._buffers
        index = buffers.idle(self._last)
        aligned = buffers.landmarks[index]
        if self.smoother:
            # The filter returns its own state, which the next frame updates in place.
            np.copyto(aligned, self.smoother(self.align(landmarks, out=self._aligned), time))
        else:
            self.align(landmarks, out=aligned)
        image = None
        if self.engine.needs_driving_image:
            image = cv2.warpAffine(frame, self._affine, (self.size, self.size), dst=buffers.images[index],
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self._retarget(aligned, self._aligned if self.smoother else aligned, image)
        self._last = DrivingFrame(landmarks=aligned, reference=self._reference, time=time, image=image, tag=tag)
        return buffers.hand_out(self._last)

    def render(self, driving: DrivingFrame | Rendered) -> Rendered | None:
        """Everything `drive` does from the engine on: step it with what `track` returned (a
        Rendered passes through), then give the frame's buffers back."""
        if isinstance(driving, Rendered):
            return driving
        try:
            return self.engine.step(driving)
        finally:
            self._buffers.release(driving)

    def release(self, driving: DrivingFrame | Rendered) -> None:
        """Give back the buffers of a frame from `track` that will not be rendered (dropped)."""
        if isinstance(driving, DrivingFrame):
            self._buffers.release(driving)

    def flush(self) -> list[Rendered]:
        return self.engine.flush()

    def close(self) -> None:
        self.tracker.close()


def prepare_sources(images: Sequence[np.ndarray], size: int) -> list[SourcePortrait]:
    """Crop and mesh each portrait for an engine of `size` (raises NoFaceError); touches no
    Animator, so it may run on any thread."""
    if not images:
        raise ValueError("at least one source portrait is needed")
    with FaceTracker(video=False) as still:
        return [prepare_source(image, size, still) for image in images]
