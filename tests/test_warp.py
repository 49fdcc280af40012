"""The warp engine on real portraits: motion follows the driver, the face keeps its shape.

Every check measures the rendered frames with mediapipe's face mesh, the same instrument a
viewer's eye is standing in for: roll in degrees, eye and mouth openings as lid-gap over
corner-width ratios (engines.face.eye_opening / mouth_opening).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from engines import Engine, EngineError, OptionError, WarpOptions, create_engine
from engines.animator import Animator
from engines.base import DrivingFrame, SourcePortrait
from engines.face import (
    LEFT_LID_PAIRS,
    RIGHT_LID_PAIRS,
    FaceTracker,
    NoFaceError,
    eye_opening,
    head_box,
    head_roll,
    mouth_opening,
    prepare_source,
)
from engines.raster import backward_map
from engines.warp import Reenactor, Similarity, SimilarityFit, reenact

SIZE = 512


def grace_hopper() -> np.ndarray:
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        return np.array(im.convert("RGB"))


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker(video=False) as t:
        yield t


@pytest.fixture(scope="module")
def astronaut() -> SourcePortrait:
    return prepare_source(data.astronaut(), SIZE)


@pytest.fixture(scope="module")
def hopper() -> SourcePortrait:
    return prepare_source(grace_hopper(), SIZE)


def measure(tracker: FaceTracker, image: np.ndarray) -> np.ndarray:
    landmarks = tracker.detect(np.ascontiguousarray(image))
    assert landmarks is not None, "the rendered frame must still show a face"
    return landmarks


def open_mouth(landmarks: np.ndarray, pixels: float) -> np.ndarray:
    """The driver opens the jaw: lower lip and chin drop by `pixels`, fading out upwards."""
    out = landmarks.copy()
    lips = (out[13, 1] + out[14, 1]) / 2
    below = np.clip((out[:, 1] - lips) / (out[152, 1] - lips) * 1.5, 0, 1)
    below[out[:, 1] <= lips] = 0
    below[[14, 87, 178, 88, 95, 317, 402, 318, 324, 17, 84, 181, 91, 146, 314, 405, 321, 375]] = 1
    out[:, 1] += pixels * below
    return out


def close_eyes(landmarks: np.ndarray, amount: float) -> np.ndarray:
    """The driver's upper lids descend `amount` (0..1) of the way to the lower lids."""
    out = landmarks.copy()
    for upper, lower in RIGHT_LID_PAIRS + LEFT_LID_PAIRS:
        out[upper, :2] += amount * (out[lower, :2] - out[upper, :2])
    return out


def rotate(landmarks: np.ndarray, degrees: float, shift=(0.0, 0.0)) -> np.ndarray:
    cx, cy = head_box(landmarks).center
    m = cv2.getRotationMatrix2D((cx, cy), degrees, 1.0)
    out = landmarks.copy()
    out[:, :2] = landmarks[:, :2] @ m[:, :2].T + m[:, 2] + shift
    return out


def test_similarity_fit_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 3))
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    b = 1.7 * a @ rotation.T + [3, -2, 1]
    fit = Similarity.fit(a, b)
    assert fit.scale == pytest.approx(1.7, rel=1e-9)
    np.testing.assert_allclose(fit.rotation, rotation, atol=1e-9)
    np.testing.assert_allclose(fit.inverse()(fit(a)), a, atol=1e-9)


