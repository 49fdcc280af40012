"""The person matte and the background plate of a portrait, made once per source.

The matte says which pixels belong to the person (head, hair, shoulders) so that the warp
engine moves only those and leaves the background where it was; the plate is the portrait
with the person taken out and the hole filled from the surrounding background, which is what
shows where the moving head uncovers the scene behind it.

The matte is mediapipe's selfie segmentation (the general model, in the mediapipe wheel),
made certain over the face itself (the face mesh's hull): on a painting or a cartoon the
segmenter may be unsure of a face but never of where the mesh found one. The plate is filled
by a push-pull pyramid (each coarser level averages the known pixels under it; holes take the
coarser level's colour, feathered), which is smooth, fast (a few ms at 512²) and, unlike
cv2.inpaint, cost-independent of the hole's size. Only a band along the hole's edge is ever
uncovered by the moving head; there the fill is cv2.inpaint's (Telea's fast marching, from the
background's own pixels on one side and the smooth fill on the other), which carries edges
and stripes of the scene on into the hole instead of blurring them away. Both fills read the
background from a few pixels beyond the hole's edge, where the person's outline no longer
lingers (a fringe there would be drawn on into the band as a light or dark streak).
"""

from __future__ import annotations

import cv2
import numpy as np

from .face import FACE_OVAL, _native_stderr_muted, import_mediapipe


def segment_person(image: np.ndarray) -> np.ndarray:
    """mediapipe's selfie segmentation: (H, W) float32 in [0, 1], 1 on the person."""
    mp = import_mediapipe()

    with _native_stderr_muted():
        with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as segmenter:
            mask = segmenter.process(np.ascontiguousarray(image)).segmentation_mask
    if mask is None:
        return np.zeros(image.shape[:2], np.float32)
    return np.clip(mask.astype(np.float32), 0.0, 1.0)


def person_matte(image: np.ndarray, landmarks: np.ndarray, segmentation: np.ndarray | None = None) -> np.ndarray:
    """(H, W) float32 alpha of the person in `image` (RGB uint8, landmarks its face mesh).

    The segmenter's mask, cut at one half to a clean edge a pixel or two wide (its raw edge
    is a wide ramp that would let background ride along with the head), joined with the face
    mesh's oval (filled, antialiased): a face is always person."""
    seg = segment_person(image) if segmentation is None else segmentation.astype(np.float32)
    matte = (seg > 0.5).astype(np.uint8)
    # Grown by a pixel or two: the segmenter's edge runs a little inside hair and shoulders,
    # and a fringe left behind would stay on the background as a ghost of the outline.
    r = max(1, round(image.shape[0] / 256))
    matte = cv2.dilate(matte, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).astype(np.float32)
    face = np.zeros(image.shape[:2], np.uint8)
    oval = np.rint(landmarks[list(FACE_OVAL), :2] * 16).astype(np.int32)
    cv2.fillPoly(face, [oval], 255, cv2.LINE_AA, 4)
    matte = np.maximum(matte, face.astype(np.float32) / 255.0)
    # A hair-thin soft edge: antialiased at full resolution, never a hard step.
    return cv2.GaussianBlur(matte, (0, 0), max(0.6, image.shape[0] / 512))


def background_plate(image: np.ndarray, matte: np.ndarray, grow: float = 0.006, band: float = 0.07,
                     clean: float = 0.012) -> np.ndarray:
    """`image` with the person removed: where the matte is, the colour of the background
    around it (push-pull), filled from pixels beyond the matte grown by `grow` of the side
    (so hair fringes and the segmenter's halo are not smeared into the fill); within `band` of
    the side of the hole's edge (what a moving head uncovers) the fill is inpainted. Both fills
    read only pixels `clean` of the side beyond the hole. Pixels outside the matte are the
    portrait's own, unchanged."""
    h, w = matte.shape
    radius = max(1, int(round(grow * max(h, w))))
    hole = cv2.dilate((matte > 0.05).astype(np.uint8), cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    # Neither fill reads the pixels right at the hole's edge: there the person's outline
    # lingers (hair wisps, the segmenter's halo, a drawn outline's antialiasing), and each
    # would be drawn on into the fill as a light or dark streak. Both start `clean` of the
    # side beyond the hole (those pixels stay the portrait's own in the plate).
    margin = max(1, int(round(clean * max(h, w))))
    ring = cv2.dilate(hole, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
    known = (1 - ring).astype(np.float32)
    if known.sum() < 1:  # nothing but person: no background to fill from
        mean = image.reshape(-1, 3).mean(axis=0)
        return np.broadcast_to(mean.astype(np.uint8), image.shape).copy()
    # Push: premultiplied colour and weight, halved until one pixel.
    colour = image.astype(np.float32) * known[..., None]
    levels = [(colour, known)]
    while min(levels[-1][1].shape) > 1:
        c, k = levels[-1]
        levels.append((cv2.pyrDown(c), cv2.pyrDown(k)))
    # Pull: each level's holes take the coarser level's colour.
    c, k = levels[-1]
    filled = c / np.maximum(k, 1e-6)[..., None]
    for c, k in reversed(levels[:-1]):
        up = cv2.pyrUp(filled, dstsize=(k.shape[1], k.shape[0]))
        weight = np.clip(k * 4.0, 0.0, 1.0)[..., None]  # partly known: trust what is known
        filled = c / np.maximum(k, 1e-6)[..., None] * weight + up * (1 - weight)
    # The fill only where the person is: every pixel outside the matte stays the portrait's.
    keep = (matte <= 0.01)[..., None]
    plate = np.clip(np.rint(np.where(keep, image.astype(np.float32), filled)), 0, 255).astype(np.uint8)
    # The band along the hole's edge: inpainted from the background beyond the clean margin.
    width = band * max(h, w)
    edge = ((cv2.distanceTransform(hole, cv2.DIST_L2, 5) <= width) & (hole > 0)).astype(np.uint8)
    if width >= 1 and edge.any():
        painted = cv2.inpaint(plate, edge | (ring & (1 - hole)), max(3.0, width / 8), cv2.INPAINT_TELEA)
        plate = np.where(keep, plate, painted)
    return plate
