"""The Animator's two halves, `track` and `render`, as the streamer's two threads use them:
each driving frame keeps its own arrays from `track` until it is rendered or released, so the
next frames can be tracked while it is in the engine."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import PortraitEngine

from engines.animator import Animator
from engines.base import DrivingFrame, Rendered
from streamer import samples

SIZE = 128


class RecordingEngine(PortraitEngine):
    """Renders the portrait; keeps a copy of every driving frame it was stepped with."""

    name = "recording"
    size = SIZE
    needs_driving_image = True

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[np.ndarray, np.ndarray, float]] = []

    def step(self, frame: DrivingFrame) -> Rendered:
        self.seen.append((frame.landmarks.copy(), frame.image.copy(), frame.time))
        return super().step(frame)


@pytest.fixture(scope="module")
def astronaut():
    return samples.portrait("astronaut")


def animator_with(astronaut, buffers: int) -> Animator:
    animator = Animator(RecordingEngine(), smoothing=True, buffers=buffers)
    animator.set_sources([astronaut])
    return animator


def moved(animator: Animator, pixels: float) -> tuple[np.ndarray, np.ndarray]:
    """A driving frame and its landmarks: the source crop itself, shifted right."""
    crop, marks = animator.sources[0].image, animator.sources[0].landmarks
    frame = np.roll(crop, round(pixels), axis=1)
    return frame, marks + np.float32([pixels, 0, 0])


def track_moved(animator: Animator, pixels: float, time: float, tag: int) -> DrivingFrame:
    frame, marks = moved(animator, pixels)
    return animator.track(frame, time, tag=tag, landmarks=marks)


def test_frames_in_flight_keep_their_own_arrays_until_rendered(astronaut):
    animator = animator_with(astronaut, buffers=3)
    faceless = np.zeros_like(animator.sources[0].image)
    try:
        assert isinstance(animator.track(faceless, 0.0, tag="no face yet", landmarks=None), Rendered)
        tracked, copies = [], []
        for i in range(3):
            driving = track_moved(animator, 4 * i, i / 25, tag=i)
            tracked.append(driving)
            copies.append((driving.landmarks.copy(), driving.image.copy()))
        # Three frames in flight, three sets of arrays: tracking the later ones left the first intact.
        assert len({id(d.landmarks) for d in tracked}) == len({id(d.image) for d in tracked}) == 3
        for driving, (landmarks, image) in zip(tracked, copies):
            assert np.array_equal(driving.landmarks, landmarks) and np.array_equal(driving.image, image)
        assert not np.array_equal(copies[0][1], copies[2][1])  # the frames do differ
        with pytest.raises(RuntimeError, match="in use"):
            track_moved(animator, 20, 0.2, tag=3)

        assert animator.render(tracked[0]).tag == 0
        assert np.array_equal(animator.engine.seen[0][0], copies[0][0])
        animator.release(tracked[1])  # dropped: never rendered
        with pytest.raises(RuntimeError, match="twice"):
            animator.release(tracked[1])
        freed = {id(tracked[0].landmarks), id(tracked[1].landmarks)}
        newer = track_moved(animator, 24, 0.24, tag=4)
        assert id(newer.landmarks) in freed
        assert np.array_equal(tracked[2].landmarks, copies[2][0])  # the one still out is untouched

        # No face: the last good pose again, on its arrays, with this frame's own time and tag,
        # while the frame it repeats may still be in the engine.
        held = animator.track(faceless, 0.28, tag=5, landmarks=None)
        assert held is not newer and held.landmarks is newer.landmarks and held.image is newer.image
        assert (held.time, held.tag, newer.time, newer.tag) == (0.28, 5, 0.24, 4)
        animator.render(newer)
        animator.render(tracked[2])
        # The held pose still counts as a user of its set: two sets are free, not three.
        a = track_moved(animator, 8, 0.32, tag=6)
        b = track_moved(animator, 12, 0.36, tag=7)
        assert held.landmarks is not a.landmarks and held.landmarks is not b.landmarks
        with pytest.raises(RuntimeError, match="in use"):
            track_moved(animator, 16, 0.4, tag=8)
        for driving in (held, a, b):
            animator.render(driving)
        assert [time for _, _, time in animator.engine.seen] == [0.0, 0.24, 2 / 25, 0.28, 0.32, 0.36]
    finally:
        animator.close()


def test_drive_is_track_then_render_on_one_set_of_arrays(astronaut):
    """`drive` (offline `animate`, `bench`) gives each frame's arrays back after its step, so
    one set does for any number of frames, faces or not."""
    animator = animator_with(astronaut, buffers=1)
    try:
        frame, marks = moved(animator, 0)
        assert np.array_equal(animator.drive(frame, 0.0, tag=0, landmarks=None).image, animator.sources[0].image)
        for i in range(1, 6):
            frame, marks = moved(animator, 3 * i)
            assert animator.drive(frame, i / 25, tag=i, landmarks=None if i == 4 else marks).tag == i
        seen = animator.engine.seen
        assert len(seen) == 5 and animator.frames_without_face == 2
        assert np.array_equal(seen[3][0], seen[2][0])  # frame 4 had no face: frame 3's pose, held
    finally:
        animator.close()
