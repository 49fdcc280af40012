"""How well an animation follows its driver, measured from the face mesh of both.

Our stand-in for the paper's Expression / Pose columns (ARKit blendshapes and ArcFace cannot
ship): every figure comes from mediapipe's face mesh on the driving frames and on the
rendered frames, time-aligned frame by frame, so it works for any engine.

Each face's curves are taken relative to its own reference frame (the frame that stands
for the portrait's own pose and expression), because driver and portrait are different
people: what must carry over is the *change*.

- head pose: yaw, pitch, roll (degrees) of the rigid points against the reference frame;
- mouth: inner-lip gap over mouth width (change);
- each eye: opening as a fraction of that face's own reference opening;
- brows: brow height over the eyes, in inter-ocular distances (change);
- smile: mouth-corner distance in inter-ocular distances (change);
- identity: the output's face shape (pose removed: a similarity fit) against the source's
  and the driver's, in face heights;
- jitter: frame-to-frame landmark motion of the output where the driver holds still;
- background: how much pixels outside the person matte change.

`compare` and the helpers are plain numpy on landmark arrays, for training validation to log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .face import FACE_OVAL, RIGID, head_box

FEATURES = ("yaw", "pitch", "roll", "mouth", "eye_right", "eye_left", "brows", "smile")
POSE = ("yaw", "pitch", "roll")
RIGHT_BROW, LEFT_BROW = (70, 63, 105, 66, 107), (300, 293, 334, 296, 336)
# Face shape for identity: oval, brows, nose, eye corners (no lips or lids: expressions).
SHAPE = tuple(FACE_OVAL) + RIGHT_BROW + LEFT_BROW + (1, 4, 5, 6, 168, 197, 195, 33, 133, 263, 362, 98, 327)
STILL_FRAMES = 8  # a driver still for this many frames in a row is a still stretch
STILL_MOTION = 0.005  # frame-to-frame RMS motion (face heights) under which a driver is still:
# mediapipe wobbles 0.0005-0.004 on a repeated frame; a head drifting 2 px a frame moves 0.012


def _fit(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity a -> b (Umeyama): scale, rotation, shift."""
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    a0, b0 = a - ma, b - mb
    u, d, vt = np.linalg.svd(b0.T @ a0 / len(a))
    flip = np.ones(a.shape[1])
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        flip[-1] = -1
    rotation = (u * flip) @ vt
    scale = float((d * flip).sum() / max((a0 ** 2).sum() / len(a), 1e-12))
    return scale, rotation, mb - scale * rotation @ ma


def head_pose(landmarks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of `landmarks` against `reference` (the same face),
    from the rigid points in 3-D. Yaw: turning to the image's right; pitch: nodding down;
    roll: clockwise on screen."""
    _s, r, _t = _fit(reference[list(RIGID)].astype(np.float64), landmarks[list(RIGID)].astype(np.float64))
    yaw = math.degrees(math.asin(float(np.clip(-r[2, 0], -1, 1))))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return np.array([-yaw, -pitch, roll])


def _dist(lm: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(lm[a, :2] - lm[b, :2]))


def expression(landmarks: np.ndarray) -> np.ndarray:
    """(mouth, eye_right, eye_left, brows, smile): raw measures of one face."""
    from .warp import eye_apertures, mouth_aperture  # same measures the warp engine is driven by

    ocular = max(_dist(landmarks, 33, 263), 1e-6)
    eyes = eye_apertures(landmarks)
    brows = 0.0
    for brow, lid in ((RIGHT_BROW, 159), (LEFT_BROW, 386)):
        brows += float(landmarks[lid, 1] - landmarks[list(brow), 1].mean()) / ocular / 2
    smile = _dist(landmarks, 61, 291) / ocular
    return np.array([mouth_aperture(landmarks), eyes[0], eyes[1], brows, smile])


def curves(landmarks: Sequence[np.ndarray | None], reference: int) -> np.ndarray:
    """(frames, 8) curves in FEATURES order, relative to frame `reference`: pose in degrees,
    eyes as fractions of the reference opening, the rest as changes. NaN where no face."""
    ref = landmarks[reference]
    if ref is None:
        raise ValueError(f"reference frame {reference} has no face")
    ref_expr = expression(ref)
    out = np.full((len(landmarks), len(FEATURES)), np.nan)
    for i, lm in enumerate(landmarks):
        if lm is None:
            continue
        e = expression(lm)
        rel = e - ref_expr
        rel[1:3] = e[1:3] / np.maximum(ref_expr[1:3], 1e-6)
        out[i, :3] = head_pose(lm, ref)
        out[i, 3:] = rel
    return out


def shape_distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance of face shape a from b after the best similarity (pose removed), in
    face heights of b."""
    idx = list(SHAPE)
    s, r, t = _fit(a[idx, :2].astype(np.float64), b[idx, :2].astype(np.float64))
    moved = s * a[idx, :2] @ r.T + t
    return float(np.sqrt(((moved - b[idx, :2]) ** 2).sum(axis=1).mean()) / max(head_box(b).height, 1e-6))


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) < 1e-9 or np.std(b) < 1e-9:
        return None  # undefined for a flat curve
    return float(np.corrcoef(a, b)[0, 1])


