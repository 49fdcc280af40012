"""The warp engine: a weight-free, landmark-driven portrait animator (the default engine).

The source's own face mesh is moved by the driving face's motion *relative to a reference
driving frame*, so the portrait keeps its own face shape (no identity leakage); then the
source image is warped piecewise-affinely over a triangulation of that mesh, which is
extended by two rings around the head (hair follows the head, shoulders less) and the
fixed image border (the background stays put). Eyelids close because the eye triangles
collapse; an opened mouth gets a cavity painted between the lips.

It is also the paper's F, the classical reenactor that makes cross-identity control
images for training: `reenact(source, driving)`.

Motion, with S the source mesh, R the reference driving mesh and D the current one (3-D,
aligned to the source head box): the head pose M (a similarity) is fitted on rigid points
R -> D, and Q (a similarity) maps the reference onto the source, R -> S. Carrying the
source, seen in the driver's reference frame, along the driver's motion gives

    O = Q(D + M.scale * M.R @ (Q^-1(S) - R))

in which `Q^-1(S) - R` (the source's shape against the driver's) is fixed per source and
reference, so a frame costs one 3x3 similarity fit and one matrix product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from scipy.spatial import Delaunay

from .base import DrivingFrame, EngineError, Rendered, SourcePortrait, Timings, check_sources
from .face import (
    FACE_OVAL,
    LEFT_LID_PAIRS,
    LIP_PAIRS,
    OUTER_LIPS,
    RIGHT_LID_PAIRS,
    LEFT_BROW_LOWER,
    RIGHT_BROW_LOWER,
    RIGID,
    FaceTracker,
    alignment_affine,
    as_rgb,
    head_box,
    prepare_source,
    transform_landmarks,
)

MESH_POINTS = 468  # the face mesh without the 10 iris points (irises move with their eye)
RING_SCALES = (1.35, 2.0)  # ring radii, in face-oval radii around the head centre
# How much of the head's motion each ring takes, above the head centre and below it:
# hair moves with the head; neck and shoulders hardly do.
RING_WEIGHTS = ((1.0, 0.55), (0.55, 0.12))
BORDER_STEPS = 8  # fixed points along each image edge


@dataclass(frozen=True)
class Similarity:
    """x -> scale * rotation @ x + shift, on row vectors of 3-D points."""

    scale: float
    rotation: np.ndarray  # (3, 3)
    shift: np.ndarray  # (3,)

    @classmethod
    def fit(cls, a: np.ndarray, b: np.ndarray) -> "Similarity":
        """Least-squares similarity taking points a onto points b (Umeyama, 1991)."""
        ma, mb = a.mean(axis=0), b.mean(axis=0)
        a0, b0 = a - ma, b - mb
        u, d, vt = np.linalg.svd(b0.T @ a0 / len(a))
        flip = np.ones(3)
        if np.linalg.det(u) * np.linalg.det(vt) < 0:
            flip[-1] = -1
        rotation = (u * flip) @ vt
        scale = float((d * flip).sum() / max((a0 ** 2).sum() / len(a), 1e-12))
        return cls(scale, rotation, mb - scale * rotation @ ma)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.scale * x @ self.rotation.T + self.shift

    def inverse(self) -> "Similarity":
        rt = self.rotation.T
        return Similarity(1 / self.scale, rt, -(rt @ self.shift) / self.scale)


class Reenactor:
    """The per-source part of the warp: triangulation, rings, colours; all computed once.

    `landmarks(driving, reference)` moves the source mesh; `render(driving, reference)`
    warps the source image onto it.

    Eyes and mouth are where a plain mesh warp fails to read, so they get two changes:
    an eyelid that closes slides over the eye (painted in the source's lid colour, with a
    lash line) instead of squashing iris and lashes into a smear; and the mouth's interior
    is split at the source's lip midline: the upper half (upper teeth) moves with the upper
    lip, the lower half opens into a cavity painted in a dark shade of the source's lips.
    """

    def __init__(self, source: SourcePortrait, grid: int | None = None):
        self.source = source
        self.size = size = source.image.shape[0]
        # The warp map is piecewise affine, so it is computed on a coarser grid and
        # upsampled bilinearly: indistinguishable, and a quarter of the per-pixel work.
        self.grid = grid or max(64, size // 2)
        mesh = source.landmarks[:MESH_POINTS].astype(np.float64)
        self._mesh3d = mesh

        lids = np.array(RIGHT_LID_PAIRS + LEFT_LID_PAIRS)
        self._lid_upper, self._lid_lower = lids[:, 0], lids[:, 1]
        lips = np.array(LIP_PAIRS)
        self._lip_upper, self._lip_lower = lips[:, 0], lips[:, 1]
        midline = (mesh[self._lip_upper, :2] + mesh[self._lip_lower, :2]) / 2
        self._half_gap = midline - mesh[self._lip_upper, :2]  # (pairs, 2), points down the mouth
        self._source_gap = _lip_gap(mesh)

        # Rings around the head centre follow a weighted share of the head's motion.
        centre = mesh[list(FACE_OVAL)].mean(axis=0)
        oval = mesh[list(FACE_OVAL)]
        rings, weights = [], []
        for scale, (w_up, w_down) in zip(RING_SCALES, RING_WEIGHTS):
            points = centre + (oval - centre) * [scale, scale, 0]
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

        # Per-frame buffers.
        g = self.grid
        self._ids = np.empty((g, g), np.int32)
        ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
        k = size / g  # grid pixel centre -> image pixel centre
        self._grid_xy1 = np.stack([(xs + 0.5) * k - 0.5, (ys + 0.5) * k - 0.5, np.ones_like(xs)], -1).reshape(-1, 3)
        self._affines = np.empty((len(self.triangles) + 1, 2, 3), np.float32)
        self._affines[0] = [[1, 0, 0], [0, 1, 0]]  # id 0: pixels no triangle covers stay put
        self._coarse = np.empty((g * g, 2), np.float32)
        self._chosen = np.empty((g * g, 2, 3), np.float32)
        self._map_x = np.empty((size, size), np.float32)
        self._map_y = np.empty((size, size), np.float32)
        self._vertices = self.src_vertices.copy()
        self.output = np.empty((size, size, 3), np.uint8)

        self._cavity_colour = self._mean_colour([mesh[list(OUTER_LIPS), :2]]) * np.array([0.3, 0.2, 0.2])
        self._lid_colour, self._lash_colour = self._eyelid_colours(mesh)
        self._reference_key: int | None = None

    def _mean_colour(self, polygons: list[np.ndarray]) -> np.ndarray:
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(mask, [np.rint(p).astype(np.int32) for p in polygons], 255)
        return np.array(cv2.mean(self.source.image, mask=mask)[:3], np.float32)

    def _eyelid_colours(self, mesh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The skin of the upper lids and a darker shade for lashes.

        Taken from the middle of the band between each upper lid and its brow: the median
        there is lid skin, clear of lashes, crease shadow and brow hair.
        """
        mask = np.zeros((self.size, self.size), np.uint8)
        for pairs, brow in ((RIGHT_LID_PAIRS, RIGHT_BROW_LOWER), (LEFT_LID_PAIRS, LEFT_BROW_LOWER)):
            upper = mesh[[u for u, _ in pairs], :2]
            brow_y = mesh[list(brow), 1].mean()
            lid_y = upper[:, 1]
            band = np.concatenate([np.stack([upper[:, 0], lid_y + 0.3 * (brow_y - lid_y)], 1),
                                   np.stack([upper[:, 0], lid_y + 0.6 * (brow_y - lid_y)], 1)[::-1]])
            cv2.fillPoly(mask, [np.rint(band).astype(np.int32)], 255)
        pixels = self.source.image[mask > 0]
        lid = np.median(pixels, axis=0).astype(np.float32) if len(pixels) else self._mean_colour([])
        return lid, lid * 0.35

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
        self._rings_in_ref = q_inv(self._rings3d)
        self._lids_in_ref = q_inv(self._mesh3d[np.concatenate([self._lid_upper, self._lid_lower])])
        self._reference_lid_gaps = np.maximum(_gaps(ref, self._lid_upper, self._lid_lower), 1e-3)
        self._reference_key = key

    def _motion(self, driving: np.ndarray, reference: np.ndarray) -> Similarity:
        self._bind_reference(reference)
        return Similarity.fit(self._ref_rigid, driving[list(RIGID)].astype(np.float64))

    def _moved(self, driving: np.ndarray, motion: Similarity) -> np.ndarray:
        d = driving[:MESH_POINTS].astype(np.float64)
        return self._q(d + motion.scale * self._shape_offset @ motion.rotation.T)

    def landmarks(self, driving: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """The source mesh (468, 3) moved as the driver moved from `reference` to `driving`."""
        return self._moved(driving, self._motion(driving, reference))

    # -- rendering ------------------------------------------------------------------------------
    def render(self, driving: np.ndarray, reference: np.ndarray, timings: Timings | None = None) -> np.ndarray:
        """Warp the source so its face follows `driving` (relative to `reference`)."""
        t0 = time.perf_counter()
        motion = self._motion(driving, reference)
        mesh = self._moved(driving, motion)
        v = self._vertices
        v[:MESH_POINTS] = mesh[:, :2]
        rings = self._q(motion(self._rings_in_ref))
        v[self._ring] = (self._rings3d + self._ring_weight * (rings - self._rings3d))[:, :2]
        closed = 1.0 - _gaps(driving, self._lid_upper, self._lid_lower) / self._reference_lid_gaps
        lid_edge, lid_open = self._slide_eyelids(v, self._q(motion(self._lids_in_ref))[:, :2], closed)
        mouth_open = self._split_mouth(v)
        t1 = time.perf_counter()
        self._rasterise(v)
        t2 = time.perf_counter()
        cv2.resize(self._coarse[:, 0].reshape(self.grid, self.grid), (self.size, self.size), dst=self._map_x)
        cv2.resize(self._coarse[:, 1].reshape(self.grid, self.grid), (self.size, self.size), dst=self._map_y)
        cv2.remap(self.source.image, self._map_x, self._map_y, cv2.INTER_LINEAR, dst=self.output,
                  borderMode=cv2.BORDER_REPLICATE)
        t3 = time.perf_counter()
        if lid_edge is not None:
            self._paint_eyelids(lid_open, lid_edge, mesh)
        if mouth_open > 0.02:
            self._paint_cavity(v, mouth_open)
        t4 = time.perf_counter()
        if timings is not None:
            for stage, ms in (("motion", t1 - t0), ("raster", t2 - t1), ("remap", t3 - t2), ("paint", t4 - t3)):
                timings.record(stage, ms * 1e3)
        return self.output

    def _slide_eyelids(self, v: np.ndarray, rigid: np.ndarray, closed: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Hold the warp's upper lids open and return where the painted lids must reach.

        `rigid` is where the lids would be had the head moved and the eyes not closed;
        `closed` is how far (0..1) each of the driver's lids closed against its reference.
        The closing part of each upper lid's motion is taken out of the warp (so the eye is
        not squashed) and painted over instead, as the same fraction of the portrait's own
        eye: a driver's blink shuts a cartoon's big eyes too. A lid that opens wider stays
        in the warp.
        """
        n = len(self._lid_upper)
        up_rigid, low_rigid = rigid[:n], rigid[n:]
        axis = low_rigid - up_rigid
        height = np.linalg.norm(axis, axis=1)
        axis /= np.maximum(height, 1e-6)[:, None]
        up = v[self._lid_upper]
        warp_closing = np.maximum(((up - up_rigid) * axis).sum(axis=1), 0.0)
        held_open = up - warp_closing[:, None] * axis
        v[self._lid_upper] = held_open
        closing = np.clip(closed, 0.0, 1.0) * height
        if closing.max() < 0.5:
            return None, held_open
        return held_open + closing[:, None] * axis, held_open

    def _paint_eyelids(self, held_open: np.ndarray, edge: np.ndarray, mesh: np.ndarray) -> None:
        half = len(held_open) // 2
        thickness = max(1, round(self.size / 256))
        for eye, corners in ((slice(0, half), (33, 133)), (slice(half, None), (263, 362))):
            a, b = mesh[corners[0], :2], mesh[corners[1], :2]
            # Reach a little above the held-open lid, over the source's own lash line.
            lid = np.concatenate([[a], held_open[eye] - [0, thickness], [b], edge[eye][::-1]])
            lash = np.concatenate([[a], edge[eye], [b]])
            self._paint(lid, self._lid_colour, 1.0, lash=lash)

    def _split_mouth(self, v: np.ndarray) -> float:
        """Place the lip midline: it rides the upper lip, never past the lower; returns how far
        (0..1) the mouth opened beyond the source's, the strength of its cavity."""
        upper, lower = v[self._lip_upper], v[self._lip_lower]
        gap = np.linalg.norm(lower - upper, axis=1)
        source_gap = 2 * np.linalg.norm(self._half_gap, axis=1)
        keep = np.clip(gap / np.maximum(source_gap, 1e-6), 0.0, 1.0)[:, None]
        v[self._mid] = upper + self._half_gap * keep
        width = np.linalg.norm(v[78] - v[308])
        return float(np.clip((gap.max() - source_gap.max()) / max(0.12 * width, 1.0), 0.0, 1.0))

    def _paint_cavity(self, v: np.ndarray, strength: float) -> None:
        cavity = np.concatenate([[v[78]], v[self._mid], [v[308]], v[self._lip_lower][::-1]])
        self._paint(cavity, self._cavity_colour, strength)

    def _paint(self, polygon: np.ndarray, colour: np.ndarray, strength: float, lash: np.ndarray | None = None) -> None:
        """Blend a soft-edged filled polygon (and a dark line along `lash`) into the output."""
        pad = 4
        x0, y0 = np.maximum(np.floor(polygon.min(axis=0)).astype(int) - pad, 0)
        x1, y1 = np.minimum(np.ceil(polygon.max(axis=0)).astype(int) + pad, self.size)
        if x1 <= x0 or y1 <= y0:
            return
        roi = self.output[y0:y1, x0:x1]
        layer = np.empty_like(roi, dtype=np.float32)
        layer[:] = colour
        mask = np.zeros(roi.shape[:2], np.float32)
        fixed = lambda p: np.rint((p - [x0, y0]) * 16).astype(np.int32)  # 4 fractional bits
        cv2.fillPoly(mask, [fixed(polygon)], 1.0, cv2.LINE_AA, 4)
        if lash is not None:
            cv2.polylines(layer, [fixed(lash)], False, self._lash_colour.tolist(), max(1, self.size // 256),
                          cv2.LINE_AA, 4)
            cv2.polylines(mask, [fixed(lash)], False, 1.0, max(1, self.size // 256), cv2.LINE_AA, 4)
        mask = cv2.GaussianBlur(mask, (3, 3), 0)[..., None] * strength
        roi[:] = (roi * (1 - mask) + layer * mask).astype(np.uint8)

    def _rasterise(self, vertices: np.ndarray) -> None:
        """Fill the coarse backward map: for each grid pixel, where in the source it comes from.

        Triangles are drawn by id into a grid-sized image (OpenCV fills ~1000 small convex
        polygons in about 3 ms), then each pixel applies its triangle's affine.
        """
        dst = vertices[self.triangles]  # (T, 3, 2) where the triangles are now
        src = self.src_vertices[self.triangles]  # (T, 3, 2) where they come from
        # Affine taking each moved triangle back to its source triangle: src = A @ [x, y, 1].
        e1, e2 = dst[:, 1] - dst[:, 0], dst[:, 2] - dst[:, 0]
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        det[np.abs(det) < 1e-6] = 1.0  # a collapsed triangle covers no pixel anyway
        inv = np.stack([np.stack([e2[:, 1], -e2[:, 0]], -1), np.stack([-e1[:, 1], e1[:, 0]], -1)], 1) / det[:, None, None]
        s1, s2 = src[:, 1] - src[:, 0], src[:, 2] - src[:, 0]
        linear = np.stack([s1, s2], -1) @ inv  # (T, 2, 2)
        a = self._affines[1:]
        a[:, :, :2] = linear
        a[:, :, 2] = src[:, 0] - (linear @ dst[:, 0, :, None])[..., 0]

        ids = self._ids
        ids.fill(0)
        points = np.rint(dst * (16 * self.grid / self.size)).astype(np.int32)  # 4 fractional bits
        for k, triangle in enumerate(points, start=1):
            cv2.fillConvexPoly(ids, triangle, k, cv2.LINE_8, 4)
        np.take(self._affines, ids.reshape(-1), axis=0, out=self._chosen)  # each pixel's affine
        np.einsum("nij,nj->ni", self._chosen, self._grid_xy1, out=self._coarse)


def _gaps(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances between paired points a[i], b[i] (x, y only)."""
    return np.linalg.norm(points[a, :2] - points[b, :2], axis=1)


def _lip_gap(mesh: np.ndarray) -> float:
    """Distance between the inner lips' midpoints, in pixels."""
    return float(np.linalg.norm(mesh[13, :2] - mesh[14, :2]))


class WarpEngine:
    """The Engine protocol over a Reenactor: one frame in, one frame out, no latency."""

    name = "warp"
    needs_driving_image = False
    waits_on_device = False

    def __init__(self, size: int = 512, grid: int | None = None):
        self.size = size
        self._grid = grid
        self._reenactor: Reenactor | None = None
        self._timings = Timings()

    @property
    def timings(self) -> Timings:
        return self._timings

    def prepare(self, sources: Sequence[SourcePortrait]) -> None:
        # The warp animates the first portrait; further references are for engines that
        # can blend appearance (the diffusion engine concatenates their features).
        check_sources(sources, self.size, self.name)
        source = sources[0]
        self._reenactor = Reenactor(source, self._grid)

    def step(self, frame: DrivingFrame) -> Rendered:
        if self._reenactor is None:
            raise EngineError("prepare() the engine with a source first")
        t0 = time.perf_counter()
        image = self._reenactor.render(frame.landmarks, frame.reference, self._timings)
        self._timings.record("engine", (time.perf_counter() - t0) * 1e3)
        self._timings.steps += 1
        return Rendered(image, frame.tag)

    def flush(self) -> list[Rendered]:
        return []

    def reset(self) -> None:
        pass  # no driving state: the Animator owns smoothing and the reference


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
