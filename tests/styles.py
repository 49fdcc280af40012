"""Portraits of other kinds, made in code: stylized versions of the bundled photos and a
flat-colour cartoon face, for tests that must hold on more than photographs."""

from __future__ import annotations

import cv2
import numpy as np


def posterized(image: np.ndarray, levels: int = 5) -> np.ndarray:
    """A poster: edge-preserving smoothing, then few colour levels per channel."""
    smooth = cv2.bilateralFilter(image, 9, 60, 9)
    step = 256 // levels
    return (smooth // step * step + step // 2).astype(np.uint8)


def inked(image: np.ndarray) -> np.ndarray:
    """A comic-book look: flattened colours (repeated bilateral filtering, posterized) with
    dark ink lines on the edges."""
    small = image
    for _ in range(3):
        small = cv2.bilateralFilter(small, 7, 40, 7)
    flat = posterized(small, 6)
    gray = cv2.medianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 5)
    edges = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 4)
    return (flat.astype(np.float32) * (edges[..., None] / 255.0) * 0.8 + flat * 0.2).astype(np.uint8)


def painted(image: np.ndarray) -> np.ndarray:
    """An oil-painting-like look: OpenCV's stylization filter (smoothed regions, soft edges)."""
    return cv2.stylization(image, sigma_s=40, sigma_r=0.35)


def cartoon_face(size: int = 512, skin=(236, 188, 150), hair=(70, 40, 25), backdrop=(90, 160, 210),
                 eye_scale: float = 1.0) -> np.ndarray:
    """A flat-colour cartoon head and shoulders on a plain backdrop (RGB uint8)."""
    s = size / 512
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = backdrop
    p = lambda x, y: (int(round(x * s)), int(round(y * s)))
    r = lambda a: int(round(a * s))
    aa = cv2.LINE_AA
    cv2.ellipse(img, p(256, 520), (r(190), r(110)), 0, 180, 360, (60, 90, 150), -1, aa)  # shoulders
    cv2.rectangle(img, p(220, 330), p(292, 430), tuple(int(c * 0.9) for c in skin), -1, aa)  # neck
    cv2.ellipse(img, p(256, 200), (r(128), r(140)), 0, 0, 360, hair, -1, aa)  # hair behind
    cv2.ellipse(img, p(256, 235), (r(105), r(130)), 0, 0, 360, skin, -1, aa)  # face
    cv2.ellipse(img, p(256, 150), (r(112), r(60)), 0, 180, 360, hair, -1, aa)  # fringe
    for x in (212, 300):
        cv2.ellipse(img, p(x, 222), (r(24 * eye_scale), r(14 * eye_scale)), 0, 0, 360, (250, 250, 250), -1, aa)
        cv2.circle(img, p(x, 222), r(10 * eye_scale), (80, 110, 60), -1, aa)
        cv2.circle(img, p(x, 222), r(5 * eye_scale), (15, 15, 15), -1, aa)
        cv2.circle(img, p(x + 3, 218), r(2.5 * eye_scale), (255, 255, 255), -1, aa)
        cv2.ellipse(img, p(x, 222), (r(25 * eye_scale), r(15 * eye_scale)), 0, 190, 350, (30, 20, 15), r(3), aa)
        cv2.ellipse(img, p(x, 190), (r(26), r(8)), 0, 190, 350, hair, r(5), aa)  # brows
    cv2.line(img, p(256, 235), p(248, 275), tuple(int(c * 0.75) for c in skin), r(3), aa)  # nose
    cv2.line(img, p(248, 275), p(260, 278), tuple(int(c * 0.75) for c in skin), r(3), aa)
    cv2.ellipse(img, p(256, 310), (r(34), r(9)), 0, 0, 180, (190, 80, 90), -1, aa)  # lower lip
    cv2.ellipse(img, p(256, 310), (r(34), r(6)), 0, 180, 360, (170, 70, 80), -1, aa)  # upper lip
    cv2.line(img, p(222, 310), p(290, 310), (110, 40, 50), r(2), aa)
    return img