def still_stretches(landmarks: Sequence[np.ndarray | None]) -> np.ndarray:
    """(frames,) bool: frames inside runs of >= STILL_FRAMES where the face hardly moves."""
    n = len(landmarks)
    still = np.zeros(n, bool)
    for i in range(1, n):
        a, b = landmarks[i - 1], landmarks[i]
        if a is None or b is None:
            continue
        motion = np.sqrt(((a[:, :2] - b[:, :2]) ** 2).sum(axis=1).mean()) / max(head_box(b).height, 1e-6)
        still[i] = motion < STILL_MOTION
    out = np.zeros(n, bool)
    i = 0
    while i < n:
        if still[i]:
            j = i
            while j < n and still[j]:
                j += 1
            if j - i >= STILL_FRAMES:
                out[i:j] = True
            i = j
        else:
            i += 1
    return out


def jitter(landmarks: Sequence[np.ndarray | None], frames: np.ndarray) -> float | None:
    """Mean frame-to-frame RMS landmark motion (face heights) over the flagged frames."""
    moves = []
    for i in np.flatnonzero(frames):
        if i == 0 or landmarks[i] is None or landmarks[i - 1] is None:
            continue
        a, b = landmarks[i - 1], landmarks[i]
        moves.append(np.sqrt(((a[:, :2] - b[:, :2]) ** 2).sum(axis=1).mean()) / max(head_box(b).height, 1e-6))
    return float(np.mean(moves)) if moves else None


