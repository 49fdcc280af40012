"""The warp engine: a weight-free, landmark-driven portrait animator (the default engine).

The source's own face mesh is moved by the driving face's motion *relative to a reference
driving frame*, so the portrait keeps its own face shape (no identity leakage); then the
source image is warped piecewise-affinely over a triangulation of that mesh, extended by two
rings around the head (hair follows the head, shoulders less) and the fixed image border.
A person matte (engines.matte, made once per source) composites the warped person over a
background plate, so the background stays put and what the moving head uncovers is filled
from the portrait itself.

It is also the paper's F, the classical reenactor that makes cross-identity control images
for training: `reenact(source, driving)`.

Motion, with S the source mesh, R the reference driving mesh and D the current one (3-D,
aligned to the source head box): the head pose M (a similarity) is fitted on rigid points
R -> D, and Q (a similarity) maps the reference onto the source, R -> S. Carrying the
source, seen in the driver's reference frame, along the driver's motion gives

    O = Q(D + M.scale * M.R @ (Q^-1(S) - R))

in which `Q^-1(S) - R` (the source's shape against the driver's) is fixed per source and
reference, so a frame costs one 3x3 similarity fit and one matrix product.

Relative motion is right for pose, brows and smiles, and wrong for the two expressions a
reference frame is often caught in the middle of: an open mouth (a talker, a resting open
smile) and half-shut eyes. So eyes and mouth are driven by calibrated openings instead
(`DriverCalibration`): the driver's eye opening as a fraction of its own open eye, the mouth's
opening above its own closed mouth, each measured on the driver's face and applied to the
portrait's own eyes and mouth, whatever their size or style.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from scipy.spatial import Delaunay

from .base import DrivingFrame, EngineError, QualityLevel, Rendered, SourcePortrait, Timings, check_sources
from .face import (
    FACE_OVAL,
    LEFT_LID_PAIRS,
    LIP_PAIRS,
    OUTER_LIPS,
    RIGHT_LID_PAIRS,
    RIGID,
    FaceTracker,
    alignment_affine,
    as_rgb,
    head_box,
    prepare_source,
    transform_landmarks,
)
from .raster import backward_map, composite, face_drawing_keys, unfold_outline

MESH_POINTS = 468  # the face mesh without the 10 iris points (irises move with their eye)
RING_SCALES = (1.35, 2.0)  # ring radii, in face-oval radii around the head centre
# How much of the head's motion each ring takes, above the head centre and below it:
# hair moves with the head; neck and shoulders hardly do.
RING_WEIGHTS = ((1.0, 0.55), (0.55, 0.12))
BORDER_STEPS = 8  # fixed points along each image edge
# At most how much wider than in the source (at the head's scale) a strip of the face's edge
# may become where a turn reveals the side of the head: the portrait shows that side in a few
# pixels, and stretched further they smear into streaks. (Unturned, strips keep their width.)
MAX_STRETCH = 2.5

# Skin above each upper lid, outer corner to inner (the mesh's rings around the eye), and
# the eye corners (outer, inner). The lid that closes is this skin, slid down.
RIGHT_LID_SKIN = (113, 225, 224, 223, 222, 221, 189)
LEFT_LID_SKIN = (342, 445, 444, 443, 442, 441, 413)
EYE_CORNERS = ((33, 133), (263, 362))
# Lower lip and the jaw below it: what opens when the mouth opens.
LOWER_OUTER_LIP = (146, 91, 181, 84, 17, 314, 405, 321, 375)
MOUTH_CORNER_POINTS = (61, 291, 78, 308)

# Eye opening, as a fraction of the driver's own open eye, that reads fully open and shut.
# mediapipe never brings a shut eye's lid points together (lashes): a shut eye measures about
# a third of the open one, a relaxed open eye 0.9-1.0 of its widest.
EYE_OPEN_FRACTION, EYE_SHUT_FRACTION = 0.88, 0.4
# Mouth opening (inner lip gap over mouth width) above which a mouth is not closed, whatever
# the reference frame shows: mediapipe measures closed lips at 0.00-0.05.
MOUTH_CLOSED_MAX = 0.06
CALIBRATION_RELAX = 0.004  # per frame: how fast the open-eye and closed-mouth levels forget


@dataclass(frozen=True)
class Similarity:
    """x -> scale * rotation @ x + shift, on row vectors of 3-D points."""

    scale: float
    rotation: np.ndarray  # (3, 3)
    shift: np.ndarray  # (3,)

    @classmethod
    def fit(cls, a: np.ndarray, b: np.ndarray) -> "Similarity":
        """Least-squares similarity taking points a onto points b (Umeyama, 1991)."""
        return SimilarityFit(a)(b)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.scale * x @ self.rotation.T + self.shift

    def inverse(self) -> "Similarity":
        rt = self.rotation.T
        return Similarity(1 / self.scale, rt, -(rt @ self.shift) / self.scale)


_FLIP = np.array([1.0, 1.0, -1.0])


def _det3(m: np.ndarray) -> float:
    (a, b, c), (d, e, f), (g, h, i) = m.tolist()
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


class SimilarityFit:
    """Similarity.fit(a, b) from fixed points `a` onto each frame's `b`: a's half of the fit
    (its mean, its centred points, their spread) is computed once. The same arithmetic as a
    fit from scratch, so the same similarity, bit for bit."""

    def __init__(self, a: np.ndarray):
        self._n = len(a)
        self._ma = a.mean(axis=0)
        self._a0 = a - self._ma
        self._spread = max((self._a0 ** 2).sum() / self._n, 1e-12)

    def __call__(self, b: np.ndarray) -> Similarity:
        mb = b.mean(axis=0)
        u, d, vt = np.linalg.svd((b - mb).T @ self._a0 / self._n)
        # A reflection (det -1: u and vt are orthogonal, so the sign is never in doubt) flips
        # the last axis; otherwise u and d stay as they are (what a product by ones gives).
        if _det3(u) * _det3(vt) < 0:
            u, d = u * _FLIP, d * _FLIP
        rotation = u @ vt
        scale = float(d.sum() / self._spread)
        return Similarity(scale, rotation, mb - scale * rotation @ self._ma)


_RIGID = np.array(RIGID)
# Per eye: the lid pairs' upper and lower points, and the eye's corners.
_EYE_LIDS = tuple((np.array(pairs)[:, 0], np.array(pairs)[:, 1], corners)
                  for pairs, corners in ((RIGHT_LID_PAIRS, EYE_CORNERS[0]), (LEFT_LID_PAIRS, EYE_CORNERS[1])))


def eye_apertures(landmarks: np.ndarray) -> np.ndarray:
    """(2,) right and left eye openings: mean lid gap over the eye's corner-to-corner width."""
    out = np.empty(2)
    for k, (upper, lower, (a, b)) in enumerate(_EYE_LIDS):
        gap = np.linalg.norm(landmarks[upper, :2] - landmarks[lower, :2], axis=1).mean()
        out[k] = gap / max(float(np.linalg.norm(landmarks[a, :2] - landmarks[b, :2])), 1e-6)
    return out


def mouth_aperture(landmarks: np.ndarray) -> float:
    """Inner-lip gap at the middle of the mouth over the mouth's inner width."""
    gap = np.linalg.norm(landmarks[13, :2] - landmarks[14, :2])
    return float(gap / max(float(np.linalg.norm(landmarks[78, :2] - landmarks[308, :2])), 1e-6))


