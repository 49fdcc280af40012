"""Training samples: the paper's cross-identity control images (sections 3.2-3.4).

For a clip of one identity: the appearance reference I_S and the target(s) I_D are frames
of that clip; I_S' is a frame of a clip of *another* identity. The control image is
I_C = F(I_S' -> I_D): I_S' reenacted with I_D's pose and expression by F, our weight-free
reenactor (engines.warp: the paper's F is Face Vid2Vid). So C sees I_D's motion on another
face and cannot copy I_D's identity from it.

F here is `engines.warp.Reenactor`, the renderer `engines.warp.reenact` runs, fed with the
face meshes prepare-data stored (reenact would mesh both images again: 2 mediapipe runs a
sample). As in reenact without a reference, the driving mesh is transferred as it is (an
absolute reenactment, which leaks I_D's face shape into I_C, as the paper says Face Vid2Vid
does: the scaling below is its remedy). I_S' is first aligned onto the clip's framing (the
paper's box alignment, here from I_S' to the clip's first frame) so that I_C is framed as I_D.

The local control image I_C^l keeps I_C's eye and mouth patches only, at the boxes the
engine uses (engines.face.local_patch_boxes, on I_C's landmarks), black elsewhere: exactly
what the live engine's `control_hints` builds from a driving frame.

Random heterogeneous scaling (3.4): I_C and I_C^l are scaled by (sx, sy), each drawn in
[0.9, 1.1], about the face centre, one draw per sample (per clip in the temporal stages, so
the distortion holds over time), the same warp for both images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...base import SourcePortrait
from ...face import alignment_affine, head_box, local_patch_boxes, transform_landmarks
from ...warp import Reenactor

SCALE_RANGE = (0.9, 1.1)


@dataclass(frozen=True)
class Control:
    """One driving frame's control images, uint8 RGB (S, S, 3), and how they were made."""

    image: np.ndarray  # I_C
    local: np.ndarray  # I_C^l: the eye and mouth patches of I_C, black elsewhere
    landmarks: np.ndarray  # I_C's face mesh (the driving mesh), after scaling
    scale: tuple[float, float]  # (sx, sy)


def local_image(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The eye and mouth patches of `image` (engines.face.local_patch_boxes), black elsewhere."""
    size = image.shape[0]
    out = np.zeros_like(image)
    for x0, y0, x1, y1 in local_patch_boxes(landmarks, size):
        out[y0:y1, x0:x1] = image[y0:y1, x0:x1]
    return out


def scaling_affine(sx: float, sy: float, centre: tuple[float, float]) -> np.ndarray:
    cx, cy = centre
    return np.array([[sx, 0, cx - sx * cx], [0, sy, cy - sy * cy]], dtype=np.float64)


def draw_scale(rng: np.random.Generator, enabled: bool = True) -> tuple[float, float]:
    if not enabled:
        return 1.0, 1.0
    lo, hi = SCALE_RANGE
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


class CrossIdentityControl:
    """F(I_S' -> I_D) for one other-identity frame I_S', rigged once for many driving frames
    (the temporal stages drive one I_S' over a whole clip)."""

    def __init__(self, other: np.ndarray, other_landmarks: np.ndarray, clip_reference: np.ndarray):
        size = other.shape[0]
        # The paper's alignment, this way round: I_S' onto the clip's framing.
        affine = alignment_affine(head_box(clip_reference), head_box(other_landmarks))
        aligned = cv2.warpAffine(other, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self.portrait = SourcePortrait(image=aligned, landmarks=transform_landmarks(other_landmarks, affine))
        self.reenactor = Reenactor(self.portrait)
        self.size = size

    def __call__(self, driving_landmarks: np.ndarray, scale: tuple[float, float]) -> Control:
        image = self.reenactor.render(driving_landmarks, self.portrait.landmarks).copy()
        return controls_of(image, driving_landmarks, scale)


def controls_of(image: np.ndarray, landmarks: np.ndarray, scale: tuple[float, float]) -> Control:
    """I_C^l from I_C (the patches at I_C's landmarks), then one scaling warp for both."""
    local = local_image(image, landmarks)
    if scale == (1.0, 1.0):
        return Control(image, local, landmarks, scale)
    warp = scaling_affine(*scale, head_box(landmarks).center)
    s = image.shape[0]
    image = cv2.warpAffine(image, warp, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    local = cv2.warpAffine(local, warp, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return Control(image, local, transform_landmarks(landmarks, warp), scale)
