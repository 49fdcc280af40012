"""The face pipeline every engine and the streamer share.

mediapipe's face detector + 478-point face mesh (tracking in video mode), the head box,
the square portrait crop at an engine's resolution, the paper's driving-to-source
alignment (one translation + scale affine for a whole driving sequence, section 3.4), the
eye and mouth patches of the local control image, and a One-Euro filter against jitter.

Coordinates: landmarks are pixels of the image they belong to, as float32 (x, y, z), with z
on x's scale (mediapipe's convention: smaller z is nearer the camera).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading
import types
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

NUM_LANDMARKS = 478

# mediapipe face-mesh indices (see mediapipe's face_mesh_connections.py).
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
INNER_LIPS = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
RIGHT_IRIS_CENTER, LEFT_IRIS_CENTER = 468, 473
# Points that move with the skull and not with expressions: forehead, temples, nose bridge
# and tip, cheekbones, eye corners. Head pose is fitted on these alone.
RIGID = (10, 338, 297, 109, 67, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 234, 454, 127, 356,
         93, 323, 33, 133, 362, 263, 116, 345, 123, 352)
# Upper/lower eyelid points facing each other, corner to corner (outer to inner), and the
# inner lips likewise: how the warp tells an eye or the mouth closing from the head moving.
RIGHT_LID_PAIRS = ((246, 7), (161, 163), (160, 144), (159, 145), (158, 153), (157, 154), (173, 155))
LEFT_LID_PAIRS = ((466, 249), (388, 390), (387, 373), (386, 374), (385, 380), (384, 381), (398, 382))
LIP_PAIRS = ((191, 95), (80, 88), (81, 178), (82, 87), (13, 14), (312, 317), (311, 402), (310, 318), (415, 324))
RIGHT_BROW_LOWER, LEFT_BROW_LOWER = (46, 53, 52, 65, 55), (276, 283, 282, 295, 285)
# Eyelid midpoints (upper, lower) and mouth inner-lip midpoints (upper, lower), eye corners.
RIGHT_EYE_LIDS, LEFT_EYE_LIDS = (159, 145), (386, 374)
RIGHT_EYE_CORNERS, LEFT_EYE_CORNERS = (33, 133), (362, 263)
MOUTH_LIDS, MOUTH_CORNERS = (13, 14), (78, 308)

REDETECT_PASSES = 2  # extra mesh passes on a frame whose face was just detected (FaceTracker.detect)
MAX_SIDE = 2048  # larger images are downscaled before anything else (memory, mesh speed)


class NoFaceError(ValueError):
    """Raised where a face is required (a source portrait) and none is found."""


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


def head_box(landmarks: np.ndarray) -> Box:
    """The bounding box of the face mesh (forehead to chin, ear to ear)."""
    x0, y0 = landmarks[:, :2].min(axis=0)
    x1, y1 = landmarks[:, :2].max(axis=0)
    return Box(float(x0), float(y0), float(x1), float(y1))


def downscale(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    h, w = image.shape[:2]
    k = max_side / max(h, w)
    if k >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB, contiguous: what mediapipe and the engines take. Drops alpha, expands gray."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


_mute_lock = threading.Lock()
_mute_depth = 0
_mute_saved: int | None = None
# mediapipe says some things once per process (the XNNPACK delegate, absl's "before
# InitializeLog" banner, the landmark projection's NORM_RECT warning on the first face):
# calls stay muted until a face has gone through the mesh once.
_said_once = False


class _Deferred(types.ModuleType):
    """A module whose code runs at the first use of one of its names (importing it, or
    reading its __spec__ as the import system does, does not run it: importlib.util.LazyLoader
    runs the module at any attribute read, __spec__ included, so an `import` of it runs it)."""

    def __getattr__(self, name: str):
        with _deferred_lock:
            if type(self) is _Deferred:
                self.__class__ = types.ModuleType  # from here on an ordinary module, as during an import
                self.__spec__.loader.exec_module(self)
        return getattr(self, name)


_deferred_lock = threading.RLock()


def import_mediapipe():
    """mediapipe, imported without running matplotlib.pyplot. The package's __init__ imports
    its drawing helpers, which import pyplot at their top for a 3-D plot nothing here calls:
    ~0.9 s of the ~1.4 s import, paid by every command that finds a face (serve's and cam's
    start-up, animate, each worker). pyplot is imported as a _Deferred module instead: its
    code runs at the first use of it, wherever that is."""
    if "mediapipe" not in sys.modules and "matplotlib.pyplot" not in sys.modules:
        spec = importlib.util.find_spec("matplotlib.pyplot")  # (imports matplotlib itself: 0.3 s)
        if spec is not None and spec.loader is not None:
            pyplot = importlib.util.module_from_spec(spec)
            pyplot.__class__ = _Deferred
            sys.modules["matplotlib.pyplot"] = pyplot
            sys.modules["matplotlib"].pyplot = pyplot  # as an import binds it on its package
    import mediapipe

    return mediapipe


@contextlib.contextmanager
def _native_stderr_muted():
    """mediapipe's C++ side logs to file descriptor 2 (absl, which no environment variable
    quiets, and TFLite): "Feedback manager" and XNNPACK lines when a graph starts, a
    projection warning on its first face. A command's messages must not drown in them.

    Only graph start-up and the calls before the first face run under this (real failures
    raise in Python). File descriptor 2 belongs to the process, so concurrent callers
    share one redirection: the first in mutes, the last out restores."""
    global _mute_depth, _mute_saved
    with _mute_lock:
        if _mute_depth == 0:
            try:
                saved = os.dup(2)
            except OSError:
                saved = None
            if saved is not None:
                with open(os.devnull, "wb") as devnull:
                    os.dup2(devnull.fileno(), 2)
            _mute_saved = saved
        _mute_depth += 1
    try:
        yield
    finally:
        with _mute_lock:
            _mute_depth -= 1
            if _mute_depth == 0 and _mute_saved is not None:
                os.dup2(_mute_saved, 2)
                os.close(_mute_saved)
                _mute_saved = None


def _shared(rgb: np.ndarray) -> np.ndarray:
    """A read-only view of a C-contiguous frame: mediapipe then reads the frame's own pixels
    instead of copying them into its image (it copies every writable array: 0.1 ms a 640x480
    frame). The caller's array stays writable; mediapipe is done with it when process returns."""
    if not rgb.flags.c_contiguous or not rgb.flags.writeable:
        return rgb
    view = rgb.view()
    view.flags.writeable = False
    return view