def test_a_fit_from_fixed_points_is_the_fit_from_scratch_bit_for_bit():
    """SimilarityFit (the reference's half of the fit made once per reference, the reflection
    test on closed-form determinants) against Umeyama as written before it, reflections too."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(29, 3))
    fixed = SimilarityFit(a)
    reflections = 0
    for k in range(20):
        turn = np.linalg.qr(rng.normal(size=(3, 3)))[0] * (-1.0) ** np.array([0, 0, k])  # odd k: det -1
        b = 1.3 * a @ turn.T + rng.normal(size=(29, 3)) * 0.05 * k
        ma, mb = a.mean(axis=0), b.mean(axis=0)
        a0, b0 = a - ma, b - mb
        u, d, vt = np.linalg.svd(b0.T @ a0 / len(a))
        flip = np.ones(3)
        if np.linalg.det(u) * np.linalg.det(vt) < 0:
            flip[-1] = -1
            reflections += 1
        rotation = (u * flip) @ vt
        scale = float((d * flip).sum() / max((a0 ** 2).sum() / len(a), 1e-12))
        got = fixed(b)
        assert got.scale == scale
        assert np.array_equal(got.rotation, rotation) and np.array_equal(got.shift, mb - scale * rotation @ ma)
        assert np.linalg.det(got.rotation) > 0  # (a reflected b is fitted by a rotation)
    assert reflections >= 5


def test_the_face_drawing_keys_are_numpys_bit_for_bit():
    """engines.raster.face_drawing_keys (each face triangle's flip and depth, compiled) against
    the numpy it replaced, on triangles of every scale, half of them flipped."""
    from engines.raster import face_drawing_keys

    rng = np.random.default_rng(0)
    count, start = 3000, 400
    dst = rng.normal(size=(count, 3, 2)) * rng.choice([1e-3, 1.0, 300.0], size=(count, 1, 1))
    source_det, depth = rng.normal(size=count), rng.normal(size=468) * 40
    points = rng.integers(0, 468, size=(count - start, 3))
    flipped, face_depth = np.empty(count - start, np.bool_), np.empty(count - start)
    face_drawing_keys(dst, start, source_det, depth, points, flipped, face_depth)
    e1, e2 = dst[:, 1] - dst[:, 0], dst[:, 2] - dst[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    assert np.array_equal(flipped, det[start:] * source_det[start:] <= 0) and 0.3 < flipped.mean() < 0.7
    assert np.array_equal(face_depth, depth[points].mean(axis=1))


def test_the_backward_map_is_the_piecewise_affine_warp_and_draws_in_order():
    """engines.raster against scikit-image's PiecewiseAffineTransform on a jittered grid mesh
    (every pixel, full resolution and on a coarser grid), and where two triangles overlap the
    later one in the drawing order wins."""
    from scipy.spatial import Delaunay
    from skimage.transform import PiecewiseAffineTransform

    rng = np.random.default_rng(0)
    size = 96
    g = np.linspace(-1, size, 7)
    src = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    dst = src + rng.uniform(-4, 4, src.shape) * ((src > 0) & (src < size - 1)).all(axis=1, keepdims=True)
    tri = Delaunay(dst).simplices  # the triangulation scikit-image makes of the moved points
    order = np.arange(len(tri))
    map_x, map_y = np.empty((size, size), np.float32), np.empty((size, size), np.float32)
    backward_map(np.ascontiguousarray(dst[tri]), np.ascontiguousarray(src[tri]), order, 0.0, 0.0, 1.0, map_x, map_y)
    transform = PiecewiseAffineTransform.from_estimate(dst, src)
    ys, xs = np.mgrid[0:size, 0:size]
    expected = transform(np.stack([xs.ravel(), ys.ravel()], 1)).reshape(size, size, 2)
    inside = (expected != -1).all(axis=2)  # scikit-image's outside marker
    assert inside.mean() > 0.95
    assert np.abs(map_x - expected[..., 0])[inside].max() < 1e-3
    assert np.abs(map_y - expected[..., 1])[inside].max() < 1e-3
    # On a grid of half the resolution: the samples at its pixel centres.
    half_x, half_y = np.empty((size // 2, size // 2), np.float32), np.empty((size // 2, size // 2), np.float32)
    backward_map(np.ascontiguousarray(dst[tri]), np.ascontiguousarray(src[tri]), order, 0.0, 0.0, 2.0, half_x, half_y)
    centres = transform(np.stack([xs[::2, ::2].ravel() + 0.5, ys[::2, ::2].ravel() + 0.5], 1)).reshape(size // 2,
                                                                                                     size // 2, 2)
    ok = (centres != -1).all(axis=2)
    assert np.abs(half_x - centres[..., 0])[ok].max() < 1e-3
    # Two overlapping triangles, each mapping to its own constant-ish source: the last drawn wins.
    a = np.array([[[10, 10], [60, 10], [10, 60]], [[20, 20], [70, 20], [20, 70]]], np.float64)
    s = np.array([[[0, 0], [0.001, 0], [0, 0.001]], [[50, 50], [50.001, 50], [50, 50.001]]], np.float64)
    for first, last in ((0, 1), (1, 0)):
        backward_map(a, s, np.array([first, last]), 0.0, 0.0, 1.0, map_x, map_y)
        assert abs(map_x[30, 30] - s[last, 0, 0]) < 0.1  # covered by both
        assert abs(map_x[12, 12] - s[0, 0, 0]) < 0.1 and abs(map_x[65, 22] - s[1, 0, 0]) < 0.1
        assert map_x[90, 90] == 90 and map_y[90, 5] == 90  # no triangle: the pixel itself


def test_engine_meets_the_protocol_and_rejects_misuse(astronaut):
    engine = create_engine(WarpOptions(SIZE))
    assert isinstance(engine, Engine)
    frame = DrivingFrame(astronaut.landmarks, astronaut.landmarks, 0.0)
    with pytest.raises(EngineError, match="prepare"):
        engine.step(frame)
    with pytest.raises(EngineError, match="256x256"):
        engine.prepare([SourcePortrait(np.zeros((256, 256, 3), np.uint8), astronaut.landmarks)])
    with pytest.raises(EngineError, match="not engine options"):
        create_engine("nope")
    with pytest.raises(OptionError, match="--size must be a multiple of 8"):
        WarpOptions(size=100)


def test_driver_at_its_reference_renders_the_source_unchanged(astronaut, hopper):
    """Zero motion must be a no-op, whoever drives: the source is not pulled to the driver's face."""
    engine = create_engine(WarpOptions(SIZE))
    engine.prepare([astronaut])
    out = engine.step(DrivingFrame(hopper.landmarks, hopper.landmarks, 0.0, tag="t0"))
    assert out.tag == "t0"
    diff = np.abs(out.image.astype(np.int16) - astronaut.image).mean()
    assert diff < 1.0, f"mean abs difference {diff:.2f} (interpolation alone stays well under 1 level)"
    assert set(engine.timings.last) >= {"motion", "raster", "remap", "engine"}


@pytest.mark.parametrize("degrees", [-15, 10])
def test_head_roll_follows_the_driver(astronaut, hopper, tracker, degrees):
    reenactor = Reenactor(astronaut)
    base = head_roll(measure(tracker, reenactor.render(hopper.landmarks, hopper.landmarks).copy()))
    out = reenactor.render(rotate(hopper.landmarks, degrees, (12, -8)), hopper.landmarks)
    rolled = head_roll(measure(tracker, out)) - base
    # cv2's positive angle turns the head anticlockwise on screen, which head_roll counts negative.
    # 2 degrees: mediapipe's own roll jitter on a still photo is about 0.5 degree.
    assert rolled == pytest.approx(-degrees, abs=2.0)


def test_head_translation_follows_the_driver(astronaut, hopper, tracker):
    reenactor = Reenactor(astronaut)
    before = head_box(measure(tracker, reenactor.render(hopper.landmarks, hopper.landmarks).copy())).center
    after = head_box(measure(tracker, reenactor.render(rotate(hopper.landmarks, 0, (20, 12)), hopper.landmarks))).center
    # Driver and source faces have the same box size after alignment, so pixels carry over 1:1.
    assert after[0] - before[0] == pytest.approx(20, abs=3)
    assert after[1] - before[1] == pytest.approx(12, abs=3)


def test_mouth_opening_tracks_the_driver(astronaut, hopper, tracker):
    reenactor = Reenactor(astronaut)
    openings = []
    for pixels in (0, 12, 24):
        out = reenactor.render(open_mouth(hopper.landmarks, pixels), hopper.landmarks)
        openings.append(mouth_opening(measure(tracker, out)))
    # The source smiles with its teeth showing (opening ~0.17). Dropping the driver's jaw by 12 and
    # 24 px (a quarter and half of the mouth's width) must read as a clearly, then widely, open mouth.
    assert openings[0] == pytest.approx(mouth_opening(astronaut.landmarks), abs=0.03)
    assert openings[1] > openings[0] + 0.05
    assert openings[2] > openings[1] + 0.05


def test_a_blink_reads_as_closed_eyes_and_reopens(astronaut, hopper, tracker):
    reenactor = Reenactor(astronaut)
    open_eyes = eye_opening(measure(tracker, reenactor.render(hopper.landmarks, hopper.landmarks).copy()))
    # A third of the way closed on the driver's mesh is what mediapipe measures on a half-shut
    # eye (it never brings a shut eye's lid points together: a shut eye reads ~0.35 of open).
    half = eye_opening(measure(tracker, reenactor.render(close_eyes(hopper.landmarks, 0.33), hopper.landmarks).copy()))
    shut = eye_opening(measure(tracker, reenactor.render(close_eyes(hopper.landmarks, 1.0), hopper.landmarks).copy()))
    again = eye_opening(measure(tracker, reenactor.render(hopper.landmarks, hopper.landmarks).copy()))
    # Open eyes measure ~0.36 here; mediapipe reads a shut eye under ~0.12.
    assert shut < 0.12 < open_eyes
    assert shut < half < open_eyes
    assert again == pytest.approx(open_eyes, abs=0.02)


def test_the_source_keeps_its_face_shape_under_a_different_driver(astronaut, hopper, tracker):
    """No identity leakage: with the driver turned and talking, the rendered face's rigid shape
    (pose removed) stays the source's, far from the driver's."""
    reenactor = Reenactor(astronaut)
    driving = open_mouth(rotate(hopper.landmarks, 8, (10, 5)), 6)
    out = measure(tracker, reenactor.render(driving, hopper.landmarks))

    def shape_distance(a: np.ndarray, b: np.ndarray) -> float:
        """RMS distance over the face oval and brows after the best similarity, in box heights."""
        idx = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
               148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109, 70, 105, 107, 336, 334, 300]
        fit = Similarity.fit(a[idx].astype(np.float64), b[idx].astype(np.float64))
        return float(np.sqrt(((fit(a[idx]) - b[idx]) ** 2).sum(axis=1).mean()) / head_box(b).height)

    to_source = shape_distance(out, astronaut.landmarks)
    to_driver = shape_distance(out, driving)
    assert to_source < 0.5 * to_driver, (to_source, to_driver)


