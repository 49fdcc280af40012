"""Retargeting, live: the user's controls over how much of the driver reaches the portrait.

Four controls, per session, changeable at any moment (`Retargeting`, validated once where it
is made):

  expression   0 the neutral face (the reference frame's) .. 1 as driven .. 2 exaggerated
  head_pose    0 a steady head (the reference pose) that still talks .. 1 as driven .. 2
  mouth_open   a gain on the lips' gap: 0 closed, 1 as driven, 2 twice as open
  eyes         "follow" passes blinks through; "open" keeps the eyes open

and "neutral = now", which is recalibration (`Animator.recalibrate`): the next frame becomes
the reference the controls measure from.

They are applied in landmark space, to the aligned driving mesh, before any engine sees it
(`Retargeter.apply`, called by `Animator.track`), so every engine obeys them. With M the
driver's head motion (a similarity fitted on rigid points, reference R -> driving D), the
driver's face in its reference head frame is L = M^-1(D), and

    D' = M^p( R + e (L - R) + mouth and eye edits )

where M^p is M raised to the power p (rotation angle, scale and shift times p, about the
reference head's centre). The warp engine takes D' directly. An engine that reads driving
*pixels* (the diffusion engine's motion ControlNet) gets the driving image re-posed to D'
by our reenactor F (`DrivingReposer`: engines.warp.Reenactor, the F the training pairs
use), from one aligned driving frame: the reference frame itself.

A change never jumps: each control moves towards its new value by at most 1/RAMP_FRAMES a
frame. While every control is at its neutral value the mesh and the image are left exactly
as they are (no work at all).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import numpy as np

from .options import OptionError, flag

RAMP_FRAMES = 8  # a control crosses 1.0 of its range in this many frames
EYE_MODES = ("follow", "open")
# Each control's range; the neutral value (nothing edited) is 1, or "follow".
RANGES = {"expression": (0.0, 2.0), "head_pose": (0.0, 2.0), "mouth_open": (0.0, 3.0)}
MESSAGE_TYPE = "retarget"  # the data channel message: {"type": "retarget", "head_pose": 0, ...}
EYE_RELAX = 0.004  # per frame: how fast the remembered open eye forgets a wider one


@dataclass(frozen=True)
class Retargeting:
    """The controls' values (see the module's docstring). Validated here, once: a broken
    rule raises OptionError naming the flag (`--head-pose`)."""

    expression: float = 1.0
    head_pose: float = 1.0
    mouth_open: float = 1.0
    eyes: str = "follow"

    def __post_init__(self):
        for name, (low, high) in RANGES.items():
            _check_number(getattr(self, name), name, low, high, flag(name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.eyes not in EYE_MODES:
            raise OptionError(f"--eyes must be one of {', '.join(EYE_MODES)}, got {self.eyes!r}")

    @property
    def neutral(self) -> bool:
        return self == NEUTRAL

    def as_dict(self) -> dict:
        return asdict(self)

    def updated(self, message: Mapping[str, Any]) -> "Retargeting":
        """These settings with the fields a data channel message gives (any of expression,
        head_pose, mouth_open, eyes; "type" is ignored). Raises ValueError with a message for
        the sender: an unknown field, a value that is not a number in its range."""
        if not isinstance(message, Mapping):
            raise ValueError("a retarget message is a JSON object")
        changes = {}
        for name, value in message.items():
            if name == "type":
                continue
            if name in RANGES:
                low, high = RANGES[name]
                _check_number(value, name, low, high, name)
            elif name == "eyes":
                if value not in EYE_MODES:
                    raise ValueError(f"eyes must be one of {', '.join(map(repr, EYE_MODES))}, got {value!r:.40}")
            else:
                raise ValueError(f"unknown retarget field {str(name)!r:.40}: the fields are "
                                 f"{', '.join([*RANGES, 'eyes'])}")
            changes[name] = value
        return replace(self, **changes)


def _check_number(value, name: str, low: float, high: float, spelling: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(min(max(value, -1e300), 1e300)):  # clamped: a huge int is no float
        raise OptionError(f"{spelling} must be a number in [{low:g}, {high:g}], got {value!r:.40}")
    if not low <= value <= high:
        raise OptionError(f"{spelling} must be in [{low:g}, {high:g}], got {value!r:.40}")


NEUTRAL = Retargeting()


# -- the editor ----------------------------------------------------------------------------------
class Retargeter:
    """Applies a Retargeting to each aligned driving mesh, ramping every change.

    `settings` may be replaced from any thread at any moment (one reference assignment: the
    frame being edited finishes with the values it started with). `apply` runs on the one
    thread that tracks frames. `reset` forgets what was learnt about the reference (call it
    with every recalibration)."""

    def __init__(self, settings: Retargeting = NEUTRAL, ramp_frames: int = RAMP_FRAMES):
        if ramp_frames < 1:
            raise ValueError("ramp_frames must be at least 1")
        self.settings = settings
        self._step = 1.0 / ramp_frames
        # The values being applied (_values' order), each on its way to the settings' value.
        self._current = _values(settings)
        self._aimed_at, self._target, self._settled = settings, _values(settings), True
        self._neutral = settings.neutral
        self._reference_key: int | None = None

    @property
    def current(self) -> dict:
        """The values applied to the last frame (they trail `settings` while ramping)."""
        e, p, g, eyes, engaged = self._current.tolist()
        return {"expression": e, "head_pose": p, "mouth_open": g, "eyes_open": eyes, "engaged": engaged}

    @property
    def engaged(self) -> float:
        """0 while nothing is edited, 1 once the controls are in use: how much of an edited
        driving image replaces the camera's own (a cross-fade, so that never jumps either)."""
        return float(self._current[4])

    def reset(self) -> None:
        self._reference_key = None

    def _ramp(self) -> bool:
        """Move the applied values one frame towards the settings; False when all are neutral
        (settled there: a frame then costs two comparisons)."""
        settings = self.settings
        if settings is not self._aimed_at:
            self._aimed_at, self._target, self._settled = settings, _values(settings), False
            self._neutral = settings.neutral
        if not self._settled:
            c = self._current
            c += np.clip(self._target - c, -self._step, self._step)
            self._settled = bool((c == self._target).all())
        return not (self._settled and self._neutral)

    def apply(self, driving: np.ndarray, reference: np.ndarray) -> bool:
        """Edit `driving` (478, 3), aligned like `reference`, in place. Returns False, and
        leaves it untouched, while every control is neutral."""
        if not self._ramp():
            return False
        from .warp import Similarity

        if self._reference_key != id(reference):
            self._bind(reference)
        expression, pose, gain, eyes_open, _ = self._current.tolist()
        ref = self._ref
        d = driving.astype(np.float64)
        motion = Similarity.fit(self._ref_rigid, d[self._rigid])
        face = motion.inverse()(d)  # the driver's face in its reference head frame
        self._remember_open_eyes(face)
        if expression != 1.0:
            face = ref + expression * (face - ref)
        if gain != 1.0:
            # The jaw moves with the gap at the middle of the mouth; each inner point of the lower
            # lip with its own pair's gap, so the lips close without crossing.
            gaps = face[self._lips_lower, :2] - face[self._lips_upper, :2]
            face[:, :2] += (gain - 1.0) * self._jaw_weight[:, None] * (face[14, :2] - face[13, :2])
            face[self._lips_lower, :2] = face[self._lips_upper, :2] + gain * gaps
        if eyes_open > 0.0:
            for k, eye in enumerate(self._eyes):
                corners = face[self._corners[k]].mean(axis=0)
                face[eye] += eyes_open * (self._open_eyes[k] + corners - face[eye])
        driving[:] = _partial(motion, pose, self._centre)(face)
        return True

    def _bind(self, reference: np.ndarray) -> None:
        from .face import LEFT_EYE, LEFT_EYE_CORNERS, LIP_PAIRS, RIGHT_EYE, RIGHT_EYE_CORNERS, RIGID

        ref = reference.astype(np.float64)
        self._ref = ref
        self._rigid = list(RIGID)
        self._ref_rigid = ref[self._rigid]
        self._centre = self._ref_rigid.mean(axis=0)
        self._jaw_weight = jaw_weights(ref)
        self._lips_upper, self._lips_lower = [a for a, _ in LIP_PAIRS], [b for _, b in LIP_PAIRS]
        self._eyes = (list(RIGHT_EYE), list(LEFT_EYE))
        self._corners = (list(RIGHT_EYE_CORNERS), list(LEFT_EYE_CORNERS))
        self._open_eyes = [None, None]
        self._open_aperture = np.zeros(2)
        self._remember_open_eyes(ref)
        self._reference_key = id(reference)

    def _remember_open_eyes(self, face: np.ndarray) -> None:
        """Keep each eye's widest shape seen since the reference (relative to its corners),
        forgetting slowly, so "open" is the driver's own open eye and not a surprised one."""
        from .warp import eye_apertures

        self._open_aperture *= 1.0 - EYE_RELAX
        for k, aperture in enumerate(eye_apertures(face)):
            if aperture >= self._open_aperture[k]:
                eye = face[self._eyes[k]]
                self._open_eyes[k] = eye - face[self._corners[k]].mean(axis=0)
                self._open_aperture[k] = aperture


