"""The training set: talking-head videos cut into clips, each at one fixed crop.

On disk (one folder, `prepare` writes it, `ClipSet` reads it):

    DIR/index.jsonl          one line per clip: {"id", "identity", "frames", "size", "format",
                             "video", "start", "fps"}; the set's clips in order
    DIR/clips/<id>/frames/000000.jpg ...   (format "jpeg", the default: ~50 KB a 512² frame)
    DIR/clips/<id>/frames.npy              (format "npy": one uint8 (T, S, S, 3) array,
                                            memory-mapped, no decoding: ~0.8 MB a frame)
    DIR/clips/<id>/landmarks.npy           (T, 478, 3) float32 face mesh in crop pixels
    DIR/summary.json         what was kept and what was skipped, and why

Every frame of every clip is one file read (or one slice of a memory map) away, so a
DataLoader with many workers reads at random without an index scan; the index is a few
hundred bytes a clip (tens of thousands of clips: a few MB, read once per worker).

How videos become clips (paper 4.1: FOMM's preprocessing with a box enlarged to the
shoulders): the face mesh is tracked on every frame; a clip ends at a cut (the picture
changes at once), where the face is lost, or where the head leaves the region of the
clip's first box (IoU below `min_iou`), and is split at `max_frames`. Each clip gets one
crop for all its frames: the union of its head boxes, `zoom` times as large (shoulders and
hair in), square, at `size`². Clips shorter than `min_frames` are skipped, with the reason.

Identities: each clip is its own identity (the cross-identity control images take their
other identity from another clip), unless `identity="video"` (all clips of a video are one
person) or `identity="folder"` (the video's parent folder names the person).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from ...face import FaceTracker, head_box, portrait_crop_affine, transform_landmarks, Box
from ...options import SIZE_RULE, valid_size

FORMATS = ("jpeg", "npy")
IDENTITIES = ("clip", "video", "folder")
INDEX, SUMMARY = "index.jsonl", "summary.json"


class DataError(ValueError):
    """A data folder or video that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PrepareOptions:
    size: int = 512
    zoom: float = 2.0  # crop side / head-box side: the face with hair and shoulders
    min_frames: int = 16  # the temporal stage trains on 16-frame clips
    max_frames: int = 300
    min_iou: float = 0.5  # head box against the clip's first: below it the clip ends
    cut_threshold: float = 40.0  # mean absolute grey difference (0-255) that marks a cut
    format: str = "jpeg"
    quality: int = 95
    identity: str = "clip"

    def __post_init__(self) -> None:
        if not valid_size(self.size):
            raise DataError(f"--size must be {SIZE_RULE}, got {self.size}")
        if not self.zoom >= 1.0:
            raise DataError(f"--zoom must be at least 1, got {self.zoom}")
        if self.min_frames < 2:
            raise DataError(f"--min-frames must be at least 2 (a pair needs two frames), got {self.min_frames}")
        if self.max_frames < self.min_frames:
            raise DataError(f"--max-frames ({self.max_frames}) is below --min-frames ({self.min_frames})")
        if not 0.0 <= self.min_iou < 1.0:
            raise DataError(f"--min-iou must be in [0, 1), got {self.min_iou}")
        if self.format not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise DataError(f"--quality must be in [1, 100], got {self.quality}")
        if self.identity not in IDENTITIES:
            raise DataError(f"--identity must be one of {', '.join(IDENTITIES)}, got {self.identity!r}")


@dataclass(frozen=True)
class ClipInfo:
    id: str
    identity: str
    frames: int
    size: int
    format: str
    video: str
    start: int  # first frame's index in the video
    fps: float


@dataclass
class Summary:
    kept: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"video", "frames" [start, end) or None, "reason"}

    def skip(self, video: str, reason: str, frames: tuple[int, int] | None = None) -> None:
        self.skipped.append({"video": video, "frames": list(frames) if frames else None, "reason": reason})

    def text(self) -> str:
        frames = sum(c["frames"] for c in self.kept)
        lines = [f"kept {len(self.kept)} clip(s), {frames} frames, "
                 f"{len({c['identity'] for c in self.kept})} identit{'y' if len({c['identity'] for c in self.kept}) == 1 else 'ies'}"]
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} part(s): " + ", ".join(f"{n} {r}" for r, n in reasons.items()))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Video -> segments
# ---------------------------------------------------------------------------------------------

def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = w * h
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)