def test_animator_holds_the_last_pose_when_the_face_leaves(hopper):
    engine = create_engine(WarpOptions(SIZE))
    animator = Animator(engine, smoothing=False)
    animator.set_sources([data.astronaut()])
    first = animator.drive(np.zeros((240, 320, 3), np.uint8), 0.0, tag=0)
    assert np.array_equal(first.image, animator.sources[0].image)  # no driver yet: the portrait as it is
    frame = cv2.copyMakeBorder(grace_hopper(), 60, 60, 100, 100, cv2.BORDER_REPLICATE)
    m = cv2.getRotationMatrix2D((frame.shape[1] / 2, frame.shape[0] / 2.5), 12, 1.0)
    animator.drive(frame, 0.04, tag=1)
    turned = animator.drive(cv2.warpAffine(frame, m, frame.shape[1::-1], borderMode=cv2.BORDER_REPLICATE), 0.08, tag=2)
    turned = turned.image.copy()
    held = animator.drive(np.zeros_like(frame), 0.12, tag=3)
    assert held.tag == 3
    assert np.array_equal(held.image, turned), "a frame without a face holds the last good pose"
    assert animator.frames_without_face == 2
    assert not np.array_equal(turned, animator.sources[0].image)


def test_bad_sources_are_refused_and_the_previous_source_kept():
    animator = Animator(create_engine(WarpOptions(256)))
    animator.set_sources([data.astronaut()])
    kept = animator.sources
    gradient = np.tile(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], (300, 1, 3))
    with pytest.raises(NoFaceError):
        animator.set_sources([gradient])
    assert animator.sources is kept
    huge = cv2.resize(data.astronaut(), (6000, 6000), interpolation=cv2.INTER_NEAREST)
    animator.set_sources([huge])  # downscaled, not a crash
    assert animator.sources[0].image.shape == (256, 256, 3)