def _values(settings: Retargeting) -> np.ndarray:
    """expression, head pose, mouth gain, eyes held open (0..1), re-posing engaged (0..1)."""
    return np.array([settings.expression, settings.head_pose, settings.mouth_open,
                     float(settings.eyes == "open"), float(not settings.neutral)])


def _partial(motion, amount: float, centre: np.ndarray):
    """The similarity `motion` raised to the power `amount` (0: none, 1: all of it), about
    `centre`: the rotation's angle, the log of the scale and the centre's shift, each scaled."""
    from scipy.spatial.transform import Rotation

    from .warp import Similarity

    if amount == 1.0:
        return motion
    rotation = Rotation.from_rotvec(Rotation.from_matrix(motion.rotation).as_rotvec() * amount).as_matrix()
    scale = motion.scale ** amount
    moved = centre + amount * (motion(centre[None])[0] - centre)
    return Similarity(scale, rotation, moved - scale * rotation @ centre)


def jaw_weights(mesh: np.ndarray) -> np.ndarray:
    """(478,) how much of the mouth's opening each point of `mesh` takes: the lower lip, all
    of it between the corners, fully at its middle and tapering to nothing at the corners; the
    chin and jaw below it; nothing above the lips' parting line."""
    from .face import LIP_PAIRS

    left, right = mesh[78, :2], mesh[308, :2]
    half = max(float(np.linalg.norm(right - left)) / 2, 1.0)
    x_hat = (right - left) / (2 * half)
    down_hat = np.array([-x_hat[1], x_hat[0]])
    parting = (mesh[13, :2] + mesh[14, :2]) / 2
    down = (mesh[:, :2] - parting) @ down_hat
    across = (mesh[:, :2] - (left + right) / 2) @ x_hat / half
    chin = max(float((mesh[152, :2] - parting) @ down_hat), 1.0)
    ramp = np.clip(down / (0.15 * chin), 0.0, 1.0)
    jaw = ramp * ramp * (3 - 2 * ramp) * np.exp(-0.5 * (np.maximum(np.abs(across) - 0.8, 0) / 0.9) ** 2)
    lens = np.clip(1 - np.minimum(np.abs(across), 1) ** 2, 0, 1) ** 0.8
    lip = (down > 0) & (np.abs(across) < 1)  # the lower lip's body moves as one with its edges
    weights = np.where(lip, np.maximum(lens, jaw), jaw)
    weights[[61, 291, 78, 308]] = 0.0
    weights[[a for a, _ in LIP_PAIRS]] = 0.0
    weights[468:] = 0.0  # the irises
    return weights