@dataclass
class _Track:
    """Pass 1 over a video: per frame the landmarks (or None) and whether a cut precedes it."""

    landmarks: list[np.ndarray | None]
    cuts: list[bool]
    shape: tuple[int, int]
    fps: float


def _track(path: str, cut_threshold: float, progress) -> _Track:
    from streamer.video import probe, read_frames

    info = probe(path)
    landmarks: list[np.ndarray | None] = []
    cuts: list[bool] = []
    previous = None
    shape = (info.height, info.width)
    with FaceTracker(video=True) as tracker:
        for frame in read_frames(path):
            grey = _grey(frame.image)
            cuts.append(previous is not None and float(np.abs(grey - previous).mean()) > cut_threshold)
            previous = grey
            landmarks.append(tracker.detect(frame.image))
            shape = frame.image.shape[:2]
            progress(1)
    return _Track(landmarks, cuts, shape, float(info.fps))


def segments(track: _Track, options: PrepareOptions) -> tuple[list[tuple[int, int]], list[tuple[tuple[int, int], str]]]:
    """Frame ranges [start, end) that make clips, and the ranges left out with their reason."""
    kept: list[tuple[int, int]] = []
    dropped: list[tuple[tuple[int, int], str]] = []
    n = len(track.landmarks)
    i = 0
    while i < n:
        if track.landmarks[i] is None:
            j = i
            while j < n and track.landmarks[j] is None:
                j += 1
            dropped.append(((i, j), "no face"))
            i = j
            continue
        first = head_box(track.landmarks[i])
        j = i + 1
        while (j < n and j - i < options.max_frames and track.landmarks[j] is not None and not track.cuts[j]
               and _iou(first, head_box(track.landmarks[j])) >= options.min_iou):
            j += 1
        if j - i >= options.min_frames:
            kept.append((i, j))
        else:
            why = ("cut" if j < n and track.cuts[j] else "face lost" if j < n and track.landmarks[j] is None
                   else "head moved" if j < n else "video ended")
            dropped.append(((i, j), f"too short: {j - i} frames < --min-frames {options.min_frames} ({why})"))
        i = j
    return kept, dropped


def clip_affine(landmarks: Sequence[np.ndarray], shape: tuple[int, int], options: PrepareOptions) -> np.ndarray:
    """One crop for a whole clip: the union of its head boxes, `zoom` times as large."""
    boxes = [head_box(lm) for lm in landmarks]
    union = Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))
    return portrait_crop_affine(shape, union, options.size, options.zoom)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

def _identity(video: Path, clip_id: str, options: PrepareOptions) -> str:
    if options.identity == "folder":
        return video.parent.name or video.stem
    if options.identity == "video":
        return video.stem
    return clip_id


def _write_clip(folder: Path, frames: list[np.ndarray], landmarks: np.ndarray, options: PrepareOptions) -> None:
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    if options.format == "npy":
        np.save(partial / "frames.npy", np.stack(frames))
    else:
        (partial / "frames").mkdir()
        for i, frame in enumerate(frames):
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, options.quality])
            if not ok:
                raise DataError(f"cannot encode frame {i} of {folder.name} as JPEG")
            (partial / "frames" / f"{i:06d}.jpg").write_bytes(data.tobytes())
    np.save(partial / "landmarks.npy", landmarks.astype(np.float32))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)