def background_mask(matte: np.ndarray, grow: float = 0.08) -> np.ndarray:
    """Pixels clearly outside the person: the matte grown by `grow` of the side, about as far
    as a head moves in a webcam clip (the head may cover what lies nearer)."""
    import cv2

    r = max(1, int(round(grow * max(matte.shape))))
    person = cv2.dilate((matte > 0.05).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    return person == 0


class BackgroundMeter:
    """Running background stillness: mean abs change (0-255) of pixels outside the person
    against the source portrait, and the share of them that changed by more than 8 levels."""

    def __init__(self, source: np.ndarray, mask: np.ndarray):
        self.source = source[mask].astype(np.int16)
        self.mask = mask
        self.diffs: list[float] = []
        self.changed: list[float] = []

    def add(self, frame: np.ndarray) -> None:
        if not self.mask.any():
            return
        d = np.abs(frame[self.mask].astype(np.int16) - self.source).max(axis=1)
        self.diffs.append(float(d.mean()))
        self.changed.append(float((d > 8).mean()))

    def report(self) -> dict:
        if not self.diffs:
            return {"pixels": int(self.mask.sum()), "mean_abs_diff": None, "max_abs_diff": None, "changed_share": None}
        return {"pixels": int(self.mask.sum()), "mean_abs_diff": float(np.mean(self.diffs)),
                "max_abs_diff": float(np.max(self.diffs)), "changed_share": float(np.mean(self.changed))}


@dataclass
class Comparison:
    """Driver and output curves (frames, 8) and the figures that compare them."""

    driver: np.ndarray
    output: np.ndarray
    report: dict = field(default_factory=dict)


def compare(driver: Sequence[np.ndarray | None], output: Sequence[np.ndarray | None], source: np.ndarray,
            reference: int) -> Comparison:
    """Compare time-aligned driver and output landmarks (one entry per frame, None: no face).

    `source`: the portrait's own landmarks; `reference`: the frame index standing for the
    portrait's pose and expression (what the engine was given as its reference). Errors are
    mean absolute differences of the relative curves; correlations are on the same curves.
    """
    if len(driver) != len(output):
        raise ValueError(f"{len(driver)} driver frames but {len(output)} output frames")
    if output[reference] is None:
        raise ValueError(f"the output has no face at the reference frame {reference}")
    d = curves(driver, reference)
    o = curves(output, reference)
    both = ~(np.isnan(d).any(axis=1) | np.isnan(o).any(axis=1))
    per_feature = {}
    for k, name in enumerate(FEATURES):
        a, b = d[both, k], o[both, k]
        per_feature[name] = {
            "mae": float(np.mean(np.abs(a - b))) if len(a) else None,
            "corr": _corr(a, b),
            "driver_range": float(np.ptp(a)) if len(a) else None,
            "output_range": float(np.ptp(b)) if len(b) else None,
        }
    shapes = [(shape_distance(out, source), shape_distance(out, drv))
              for out, drv in zip(output, driver) if out is not None and drv is not None]
    to_source, to_driver = (np.mean(shapes, axis=0) if shapes else (np.nan, np.nan))
    still = still_stretches(driver)
    report = {
        "frames": len(driver),
        "frames_compared": int(both.sum()),
        "output_frames_without_face": int(sum(o is None for o in output)),
        "reference_frame": reference,
        "pose_error_deg": {name: per_feature[name]["mae"] for name in POSE},
        "expression_error": {name: per_feature[name]["mae"] for name in FEATURES[3:]},
        "correlation": {name: per_feature[name]["corr"] for name in FEATURES},
        "features": per_feature,
        "identity": {"to_source": float(to_source), "to_driver": float(to_driver),
                     "source_share": float(to_source / max(to_source + to_driver, 1e-12))},
        "jitter": {"still_frames": int(still.sum()), "output": jitter(output, still), "driver": jitter(driver, still)},
    }
    return Comparison(d, o, report)


def plot(comparison: Comparison, path: str, fps: float = 25.0, title: str = "") -> None:
    """Driver against output curves, one panel per feature, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(comparison.driver)) / fps
    units = {"yaw": "deg", "pitch": "deg", "roll": "deg", "mouth": "gap / width (change)",
             "eye_right": "fraction of open", "eye_left": "fraction of open", "brows": "change", "smile": "change"}
    fig, axes = plt.subplots(4, 2, figsize=(12, 10), sharex=True)
    for ax, (k, name) in zip(axes.ravel(), enumerate(FEATURES)):
        ax.plot(t, comparison.driver[:, k], label="driver", color="tab:blue")
        ax.plot(t, comparison.output[:, k], label="output", color="tab:orange")
        f = comparison.report["features"][name]
        corr = "n/a" if f["corr"] is None else f"{f['corr']:.2f}"
        mae = "n/a" if f["mae"] is None else f"{f['mae']:.3g}"
        ax.set_title(f"{name}: error {mae}, corr {corr}", fontsize=10)
        ax.set_ylabel(units[name], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate(engine, sources: Sequence[np.ndarray], frames: Sequence[np.ndarray], fps: float = 25.0,
             reference: int | None = None, smoothing: bool = True) -> Comparison:
    """Animate `sources` with the RGB driving `frames` through any Engine (via the Animator,
    as `animate` does) and compare output with driver.

    The driver's face mesh is tracked first (the reference frame, when not given, is the one
    closest to the portrait, as `animate` picks it); outputs are matched to their driving
    frames by tag, so an engine that returns frames late is aligned all the same. Returns the
    Comparison, its report with a "background" entry added.
    """
    from .animator import Animator
    from .face import FaceTracker, NoFaceError, best_reference_frame
    from .matte import person_matte

    if not frames:
        raise ValueError("no driving frames")
    animator = Animator(engine, tracker=FaceTracker(video=True), smoothing=smoothing)
    try:
        animator.set_sources(list(sources))
        driver = [animator.tracker.detect(np.ascontiguousarray(f)) for f in frames]
        if all(d is None for d in driver):
            raise NoFaceError("no face found in any driving frame")
        if reference is None:
            reference = best_reference_frame(animator.sources[0].landmarks, driver)
        elif not 0 <= reference < len(frames) or driver[reference] is None:
            raise ValueError(f"reference frame {reference} is out of range or has no face")
        animator.set_reference(driver[reference])
        source = animator.sources[0]
        meter = BackgroundMeter(source.image, background_mask(person_matte(source.image, source.landmarks)))
        output: list[np.ndarray | None] = [None] * len(frames)
        seen = [False] * len(frames)
        with FaceTracker(video=False) as eye:  # each output frame read on its own: no tracker state carried
            def take(rendered) -> None:
                if rendered is None:
                    return
                i = rendered.tag
                seen[i] = True
                output[i] = eye.detect(np.ascontiguousarray(rendered.image))
                meter.add(rendered.image)

            for i, (frame, marks) in enumerate(zip(frames, driver)):
                take(animator.drive(frame, i / fps, tag=i, landmarks=marks))
            for rendered in animator.flush():
                take(rendered)
    finally:
        animator.close()
    if not all(seen):
        raise RuntimeError(f"the engine returned {sum(seen)} of {len(frames)} frames")
    if output[reference] is None:
        raise NoFaceError(f"no face found in the output at the reference frame {reference}")
    comparison = compare(driver, output, source.landmarks, reference)
    comparison.report["background"] = meter.report()
    return comparison