# A NormalizedLandmarkList as mediapipe serializes the face mesh's: per landmark a record of
# 17 bytes, field 1 (length-delimited, 15 bytes) holding x, y, z (fields 1-3, fixed32 floats).
_RECORD = 17
_RECORD_KEYS = np.array([0x0A, 15, 0x0D, 0x15, 0x1D], np.uint8)
_KEYS_AT, _FLOATS_AT = np.array([0, 1, 2, 7, 12]), np.array([3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16])
_record_layout: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _layout(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the keys and the floats of `count` records lie in the bytes (made once per count)."""
    if count not in _record_layout:
        starts = np.arange(count)[:, None] * _RECORD
        _record_layout[count] = ((starts + _KEYS_AT).ravel(), np.tile(_RECORD_KEYS, count),
                                 (starts + _FLOATS_AT).ravel())
    return _record_layout[count]


def landmark_array(landmark_list) -> np.ndarray:
    """(N, 3) float32 x, y, z of a mediapipe NormalizedLandmarkList, as mediapipe gives them.

    Read from the list's wire bytes in two numpy gathers where every landmark is exactly x, y,
    z (the face mesh's, always): the same float32 values as reading each landmark's fields in
    Python, at a tenth of the cost (~40 against ~300-450 us for 478 points). Any other layout
    (a visibility or presence field, a coordinate left unset) is read field by field."""
    data = landmark_list.SerializeToString()
    count, rest = divmod(len(data), _RECORD)
    if count and not rest:
        keys_at, keys, floats_at = _layout(count)
        wire = np.frombuffer(data, np.uint8)
        if np.array_equal(wire[keys_at], keys):
            return wire[floats_at].view("<f4").reshape(count, 3)  # (a fresh array: the gather copies)
    return np.array([(p.x, p.y, p.z) for p in landmark_list.landmark], dtype=np.float32).reshape(-1, 3)


def _start_quietly(graph) -> None:
    """Start a mediapipe graph with one tiny blank frame (no face: it leaves no tracking
    state), so that its calculators open, and chatter, now and muted."""
    graph.process(np.zeros((32, 32, 3), np.uint8))


class FaceTracker:
    """mediapipe face mesh (478 points with irises) on RGB uint8 frames.

    video=True tracks from frame to frame (the detector runs only when tracking is lost),
    which is both faster and steadier; use one tracker per stream.

    The mesh's own detector is short-range: it finds faces that fill much of the frame.
    `find_faces` runs mediapipe's full-range detector over the image and smaller tiles of
    it, for portraits whose face is small or off-centre (`prepare_source` uses it).
    """

    def __init__(self, video: bool = True, min_confidence: float = 0.5):
        mp = import_mediapipe()  # heavy import: only where faces are needed

        self._min_confidence = min_confidence
        self._detector: FaceDetector | None = None
        self._video, self._tracking = video, False
        with _native_stderr_muted():
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=not video,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
            )
            _start_quietly(self._mesh)

    def detect(self, rgb: np.ndarray) -> np.ndarray | None:
        """(478, 3) float32 landmarks in pixels of `rgb`, or None when there is no face."""
        global _said_once
        h, w = rgb.shape[:2]
        frame = _shared(rgb)
        with contextlib.nullcontext() if _said_once else _native_stderr_muted():
            result = self._mesh.process(frame)
            if self._video and not self._tracking and result.multi_face_landmarks:
                # A face just (re)detected is meshed from the detector's box, which sits the mesh
                # ~1.5 degrees off in pitch against every later, tracked frame of the same still
                # face; meshing it once more from its own landmarks' box gives the tracked answer.
                for _ in range(REDETECT_PASSES):
                    result = self._mesh.process(frame)
        self._tracking = bool(result.multi_face_landmarks)
        if not result.multi_face_landmarks:
            return None
        _said_once = True
        out = landmark_array(result.multi_face_landmarks[0])
        out *= np.array([w, h, w], dtype=np.float32)
        return out

    def find_faces(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes found by the full-range detector, largest first (see FaceDetector)."""
        if self._detector is None:
            self._detector = FaceDetector(self._min_confidence)
        return self._detector.find(rgb)

    def close(self) -> None:
        self._mesh.close()
        if self._detector is not None:
            self._detector.close()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The full-range detector sees its input at 192x192 and finds faces from about a fifteenth
# of that side up; tiles down to DETECT_MIN_TILE px therefore find faces down to ~MIN_FACE.
DETECT_MIN_TILE = 480
MAX_FACES = 8  # candidates meshed in a group shot
MIN_FACE = 48  # px across, in the image as read (after the MAX_SIDE downscale)
NO_FACE_ADVICE = (f"use a portrait where one face is clearly visible, at least {MIN_FACE} px across, "
                  "seen from the front or three-quarters")


class FaceDetector:
    """mediapipe's full-range face detector over a whole image, then over overlapping square
    tiles of shrinking side (the short side, half of it, ... down to DETECT_MIN_TILE): the
    detector alone misses a 100 px face in a 1080p photo, as it sees it at 10 px. About 25
    detector runs (~0.2 s) for a 1080p photo, one for a 512 px portrait."""

    def __init__(self, min_confidence: float = 0.5):
        mp = import_mediapipe()

        self.min_confidence = min_confidence
        with _native_stderr_muted():
            self._graph = mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=min_confidence)
            _start_quietly(self._graph)

    def _boxes(self, rgb: np.ndarray, x0: int, y0: int) -> list[tuple[Box, float]]:
        h, w = rgb.shape[:2]
        found = []
        for d in self._graph.process(rgb).detections or ():
            r = d.location_data.relative_bounding_box
            box = Box(x0 + r.xmin * w, y0 + r.ymin * h, x0 + (r.xmin + r.width) * w, y0 + (r.ymin + r.height) * h)
            if box.width > 0 and box.height > 0:
                found.append((box, float(d.score[0])))
        return found

    def find(self, rgb: np.ndarray) -> list[Box]:
        """Boxes (about brows to chin) of the faces at every scale, largest first; the same face
        seen at several scales or in overlapping tiles counts once."""
        rgb = np.ascontiguousarray(rgb)
        h, w = rgb.shape[:2]
        found = self._boxes(rgb, 0, 0)
        side = min(h, w) if max(h, w) > min(h, w) else min(h, w) // 2
        while side >= DETECT_MIN_TILE:
            for y0 in _tile_starts(h, side):
                for x0 in _tile_starts(w, side):
                    found += self._boxes(np.ascontiguousarray(rgb[y0:y0 + side, x0:x0 + side]), x0, y0)
            side //= 2
        return _distinct(found)

    def close(self) -> None:
        self._graph.close()


def _tile_starts(length: int, side: int) -> list[int]:
    """Starts of tiles of `side` covering [0, length), overlapping by half a tile."""
    if side >= length:
        return [0]
    starts = list(range(0, length - side, side // 2))
    return starts + [length - side]


def _distinct(found: list[tuple[Box, float]]) -> list[Box]:
    """One box per face, largest first: a box whose centre lies in a kept box is the same face
    (seen again by an overlapping tile, or cut by a tile's edge)."""
    kept: list[Box] = []
    for box, _ in sorted(found, key=lambda f: -f[0].width * f[0].height):
        cx, cy = box.center
        if not any(k.x0 <= cx <= k.x1 and k.y0 <= cy <= k.y1 for k in kept):
            kept.append(box)
    return kept


def portrait_crop_affine(image_shape: tuple[int, ...], box: Box, size: int, zoom: float = 2.0) -> np.ndarray:
    """2x3 affine from image pixels to a size x size square centred on the head.

    The square is `zoom` head-box sides wide (room for hair and shoulders), raised a little
    because the mesh stops mid-forehead, and kept inside the image where the image allows.
    """
    h, w = image_shape[:2]
    side = min(zoom * max(box.width, box.height), w, h)
    cx, cy = box.center
    cy -= 0.1 * box.height
    x0 = min(max(cx - side / 2, 0.0), w - side)
    y0 = min(max(cy - side / 2, 0.0), h - side)
    k = size / side
    return np.array([[k, 0, -k * x0], [0, k, -k * y0]], dtype=np.float64)


def transform_landmarks(landmarks: np.ndarray, affine: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Apply a 2x3 affine to (x, y); z follows the mean scale, so it stays on x's scale."""
    if out is None:
        out = np.empty_like(landmarks)
    a = affine.astype(np.float32)
    np.matmul(landmarks[:, :2], a[:, :2].T, out=out[:, :2])
    out[:, :2] += a[:, 2]
    out[:, 2] = landmarks[:, 2] * math.sqrt(abs(np.linalg.det(affine[:, :2])))
    return out


def alignment_affine(source: Box, driving: Box, isotropic: bool = False) -> np.ndarray:
    """The paper's driving-to-source alignment: translation + scale taking the head box of
    the chosen driving frame onto the source's. Applied unchanged to every driving frame.

    The released code fits it on three box corners, which scales x and y separately; pass
    isotropic=True to keep the driving face's proportions instead.
    """
    sx = source.width / max(driving.width, 1e-6)
    sy = source.height / max(driving.height, 1e-6)
    if isotropic:
        sx = sy = math.sqrt(sx * sy)
    (scx, scy), (dcx, dcy) = source.center, driving.center
    return np.array([[sx, 0, scx - sx * dcx], [0, sy, scy - sy * dcy]], dtype=np.float64)


def best_reference_frame(source: np.ndarray, driving: Sequence[np.ndarray | None]) -> int:
    """Index of the driving frame whose landmarks, each normalised by its own head box, are
    closest (L1) to the source's: the released code's choice of alignment frame."""

    def normalised(lm: np.ndarray) -> np.ndarray:
        b = head_box(lm)
        return (lm[:, :2] - np.array(b.center)) / np.array([max(b.width, 1e-6), max(b.height, 1e-6)])

    target = normalised(source)
    best, best_index = math.inf, -1
    for i, lm in enumerate(driving):
        if lm is None:
            continue
        d = float(np.abs(normalised(lm) - target).sum())
        if d < best:
            best, best_index = d, i
    if best_index < 0:
        raise NoFaceError("no face found in any driving frame")
    return best_index


def _patch_weights() -> np.ndarray:
    """(3, NUM_LANDMARKS): row i averages the landmarks of patch i (right eye, left eye, mouth)."""
    weights = np.zeros((3, NUM_LANDMARKS))
    for row, ids in enumerate((RIGHT_EYE, LEFT_EYE, INNER_LIPS + OUTER_LIPS)):
        weights[row, list(ids)] = 1 / len(ids)
    return weights


# Built once: the live engine computes the boxes on every frame.
_PATCH_WEIGHTS = _patch_weights()


def local_patch_boxes(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(3, 4) int boxes x0, y0, x1, y1 around the right eye, left eye and mouth.

    As the released code: square patches of side size/4 (128 at 512), centres clipped to
    [size/8, 7*size/8] so every patch lies inside the frame.
    """
    half = size // 8
    centres = _PATCH_WEIGHTS @ landmarks[:, :2]  # each patch's landmark mean, one product
    centres = np.clip(np.rint(centres), half, size - half).astype(np.int64)
    return np.concatenate([centres - half, centres + half], axis=1)


def aperture(landmarks: np.ndarray, lids: tuple[int, int], corners: tuple[int, int]) -> float:
    """Opening of an eye or the mouth: lid-to-lid distance over corner-to-corner width."""
    gap = np.linalg.norm(landmarks[lids[0], :2] - landmarks[lids[1], :2])
    width = np.linalg.norm(landmarks[corners[0], :2] - landmarks[corners[1], :2])
    return float(gap / max(width, 1e-6))


def mouth_opening(landmarks: np.ndarray) -> float:
    return aperture(landmarks, MOUTH_LIDS, MOUTH_CORNERS)


def eye_opening(landmarks: np.ndarray) -> float:
    """Mean opening of both eyes (about 0.3 open, under 0.1 shut)."""
    return (aperture(landmarks, RIGHT_EYE_LIDS, RIGHT_EYE_CORNERS)
            + aperture(landmarks, LEFT_EYE_LIDS, LEFT_EYE_CORNERS)) / 2


def head_roll(landmarks: np.ndarray) -> float:
    """In-plane head rotation in degrees, from the line through the outer eye corners
    (positive: the head turns clockwise on screen)."""
    right, left = landmarks[33, :2], landmarks[263, :2]
    dx, dy = left - right
    return math.degrees(math.atan2(dy, dx))


class OneEuroFilter:
    """The One-Euro filter (Casiez et al., CHI 2012) on arrays: strong smoothing when the
    signal is still (kills mesh jitter), little lag when it moves fast.

    min_cutoff is in Hz, beta in 1/(units per second); with pixel landmarks the defaults
    smooth sub-pixel jitter away and let a quick head turn through.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.3, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Filter x (the array is not modified) at time t seconds; returns the filter's state."""
        if self._x is None or t <= self._t:
            if self._x is None or self._x.shape != x.shape:
                self._x, self._dx = x.astype(np.float32, copy=True), np.zeros_like(x, dtype=np.float32)
                self._t = t
                return self._x
            t = self._t + 1e-3  # repeated or out-of-order timestamps: treat as 1 ms apart
        dt = t - self._t
        self._t = t
        dx = (x - self._x) / dt
        self._dx += self._alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x += self._alpha(cutoff, dt) * (x - self._x)
        return self._x


def _mesh_around(image: np.ndarray, box: Box, tracker: FaceTracker, side: int = 384) -> np.ndarray | None:
    """The face mesh of the face in `box`, meshed in a square three boxes wide around it
    (where the mesh's short-range detector finds it), in `image` pixels; None if the mesh
    finds no face there or a different one (a neighbour in a group shot)."""
    span = 3.0 * max(box.width, box.height)
    cx, cy = box.center
    k = side / span
    affine = np.array([[k, 0, side / 2 - k * cx], [0, k, side / 2 - k * cy]])
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    region = cv2.warpAffine(image, affine, (side, side), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    landmarks = tracker.detect(region)
    if landmarks is None:
        return None
    landmarks = transform_landmarks(landmarks, cv2.invertAffineTransform(affine))
    mx, my = head_box(landmarks).center
    if not (box.x0 <= mx <= box.x1 and box.y0 <= my <= box.y1):
        return None
    return landmarks


def locate_face(image: np.ndarray, tracker: FaceTracker) -> tuple[np.ndarray, int]:
    """The face mesh of the largest face in an RGB image, in its pixels, and how many faces it
    shows. The full-range detector finds the candidates (small or off-centre faces too), each
    is meshed around its box (a detector's false alarm does not mesh, so it does not count);
    a close-up the detector misses is meshed whole. Raises NoFaceError, with advice."""
    meshed = [m for m in (_mesh_around(image, box, tracker) for box in tracker.find_faces(image)[:MAX_FACES])
              if m is not None]
    landmarks = meshed[0] if meshed else tracker.detect(image)
    if landmarks is None:
        raise NoFaceError(f"no face found in the source portrait: {NO_FACE_ADVICE}")
    return landmarks, max(1, len(meshed))


def prepare_source(image: np.ndarray, size: int, tracker: FaceTracker | None = None):
    """Crop a portrait to the engine's square and find its face mesh in the crop.

    The face is found first with the full-range detector (a small or off-centre face: a
    half-body photo, a group shot, a face in a corner of a large canvas), meshed around it,
    and the portrait cropped around that mesh. In a group shot the largest face is taken
    (`SourcePortrait.faces` says how many there were). Raises NoFaceError, with advice, when
    the portrait has no face. Huge images are downscaled first.
    """
    from .base import SourcePortrait

    image = downscale(as_rgb(image))
    own = tracker is None
    tracker = tracker or FaceTracker(video=False)
    try:
        landmarks, faces = locate_face(image, tracker)
        affine = portrait_crop_affine(image.shape, head_box(landmarks), size)
        interp = cv2.INTER_AREA if affine[0, 0] < 1 else cv2.INTER_CUBIC
        crop = cv2.warpAffine(image, affine, (size, size), flags=interp, borderMode=cv2.BORDER_REPLICATE)
        # Meshing the crop itself gives landmarks as precise as the engine's resolution allows.
        refined = tracker.detect(crop)
        landmarks = refined if refined is not None else transform_landmarks(landmarks, affine)
    finally:
        if own:
            tracker.close()
    return SourcePortrait(image=crop, landmarks=landmarks, faces=faces)