def prepare(videos: Iterable[str | Path], out: str | Path, options: PrepareOptions = PrepareOptions(),
            progress: bool = True) -> Summary:
    """Videos -> a training set in `out` (see the module docstring). Returns the summary
    (also written to out/summary.json). Raises DataError when no clip could be made."""
    from tqdm import tqdm

    from streamer.video import VideoError, probe, read_frames

    paths = [Path(v) for v in videos]
    if not paths:
        raise DataError("no videos given")
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    summary = Summary()
    infos: list[ClipInfo] = []
    total = 0
    readable = []
    for path in paths:
        try:
            total += probe(path).frames
            readable.append(path)
        except (VideoError, OSError) as e:
            summary.skip(str(path), f"unreadable: {e}")
    bar = tqdm(total=2 * total, unit="frame", desc="prepare-data", disable=not progress)
    for v, path in enumerate(readable):
        try:
            track = _track(str(path), options.cut_threshold, bar.update)
        except (VideoError, OSError) as e:
            summary.skip(str(path), f"unreadable: {e}")
            continue
        kept, dropped = segments(track, options)
        for frames, reason in dropped:
            summary.skip(str(path), reason, frames)
        if not kept:
            bar.update(len(track.landmarks))
            continue
        affines = [clip_affine(track.landmarks[a:b], track.shape, options) for a, b in kept]
        current: list[np.ndarray] = []
        which = 0
        s = options.size
        for frame in read_frames(path):  # pass 2: crop the kept frames
            bar.update(1)
            while which < len(kept) and frame.index >= kept[which][1]:
                which += 1
            if which >= len(kept):
                break
            a, b = kept[which]
            if frame.index < a:
                continue
            affine = affines[which]
            interp = cv2.INTER_AREA if affine[0, 0] < 1 else cv2.INTER_CUBIC
            current.append(cv2.warpAffine(frame.image, affine, (s, s), flags=interp, borderMode=cv2.BORDER_REPLICATE))
            if frame.index == b - 1:
                clip_id = f"{path.stem}-{v:04d}-{a:06d}"
                lms = np.stack([transform_landmarks(lm, affine) for lm in track.landmarks[a:b]])
                _write_clip(out / "clips" / clip_id, current, lms, options)
                info = ClipInfo(clip_id, _identity(path, clip_id, options), b - a, s, options.format, str(path), a,
                                track.fps)
                infos.append(info)
                summary.kept.append(asdict(info))
                current = []
    bar.close()
    _write_text(out / INDEX, "".join(json.dumps(asdict(i)) + "\n" for i in infos))
    _write_text(out / SUMMARY, json.dumps(asdict(summary), indent=1))
    if not infos:
        reasons = "; ".join(sorted({s["reason"].split(" (")[0] for s in summary.skipped})) or "no frames"
        raise DataError(f"no clip could be made from {len(paths)} video(s): {reasons} (see {out / SUMMARY})")
    return summary


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# Reading: random access to any frame of any clip
# ---------------------------------------------------------------------------------------------

class ClipSet:
    """A prepared training set. `frame(c, i)` is clip c's i-th frame (uint8 (S, S, 3) RGB),
    `landmarks(c)` its mesh (T, 478, 3); cheap to pickle (DataLoader workers open files lazily)."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such data folder (make one with `xportrait prepare-data VIDEOS --out {root}`)")
        index = root / INDEX
        if not index.is_file():
            raise DataError(f"{root}: not a training set ({INDEX} is missing; "
                            f"make one with `xportrait prepare-data VIDEOS --out {root}`)")
        clips = []
        try:
            for n, line in enumerate(index.read_text().splitlines(), 1):
                if line.strip():
                    clips.append(ClipInfo(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise DataError(f"{index}: line {n} is not a clip record ({e})") from None
        if not clips:
            raise DataError(f"{root}: the training set has no clips")
        sizes = {c.size for c in clips}
        if len(sizes) != 1:
            raise DataError(f"{root}: clips of several sizes {sorted(sizes)}: prepare them at one --size")
        self.root, self.clips, self.size = root, clips, sizes.pop()
        missing = [c.id for c in clips if not (root / "clips" / c.id / "landmarks.npy").is_file()]
        if missing:
            raise DataError(f"{root}: {len(missing)} clip(s) of the index have no files: {', '.join(missing[:5])}")
        self.identities = sorted({c.identity for c in clips})
        self._by_identity = {i: [n for n, c in enumerate(clips) if c.identity == i] for i in self.identities}
        self._landmarks: dict[int, np.ndarray] = {}
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.clips)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_landmarks"], state["_arrays"] = {}, {}  # memory maps do not travel to workers
        return state

    def clips_of_other_identities(self, clip: int) -> list[int]:
        own = self.clips[clip].identity
        return [n for i in self.identities if i != own for n in self._by_identity[i]]

    def landmarks(self, clip: int) -> np.ndarray:
        if clip not in self._landmarks:
            self._landmarks[clip] = np.load(self.root / "clips" / self.clips[clip].id / "landmarks.npy", mmap_mode="r")
        return self._landmarks[clip]

    def frame(self, clip: int, index: int) -> np.ndarray:
        info = self.clips[clip]
        if not 0 <= index < info.frames:
            raise IndexError(f"clip {info.id} has {info.frames} frames, not {index}")
        folder = self.root / "clips" / info.id
        if info.format == "npy":
            if clip not in self._arrays:
                self._arrays[clip] = np.load(folder / "frames.npy", mmap_mode="r")
            return np.asarray(self._arrays[clip][index])
        path = folder / "frames" / f"{index:06d}.jpg"
        data = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if data is None:
            raise DataError(f"{path}: unreadable frame")
        return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
