"""The synthetic puppet: driving clips made from one still portrait, with known ground truth.

A driving clip animates one still photo the way a webcam user would move: the whole image
is rolled, shifted and scaled about the face centre (one affine per frame), the jaw is
opened with a displacement field that leaves the upper lip in place and paints the mouth
cavity into the gap, and the upper eyelids come down over the eye openings. Every frame
comes with the `Pose` that made it, so a test can check what a face tracker measures on
it against the truth. All the geometry that depends only on the portrait (landmarks,
per-column lip and lid curves, colours) is worked out once in `Puppet`; a frame costs
one small remap, two small paints and one warpAffine.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Iterator

import cv2
import numpy as np

from engines.face import (
    FACE_OVAL,
    INNER_LIPS,
    LEFT_EYE,
    MOUTH_CORNERS,
    OUTER_LIPS,
    RIGHT_EYE,
    FaceTracker,
    NoFaceError,
    as_rgb,
    downscale,
    head_box,
    head_roll,
    locate_face,
    transform_landmarks,
)

from .gallery import PORTRAITS, portrait

# --------------------------------------------------------------------------- poses, scripts


@dataclass(frozen=True)
class Pose:
    """What a driving frame shows, relative to the levelled, centred neutral portrait.

    roll_deg: in-plane head rotation, positive clockwise on screen (engines.face.head_roll's
    sign, so head_roll measured on the frame is about roll_deg). dx, dy: shift of the face
    centre in output pixels (right, down). scale: face size relative to neutral framing.
    mouth: 0 as photographed (closed, or a smile's parted lips) to 1 wide open.
    blink: 0 eyes as photographed to 1 shut.
    """

    roll_deg: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    mouth: float = 0.0
    blink: float = 0.0

    def __post_init__(self) -> None:
        for field in ("roll_deg", "dx", "dy", "scale", "mouth", "blink"):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"Pose.{field} must be finite, got {getattr(self, field)!r}")
        if not 0.25 <= self.scale <= 4.0:
            raise ValueError(f"Pose.scale must lie in [0.25, 4], got {self.scale}")
        if not 0.0 <= self.mouth <= 1.0:
            raise ValueError(f"Pose.mouth must lie in [0, 1], got {self.mouth}")
        if not 0.0 <= self.blink <= 1.0:
            raise ValueError(f"Pose.blink must lie in [0, 1], got {self.blink}")


Script = Callable[[float], Pose]

# The default script's acts, (name, start s, end s). It starts and ends on the neutral pose,
# so it loops without a jump.
SCRIPT_SEGMENTS = (
    ("neutral", 0.0, 1.0),
    ("roll", 1.0, 3.0),
    ("translate", 3.0, 5.0),
    ("mouth", 5.0, 6.6),
    ("blink", 6.6, 7.8),
    ("combined", 7.8, 10.0),
)
DEFAULT_SCRIPT_SECONDS = SCRIPT_SEGMENTS[-1][2]


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def _bump(t: float, start: float, rise: float, hold: float, fall: float) -> float:
    """0 before start, eases up to 1 over `rise`, holds, eases back to 0 over `fall`."""
    if t < start + rise:
        return _smoothstep((t - start) / rise)
    return 1.0 - _smoothstep((t - start - rise - hold) / fall)


def default_script(t: float) -> Pose:
    """Neutral hold, head roll to +15 and -15 degrees, a sweep of translations, the mouth
    opening wide and closing, a full and a half blink, then everything at once as in
    speech (10 s, repeating)."""
    t = t % DEFAULT_SCRIPT_SECONDS
    if t < 1.0:
        return Pose()
    if t < 3.0:
        u = (t - 1.0) / 2.0
        return Pose(roll_deg=15.0 * math.sin(2 * math.pi * u))
    if t < 5.0:
        u = (t - 3.0) / 2.0
        return Pose(dx=60.0 * math.sin(2 * math.pi * u), dy=30.0 * math.sin(4 * math.pi * u))
    if t < 6.6:
        return Pose(mouth=_bump(t, 5.0, 0.4, 0.6, 0.4))
    if t < 7.8:
        full = _bump(t, 6.7, 0.1, 0.12, 0.15)  # a natural blink: ~0.35 s, 3 frames shut at 25 fps
        half = 0.5 * _bump(t, 7.2, 0.15, 0.1, 0.2)
        return Pose(blink=max(full, half))
    u = (t - 7.8) / (DEFAULT_SCRIPT_SECONDS - 7.8)
    return Pose(
        roll_deg=8.0 * math.sin(2 * math.pi * u),
        dx=35.0 * math.sin(math.pi * u),
        dy=-15.0 * math.sin(2 * math.pi * u),
        scale=1.0 + 0.08 * math.sin(math.pi * u),
        mouth=0.35 * (1 - math.cos(6 * math.pi * u)),
        blink=_bump(u, 0.55, 0.05, 0.03, 0.06),
    )


# --------------------------------------------------------------------------- the puppet

FACE_FRACTION = 1 / 3  # head-box height over frame height: a webcam user's framing
FACE_ANCHOR = (0.5, 0.46)  # where the face centre sits, in fractions of the frame

_UPPER_INNER_LIP = (INNER_LIPS[0],) + INNER_LIPS[11:][::-1] + (INNER_LIPS[10],)
_LOWER_INNER_LIP = INNER_LIPS[:11]
_CHIN = 152


def _split_lid(contour: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """engines.face eye contours run corner, lower lid, other corner, upper lid back."""
    return (contour[0],) + contour[9:][::-1] + (contour[8],), contour[:9]


def _curve(landmarks: np.ndarray, indices: tuple[int, ...], xs: np.ndarray) -> np.ndarray:
    """y of the polyline through landmarks[indices] at each x (held flat past its ends)."""
    points = landmarks[list(indices), :2]
    order = np.argsort(points[:, 0], kind="stable")
    return np.interp(xs, points[order, 0], points[order, 1]).astype(np.float32)


def _smooth(x: np.ndarray) -> np.ndarray:
    np.clip(x, 0.0, 1.0, out=x)
    return x * x * (3 - 2 * x)


def _roi(x0: float, y0: float, x1: float, y1: float, shape: tuple[int, ...]) -> tuple[slice, slice]:
    h, w = shape[:2]
    xa, ya = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
    xb, yb = min(int(math.ceil(x1)), w), min(int(math.ceil(y1)), h)
    if xb - xa < 2 or yb - ya < 2:
        raise NoFaceError("the face lies too close to the portrait's edge to animate")
    return slice(ya, yb), slice(xa, xb)


class _MouthRig:
    """Opens the jaw of one portrait.

    Per image column, three curves are fixed once: the inner-lip midline (where the lips
    part), how far the lower lip may drop there (a lens: full in the middle, nothing at the
    corners) and how far the jaw drops (broad, fading towards the cheeks). A frame's vertical
    displacement field, in output coordinates: nothing above the midline; the cavity, then
    the lower lip and chin carried down rigidly, blending from the lip's lens to the jaw's
    profile by the chin; below the chin it fades out over the neck. Its slope stays under 1
    everywhere outside the painted cavity, so the remap never folds.
    """

    def __init__(self, base: np.ndarray, lm: np.ndarray):
        left, right = lm[MOUTH_CORNERS[0], :2], lm[MOUTH_CORNERS[1], :2]
        width = float(np.linalg.norm(right - left))
        centre_x = float(left[0] + right[0]) / 2
        oval = lm[list(FACE_OVAL), :2]
        face_width = float(oval[:, 0].max() - oval[:, 0].min())
        chin = float(lm[_CHIN, 1])
        upper_y = lm[list(_UPPER_INNER_LIP), 1]
        # A wide-open mouth is about half as high as it is wide (lips 13/14 over corners 78/308).
        self.max_drop = 0.55 * width
        self.fade = 3.0 * self.max_drop  # below the chin; >= 2x the drop keeps the slope < 1
        self.rows, self.cols = _roi(centre_x - 0.75 * face_width, upper_y.min() - 3,
                                    centre_x + 0.75 * face_width, chin + self.max_drop + self.fade + 2,
                                    base.shape)
        y0, x0 = self.rows.start, self.cols.start
        h, w = self.rows.stop - y0, self.cols.stop - x0
        xs = np.arange(x0, x0 + w, dtype=np.float32)
        mid = (_curve(lm, _UPPER_INNER_LIP, xs) + _curve(lm, _LOWER_INNER_LIP, xs)) / 2
        self.mid = (mid - y0)[None, :]
        u = (xs - centre_x) / max(width / 2, 1.0)
        self.lens = (np.clip(1 - u * u, 0, 1) ** 0.8)[None, :]
        taper = _smooth(np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32) / (0.2 * w))
        self.jaw = (np.exp(-0.5 * ((xs - centre_x) / (0.35 * face_width)) ** 2) * taper)[None, :]
        self.chin = chin - y0
        self.rows_grid = np.arange(h, dtype=np.float32)[:, None]
        self.map_x = np.repeat(np.arange(w, dtype=np.float32)[None, :], h, axis=0)
        self.map_y = np.empty((h, w), np.float32)
        self.edge = max(0.8, 0.03 * width)  # soft cavity edge, px

        # The cavity's colours, from the lips themselves: near black in the throat, a dim
        # tongue-red towards the lower lip.
        mask = np.zeros(base.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.rint(lm[list(OUTER_LIPS), :2]).astype(np.int32)], 1)
        cv2.fillPoly(mask, [np.rint(lm[list(INNER_LIPS), :2]).astype(np.int32)], 0)
        lips = base[mask.astype(bool)].astype(np.float32)
        lip = lips.mean(axis=0) if len(lips) else np.array([150, 80, 80], np.float32)
        self.throat = lip * 0.10
        self.tongue = lip * 0.45

    def apply(self, base: np.ndarray, work: np.ndarray, amount: float) -> None:
        src = base[self.rows, self.cols]
        dst = work[self.rows, self.cols]
        if amount <= 0.0:
            np.copyto(dst, src)
            return
        y = self.rows_grid
        drop = amount * self.max_drop
        opening = drop * self.lens  # how far the lower lip has come down, per column
        jaw = drop * self.jaw
        lip_top = self.mid + opening  # output row of the lower lip's inner edge
        chin_out = np.maximum(self.chin + jaw, lip_top + 1.0)
        carried = opening + (jaw - opening) * _smooth((y - lip_top) / (chin_out - lip_top))
        below_chin = jaw * (1 - _smooth((y - chin_out) / self.fade))
        shift = np.where(y < chin_out, carried, below_chin)
        shift = np.where(y < lip_top, y - self.mid, shift)  # the cavity: painted over below
        shift = np.where(y < self.mid, 0.0, shift)
        np.subtract(y, shift, out=self.map_y)
        cv2.remap(src, self.map_x, self.map_y, cv2.INTER_LINEAR, dst=dst,
                  borderMode=cv2.BORDER_REPLICATE)

        depth = np.clip((y - self.mid) / np.maximum(opening, 1e-3), 0, 1)
        alpha = np.clip(np.minimum(y - self.mid, lip_top - y) / self.edge + 0.5, 0, 1)
        alpha *= np.clip(opening / self.edge, 0, 1)  # corners: a hairline, not a dark dot
        rows = np.flatnonzero(alpha.max(axis=1) > 0)
        if len(rows) == 0:
            return
        band = slice(rows[0], rows[-1] + 1)
        a = alpha[band, :, None]
        tone = _smooth((depth[band] - 0.5) * 2.0)[:, :, None]
        cavity = self.throat + (self.tongue - self.throat) * tone
        dst[band] = np.rint(dst[band] * (1 - a) + cavity * a).astype(np.uint8)


class _EyeRig:
    """Closes the upper eyelid of one eye.

    The lid is painted with the colour of the skin next to the eye (per column, so the lid
    keeps the face's shading), rounded like a lid over an
    eyeball (a little lighter in the middle, darker towards its edge), with a thin lash
    line along its edge. The edge descends from the upper lid curve to the lower one in
    proportion to `blink`; the photographed upper lash line is covered from the start.
    """

    def __init__(self, base: np.ndarray, lm: np.ndarray, contour: tuple[int, ...], skin_tone: np.ndarray):
        upper, lower = _split_lid(contour)
        points = lm[list(contour), :2]
        x_min, x_max = float(points[:, 0].min()), float(points[:, 0].max())
        eye_width = x_max - x_min
        self.rows, self.cols = _roi(x_min - 2, points[:, 1].min() - 0.3 * eye_width - 3,
                                    x_max + 2, points[:, 1].max() + 3, base.shape)
        y0, x0 = self.rows.start, self.cols.start
        h, w = self.rows.stop - y0, self.cols.stop - x0
        xs = np.arange(x0, x0 + w, dtype=np.float32)
        top, bottom = _curve(lm, upper, xs), _curve(lm, lower, xs)
        height = max(float((bottom - top).max()), 1.0)
        self.top = (top - y0)[None, :]
        self.closed = (bottom - y0)[None, :]  # a shut lid's edge lies along the lower lid
        inside = np.minimum(xs - x_min, x_max - xs) / max(0.08 * eye_width, 1.0)
        self.span = _smooth(inside.astype(np.float32))[None, :]
        # The photographed lash line is thicker than the mesh's contour admits: the lid
        # reaches `margin` above the contour and fades into the skin over `feather`.
        self.margin = max(1.0, 0.35 * height)
        self.feather = max(1.0, 0.3 * height)
        self.edge = max(0.6, 0.06 * height)
        self.lash_width = max(0.7, 0.08 * height)
        self.rows_grid = np.arange(h, dtype=np.float32)[:, None]

        # Skin per column: the colour of a band above the eye, or below it where that is
        # nearer the face's skin tone (glasses rims and brows sit above some eyes), at the
        # brightness of the band's bright pixels (lashes, the crease and wrinkles are darker
        # than the skin between them), smoothed across columns.
        def band(rows_from: np.ndarray, a: float, b: float) -> np.ndarray:
            out = np.empty((w, 3), np.float32)
            rows_a = np.clip(np.rint(rows_from + a), 0, base.shape[0] - 1).astype(int)
            rows_b = np.clip(np.rint(rows_from + b), 0, base.shape[0] - 1).astype(int)
            for j in range(w):
                lo, hi = sorted((rows_a[j], rows_b[j]))
                pixels = base[lo:hi + 1, x0 + j].astype(np.float32)
                colour = np.median(pixels, axis=0)
                bright = np.percentile(pixels.mean(axis=1), 60)
                out[j] = colour * (bright / max(float(colour.mean()), 1.0))
            return out

        above = band(top, -self.margin - self.feather - 0.4 * height, -self.margin - self.feather)
        below = band(bottom, 0.3 * height, 0.8 * height)
        nearer_above = np.abs(above - skin_tone).sum(axis=1) <= np.abs(below - skin_tone).sum(axis=1)
        skin = np.where(nearer_above[:, None], above, below)
        k = max(3, int(round(0.25 * eye_width)) | 1)
        self.skin = cv2.blur(skin[None], (k, 1), borderType=cv2.BORDER_REPLICATE)[0][None]  # (1, w, 3)
        # Lashes: the darkest tenth of the pixels along the photographed upper lid, darkened.
        lid_rows = np.clip(np.rint(top).astype(int), 0, base.shape[0] - 1)
        lid_pixels = base[lid_rows, x0 + np.arange(w)].reshape(-1, 3).astype(np.float32)
        dark = lid_pixels[lid_pixels.sum(axis=1) <= np.percentile(lid_pixels.sum(axis=1), 10)]
        self.lash = (dark.mean(axis=0) if len(dark) else np.full(3, 30, np.float32)) * 0.8

    def apply(self, base: np.ndarray, work: np.ndarray, amount: float) -> None:
        src = base[self.rows, self.cols]
        dst = work[self.rows, self.cols]
        if amount <= 0.0:
            np.copyto(dst, src)
            return
        y = self.rows_grid
        onset = min(1.0, amount / 0.15)  # the first few percent of a blink cover the old lash line
        edge = self.top + amount * (self.closed - self.top)
        upper = self.top - self.margin * onset
        lid = np.clip((edge - y) / self.edge + 0.5, 0, 1) * _smooth((y - upper) / self.feather + 0.5)
        lid *= self.span * onset
        # 0 at the lid's top, 1 at its edge: a rounded lid is lightest a third of the way down.
        along = np.clip((y - upper) / np.maximum(edge - upper, 1.0), 0, 1)
        shade = 1.0 + 0.05 * np.sin(np.pi * np.minimum(along * 1.5, 1.0)) - 0.16 * _smooth((along - 0.5) * 2)
        colour = self.skin * shade[:, :, None]
        lash = np.exp(-(((y - edge) / self.lash_width) ** 2)) * self.span * onset
        out = src.astype(np.float32)
        out += (colour - out) * lid[:, :, None]
        out += (self.lash - out) * lash[:, :, None]
        np.copyto(dst, np.rint(out).astype(np.uint8))


_CHEEKS = (50, 280, 101, 330)


def _skin_tone(image: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The face's skin colour: the median over small windows on both cheeks."""
    r = max(2, int(0.03 * head_box(lm).height))
    patches = []
    for i in _CHEEKS:
        x, y = (int(round(v)) for v in lm[i, :2])
        patches.append(image[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1].reshape(-1, 3))
    return np.median(np.concatenate(patches).astype(np.float32), axis=0)


def _framed(image: np.ndarray, affine: np.ndarray, size: tuple[int, int], zoom: float) -> np.ndarray:
    """`image` warped by `affine` onto a size canvas. Where the photo does not reach, a
    blurred enlargement of it fills in (as video players do), with a feathered seam:
    mirroring the border would put mirrored shoulders, or a second head, in the frame."""
    width, height = size
    h, w = image.shape[:2]
    cover = max(width / w, height / h)
    small = cv2.resize(image, (max(1, round(w * cover / 8)), max(1, round(h * cover / 8))),
                       interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 3)
    backdrop = cv2.resize(small, (round(w * cover), round(h * cover)), interpolation=cv2.INTER_LINEAR)
    y0, x0 = (backdrop.shape[0] - height) // 2, (backdrop.shape[1] - width) // 2
    backdrop = backdrop[y0:y0 + height, x0:x0 + width].astype(np.float32)
    photo = cv2.warpAffine(image, affine, size, flags=cv2.INTER_AREA if zoom < 1 else cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    inside = cv2.warpAffine(np.ones((h, w), np.float32), affine, size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    feather = max(3, int(0.01 * max(size)))
    inside = cv2.erode(inside, np.ones((2 * feather + 1,) * 2, np.uint8))
    inside = cv2.GaussianBlur(inside, (0, 0), feather / 2)[:, :, None]
    return np.rint(backdrop + (photo - backdrop) * inside).astype(np.uint8)


class Puppet:
    """One portrait, rigged once, rendered at any `Pose` into size = (width, height) frames.

    The portrait is levelled (its eye line made horizontal) and scaled once so the face is
    FACE_FRACTION of the frame height, then framed in a working canvas a quarter-frame larger
    on every side, so that rolls and shifts show real photo rather than border fill.
    """

    def __init__(self, image: np.ndarray, size: tuple[int, int] = (640, 480)):
        self.size = _check_size(size)
        width, height = self.size
        image = downscale(as_rgb(image))
        with FaceTracker(video=False) as tracker:
            landmarks, _ = locate_face(image, tracker)  # the largest face; NoFaceError if none
        box = head_box(landmarks)
        zoom = FACE_FRACTION * height / max(box.height, 1.0)
        pad = max(width, height) // 4
        self.anchor = (FACE_ANCHOR[0] * width, FACE_ANCHOR[1] * height)
        centre = (self.anchor[0] + pad, self.anchor[1] + pad)
        # Rotating by the photo's own roll (counter-clockwise for cv2) levels the eyes.
        level = cv2.getRotationMatrix2D(box.center, head_roll(landmarks), zoom)
        level[:, 2] += np.array(centre) - np.array(box.center)
        self.base = _framed(image, level, (width + 2 * pad, height + 2 * pad), zoom)
        self.landmarks = transform_landmarks(landmarks, level)  # in self.base's pixels
        self.centre = head_box(self.landmarks).center
        self._mouth = _MouthRig(self.base, self.landmarks)
        tone = _skin_tone(self.base, self.landmarks)
        self._eyes = tuple(_EyeRig(self.base, self.landmarks, c, tone) for c in (RIGHT_EYE, LEFT_EYE))
        self._work = self.base.copy()
        self._lock = threading.Lock()  # one shared working canvas

    def affine(self, pose: Pose) -> np.ndarray:
        """The 2x3 map from the working canvas to the output frame for `pose`."""
        m = cv2.getRotationMatrix2D(self.centre, -pose.roll_deg, pose.scale)
        m[:, 2] += np.array(self.anchor) + (pose.dx, pose.dy) - np.array(self.centre)
        return m

    def render(self, pose: Pose, out: np.ndarray | None = None) -> np.ndarray:
        """The frame for `pose` (RGB uint8, height x width), written into `out` if given."""
        if not isinstance(pose, Pose):
            raise TypeError(f"expected a Pose, got {type(pose).__name__}")
        width, height = self.size
        if out is None:
            out = np.empty((height, width, 3), np.uint8)
        elif out.shape != (height, width, 3) or out.dtype != np.uint8:
            raise ValueError(f"out must be a {height}x{width}x3 uint8 array, got {out.shape} {out.dtype}")
        with self._lock:
            self._mouth.apply(self.base, self._work, pose.mouth)
            for eye in self._eyes:
                eye.apply(self.base, self._work, pose.blink)
            cv2.warpAffine(self._work, self.affine(pose), (width, height), dst=out,
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        return out


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least 64x64 (H.264 4:2:0), got {width}x{height}")
    return width, height


@lru_cache(maxsize=8)
def _bundled_puppet(name: str, size: tuple[int, int]) -> Puppet:
    return Puppet(portrait(name), size)


def puppet(source: str | np.ndarray, size: tuple[int, int] = (640, 480)) -> Puppet:
    """A Puppet for a bundled portrait's name (rigged once per name and size) or an image."""
    if isinstance(source, str):
        if source not in PORTRAITS:
            raise ValueError(f"unknown portrait {source!r}; choose one of: {', '.join(PORTRAITS)}")
        return _bundled_puppet(source, _check_size(size))
    return Puppet(source, size)


def _frame_rate(fps: float) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (0 < fps <= 240):
        raise ValueError(f"fps must be a number in (0, 240], got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def driving_clip(source: str | np.ndarray = "astronaut", frames: int | None = None, fps: float = 25.0,
                 size: tuple[int, int] = (640, 480), script: Script | None = None,
                 ) -> Iterator[tuple[np.ndarray, Pose]]:
    """(frame, pose) pairs: `frames` frames (default: the default script's 10 s) of the
    portrait moved by `script` (time in seconds -> Pose; default `default_script`).

    Arguments are checked, and the portrait rigged, when this is called, not on the first
    frame. Each frame is a new array the caller may keep.
    """
    _frame_rate(fps)
    if frames is None:
        frames = int(round(DEFAULT_SCRIPT_SECONDS * fps))
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 0:
        raise ValueError(f"frames must be a non-negative integer, got {frames!r}")
    script = default_script if script is None else script
    if not callable(script):
        raise TypeError("script must be a callable taking seconds and returning a Pose")
    rig = puppet(source, size)

    def generate() -> Iterator[tuple[np.ndarray, Pose]]:
        for i in range(frames):
            pose = script(i / fps)
            yield rig.render(pose), pose

    return generate()


__all__ = ["Pose", "Script", "SCRIPT_SEGMENTS", "DEFAULT_SCRIPT_SECONDS", "default_script", "Puppet", "puppet",
           "driving_clip", "FACE_FRACTION", "FACE_ANCHOR"]
