"""The face pipeline: crop, alignment (paper section 3.4), local patches, filtering."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from engines.face import (
    NUM_LANDMARKS,
    Box,
    FaceTracker,
    NoFaceError,
    OneEuroFilter,
    alignment_affine,
    as_rgb,
    best_reference_frame,
    downscale,
    head_box,
    landmark_array,
    local_patch_boxes,
    portrait_crop_affine,
    prepare_source,
    transform_landmarks,
)


def test_landmarks_read_from_wire_bytes_equal_field_by_field():
    """detect's fast read of mediapipe's landmarks (their serialized bytes, one numpy pass) and
    its read-only view of the frame (no copy in mediapipe) give the plain reading's landmarks,
    bit for bit, on a still and on a tracked (video) frame; the caller's frame stays writable."""
    from mediapipe.framework.formats import landmark_pb2

    image = prepare_source(data.astronaut(), 256).image  # (a face that fills the frame)
    h, w = image.shape[:2]
    for video in (True,):  # (a still tracker reads its result the same way)
        with FaceTracker(video=video) as ours, FaceTracker(video=video) as plain:
            for frame in (image, np.ascontiguousarray(image[:, ::-1]), image):
                got = ours.detect(frame)
                assert got is not None
                assert frame.flags.writeable
                result = plain._mesh.process(frame.copy())
                for _ in range(2 if video and not plain._tracking else 0):
                    result = plain._mesh.process(frame.copy())
                plain._tracking = True
                # (every landmark exactly x, y, z: the one-pass read is the one taken)
                assert len(result.multi_face_landmarks[0].SerializeToString()) == 17 * NUM_LANDMARKS
                points = result.multi_face_landmarks[0].landmark
                want = np.array([(p.x, p.y, p.z) for p in points], np.float32) * np.array([w, h, w], np.float32)
                assert got.dtype == np.float32 and np.array_equal(got, want)
    # Layouts the one-pass read does not take are read field by field: a visibility field, a
    # coordinate set to 0 (still written on the wire: a proto2 field), no landmarks at all.
    odd = landmark_pb2.NormalizedLandmarkList()
    odd.landmark.add(x=0.25, y=0.5, z=-0.125, visibility=0.9)
    odd.landmark.add(x=0.0, y=1.0, z=2.0)
    assert np.array_equal(landmark_array(odd), np.array([[0.25, 0.5, -0.125], [0.0, 1.0, 2.0]], np.float32))
    zero = landmark_pb2.NormalizedLandmarkList()
    zero.landmark.add(x=0.0, y=0.75, z=0.0)
    assert np.array_equal(landmark_array(zero), np.array([[0.0, 0.75, 0.0]], np.float32))
    assert landmark_array(landmark_pb2.NormalizedLandmarkList()).shape == (0, 3)


@pytest.fixture(scope="module")
def astronaut_landmarks() -> np.ndarray:
    with FaceTracker(video=False) as tracker:
        landmarks = tracker.detect(data.astronaut())
    assert landmarks is not None and landmarks.shape == (NUM_LANDMARKS, 3)
    return landmarks


def test_head_box_holds_the_face(astronaut_landmarks):
    box = head_box(astronaut_landmarks)
    # The astronaut's face sits in the upper middle of her 512x512 photo, about 100 px wide.
    assert 150 < box.center[0] < 280 and 60 < box.center[1] < 200
    assert 70 < box.width < 160 and 90 < box.height < 190


def test_portrait_crop_centres_the_head_and_stays_inside_the_image(astronaut_landmarks):
    box = head_box(astronaut_landmarks)
    a = portrait_crop_affine((512, 512, 3), box, 256)
    cropped = head_box(transform_landmarks(astronaut_landmarks, a))
    assert cropped.center[0] == pytest.approx(128, abs=2)
    assert cropped.height == pytest.approx(256 / 2.0 * box.height / max(box.width, box.height), rel=0.01)
    # A head near a corner: the square slides to stay within the image instead of padding.
    corner = Box(5, 5, 105, 125)
    a = portrait_crop_affine((400, 600, 3), corner, 128)
    x0, y0 = -a[0, 2] / a[0, 0], -a[1, 2] / a[1, 1]
    assert x0 == pytest.approx(0) and y0 == pytest.approx(0)