def test_reenact_is_a_callable_F(tracker):
    """F(source, driving): the classical reenactor, on images alone (the paper's training role)."""
    source = data.astronaut()
    driver = cv2.copyMakeBorder(grace_hopper(), 60, 60, 100, 100, cv2.BORDER_REPLICATE)
    m = cv2.getRotationMatrix2D((driver.shape[1] / 2, driver.shape[0] / 2.5), -12, 1.0)
    turned = cv2.warpAffine(driver, m, driver.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
    relative = reenact(source, turned, reference=driver, size=256)
    assert relative.shape == (256, 256, 3)
    roll = head_roll(measure(tracker, relative)) - head_roll(measure(tracker, prepare_source(source, 256).image))
    assert roll == pytest.approx(12, abs=2.5)
    with pytest.raises(NoFaceError):
        reenact(source, np.zeros((200, 200, 3), np.uint8))


def test_a_driving_clip_end_to_end_tracks_roll_mouth_and_blinks():
    """The whole loop on real pixels: a scripted clip of Grace Hopper (roll, translation, mouth,
    blinks, speech-like mix; streamer.samples) drives the astronaut through the Animator
    (tracking, alignment, One-Euro smoothing, warp). The driver and the output are each
    measured by their own mediapipe tracker, frame by frame."""
    from streamer.samples import driving_clip

    animator = Animator(create_engine(WarpOptions(SIZE)))
    animator.set_sources([data.astronaut()])
    rows = []
    with FaceTracker(video=True) as driver_eye, FaceTracker(video=True) as output_eye:
        for i, (frame, _pose) in enumerate(driving_clip("grace_hopper", fps=25)):
            driver = driver_eye.detect(frame)
            out = output_eye.detect(animator.drive(frame, i / 25, landmarks=driver).image)
            assert out is not None, f"frame {i}: the output lost its face"
            rows.append([f(lm) for lm in (driver, out) for f in (head_roll, mouth_opening, eye_opening)])
    d_roll, d_mouth, d_eyes, o_roll, o_mouth, o_eyes = np.array(rows).T
    # Observed on this clip: correlations 0.99 (roll), 0.92-0.93 (mouth: at its widest the jaw
    # reaches the dark collar and mediapipe reads the output's opening short, 0.5 for 0.7),
    # 0.86 (eyes: blinks last 3 frames, so the filter's one-frame lag costs most there).
    assert np.corrcoef(d_roll, o_roll)[0, 1] > 0.97
    assert np.corrcoef(d_mouth, o_mouth)[0, 1] > 0.9
    assert np.corrcoef(d_eyes, o_eyes)[0, 1] > 0.75
    # Roll carries over in degrees (the source's own 3 degree tilt is the offset).
    assert np.abs((o_roll - o_roll[0]) - (d_roll - d_roll[0])).max() < 5.0
    # The widest mouth opens the astronaut's mouth about as far as the driver's (0.68 -> ~0.7);
    # the blink shuts her eyes (driver ~0.11 shut, ~0.30 open; astronaut 0.36 open).
    assert o_mouth.max() > 0.5
    assert o_eyes.min() < 0.15
