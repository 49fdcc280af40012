"""What the warp engine's frames look like: lids that cover the eye, a mouth with an inside,
smooth edges, a background that stays put, and expressions that carry across identities and
styles (photos, a painting-like and a comic-like version made in code, a flat cartoon).

Geometry is checked exactly where it can be (a marker colour painted into the source's eye
openings must not show through a shut lid; background pixels must be bit-identical), looks
against a supersampled render, and expression transfer with mediapipe on driver and output.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from engines import WarpOptions, create_engine
from engines.base import SourcePortrait
from engines.face import LEFT_EYE, LEFT_LID_PAIRS, RIGHT_EYE, RIGHT_LID_PAIRS, FaceTracker, prepare_source
from engines.metrics import evaluate
from engines.warp import Reenactor
from test_warp import open_mouth  # tests/ is on sys.path: one jaw-drop helper for both warp test files
from streamer.samples import Pose, driving_clip, portrait
from styles import cartoon_face, inked, painted

SIZE = 512
MARKER = np.array([0, 255, 0], np.uint8)


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker(video=False) as t:
        yield t


@pytest.fixture(scope="module")
def images():
    astronaut, hopper = portrait("astronaut"), portrait("grace_hopper")
    return {"astronaut": astronaut, "grace_hopper": hopper, "painted_hopper": painted(hopper),
            "inked_astronaut": inked(astronaut), "cartoon": cartoon_face()}


@pytest.fixture(scope="module")
def sources(images, tracker):
    return {name: prepare_source(image, SIZE, tracker) for name, image in images.items()}


@pytest.fixture(scope="module")
def driver(sources):
    """Another identity's face, as the engine sees a driver: Grace Hopper's mesh (Grace Hopper
    herself is driven by the astronaut's)."""
    return sources["grace_hopper"].landmarks


def driver_for(name: str, sources) -> np.ndarray:
    return sources["astronaut" if "hopper" in name else "grace_hopper"].landmarks


def close_eyes(landmarks: np.ndarray, amount: float, eyes=(0, 1)) -> np.ndarray:
    out = landmarks.copy()
    for k, pairs in enumerate((RIGHT_LID_PAIRS, LEFT_LID_PAIRS)):
        if k in eyes:
            for upper, lower in pairs:
                out[upper, :2] += amount * (out[lower, :2] - out[upper, :2])
    return out


def turned(landmarks: np.ndarray, yaw: float = 0.0, roll: float = 0.0, shift=(0.0, 0.0)) -> np.ndarray:
    """The driver's head turned about its own centre (yaw: about the vertical axis) and moved."""
    c = landmarks.mean(axis=0)
    a, b = math.radians(yaw), math.radians(roll)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return ((landmarks - c) @ (rz @ ry).T + c + [shift[0], shift[1], 0]).astype(np.float32)


def eye_openings(landmarks: np.ndarray) -> list[np.ndarray]:
    return [landmarks[list(contour), :2] for contour in (RIGHT_EYE, LEFT_EYE)]


def marked(source: SourcePortrait) -> tuple[SourcePortrait, list[np.ndarray]]:
    """The source with each eye's opening (the mesh's eye contour) painted in MARKER."""
    image = source.image.copy()
    masks = []
    for polygon in eye_openings(source.landmarks):
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.rint(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        image[mask > 0] = MARKER
        masks.append(mask > 0)
    return SourcePortrait(image, source.landmarks), masks


def marker_pixels(image: np.ndarray) -> int:
    """Pixels that are mostly marker (more than half of it, blended with anything)."""
    d = image.astype(np.int16)
    return int(((d[..., 1] - np.maximum(d[..., 0], d[..., 2])) > 128).sum())


STYLES = ("astronaut", "grace_hopper", "painted_hopper", "inked_astronaut", "cartoon")


@pytest.mark.parametrize("name", STYLES)
def test_a_full_blink_hides_the_eye_interior_and_a_wink_only_its_eye(name, sources):
    source, masks = marked(sources[name])
    reference = driver_for(name, sources)
    reenactor = Reenactor(source, matte=np.ones((SIZE, SIZE), np.float32))
    area = sum(int(m.sum()) for m in masks)
    open_ = marker_pixels(reenactor.render(reference, reference))
    assert open_ > 0.5 * area  # open eyes: the interior shows
    half = marker_pixels(reenactor.render(close_eyes(reference, 0.33), reference))
    shut = marker_pixels(reenactor.render(close_eyes(reference, 1.0), reference))
    # Not one pixel of the interior may show through a shut lid, whatever the style.
    assert shut == 0, f"{shut} of {area} interior pixels show through the shut lids"
    assert 0.1 * open_ < half < 0.9 * open_, (half, open_)  # half-shut reads as such
    out = reenactor.render(close_eyes(reference, 1.0, eyes=(1,)), reference)
    right = marker_pixels(np.where(masks[0][..., None], out, 0))
    left = marker_pixels(np.where(masks[1][..., None], out, 0))
    assert left == 0 and right > 0.5 * masks[0].sum(), (right, left)  # a wink shuts one eye


def test_a_shut_lid_is_skin_with_a_lash_line(sources, driver):
    """The lid is the portrait's own skin (close to its skin colour, textured, not a flat
    block) with a dark line along its edge."""
    source = sources["astronaut"]
    reenactor = Reenactor(source)
    out = reenactor.render(close_eyes(driver, 1.0), driver).copy()
    from engines.warp import skin_tone

    tone = skin_tone(source.image, source.landmarks)
    for polygon in eye_openings(source.landmarks):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        cv2.fillPoly(mask, [np.rint(polygon).astype(np.int32)], 1)
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
        rows = np.flatnonzero(inner.any(axis=1))
        top = inner.copy()
        top[rows[len(rows) // 2]:] = False  # the upper half: lid skin, clear of the lash line
        lid = out[top].astype(np.float32)
        assert np.linalg.norm(lid.mean(axis=0) - tone) < 45, (lid.mean(axis=0), tone)
        assert lid.std(axis=0).mean() > 1.0  # texture, not one flat colour
        darkest = out[cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0].astype(np.float32).sum(axis=1).min()
        assert darkest < 0.6 * tone.sum()  # the lash line


def test_an_opened_mouth_has_depth_teeth_and_keeps_its_lips(sources):
    """Grace Hopper's mouth is closed in her portrait: opened by a driver, the inside is dark
    in the middle and lit near the lips, upper and lower teeth show, the lips keep their
    colour; at rest nothing is drawn (no seam where the lips meet)."""
    source = sources["grace_hopper"]
    driver = sources["cartoon"].landmarks  # another identity, lips closed
    reenactor = Reenactor(source)
    closed = reenactor.render(driver, driver).copy()
    mouth = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mouth, [np.rint(source.landmarks[[61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269,
                                                    267, 0, 37, 39, 40, 185], :2]).astype(np.int32)], 1)
    around = cv2.dilate(mouth, np.ones((15, 15), np.uint8)) > 0
    # (Resampling alone moves textured pixels by a level or two: a drawn seam by tens.)
    assert np.abs(closed[around].astype(np.int16) - source.image[around]).mean() < 2.0, "a seam where the lips meet"

    wide = reenactor.render(open_mouth(driver, 30), driver).copy()
    moved = reenactor.landmarks(open_mouth(driver, 30), driver)
    upper = moved[[78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308], :2]
    lower = moved[[308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78], :2]
    inside = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(inside, [np.rint(np.concatenate([upper, lower])).astype(np.int32)], 1)
    core = cv2.erode(inside, np.ones((9, 9), np.uint8)) > 0
    brightness = wide.astype(np.float32).mean(axis=2)
    skin = source.image.astype(np.float32).mean(axis=2)[around & ~(mouth > 0)].mean()
    assert inside.sum() > 400
    # Teeth: light, low-saturation pixels in the top and bottom of the opening.
    x0, y0, w, h = cv2.boundingRect(inside)
    band = lambda a, b: (inside > 0) & (np.arange(SIZE)[:, None] >= y0 + a * h) & (np.arange(SIZE)[:, None] < y0 + b * h)
    light = (brightness > 0.9 * skin) & ((wide.max(axis=2) - wide.min(axis=2)) < 60)
    assert light[band(0.0, 0.3)].mean() > 0.25, "upper teeth"
    assert light[band(0.7, 1.0)].mean() > 0.05, "lower teeth"
    # Depth: the throat (the middle rows, clear of teeth) is darker than the skin by far.
    middle = core & band(0.35, 0.65)
    assert brightness[middle].mean() < 0.35 * skin
    # The lips keep their colour: the band just outside the opening is still lip-coloured.
    lips_now = wide[(cv2.dilate(inside, np.ones((7, 7), np.uint8)) > 0) & ~(inside > 0)].astype(np.float32).mean(axis=0)
    lips_src = source.image[mouth > 0].astype(np.float32).mean(axis=0)
    assert np.linalg.norm(lips_now - lips_src) < 40, (lips_now, lips_src)


def supersampled(source: SourcePortrait, driving: np.ndarray, reference: np.ndarray, like: Reenactor) -> np.ndarray:
    """The same frame rendered at twice the resolution (the same matte and plate, enlarged)
    and averaged down 2x2."""
    double = lambda image: cv2.resize(image, (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_CUBIC)
    scale = np.float32([2, 2, 2])
    r2 = Reenactor(SourcePortrait(double(source.image), source.landmarks * scale), matte=double(like.matte),
                   plate=double(like.plate))
    out = r2.render(driving * scale, reference * scale)
    return cv2.resize(out, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


# How much closer to the supersampled frame the full-resolution map brings the mouth than the
# half-resolution grid: clearly on a photo's textured lips, nothing to see on a cartoon's flat
# ones. (grace_hopper: 3.90 against 4.42 levels, 0.88, since the map is at full resolution
# everywhere and so is the supersampled render's; the half-resolution grid with a full-resolution
# mouth gave 0.82 against a reference on its own grid.)
@pytest.mark.parametrize("name,gain", [("grace_hopper", 0.92), ("cartoon", 1.0)])
def test_edges_are_as_smooth_as_a_supersampled_render(name, gain, sources):
    """Open mouth, shut eyes and a turned head, against the same frame rendered at twice the
    resolution and averaged down: around the lids and the mouth the frame matches it to a
    few levels, clearly closer than the same engine with its map only on the half-resolution
    grid (which bends the lip lines into steps: the old jagged seam under the lower lip);
    the head's outline (the matte, antialiased at full resolution) is soft."""
    source = sources[name]
    driver = driver_for(name, sources)
    driving = turned(close_eyes(open_mouth(driver, 28), 1.0), yaw=12, roll=6, shift=(14, 4))
    reenactor = Reenactor(source)
    out = reenactor.render(driving, driver).copy()
    outline = (reenactor.alpha > 0.02) & (reenactor.alpha < 0.98)
    reference = supersampled(source, driving, driver, reenactor)
    coarse_only = Reenactor(source, grid=SIZE // 2, matte=reenactor.matte, plate=reenactor.plate)
    coarse_only._refine = lambda *_: None
    coarse = coarse_only.render(driving, driver).copy()
    moved = reenactor.landmarks(driving, driver)
    diff = np.abs(out.astype(np.int16) - reference).max(axis=2)
    diff_coarse = np.abs(coarse.astype(np.int16) - reference).max(axis=2)
    for ids in (RIGHT_EYE, LEFT_EYE, (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37,
                                      39, 40, 185)):
        x0, y0 = np.floor(moved[list(ids), :2].min(axis=0)).astype(int) - 6
        x1, y1 = np.ceil(moved[list(ids), :2].max(axis=0)).astype(int) + 6
        region, region_coarse = diff[y0:y1, x0:x1], diff_coarse[y0:y1, x0:x1]
        # (Around the eyes the lid's stretched skin is blurred by whole pixels and its band
        # found on the pixels of each resolution: no two resolutions agree on its texture, so
        # there the full-resolution map is only held to be no worse than the coarse one.)
        assert region.mean() <= region_coarse.mean() + 0.05, (region.mean(), region_coarse.mean())
    x0, y0 = np.floor(moved[[61, 0], :2].min(axis=0)).astype(int) - 6
    x1, y1 = np.ceil(moved[[291, 17], :2].max(axis=0)).astype(int) + 20
    mouth, mouth_coarse = diff[y0:y1, x0:x1].mean(), diff_coarse[y0:y1, x0:x1].mean()
    assert mouth < 4.1 and mouth < gain * mouth_coarse, (mouth, mouth_coarse)
    # The head's outline is the warped matte: a soft edge (no pixel-to-pixel step from
    # background to person), wherever the head went.
    alpha = reenactor.alpha
    step = np.maximum(np.abs(np.diff(alpha, axis=0)).max(), np.abs(np.diff(alpha, axis=1)).max())
    assert outline.sum() > 200 and step < 0.85, step


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper", "cartoon"])
def test_the_background_stays_put_while_the_head_moves(name, sources):
    source = sources[name]
    driver = driver_for(name, sources)
    reenactor = Reenactor(source)
    for driving in (turned(driver, shift=(30, -10)), turned(driver, yaw=20, roll=-10, shift=(-25, 8))):
        out = reenactor.render(driving, driver)
        alpha = reenactor.alpha
        away = (reenactor.matte <= 0.0) & (alpha <= 0.0)  # neither where the person was nor is
        assert away.sum() > 0.1 * SIZE * SIZE
        assert np.array_equal(out[away], source.image[away]), "background pixels changed"
        # Far from the person (farther than the head moved), nothing changes at all.
        far = cv2.dilate((reenactor.matte > 0).astype(np.uint8), np.ones((81, 81), np.uint8)) == 0
        assert np.array_equal(out[far], source.image[far])
        # Where the head was and is no more, the scene behind it shows: the plate, not the person.
        uncovered = (reenactor.matte > 0.99) & (alpha <= 0.0)
        assert uncovered.sum() > 50
        assert np.array_equal(out[uncovered], reenactor.plate[uncovered])
        # The head itself moved: the face is not where it was.
        assert np.abs(out.astype(np.int16) - source.image).mean() > 3.0


def script(t: float) -> Pose:
    """1.9 s of everything the face does: mouth opening and closing, a full and a half
    blink, then speech-like mouth movement while the head rolls."""
    bump = lambda start, rise, hold, fall: max(0.0, min(1.0, (t - start) / rise, 1.0 - (t - start - rise - hold) / fall))
    roll = 10.0 * math.sin(2 * math.pi * (t - 1.45) / 0.5) if t > 1.45 else 0.0
    mouth = max(0.8 * bump(0.15, 0.2, 0.2, 0.2), 0.4 * bump(1.45, 0.1, 0.05, 0.1), 0.4 * bump(1.7, 0.08, 0.04, 0.08))
    return Pose(roll_deg=roll, mouth=min(mouth, 1.0), blink=max(bump(0.85, 0.06, 0.12, 0.08), 0.5 * bump(1.15, 0.06, 0.08, 0.08)))


@pytest.fixture(scope="module")
def clips():
    frames = 48
    return {name: [f for f, _ in driving_clip(name, frames=frames, fps=25, script=script)]
            for name in ("grace_hopper", "astronaut")}


# Each case: the portrait, the driver (another identity), and the correlations it must reach.
# Thresholds: 0.8 for the mouth and 0.7 for each eye are what a viewer reads as following (the
# issue's failing cases were 0.64 and -0.48); roll must follow almost exactly (0.95: the
# instrument's own jitter on a painting costs a little). The painting's eyes sit in dark
# glasses-and-shadow blobs that mediapipe reads less surely: 0.6 there; so is the cartoon's
# left eye (measured 0.67-0.69: its lid's skin band runs into the drawn brow at one corner).
CASES = [
    ("astronaut", "grace_hopper", {"mouth": 0.8, "eye_right": 0.7, "eye_left": 0.7, "roll": 0.97}),
    # The driver's resting face is an open, toothy smile; the portrait's mouth is closed.
    ("painted_hopper", "astronaut", {"mouth": 0.8, "eye_right": 0.6, "eye_left": 0.6, "roll": 0.95}),
    ("cartoon", "grace_hopper", {"mouth": 0.8, "eye_right": 0.7, "eye_left": 0.6, "roll": 0.97}),
]


@pytest.mark.parametrize("name,drive,minimum", CASES, ids=[c[0] for c in CASES])
def test_expressions_carry_across_identities_and_styles(name, drive, minimum, images, clips):
    comparison = evaluate(create_engine(WarpOptions(size=SIZE)), [images[name]], clips[drive], fps=25)
    corr = comparison.report["correlation"]
    for feature, floor in minimum.items():
        assert corr[feature] is not None and corr[feature] > floor, (feature, corr)
    # Opening and closing keep their sense (the painting opened when its driver
    # closed): the output's widest mouth comes with the driver's, its rest with the driver's.
    d, o = comparison.driver[:, 3], comparison.output[:, 3]
    widest, rest = int(np.nanargmax(d)), int(np.nanargmin(d))
    assert o[widest] > o[rest] + 0.15, (o[widest], o[rest])


def test_a_reference_caught_smiling_or_mid_blink_still_drives_the_right_way(sources):
    """The cause of the issue's inverted mouth: motion relative to a reference frame whose
    mouth is open. Mouth and eyes are driven by openings calibrated on the driver (its closed
    mouth, its open eye) instead, so closing from an open reference closes, never opens."""
    from engines.warp import mouth_aperture

    source, marks = marked(sources["grace_hopper"])  # lips closed in her portrait
    smiling = sources["astronaut"].landmarks  # the reference: lips parted in a smile (0.17)
    reenactor = Reenactor(source, matte=np.ones((SIZE, SIZE), np.float32))
    base = mouth_aperture(source.landmarks)
    lips_shut = smiling.copy()
    gap = smiling[14, 1] - smiling[13, 1]
    lips_shut[[14, 87, 178, 88, 95, 317, 402, 318, 324], 1] -= gap  # the driver closes its lips
    closed = mouth_aperture(reenactor.landmarks(lips_shut, smiling))
    wide = mouth_aperture(reenactor.landmarks(open_mouth(smiling, 30), smiling))
    assert closed <= base + 0.02, (closed, base)  # closing never opens the portrait's mouth
    assert wide > closed + 0.3

    # A reference caught mid-blink: the open eye seen afterwards is open, the shut one shut.
    blinking = close_eyes(smiling, 0.6)
    reenactor = Reenactor(source, matte=np.ones((SIZE, SIZE), np.float32))
    area = sum(int(m.sum()) for m in marks)
    reenactor.render(blinking, blinking)
    opened = marker_pixels(reenactor.render(smiling, blinking))
    assert opened > 0.5 * area  # once the driver opens its eyes they read as open
    assert marker_pixels(reenactor.render(close_eyes(smiling, 1.0), blinking)) == 0


def test_a_drawn_mouth_opens_with_the_driver(images, clips, tracker):
    """The comic-like portrait's lips are posterized skin with ink on them: the opening gets
    lips of its own (and drawn teeth inside them), so it reads as an open mouth, not a dark
    hole in the chin. Read frame by frame (mediapipe's video tracker, once it has taken the
    wide-open comic mouth for a closed one, keeps to that; `eval` reads each output frame on
    its own for that reason: it read this clip at -0.49 with the tracker, 0.79 without).
    Measured: 0.76; the engine without the drawn lips: -0.80 (it opened a hole the mesh read
    as the mouth closing). 0.6 is what a per-frame reading of a posterized face, noisy by a
    few hundredths of a mouth width, reaches only when the mouth follows."""
    from engines.animator import Animator
    from engines.face import best_reference_frame
    from engines.warp import mouth_aperture

    frames = clips["grace_hopper"]
    animator = Animator(create_engine(WarpOptions(size=SIZE)), tracker=FaceTracker(video=True))
    animator.set_sources([images["inked_astronaut"]])
    assert animator.engine._reenactor._mouth.rim is not None  # its lips read as skin
    driver = [animator.tracker.detect(np.ascontiguousarray(f)) for f in frames]
    animator.set_reference(driver[best_reference_frame(animator.sources[0].landmarks, driver)])
    pairs = []
    for i, frame in enumerate(frames):
        out = tracker.detect(np.ascontiguousarray(animator.drive(frame, i / 25, tag=i).image))
        if out is not None and driver[i] is not None:
            pairs.append((mouth_aperture(driver[i]), mouth_aperture(out)))
    d, o = np.array(pairs).T
    assert len(pairs) > 0.9 * len(frames)
    assert np.corrcoef(d, o)[0, 1] > 0.6, np.corrcoef(d, o)[0, 1]
    # `xportrait eval`'s figure agrees (it once read this clip at -0.49: the tracker's lock-in).
    report = evaluate(create_engine(WarpOptions(size=SIZE)), [images["inked_astronaut"]], frames, 25).report
    assert report["correlation"]["mouth"] > 0.6, report["correlation"]


def test_what_the_head_uncovers_is_filled_with_the_scene_s_own_detail(sources):
    """Holes cut where the true background is known (the flag, the sky beside it): within the
    band a moving head uncovers, the plate carries the scene's edges and stripes on (inpainted)
    instead of a blur. Measured on these three holes: detail (mean |Laplacian|) 3.1-4.0 against
    the smooth push-pull fill's 0.8-1.7 (the true background: 6.3-11.0), with an error against
    the truth within 7% of the smooth fill's (extrapolated stripes land a little off where the
    blur would average them)."""
    from engines.matte import background_plate

    image = sources["grace_hopper"].image
    gray = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    detail = lambda x, where: float(np.abs(cv2.Laplacian(gray(x), cv2.CV_32F))[where].mean())
    for centre, axes in (((70, 110), (45, 60)), ((450, 120), (40, 70)), ((80, 260), (40, 40))):
        hole = np.zeros((SIZE, SIZE), np.uint8)
        cv2.ellipse(hole, centre, axes, 0, 0, 360, 1, -1)
        matte = cv2.GaussianBlur(hole.astype(np.float32), (0, 0), 1.0)
        inside = matte > 0.05
        band = inside & (cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5) <= 25)
        smooth, plate = background_plate(image, matte, band=0.0), background_plate(image, matte)
        assert np.array_equal(plate[matte <= 0.01], image[matte <= 0.01])  # the background itself untouched
        assert detail(plate, band) > 2.0 * detail(smooth, band), (detail(plate, band), detail(smooth, band))
        error = lambda x: float(np.abs(x.astype(np.int16) - image)[band].mean())
        assert error(plate) < 1.1 * error(smooth), (error(plate), error(smooth))


def face_coverage(reenactor: Reenactor) -> np.ndarray:
    """(H, W) bool: where the last frame's face triangles lie (the face's own part of the warp),
    rasterised at 4x and averaged down."""
    big = np.zeros((4 * SIZE, 4 * SIZE), np.uint8)
    for triangle in reenactor.triangles[reenactor._face_start:]:
        cv2.fillConvexPoly(big, np.rint(reenactor._vertices[triangle] * 4).astype(np.int32), 255, cv2.LINE_8, 0)
    return cv2.resize(big, (SIZE, SIZE), interpolation=cv2.INTER_AREA) > 127


# The saw on a turned head's cheek (on the cheek turning toward the camera): notches in the
# face's edge, measured as what a closing by a 13 px disc adds to the face's area. Before the
# outline was kept outside the face, 30 degrees of yaw gave 80-113 px turning one way and
# 23-86 px the other (20 degrees: 10-66); now 0-4 (35 degrees: 0-7). A smooth face edge of any
# shape gains nothing at this size.
@pytest.mark.parametrize("name", ["astronaut", "grace_hopper", "cartoon"])
def test_a_turned_head_keeps_a_smooth_face_edge(name, sources):
    source = sources[name]
    driver = driver_for(name, sources)
    reenactor = Reenactor(source)
    plain = Reenactor(source, matte=reenactor.matte, plate=reenactor.plate)
    plain._unfold_outline = lambda v, scale: None
    for driving in (driver, turned(driver, roll=12, shift=(20, -8))):  # unturned, the outline is as it was
        reenactor.render(driving, driver)
        plain.render(driving, driver)
        assert np.abs(reenactor._vertices - plain._vertices).max() < 1.0
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13))
    for yaw in (-30, 30):
        reenactor.render(turned(driver, yaw=yaw), driver)
        face = face_coverage(reenactor).astype(np.uint8)
        notches = int((cv2.morphologyEx(face, cv2.MORPH_CLOSE, disc) > face).sum())
        assert notches <= 12, (yaw, notches)
        # Nor does the revealed side of the head smear one strip of cheek across itself: the
        # face's outer 30 px, on rows between the eyes and the mouth, draw on at least 8 source
        # pixels (at the head's scale). The outermost strip stretched alone drew on 3.9-6.2;
        # sharing the stretch (at most MAX_STRETCH times a strip), 9.7-13.1; unturned, 28-32.
        v = reenactor._vertices
        spans = []
        for y in range(int(v[[33, 263], 1].max()), int(v[[61, 291], 1].min()), 2):
            xs = np.flatnonzero(face[y])
            for edge, step in ((xs.max(), -1), (xs.min(), 1)):
                spans.append(abs(float(reenactor._map_x[y, edge + 2 * step] - reenactor._map_x[y, edge + 32 * step])))
        assert min(spans) / reenactor._q.scale >= 8.0, (yaw, min(spans) / reenactor._q.scale)


def test_the_uncovered_band_is_filled_without_the_outline_s_fringe(sources):
    """What a moving head uncovers takes the background's colour, not the person's outline's:
    a dark fringe left up to 9 px outside the matte (hair wisps the segmenter missed) is not
    drawn on into the band (fast marching from the hole's very edge filled the whole band with
    it: 185 levels off at the 99th percentile, now under 12); and on the astronaut (the suit's dark rim beside the shoulders lies outside the
    matte) the band keeps to the colour of the background near it: 95th percentile 16 levels
    from the local mean of the background 8-40 px beyond the hole, against 68 before (the
    background itself lies 9 levels from that mean at its 95th percentile)."""
    from engines.matte import background_plate

    rng = np.random.default_rng(0)
    sky = np.array([90, 160, 210], np.float32)
    image = np.clip(sky + rng.normal(0, 3, (SIZE, SIZE, 3)), 0, 255)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(xx - 256, yy - 230)
    image[r < 150] = (200, 150, 120)
    image[(r >= 146) & (r < 155)] = (40, 30, 25)  # the fringe: 1-9 px outside the matte
    image = image.astype(np.uint8)
    matte = cv2.GaussianBlur((r < 145).astype(np.float32), (0, 0), 1.0)
    plate = background_plate(image, matte)
    hole = (matte > 0.05).astype(np.uint8)
    band = (hole > 0) & (cv2.distanceTransform(hole, cv2.DIST_L2, 5) <= 25)
    off = np.abs(plate[band].astype(np.float32) - sky).max(axis=1)
    assert np.percentile(off, 99) < 12, np.percentile(off, [50, 95, 99])
    assert np.array_equal(plate[matte <= 0.01], image[matte <= 0.01])

    source = sources["astronaut"]
    reenactor = Reenactor(source)
    hole = reenactor.matte > 0.05
    inside = cv2.distanceTransform(hole.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~hole).astype(np.uint8), cv2.DIST_L2, 5)
    near = ((~hole) & (outside >= 8) & (outside <= 40)).astype(np.float32)
    count = cv2.boxFilter(near, -1, (61, 61), normalize=False)
    local = cv2.boxFilter(source.image.astype(np.float32) * near[..., None], -1, (61, 61), normalize=False)
    local /= np.maximum(count, 1e-6)[..., None]
    band = hole & (inside <= 25) & (count > 50)
    off = np.abs(reenactor.plate.astype(np.float32) - local).max(axis=2)[band]
    assert np.percentile(off, 95) < 30, np.percentile(off, [50, 95, 99])