def test_alignment_maps_the_driving_head_box_onto_the_source_box():
    source, driving = Box(100, 120, 300, 360), Box(40, 30, 140, 150)
    a = alignment_affine(source, driving)
    corners = np.array([[40, 30, 0], [140, 150, 0]], np.float32)
    np.testing.assert_allclose(transform_landmarks(corners, a)[:, :2], [[100, 120], [300, 360]], atol=1e-4)
    assert a[0, 1] == a[1, 0] == 0  # translation + scale only
    iso = alignment_affine(source, driving, isotropic=True)
    assert iso[0, 0] == pytest.approx(iso[1, 1])
    assert iso[0, 0] == pytest.approx(np.sqrt(2.0 * 2.0), rel=1e-6)  # sx = 2, sy = 2
    centre = transform_landmarks(np.array([[90, 90, 0]], np.float32), iso)[0, :2]
    np.testing.assert_allclose(centre, source.center, atol=1e-4)


def test_z_follows_the_mean_scale():
    lm = np.array([[10, 20, 4.0]], np.float32)
    a = np.array([[2.0, 0, 0], [0, 8.0, 0]])
    assert transform_landmarks(lm, a)[0, 2] == pytest.approx(4.0 * 4.0)


def test_best_reference_frame_is_the_closest_after_box_normalisation(astronaut_landmarks):
    shifted = astronaut_landmarks + [50, 20, 0]  # same face elsewhere: distance 0 after normalising
    rolled = astronaut_landmarks.copy()
    m = cv2.getRotationMatrix2D(head_box(rolled).center, 20, 1.3)
    rolled[:, :2] = rolled[:, :2] @ m[:, :2].T + m[:, 2]
    assert best_reference_frame(astronaut_landmarks, [None, rolled, shifted, rolled]) == 2
    with pytest.raises(NoFaceError):
        best_reference_frame(astronaut_landmarks, [None, None])