# -- the driving image, re-posed --------------------------------------------------------------------
class DrivingReposer:
    """Re-poses the driving image to edited landmarks with F (engines.warp.Reenactor), for an
    engine that reads driving pixels: one aligned driving frame (the first with a face after
    the reference was set: live, the reference frame itself) with its own mesh, reenacted
    absolutely, with that mesh as F's reference, so F's mesh is the edited mesh. Made once
    per reference; F itself (its matte, triangulation) only on the first edited frame, so
    sessions that never edit pay one copy of a frame per recalibration."""

    def __init__(self, image: np.ndarray, landmarks: np.ndarray):
        self.image = image.copy()  # the caller's buffers are the next frames'
        self.landmarks = landmarks.copy()
        self._reenactor = None

    def render(self, landmarks: np.ndarray, camera: np.ndarray, engaged: float, out: np.ndarray) -> np.ndarray:
        """That frame re-posed to `landmarks`, cross-faded over the `camera`'s own
        image by `engaged` (1: all re-posed), into `out`."""
        import cv2

        from .base import SourcePortrait
        from .warp import Reenactor

        if self._reenactor is None:
            self._reenactor = Reenactor(SourcePortrait(self.image, self.landmarks))
        posed = self._reenactor.render(landmarks, self.landmarks)
        if engaged >= 1.0:
            np.copyto(out, posed)
        else:
            cv2.addWeighted(posed, engaged, camera, 1.0 - engaged, 0.0, dst=out)
        return out