class DriverCalibration:
    """What the driver's eyes look like open and its mouth closed, learnt as it is watched.

    Starts from the reference frame and keeps the widest eyes and the most closed mouth seen
    since, relaxing slowly (CALIBRATION_RELAX a frame) so one odd frame is forgotten in
    seconds. A reference caught mid-blink or mid-word is thus corrected the first time the
    driver opens its eyes or closes its mouth.
    """

    def __init__(self, reference: np.ndarray):
        self.eyes_open = eye_apertures(reference)
        self.mouth_closed = min(mouth_aperture(reference), MOUTH_CLOSED_MAX)

    def update(self, driving: np.ndarray) -> tuple[np.ndarray, float]:
        """Per eye how shut (0 open .. 1 shut), and how far the mouth is open above closed
        (in mouth widths)."""
        eyes = eye_apertures(driving)
        k = CALIBRATION_RELAX
        self.eyes_open = np.maximum(eyes, (1 - k) * self.eyes_open + k * eyes)
        fraction = eyes / np.maximum(self.eyes_open, 1e-6)
        shut = (EYE_OPEN_FRACTION - fraction) / (EYE_OPEN_FRACTION - EYE_SHUT_FRACTION)
        mouth = mouth_aperture(driving)
        self.mouth_closed = min(mouth, (1 - k) * self.mouth_closed + k * mouth, MOUTH_CLOSED_MAX)
        return np.clip(shut, 0.0, 1.0), max(0.0, mouth - self.mouth_closed)


def skin_tone(image: np.ndarray, mesh: np.ndarray) -> np.ndarray:
    """The face's skin colour: the median over small windows on both cheeks."""
    r = max(2, int(0.03 * head_box(mesh).height))
    h, w = image.shape[:2]
    patches = []
    for i in (50, 280, 101, 330):
        x, y = (int(round(c)) for c in mesh[i, :2])
        patches.append(image[max(y - r, 0):min(y + r + 1, h), max(x - r, 0):min(x + r + 1, w)].reshape(-1, 3))
    return np.median(np.concatenate(patches).astype(np.float32), axis=0)