@pytest.mark.parametrize("size", [256, 512, 768])
def test_local_patches_are_a_quarter_of_the_frame_and_inside_it(astronaut_landmarks, size):
    src = prepare_source(data.astronaut(), size)
    boxes = local_patch_boxes(src.landmarks, size)
    assert boxes.shape == (3, 4)
    np.testing.assert_array_equal(boxes[:, 2] - boxes[:, 0], size // 4)  # 128 at 512
    np.testing.assert_array_equal(boxes[:, 3] - boxes[:, 1], size // 4)
    assert boxes.min() >= 0 and boxes.max() <= size
    # Right eye left of left eye (on screen), both above the mouth.
    assert boxes[0, 0] < boxes[1, 0] and max(boxes[0, 1], boxes[1, 1]) < boxes[2, 1]
    # A face at the frame's edge: patch centres are clipped so the patches stay whole.
    edge = src.landmarks.copy()
    edge[:, 0] -= edge[:, 0].min()
    assert local_patch_boxes(edge, size).min() >= 0


def test_one_euro_filter_smooths_jitter_and_follows_motion():
    rng = np.random.default_rng(1)
    f = OneEuroFilter()
    truth = np.zeros((478, 2), np.float32)
    noisy_err, filtered_err = [], []
    for i in range(100):  # still face, 1 px jitter
        x = truth + rng.normal(0, 1.0, truth.shape).astype(np.float32)
        y = f(x, i / 25)
        if i > 10:
            noisy_err.append(np.abs(x - truth).mean())
            filtered_err.append(np.abs(y - truth).mean())
    # The defaults trade some smoothing for blink-fast response (tuned on the samples clip: mesh
    # jitter 0.38 -> 0.17 px while a 3-frame blink still closes); on white noise they cut ~40%.
    assert np.mean(filtered_err) < 0.7 * np.mean(noisy_err)
    for i in range(100, 125):  # then a fast move: 200 px/s
        y = f(truth + (i - 99) * 8.0, i / 25)
    assert np.abs(y - (truth + 25 * 8.0)).mean() < 16.0  # lags by less than two frames' motion
    assert f(truth, 124 / 25) is not None  # a repeated timestamp is not a division by zero


def test_image_checks_and_downscale():
    assert as_rgb(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert as_rgb(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="8-bit"):
        as_rgb(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        as_rgb(np.zeros((4, 5, 2), np.uint8))
    assert downscale(np.zeros((3000, 6000, 3), np.uint8)).shape == (1024, 2048, 3)
    small = np.zeros((30, 60, 3), np.uint8)
    assert downscale(small) is small


def test_prepare_source_refuses_a_portrait_without_a_face():
    with pytest.raises(NoFaceError, match="no face"):
        prepare_source(np.full((300, 300, 3), 128, np.uint8), 256)


# -- small and off-centre faces (the full-range detector before the mesh) ----------------------
def _pasted(canvas_shape, portrait, x, y, scale=1.0):
    canvas = np.full((*canvas_shape, 3), 200, np.uint8)
    if scale != 1.0:
        portrait = cv2.resize(portrait, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = portrait.shape[:2]
    canvas[y:y + h, x:x + w] = portrait
    return canvas


@pytest.fixture(scope="module")
def astronaut_crop():
    return prepare_source(data.astronaut(), 256)


@pytest.mark.parametrize("what, canvas, x, y, scale", [
    ("512 astronaut centred on 1024 canvas", (1024, 1024), 256, 256, 1.0),
    ("512 astronaut in the corner of a 1024 canvas", (1024, 1024), 512, 512, 1.0),
    ("1080p photo, face top left", (1080, 1920), 0, 0, 0.6),
    ("1080p photo, face bottom right", (1080, 1920), 1920 - 512, 1080 - 512, 1.0),
    ("half-body: face small in a 2048 canvas", (2048, 2048), 1200, 300, 0.5),
])
def test_small_or_off_centre_faces_are_found_and_cropped_like_the_portrait(what, canvas, x, y, scale,
                                                                          astronaut_crop):
    image = _pasted(canvas, data.astronaut(), x, y, scale)
    with FaceTracker(video=False) as tracker:
        assert tracker.detect(image) is None or scale == 1.0  # the mesh alone misses the small ones
        source = prepare_source(image, 256, tracker)
    assert source.faces == 1
    box, expected = head_box(source.landmarks), head_box(astronaut_crop.landmarks)
    # The same framing as the astronaut's own photo gives: head centred, same size.
    assert box.center == pytest.approx(expected.center, abs=6)
    assert box.height == pytest.approx(expected.height, rel=0.08)
    if scale == 1.0:  # the same pixels: the crop is the photo's own crop
        assert np.abs(source.image.astype(np.int16) - astronaut_crop.image).mean() < 8


def test_group_shot_takes_the_largest_face_and_counts_them():
    from streamer.samples import portrait

    group = _pasted((700, 1400), data.astronaut(), 20, 100)  # face ~105 px
    hopper = cv2.resize(portrait("grace_hopper"), None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)  # ~65 px
    group[300:300 + hopper.shape[0], 900:900 + hopper.shape[1]] = hopper
    with FaceTracker(video=False) as tracker:
        boxes = tracker.find_faces(group)
        source = prepare_source(group, 256, tracker)
    assert len(boxes) == 2 and boxes[0].width > boxes[1].width
    assert 20 < boxes[0].center[0] < 532 and 900 < boxes[1].center[0] < 900 + hopper.shape[1]
    assert source.faces == 2
    # The astronaut's face, framed as in her own photo.
    own = prepare_source(data.astronaut(), 256)
    assert np.abs(source.image.astype(np.int16) - own.image).mean() < 8


def test_no_face_says_what_to_do():
    with pytest.raises(NoFaceError, match=r"use a portrait where one face is clearly visible, at least \d+ px"):
        prepare_source(np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8), 256)


def test_concurrent_muting_restores_stderr():
    """Two threads starting trackers at once (two sessions) must not leave fd 2 on /dev/null."""
    import os
    import threading

    before = os.fstat(2)
    threads = [threading.Thread(target=lambda: FaceTracker(video=True).close()) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