def _skin_like(colours: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """Which colours (N, 3) could be the face's skin, lit or shaded: the skin's hue (its
    chromaticity within 0.035) at 0.5-1.2 times its brightness."""
    total = colours.sum(axis=-1, keepdims=True)
    chroma = colours / np.maximum(total, 1.0)
    skin_chroma = skin / max(float(skin.sum()), 1.0)
    ratio = total[..., 0] / max(float(skin.sum()), 1.0)
    return (np.linalg.norm(chroma - skin_chroma, axis=-1) < 0.035) & (ratio > 0.5) & (ratio < 1.2)


def _catmull_rom(count: int, samples: int) -> np.ndarray:
    """(samples * (count - 1) + 1, count) weights: a smooth curve through `count` control
    points (centripetal-free, uniform Catmull-Rom, end points repeated)."""
    rows = []
    for seg in range(count - 1):
        for s in range(samples):
            t = s / samples
            w = np.array([-t ** 3 + 2 * t ** 2 - t, 3 * t ** 3 - 5 * t ** 2 + 2, -3 * t ** 3 + 4 * t ** 2 + t,
                          t ** 3 - t ** 2]) / 2
            row = np.zeros(count)
            for j, wj in zip((seg - 1, seg, seg + 1, seg + 2), w):
                row[min(max(j, 0), count - 1)] += wj
            rows.append(row)
    last = np.zeros(count)
    last[-1] = 1
    rows.append(last)
    return np.array(rows)


def _flat(points: np.ndarray) -> np.ndarray:
    """Points (N, >=2) in the image plane, z set to 0: a similarity fitted on them is a roll,
    a shift and a scale."""
    return np.concatenate([points[:, :2], np.zeros((len(points), 1))], axis=1)


def _pixel_grid(x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixel coordinates of a box as a float32 column of ys and a row of xs: they broadcast
    to np.mgrid's full arrays in the first product that needs both (the same values), without
    making the two full grids."""
    return np.arange(y0, y1, dtype=np.float32)[:, None], np.arange(x0, x1, dtype=np.float32)[None, :]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


class _Eyelid:
    """One eye's closing lid: the skin above the lid slides down over the eye.

    Per frame, in the eye's own frame (u along the corners, v down across them): between the
    lid skin's line `c` (just under the brow) and the lid's new edge `e`, each pixel takes
    the colour found (v - c) / (e - c) of the way from `c` to just above the open lid's lash
    line: the upper lid's own texture and shading, stretched as a lid stretches, with the lash
    line at its edge. Below `e` the eye is as the warp left it (the lower part of the iris, the
    lower lid): nothing is squashed, and at a full blink every pixel of the opening comes from
    above the lashes, so the eye's interior cannot show. The edge is feathered over a pixel
    and a soft shadow falls under the lid onto the eye.
    """

    SAMPLES = 6  # curve samples per lid-point interval

    def __init__(self, upper: Sequence[int], lower: Sequence[int], skin: Sequence[int],
                 corners: tuple[int, int], mesh: np.ndarray, image: np.ndarray, skin_tone: np.ndarray):
        self.upper, self.lower, self.skin = list(upper), list(lower), list(skin)
        self.corners = corners
        a, b = mesh[corners[0], :2], mesh[corners[1], :2]
        width = float(np.linalg.norm(b - a))
        heights = np.linalg.norm(mesh[self.upper, :2] - mesh[self.lower, :2], axis=1)
        self.height = max(float(heights.max()), 1.0)  # the open eye, in source pixels
        self.width = width
        # The lid skin: the band between the lashes and whatever dark lies above (brow, a
        # glasses rim, a drawn crease), as fractions k of the way from the lid line (0) to the
        # skin ring (1), found on the source's own pixels.
        top, ring = mesh[self.upper, :2], mesh[self.skin, :2]
        ks = np.linspace(0.0, 1.0, 21)
        middle = slice(1, len(self.upper) - 1)
        along = top[None, middle] + ks[:, None, None] * (ring - top)[None, middle]  # (k, points, 2)
        px = cv2.remap(image.astype(np.float32), along[..., 0].astype(np.float32), along[..., 1].astype(np.float32),
                       cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        colour = np.median(px, axis=1)  # (k, 3)
        # Lid skin looks like the face's skin (a little shaded); lashes, a drawn outline, an
        # eye's white, a brow or a glasses rim do not.
        dark = ~_skin_like(colour, skin_tone)
        lo = next((i for i in range(1, len(ks)) if not dark[i]), None)
        hi = lo
        while hi is not None and hi + 1 < len(ks) and not dark[hi + 1]:
            hi += 1
        if lo is None or ks[hi] - ks[lo] < 0.2:
            lo, hi = 6, 16  # no clean band found: the middle of the way
        self.band = (float(ks[lo]), float(ks[hi]))
        # A band darker than skin (an eye in shadow, behind dark glasses, a painter's dark
        # socket) would close the eye in the colour of the open one: such a lid is the skin's
        # colour instead, shaded.
        band_colour = np.median(colour[lo:hi + 1], axis=0)
        self.flat = float(band_colour.sum()) < 0.7 * float(skin_tone.sum())
        self.skin_tone = skin_tone.astype(np.float32)
        # How far below the mesh's lower lid the opening really reaches (a drawn eye's white
        # often does; on a photo the lower lid is skin at once), in eye heights.
        low = mesh[self.lower, :2][middle]
        down = np.linspace(0.0, 0.4, 9)
        below = low[None] + (down[:, None, None] * self.height) * np.array([0.0, 1.0])
        px_low = cv2.remap(image.astype(np.float32), below[..., 0].astype(np.float32), below[..., 1].astype(np.float32),
                           cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        below_colour = np.median(px_low, axis=1)
        white = ~_skin_like(below_colour, skin_tone) & (below_colour.sum(axis=1) > 1.1 * float(skin_tone.sum()))
        reach = next((i for i in range(len(down)) if not white[i]), len(down) - 1)
        self.reach = float(down[reach])
        # Past the corners too (a drawn eye's white beyond where the mesh puts its corners):
        # how far light, unskinlike pixels go on along the eye's axis, in eye widths.
        self.extend = []
        for here, there in ((a, b), (b, a)):
            out = (here - there) / max(width, 1e-6)
            steps = np.linspace(0.0, 0.3, 7)
            pts = (here[None] + steps[:, None] * width * out[None]).astype(np.float32)
            px_out = cv2.remap(image.astype(np.float32), pts[None, :, 0], pts[None, :, 1], cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)[0]
            light = ~_skin_like(px_out, skin_tone) & (px_out.sum(axis=1) > 1.1 * float(skin_tone.sum()))
            run = next((i for i in range(len(steps)) if not light[i]), len(steps) - 1)
            self.extend.append(float(steps[max(run - 1, 0)]) if run > 0 else 0.0)
        # The lash line drawn at the lid's edge: the darkest colour along the open lid's lashes.
        lashes = px[:lo + 1].reshape(-1, 3)
        self.lash = lashes[lashes.sum(axis=1).argmin()] * 0.9
        self._curve = _catmull_rom(len(self.upper) + 2, self.SAMPLES)

    def _line(self, points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._curve @ np.concatenate([[a], points, [b]])

    def apply(self, out: np.ndarray, v: np.ndarray, shut: float, scale: float) -> None:
        """Close this eye of the rendered frame `out` by `shut` (0..1); v: the frame's
        vertices (upper lid held open); scale: output pixels per source pixel."""
        if shut <= 0.02:
            return
        a, b = v[self.corners[0]].astype(np.float64), v[self.corners[1]].astype(np.float64)
        a, b = a + self.extend[0] * (a - b), b + self.extend[1] * (b - a)
        if a[0] > b[0]:  # u runs left to right on screen, whichever corner is outer
            a, b = b, a
        axis = b - a
        length = max(float(np.linalg.norm(axis)), 1e-6)
        x_hat = axis / length
        n_hat = np.array([-x_hat[1], x_hat[0]])  # down on screen
        first, last = v[self.corners[0]], v[self.corners[1]]  # the lid points run outer to inner
        first, last = first + self.extend[0] * (first - last), last + self.extend[1] * (last - first)
        top = self._line(v[self.upper], first, last)
        bottom = self._line(v[self.lower], first, last)
        skin = self._line(v[self.skin], first, last)
        height = self.height * scale
        pad = 3
        pts = np.concatenate([top, bottom, skin])
        x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - pad, 0)
        x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + pad + int(0.3 * height), out.shape[1::-1])
        if x1 - x0 < 3 or y1 - y0 < 3:
            return
        roi = out[y0:y1, x0:x1]
        ys, xs = _pixel_grid(x0, y0, x1, y1)
        rel_x, rel_y = xs - a[0], ys - a[1]
        u = rel_x * x_hat[0] + rel_y * x_hat[1]
        vv = rel_x * n_hat[0] + rel_y * n_hat[1]

        def along(curve: np.ndarray) -> np.ndarray:
            cu = (curve - a) @ x_hat
            cv = (curve - a) @ n_hat
            order = np.argsort(cu)
            return np.interp(u, cu[order], cv[order]).astype(np.float32)

        t, low, ring = along(top), along(bottom), along(skin)
        unit = out.shape[0] / 512  # lengths that are not the eye's own, at any resolution
        k_lo, k_hi = self.band
        c = t + k_hi * (ring - t)  # the top of the lid skin band: above it nothing moves
        gap = np.maximum(low - t, 0.0)
        span = _smoothstep((np.minimum(u, length - u)) / max(0.15 * length, 1.0))  # fade at the corners
        onset = min(1.0, shut / 0.15)
        # The edge follows the lower lid (which meets the upper at the corners), a little past it.
        # (A pixel more everywhere, so the corners themselves are covered.)
        edge = t + shut * (gap + (0.06 + self.reach) * height * span + 1.5 * unit)
        # The band's lower end, clear of lashes; at least a pixel and a half above the lid line
        # even at the corners, so that no sample reaches into the eye.
        source_edge = t + onset * (np.minimum(k_lo * (ring - t) * span, 0.0) - 1.5 * unit)
        depth = np.maximum(edge - c, 1e-3)
        inside = (vv >= c) & (vv <= edge + 1.0)
        v_src = np.where(inside, c + (np.minimum(vv, edge) - c) * (source_edge - c) / depth, vv)
        shift = v_src - vv
        map_x = xs + shift * n_hat[0] - x0
        map_y = ys + shift * n_hat[1] - y0
        lid = cv2.remap(roi, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        above = (vv > c - 0.35 * height) & (vv < c) & (span > 0.5)
        covered = (vv > c) & (vv < edge) & (span > 0.5)
        if self.flat and covered.sum() > 4:
            # The colour of the skin just above (the cheeks' where that is dark too), with half
            # the band's own texture.
            tone = roi[above].astype(np.float32).mean(axis=0) if above.sum() > 4 else self.skin_tone
            if tone.sum() < 0.7 * self.skin_tone.sum():
                tone = self.skin_tone
            lid = tone + 0.5 * (lid - lid[covered].mean(axis=0))
        # Stretched skin is smooth along the stretch (a stretched pore is a streak).
        blur = 2 * int(max(1.0, 0.15 * height)) + 1
        lid = cv2.GaussianBlur(lid, (3, blur), 0)
        # Lit as the skin just above it (the band often lies in the crease's shade): a closed
        # lid catches the light as the brow bone does.
        if not self.flat and above.sum() > 4 and covered.sum() > 4:
            gain = roi[above].astype(np.float32).mean(axis=0) / np.maximum(lid[covered].mean(axis=0), 1.0)
            fall = np.clip((vv - c) / depth, 0.0, 1.0)
            lid *= 1.0 + (np.clip(gain, 0.85, 1.35) - 1.0) * (np.minimum(fall * 3, 1.0) * onset * span)[..., None]
        # Coverage: 1 down to the edge, feathered over about a pixel, only where the eye is.
        cover = np.clip(edge - vv + 0.5, 0.0, 1.0) * (vv >= c - 1.0)
        # Above the open lid's line the lid only changes skin into skin: fade it in from its top
        # so no edge shows there; over the eye it covers fully.
        soft = _smoothstep((vv - c) / max(0.3 * height, 1.0))
        cover *= np.where(vv < t - 1.5 * unit, soft, 1.0)  # (the lash line itself is covered)
        cover *= np.clip(u + 3.0 * unit, 0.0, 1.0) * np.clip(length - u + 3.0 * unit, 0.0, 1.0)  # just past the corners
        # The lash line along the edge and the lid's shadow on the eye beneath it.
        lash_width = max(0.7, 0.07 * height)
        lash = np.exp(-(((vv - edge + 0.5 * lash_width) / lash_width) ** 2)) * span * onset * 0.85
        shadow = 0.25 * np.exp(-np.maximum(vv - edge, 0.0) / max(0.12 * height, 0.5)) * (vv > edge) * span * onset
        shadow *= (vv < low + self.reach * height)  # on the eye, not on the lower lid's skin
        base = roi.astype(np.float32)
        result = base + (lid - base) * cover[..., None]
        result += (self.lash - result) * lash[..., None]
        result *= (1.0 - shadow)[..., None]
        roi[:] = np.clip(result + 0.5, 0, 255).astype(np.uint8)


class _Mouth:
    """The inside of an opened mouth, drawn at full resolution with antialiased edges.

    A cavity darker the deeper inside (lit near the lips, near black in the throat), a tongue
    at the bottom, upper teeth under the upper lip and a lower set above the lower lip. Where
    the source shows teeth the warp carries its own upper teeth (the interior's upper half
    rides with the upper lip) and their colour tints the lower set; where it shows none
    (closed lips), both sets are drawn in a light tone taken from the source's eyes' whites.
    Where the source's lips do not stand out from its skin (a drawn or posterized mouth), the
    opening gets a lower lip of its own along its lower edge, in a lip colour made from the
    skin: without one an opened mouth reads as a dark hole in the chin, to a viewer and to the
    face mesh alike (which then reads the mouth as closed).
    """

    SAMPLES = 4

    def __init__(self, mesh: np.ndarray, image: np.ndarray, half_gap: np.ndarray, skin_tone: np.ndarray):
        lips = np.array(LIP_PAIRS)
        self.upper, self.lower = lips[:, 0], lips[:, 1]
        self._curve = _catmull_rom(len(self.upper) + 2, self.SAMPLES)
        self.width = float(np.linalg.norm(mesh[78, :2] - mesh[308, :2]))
        h, w = image.shape[:2]
        lip_mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(lip_mask, [np.rint(mesh[list(OUTER_LIPS), :2]).astype(np.int32)], 255)
        inner = np.concatenate([[mesh[78, :2]], mesh[self.upper, :2], [mesh[308, :2]], mesh[self.lower, :2][::-1]])
        interior = np.zeros((h, w), np.uint8)
        cv2.fillPoly(interior, [np.rint(inner).astype(np.int32)], 255)
        lip_mask[interior > 0] = 0
        lips_rgb = image[lip_mask > 0].astype(np.float32)
        self.lip = np.median(lips_rgb, axis=0) if len(lips_rgb) else np.array([170, 90, 90], np.float32)
        # Teeth the source shows: light, low-saturation pixels in the upper half of its mouth.
        upper_half = np.zeros((h, w), np.uint8)
        mid = mesh[self.upper, :2] + half_gap
        cv2.fillPoly(upper_half, [np.rint(np.concatenate(
            [[mesh[78, :2]], mesh[self.upper, :2], [mesh[308, :2]], mid[::-1]])).astype(np.int32)], 255)
        px = image[upper_half > 0].astype(np.float32)
        self.shows_teeth = False
        light = np.array([236, 230, 214], np.float32)
        if len(px) >= max(12, 0.01 * self.width ** 2):
            value = px.max(axis=1)
            sat = (value - px.min(axis=1)) / np.maximum(value, 1)
            teeth = px[(value > 0.75 * np.percentile(image.max(axis=2), 90)) & (sat < 0.4)]
            if len(teeth) >= 0.25 * len(px):
                self.shows_teeth = True
                light = np.median(teeth, axis=0)
        self.teeth = light
        # Lips that look like skin (hue and brightness) get a rim of lip colour.
        self.rim = None
        if _skin_like(self.lip[None], skin_tone.astype(np.float32))[0]:
            self.rim = skin_tone.astype(np.float32) * np.array([0.86, 0.55, 0.55], np.float32)
        # The warp carries the source's own upper teeth only where its lips frame them; inside a
        # drawn mouth they would sit outside the new lips: there the teeth are drawn, in their colour.
        self.carry_teeth = self.shows_teeth and self.rim is None
        self.throat = self.lip * np.array([0.1, 0.05, 0.06])
        self.wall = self.lip * np.array([0.4, 0.2, 0.2])  # lit near the lips
        self.tongue = self.lip * np.array([0.58, 0.3, 0.32])

    def apply(self, out: np.ndarray, v: np.ndarray, mid: np.ndarray, strength: float, gap: float) -> None:
        """Draw the interior between the lips of vertices `v` (mid: the lip midline) into
        `out`; strength 0..1 fades it in as the mouth opens, gap: its opening in pixels."""
        left, right = v[78].astype(np.float64), v[308].astype(np.float64)
        upper = self._curve @ np.concatenate([[left], v[self.upper], [right]])
        lower = self._curve @ np.concatenate([[left], v[self.lower], [right]])
        midline = self._curve @ np.concatenate([[left], mid, [right]])
        top = midline if self.carry_teeth else upper
        pts = np.concatenate([upper, top, lower])
        pad = 3
        x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - pad, 0)
        x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + pad, out.shape[1::-1])
        if x1 - x0 < 3 or y1 - y0 < 3:
            return
        roi = out[y0:y1, x0:x1]
        shape = roi.shape[:2]
        fixed = lambda p: np.rint((p - [x0, y0]) * 16).astype(np.int32)

        def fill(polygon: np.ndarray) -> np.ndarray:
            mask = np.zeros(shape, np.uint8)
            cv2.fillPoly(mask, [fixed(polygon)], 255, cv2.LINE_AA, 4)
            return mask.astype(np.float32) / 255.0

        cavity = fill(np.concatenate([top, lower[::-1]]))
        width = max(float(np.linalg.norm(right - left)), 1.0)
        # Depth: how far inside, from a blur of the opening (0 at the lips, 1 deep inside).
        sigma = max(0.8, 0.1 * gap)
        depth = np.clip((cv2.GaussianBlur(cavity, (0, 0), sigma) - 0.5) * 2.5, 0, 1)[..., None]
        layer = self.wall + (self.throat - self.wall) * _smoothstep(depth)
        ys, xs = _pixel_grid(x0, y0, x1, y1)
        x_hat = (right - left) / width
        across = ((xs - (left[0] + right[0]) / 2) * x_hat[0] + (ys - (left[1] + right[1]) / 2) * x_hat[1]) / (width / 2)
        n_hat = np.array([-x_hat[1], x_hat[0]])

        # Tongue: a low dome resting on the lower lip, in the middle.
        centre = lower[len(lower) // 2]
        dome_h = 0.32 * gap
        rel = ((xs - centre[0]) * n_hat[0] + (ys - centre[1]) * n_hat[1])  # below the lower lip centre: > 0
        tongue = np.clip(1.0 - across ** 2 / 0.5 - ((rel + 0.2 * dome_h) / max(dome_h, 1.0)) ** 2, 0, 1)
        tongue = np.clip(tongue * 6, 0, 1)[..., None] * min(1.0, gap / (0.25 * width))
        tongue_colour = self.tongue * (0.8 + 0.25 * np.clip(-rel / max(dome_h, 1.0), 0, 1))[..., None]
        layer = layer + (tongue_colour - layer) * tongue * 0.9

        # Teeth: a band under the upper lip (drawn unless the source's own are carried by the
        # warp) and a lower set over the lower lip when the mouth is open enough to show it.
        def band(edge: np.ndarray, height: float, downwards: bool, extent: float) -> np.ndarray:
            shifted = edge + (height if downwards else -height) * n_hat
            return fill(np.concatenate([edge, shifted[::-1]])) * _smoothstep((extent - np.abs(across)) / 0.25)[..., None][..., 0]

        teeth_shade = (1.0 - 0.35 * np.abs(across) ** 2)[..., None]  # receding into shadow at the sides
        gaps = 0.12 * np.clip(np.cos(np.abs(across) * np.pi * 4.5) * 4 - 3, 0, 1)[..., None]  # the gaps between teeth
        if not self.carry_teeth:
            upper_teeth = band(upper, min(0.13 * width, 0.42 * gap), True, 0.78)[..., None]
            colour = self.teeth * teeth_shade * (1 - gaps) * 0.95
            layer = layer + (colour - layer) * upper_teeth
        if gap > 0.12 * width:
            show = min(1.0, (gap - 0.12 * width) / (0.1 * width))
            lower_teeth = band(lower, min(0.08 * width, 0.22 * gap), False, 0.55)[..., None] * show
            colour = self.teeth * teeth_shade * (1 - gaps) * 0.72
            layer = layer + (colour - layer) * lower_teeth
        alpha = (cavity * strength)[..., None]
        base = roi.astype(np.float32)
        result = base + (layer - base) * alpha
        if self.rim is not None:  # lips all round the opening, in front of the teeth and tongue
            rim_width = min(0.07 * width, 0.3 * gap)
            rim = np.maximum(band(upper, rim_width, True, 1.2), band(lower, rim_width, False, 1.2))
            result += (self.rim * (0.9 + 0.1 * teeth_shade) - result) * (rim * strength)[..., None]
        roi[:] = np.clip(result + 0.5, 0, 255).astype(np.uint8)


class Reenactor:
    """The per-source part of the warp: triangulation, rings, matte, plate, colours; all
    computed once.

    `landmarks(driving, reference)` moves the source mesh; `render(driving, reference)`
    warps the source image onto it. `matte` (the person's alpha, engines.matte.person_matte)
    and `plate` (the background behind the person, engines.matte.background_plate) are made
    here when not given.
    """

    def __init__(self, source: SourcePortrait, grid: int | None = None, matte: np.ndarray | None = None,
                 plate: np.ndarray | None = None):
        from .matte import background_plate, person_matte

        self.source = source
        self.size = size = source.image.shape[0]
        # The warp map at full resolution (engines.raster makes that cheap), or on a coarser
        # grid upsampled bilinearly, the mouth still at full resolution (a cheaper setting).
        self.grid = min(grid or size, size)
        mesh = source.landmarks[:MESH_POINTS].astype(np.float64)
        self._mesh3d = mesh

        self.matte = person_matte(source.image, source.landmarks) if matte is None else matte.astype(np.float32)
        self.plate = background_plate(source.image, self.matte) if plate is None else plate

        lids = np.array(RIGHT_LID_PAIRS + LEFT_LID_PAIRS)
        self._lid_upper, self._lid_lower = lids[:, 0], lids[:, 1]
        lips = np.array(LIP_PAIRS)
        self._lip_upper, self._lip_lower = lips[:, 0], lips[:, 1]
        midline = (mesh[self._lip_upper, :2] + mesh[self._lip_lower, :2]) / 2
        self._half_gap = midline - mesh[self._lip_upper, :2]  # (pairs, 2), points down the mouth
        self._jaw_weight = self._opening_weights(mesh)
        self._source_lip_gap = float(np.linalg.norm(mesh[14, :2] - mesh[13, :2]))
        self._source_mouth_width = float(np.linalg.norm(mesh[78, :2] - mesh[308, :2]))

        # Rings around the head centre follow a weighted share of the head's motion.
        centre = mesh[list(FACE_OVAL)].mean(axis=0)
        oval = mesh[list(FACE_OVAL)]
        rings, weights = [], []
        for scale, (w_up, w_down) in zip(RING_SCALES, RING_WEIGHTS):
            points = centre + (oval - centre) * scale  # z too: a turn moves the rings as the head
            up = np.clip((centre[1] - points[:, 1]) / np.ptp(points[:, 1]) + 0.5, 0, 1)
            rings.append(points)
            weights.append(w_down + (w_up - w_down) * up)
        self._rings3d = np.concatenate(rings)
        self._ring_weight = np.concatenate(weights)[:, None]
        edge = np.linspace(0, size - 1, BORDER_STEPS + 1)
        border = np.concatenate([
            np.stack([edge, np.zeros_like(edge)], 1), np.stack([edge, np.full_like(edge, size - 1)], 1),
            np.stack([np.zeros_like(edge), edge], 1)[1:-1], np.stack([np.full_like(edge, size - 1), edge], 1)[1:-1],
        ])
        margin = 2.0 * size  # far corners keep the hull around every ring point, on screen or not
        far = np.array([[-margin, -margin], [size + margin, -margin], [-margin, size + margin],
                        [size + margin, size + margin]])

        # Vertices: mesh | lip midline | rings | fixed border. The triangulation is fixed per
        # source; driving moves the vertices.
        self._mid = slice(MESH_POINTS, MESH_POINTS + len(midline))
        self._ring = slice(self._mid.stop, self._mid.stop + len(self._rings3d))
        self.src_vertices = np.concatenate([mesh[:, :2], midline, self._rings3d[:, :2], border, far]).astype(np.float32)
        simplices = Delaunay(self.src_vertices).simplices
        # Face triangles last, so where a turn folds the mesh the face covers the background.
        on_face = np.all(simplices < self._ring.start, axis=1)
        self.triangles = np.concatenate([simplices[~on_face], simplices[on_face]]).astype(np.int64)
        self._face_start = int((~on_face).sum())
        tri = self.src_vertices[self.triangles].astype(np.float64)
        a1, a2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        self._source_det = a1[:, 0] * a2[:, 1] - a1[:, 1] * a2[:, 0]  # each triangle's orientation
        # A face triangle's depth: its mesh points' z (the lip midline takes its upper lip's).
        depth_of = np.arange(self._ring.start)
        depth_of[self._mid] = self._lip_upper
        self._face_depth_points = np.ascontiguousarray(depth_of[self.triangles[self._face_start:]], np.int64)  # (F, 3)
        self._order = np.arange(len(self.triangles))
        self._flipped = np.empty(len(self._face_depth_points), np.bool_)
        self._face_depth = np.empty(len(self._face_depth_points))
        self._src_triangles = np.ascontiguousarray(self.src_vertices[self.triangles], np.float64)

        # Per-frame buffers.
        g = self.grid
        self._dst_triangles = np.empty_like(self._src_triangles)
        self._coarse_x = np.empty((g, g), np.float32)
        self._coarse_y = np.empty((g, g), np.float32)
        self._map_x = np.empty((size, size), np.float32)
        self._map_y = np.empty((size, size), np.float32)
        self._vertices = self.src_vertices.astype(np.float64)
        self._source_rgba = np.dstack([source.image, np.rint(self.matte * 255).astype(np.uint8)])
        self._warped_rgba = np.empty((size, size, 4), np.uint8)
        self._alpha_u8 = np.empty((size, size), np.uint8)
        self.output = np.empty((size, size, 3), np.uint8)

        image = source.image
        tone = skin_tone(image, mesh)
        self._eyes = (_Eyelid(self._lid_upper[:7], self._lid_lower[:7], RIGHT_LID_SKIN, EYE_CORNERS[0], mesh, image, tone),
                      _Eyelid(self._lid_upper[7:], self._lid_lower[7:], LEFT_LID_SKIN, EYE_CORNERS[1], mesh, image, tone))
        self._mouth = _Mouth(mesh, image, self._half_gap, tone)
        self._mouth_region = list(OUTER_LIPS)
        self._init_outline(mesh)
        self._reference_key: int | None = None
        self.calibration: DriverCalibration | None = None

    def _opening_weights(self, mesh: np.ndarray) -> np.ndarray:
        """(468,) how much of the mouth's opening each point takes: the lower lip fully
        (tapering to nothing at the corners), the chin and jaw below it, nothing above the
        lips or out on the cheeks."""
        left, right = mesh[78, :2], mesh[308, :2]
        centre = (left + right) / 2
        half = max(float(np.linalg.norm(right - left)) / 2, 1.0)
        x_hat = (right - left) / (2 * half)
        n_hat = np.array([-x_hat[1], x_hat[0]])
        rel = mesh[:, :2] - centre
        across = rel @ x_hat / half
        down = rel @ n_hat
        chin = max(float((mesh[152, :2] - centre) @ n_hat), 1.0)
        # The jaw drops as one piece: full weight just below the lips, fading out on the cheeks.
        jaw = _smoothstep(down / (0.15 * chin)) * np.exp(-0.5 * (np.maximum(np.abs(across) - 0.8, 0) / 0.9) ** 2)
        lens = np.clip(1 - np.minimum(np.abs(across), 1) ** 2, 0, 1) ** 0.8
        weights = jaw
        lower = list(self._lip_lower) + list(LOWER_OUTER_LIP) + [14]
        weights[lower] = np.maximum(lens[lower], jaw[lower])
        weights[list(MOUTH_CORNER_POINTS)] = 0.0
        weights[list(self._lip_upper)] = 0.0
        return weights

    # -- motion ---------------------------------------------------------------------------------
    def _bind_reference(self, reference: np.ndarray) -> None:
        """Fix Q (reference -> source) and the source's shape against the driver's."""
        key = id(reference)
        if key == self._reference_key:
            return
        ref = reference[:MESH_POINTS].astype(np.float64)
        self._q = Similarity.fit(ref[list(RIGID)], self._mesh3d[list(RIGID)])
        q_inv = self._q.inverse()
        self._shape_offset = q_inv(self._mesh3d) - ref
        self._ref_rigid = ref[list(RIGID)]
        self._fit_motion = SimilarityFit(self._ref_rigid)  # reference -> each frame, its half once
        # The rings follow the head's motion in the image plane only (roll, shift, scale): a
        # turn (yaw, pitch) moves the face's own mesh, and the hair and shoulders around it
        # stretch smoothly instead of folding over the cheek.
        self._q2 = Similarity.fit(_flat(ref[list(RIGID)]), _flat(self._mesh3d[list(RIGID)]))
        self._ref_rigid_2d = _flat(ref[list(RIGID)])
        self._fit_planar = SimilarityFit(self._ref_rigid_2d)
        self._rings_in_ref = self._q2.inverse()(_flat(self._rings3d))
        self._lids_in_ref = q_inv(self._mesh3d[np.concatenate([self._lid_upper, self._lid_lower])])
        self.calibration = DriverCalibration(reference)
        self._reference_key = key

    def _motion(self, driving: np.ndarray, reference: np.ndarray) -> Similarity:
        self._bind_reference(reference)
        return self._fit_motion(driving[_RIGID].astype(np.float64))

    def _moved(self, driving: np.ndarray, motion: Similarity, mouth_open: float | None = None) -> np.ndarray:
        d = driving[:MESH_POINTS].astype(np.float64)
        mesh = self._q(d + motion.scale * self._shape_offset @ motion.rotation.T)
        if mouth_open is None:
            mouth_open = self.calibration.update(driving)[1]
        # The mouth opens as far above the portrait's own lips as the driver's above its closed
        # mouth: replace the relative motion's gap (which a reference caught with an open mouth
        # would push through closed lips) by that.
        scale = self._q.scale * motion.scale
        eye_line = mesh[263, :2] - mesh[33, :2]
        n_hat = np.array([-eye_line[1], eye_line[0]]) / max(float(np.linalg.norm(eye_line)), 1e-6)
        gap = float((mesh[14, :2] - mesh[13, :2]) @ n_hat)
        target = scale * (self._source_lip_gap + mouth_open * self._source_mouth_width)
        mesh[:, :2] += (target - gap) * self._jaw_weight[:, None] * n_hat
        return mesh

    def landmarks(self, driving: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """The source mesh (468, 3) moved as the driver moved from `reference` to `driving`
        (a driving frame like any other: it updates the driver's calibration, as render does)."""
        motion = self._motion(driving, reference)
        _shut, mouth = self.calibration.update(driving)
        return self._moved(driving, motion, mouth)

    # -- rendering ------------------------------------------------------------------------------
    def recalibrate(self) -> None:
        """The driver's calibration starts again with the next reference (the same one too)."""
        self._reference_key = None

    @property
    def vertices(self) -> np.ndarray:
        """The mesh's vertices where the last `render` moved them (output pixels), in the order
        of `src_vertices`."""
        return self._vertices

    def render(self, driving: np.ndarray, reference: np.ndarray, timings: Timings | None = None,
               over_plate: bool = True) -> np.ndarray:
        """Warp the source so its face follows `driving` (relative to `reference`).
        `over_plate`: the person composited over the background plate; False (a quality
        level): the warped frame as it is."""
        t0 = time.perf_counter()
        motion = self._motion(driving, reference)
        shut, mouth_open = self.calibration.update(driving)
        mesh = self._moved(driving, motion, mouth_open)
        v = self._vertices
        v[:MESH_POINTS] = mesh[:, :2]
        planar = self._fit_planar(_flat(driving[_RIGID].astype(np.float64)))
        rings = self._q2(planar(self._rings_in_ref))
        v[self._ring] = (self._rings3d + self._ring_weight * (rings - self._rings3d))[:, :2]
        self._hold_lids(v, self._q(motion(self._lids_in_ref))[:, :2])
        self._unfold_outline(v, self._q.scale * motion.scale)
        mouth_strength, mouth_gap = self._split_mouth(v)
        t1 = time.perf_counter()
        self._rasterise(v, mesh[:, 2])
        if self.grid < self.size and mouth_strength > 0:  # full resolution where the lips part
            self._refine(v, self._mouth_region)
        t2 = time.perf_counter()
        # One remap carries the portrait and its matte (as a fourth channel: nearly free). On the
        # float maps as they are: OpenCV converts them to fixed point tile by tile, which is
        # faster than a separate cv2.convertMaps pass over the whole map (1.05 against 1.55 ms).
        cv2.remap(self._source_rgba, self._map_x, self._map_y, cv2.INTER_LINEAR, dst=self._warped_rgba,
                  borderMode=cv2.BORDER_REPLICATE)
        if over_plate:
            cv2.extractChannel(self._warped_rgba, 3, dst=self._alpha_u8)
            # Where a turn folds the mesh the map jumps, and so would the warped matte: soften it
            # by a pixel so the outline stays antialiased everywhere.
            cv2.GaussianBlur(self._alpha_u8, (3, 3), 0, dst=self._alpha_u8)
            # The person, where the warp took it, over the background plate.
            composite(self._warped_rgba, self.plate, self._alpha_u8, self.output)
        else:
            cv2.cvtColor(self._warped_rgba, cv2.COLOR_RGBA2RGB, dst=self.output)
        t3 = time.perf_counter()
        scale = self._q.scale * motion.scale
        for eye, amount in zip(self._eyes, shut):
            eye.apply(self.output, v, float(amount), scale)
        if mouth_strength > 0.0:
            self._mouth.apply(self.output, v, v[self._mid], mouth_strength, mouth_gap)
        t4 = time.perf_counter()
        if timings is not None:
            for stage, ms in (("motion", t1 - t0), ("raster", t2 - t1), ("remap", t3 - t2), ("paint", t4 - t3)):
                timings.record(stage, ms * 1e3)
        return self.output

    def _init_outline(self, mesh: np.ndarray) -> None:
        """What _unfold_outline needs, per source.

        The face's edge in the triangulation is the face oval and, where the oval bends in
        between two of its points, a few cheek or jaw points that Delaunay put on the face's
        hull too. Each of those is kept as how far out it lies from the chord of the oval
        points either side of it (in chord lengths). And each oval
        point has its sector of the face: the mesh points near the edge whose direction from
        the face's centre lies between the oval's neighbours on either side (sector_points,
        sector by sector, from sector_start)."""
        oval = np.array(FACE_OVAL)
        self._oval = oval.astype(np.int64)
        centre = mesh[oval, :2].mean(axis=0)
        rel = mesh[:, :2] - centre
        radius = np.linalg.norm(rel, axis=1)
        angle = np.arctan2(rel[:, 1], rel[:, 0])
        oval_radius = np.interp(angle, *self._periodic(angle[oval], radius[oval]))
        near = np.setdiff1d(np.flatnonzero(radius > 0.5 * oval_radius), oval)  # what a turn can carry past the edge
        theta = angle[oval]
        prev, nxt = np.roll(theta, 1), np.roll(theta, -1)
        span = np.mod(nxt - prev, 2 * np.pi)
        start = np.where(span <= np.pi, prev, nxt)
        span = np.minimum(span, 2 * np.pi - span)
        inside = np.mod(angle[near][:, None] - start, 2 * np.pi) <= span  # within the arc between the neighbours
        self._outline_radial = rel[oval] / np.maximum(radius[oval], 1e-6)[:, None]  # (oval, 2), source frame
        self._sector_start = np.concatenate([[0], np.cumsum(inside.sum(axis=0))]).astype(np.int64)
        self._sector_points = np.ascontiguousarray(np.concatenate([near[inside[:, i]] for i in range(len(oval))]),
                                                   np.int64)
        # How far outside its sector each oval point lies in the source (a little margin at most):
        # where the source's own outline runs inside a face point (a jaw corner, a bunched
        # outline), a turn may keep it so; nothing moves unturned.
        reach = np.where(inside, rel[near] @ self._outline_radial.T, -np.inf).max(axis=0)
        clearance = (rel[oval] * self._outline_radial).sum(axis=1) - reach
        self._outline_clearance = np.minimum(np.where(np.isfinite(clearance), clearance, 0.0),
                                             0.01 * float(radius[oval].mean()))
        (outer_right, _), (outer_left, _) = EYE_CORNERS
        self._eye_angle = math.atan2(*(mesh[outer_left, 1::-1] - mesh[outer_right, 1::-1]))
        # Per oval point, the near points closest to it in direction, from the outline inwards;
        # not the lips, whose gap is meant to grow many times over as the mouth opens.
        lips = mesh[list(OUTER_LIPS), :2].astype(np.float32)
        pad = 0.15 * float(np.ptp(lips[:, 0]))
        face_near = np.array([i for i in near if cv2.pointPolygonTest(lips, tuple(map(float, mesh[i, :2])), True) < -pad],
                             np.int64)
        nearest = np.argmin(np.abs(np.angle(np.exp(1j * (angle[face_near][:, None] - theta[None])))), axis=1)
        chains, alongs = [], []
        for i in range(len(oval)):
            members = face_near[nearest == i]
            along = rel[members] @ self._outline_radial[i]
            order = np.argsort(-along, kind="stable")
            chains.append(members[order])
            alongs.append(along[order])
        self._chain_start = np.concatenate([[0], np.cumsum([len(c) for c in chains])]).astype(np.int64)
        self._chain_points = np.ascontiguousarray(np.concatenate(chains), np.int64)
        self._chain_along = np.ascontiguousarray(np.concatenate(alongs), np.float64)
        self._oval_along = np.ascontiguousarray((rel[oval] * self._outline_radial).sum(axis=1))
        # The face's hull points off the oval, each against the two oval points around it.
        edges: dict[tuple[int, int], int] = {}
        for t in self.triangles[self._face_start:]:
            for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                key = (min(a, b), max(a, b))
                edges[key] = edges.get(key, 0) + 1
        hull = {int(i) for key, count in edges.items() if count == 1 for i in key if i < MESH_POINTS}
        extra = sorted(hull - set(FACE_OVAL))
        anchors = []
        for i in extra:  # the oval points either side, by direction from the centre
            before = np.mod(angle[i] - theta, 2 * np.pi)
            after = np.mod(theta - angle[i], 2 * np.pi)
            anchors.append((oval[before.argmin()], oval[after.argmin()]))
        anchors = np.array(anchors, np.int64).reshape(-1, 2)
        a, b = mesh[anchors[:, 0], :2], mesh[anchors[:, 1], :2]
        chord = b - a
        length2 = np.maximum((chord ** 2).sum(axis=1), 1e-12)
        normal = np.stack([-chord[:, 1], chord[:, 0]], axis=1)
        side = np.sign((((a + b) / 2 - centre) * normal).sum(axis=1))  # the normal that points out
        self._hull_extra, self._hull_anchors = np.array(extra, np.int64), np.ascontiguousarray(anchors)
        self._hull_side = np.ascontiguousarray(side, np.float64)
        rel_p = mesh[extra, :2] - a
        self._hull_out = np.ascontiguousarray(side * (rel_p * normal).sum(axis=1) / length2)  # in chord lengths

    @staticmethod
    def _periodic(angle: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(angle)
        a, v = angle[order], value[order]
        return np.concatenate([a - 2 * np.pi, a, a + 2 * np.pi]), np.concatenate([v, v, v])

    def _unfold_outline(self, v: np.ndarray, scale: float) -> None:
        """Keep the face's edge outside the rest of the face, and as smooth as in the source.

        The face's edge is whatever face points lie outermost, and a turn reorders them. On the
        cheek that turns toward the camera the oval, deep in the head, swings out past the hull
        points beside it that lie less deep (Delaunay's, off the oval): each left a notch, and
        the edge became a saw of them. On the cheek that turns away the oval goes behind the
        cheek, in past the points inside it, and the cheek's silhouette is what shows. So each
        hull point off the oval goes back out to at least where it lay against the chord of its
        oval neighbours, and each oval point that fell inside the face goes back out, along its
        own direction from the face's centre, to the outermost face point of its sector (by the
        margin it had in the source). Where the oval swings out it would stretch the cheek's
        outermost strip across the revealed side of the head: the points inside it follow out,
        so no strip grows wider than MAX_STRETCH times. Folded triangles stay inside the edge,
        drawn under the facing ones (far to near). Unturned, nothing moves (well under a pixel).
        scale: output pixels per source pixel. Compiled: engines.raster.unfold_outline."""
        (outer_right, _), (outer_left, _) = EYE_CORNERS  # the eye line that gives the head's roll
        unfold_outline(v, self._oval, self._outline_radial, self._sector_start, self._sector_points,
                       self._outline_clearance, scale, outer_right, outer_left, self._eye_angle, self._hull_extra,
                       self._hull_anchors, self._hull_side, self._hull_out, self._chain_start, self._chain_points,
                       self._chain_along, self._oval_along, MAX_STRETCH)

    def _hold_lids(self, v: np.ndarray, rigid: np.ndarray) -> None:
        """Put the warp's upper lids where the head alone carries them: open. Closing is
        the lid's slide (_Eyelid), so the eye is covered, never squashed."""
        v[self._lid_upper] = rigid[:len(self._lid_upper)]

    def _split_mouth(self, v: np.ndarray) -> tuple[float, float]:
        """Place the lip midline: it rides the upper lip, never past the lower. Returns the
        strength (0..1) of the interior to draw, and the opening in pixels."""
        upper, lower = v[self._lip_upper], v[self._lip_lower]
        gap = np.linalg.norm(lower - upper, axis=1)
        source_gap = 2 * np.linalg.norm(self._half_gap, axis=1)
        keep = np.clip(gap / np.maximum(source_gap, 1e-6), 0.0, 1.0)[:, None]
        v[self._mid] = upper + self._half_gap * keep
        width = max(float(np.linalg.norm(v[78] - v[308])), 1.0)
        opened = float((gap - source_gap).max())
        if opened < 0.5:  # under half a pixel: nothing to draw
            return 0.0, float(gap.max())
        return float(np.clip(opened / max(0.06 * width, 1.0), 0.0, 1.0)), float(gap.max())

    @property
    def alpha(self) -> np.ndarray:
        """(H, W) float32 in [0, 1]: where the last frame shows the person (the warped matte)."""
        return self._alpha_u8 * np.float32(1 / 255)

    def _refine(self, vertices: np.ndarray, region: list[int]) -> None:
        """Recompute the map at full resolution around the points `region` (the mouth), when
        the map is on a coarser grid: there triangles are small and stretched, and a map
        interpolated from the grid would bend straight lip edges into steps."""
        pts = vertices[region]
        pad = 0.12 * float(np.ptp(pts[:, 0]))
        x0, y0 = np.maximum(np.floor(pts.min(axis=0) - pad).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(pts.max(axis=0) + pad).astype(int), self.size)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        map_x, map_y = np.empty((y1 - y0, x1 - x0), np.float32), np.empty((y1 - y0, x1 - x0), np.float32)
        backward_map(self._dst_triangles, self._src_triangles, self._order, float(x0), float(y0), 1.0, map_x, map_y)
        self._map_x[y0:y1, x0:x1], self._map_y[y0:y1, x0:x1] = map_x, map_y

    def _rasterise(self, vertices: np.ndarray, depth: np.ndarray) -> None:
        """Fill the backward map: for each output pixel, where in the source it comes from.

        engines.raster scans the triangles in drawing order, each pixel taking the affine of
        the last triangle that covers it (on the grid, then upsampled, when it is coarser).
        """
        dst = np.take(vertices, self.triangles, axis=0, out=self._dst_triangles)  # (T, 3, 2) where they are now
        # Face triangles far to near (a turned head's far cheek under its nose, not over it),
        # those a turn has flipped over (seen from behind) first of all: where the face's
        # edge turns away they fill in with the cheek's own colours, under every facing one.
        f = self._face_start
        flipped, face_depth = self._flipped, self._face_depth
        face_drawing_keys(dst, f, self._source_det, np.ascontiguousarray(depth, np.float64), self._face_depth_points,
                          flipped, face_depth)
        order = self._order
        order[f:] = f + np.lexsort((-face_depth, ~flipped))
        if self.grid == self.size:
            backward_map(dst, self._src_triangles, order, 0.0, 0.0, 1.0, self._map_x, self._map_y)
            return
        backward_map(dst, self._src_triangles, order, 0.0, 0.0, self.size / self.grid, self._coarse_x, self._coarse_y)
        cv2.resize(self._coarse_x, (self.size, self.size), dst=self._map_x)
        cv2.resize(self._coarse_y, (self.size, self.size), dst=self._map_y)


class WarpEngine:
    """The Engine protocol over a Reenactor: one frame in, one frame out, no latency."""

    name = "warp"
    needs_driving_image = False
    waits_on_device = False

    def __init__(self, size: int = 512, grid: int | None = None):
        self.size = size
        self._grid = grid
        self._reenactor: Reenactor | None = None
        self._reenactors: dict[tuple[int, int], Reenactor] = {}  # per quality level's grid, this source's
        self._level = 0
        self._over_plate = True  # the quality level's: the person composited over the plate
        self._timings = Timings()

    @property
    def timings(self) -> Timings:
        return self._timings

    @property
    def reenactor(self) -> Reenactor | None:
        """The Reenactor that renders the current source at the current quality level."""
        return self._reenactor

    def prepare(self, sources: Sequence[SourcePortrait]) -> None:
        # The warp animates the first portrait; further references are for engines that
        # can blend appearance (the diffusion engine concatenates their features).
        check_sources(sources, self.size, self.name)
        source = sources[0]
        self._reenactor = Reenactor(source, self._grid)
        self._reenactors = {(id(source), self._reenactor.grid): self._reenactor}
        self.set_quality(self._level)

    def step(self, frame: DrivingFrame) -> Rendered:
        if self._reenactor is None:
            raise EngineError("prepare() the engine with a source first")
        t0 = time.perf_counter()
        image = self._reenactor.render(frame.landmarks, frame.reference, self._timings, self._over_plate)
        self._timings.record("engine", (time.perf_counter() - t0) * 1e3)
        self._timings.steps += 1
        return Rendered(image, frame.tag)

    def flush(self) -> list[Rendered]:
        return []

    def reset(self) -> None:
        # Driving state: the driver's calibration starts again with the next reference.
        for reenactor in self._reenactors.values():
            reenactor.recalibrate()

    # Quality levels (engines.base.Governed), what costs on the CPU: the warp map on a grid of a
    # quarter of the size (raster: about half), then no matte composite (the background follows the head).
    QUALITY = ((QualityLevel("full"), None, True), (QualityLevel("coarse map", 0.85), 4, True),
               (QualityLevel("coarse map, no matte", 0.72), 4, False))

    def quality_levels(self) -> list[QualityLevel]:
        return [level for level, _, _ in self.QUALITY]

    def make_quality(self, level: int) -> None:
        """Nothing to make ahead: a level's grid is made per source at the move, in milliseconds."""

    def quality_ready(self, level: int) -> bool:
        return 0 <= level < len(self.QUALITY)

    def set_quality(self, level: int) -> None:
        """A grid of another size is another Reenactor (same matte and plate), kept per source."""
        _, divisor, over_plate = self.QUALITY[level]
        self._level, self._over_plate, old = level, over_plate, self._reenactor
        if old is not None:
            grid = (self._grid or self.size) if divisor is None else max(32, self.size // divisor)
            key = (id(old.source), grid)
            if key not in self._reenactors:
                self._reenactors = {k: r for k, r in self._reenactors.items() if k[0] == id(old.source)}
                self._reenactors[key] = Reenactor(old.source, grid, matte=old.matte, plate=old.plate)
            self._reenactor = self._reenactors[key]


def reenact(source: np.ndarray, driving: np.ndarray, reference: np.ndarray | None = None,
            size: int = 512) -> np.ndarray:
    """F(source, driving) -> image: the source portrait with the driving face's pose and
    expression, cropped to size x size. Any RGB images with a face.

    With a `reference` image of the driver (e.g. its neutral frame), only the motion from
    reference to driving is transferred and the source keeps its face shape. Without one the
    source's own pose and expression serve as the reference (the driving face is aligned to
    the source and transferred as it is), as a classical reenactor would for training pairs.
    """
    with FaceTracker(video=False) as tracker:
        portrait = prepare_source(source, size, tracker)
        drive = tracker.detect(as_rgb(driving))
        ref = drive if reference is None else tracker.detect(as_rgb(reference))
    if drive is None or ref is None:
        from .face import NoFaceError

        raise NoFaceError("no face found in the driving image" if drive is None else "no face in the reference")
    affine = alignment_affine(head_box(portrait.landmarks), head_box(ref))
    drive_aligned = transform_landmarks(drive, affine)
    if reference is None:
        ref_aligned = portrait.landmarks.copy()  # the source stands for the driver's neutral
    else:
        ref_aligned = transform_landmarks(ref, affine)
    return Reenactor(portrait).render(drive_aligned, ref_aligned).copy()
