"""`xportrait animate SOURCE [SOURCE ...] DRIVING -o OUT.mp4`: animate a portrait offline.

Two passes over the driving video, as the released X-Portrait code works on a whole clip:
pass 1 tracks the face mesh in every frame (landmarks only, a few KB a frame) so that the
reference frame can be chosen among all of them; pass 2 decodes again and drives the
engine with the stored landmarks, writing each rendered frame as it comes. The output keeps
the driving video's frame times and its audio; its extension chooses the container (.mp4
H.264 + AAC, .mov, .mkv, .webm, .avi, .gif: streamer.video.CONTAINERS).

A SOURCE is an image file or the name of a bundled portrait (astronaut, grace_hopper).

Bad input (unreadable image or video, no face in the source or in the driving clip's first
FACE_SEARCH_S seconds, an output that is not a new or regular file, missing weights) is
reported in one line on stderr with exit status 2, and no output file is left behind: the
video is written to a hidden file next to OUT and renamed only once it is complete; Ctrl-C,
SIGTERM and SIGHUP remove it too.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from engines import EngineError, create_engine

from .options import AnimateOptions, add_engine_arguments, add_retarget_arguments, animate_options
from .output import OutputPathError, atomic_output, check_output, exit_cleanly_on_signals
from .samples.gallery import PORTRAITS
from .video import CONTAINERS, Container, VideoError, VideoWriter, probe, read_frames

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
PROG = "xportrait animate"
# Pass 1 gives up when the driving clip shows no face in its first this many seconds (a
# faceless 100,000-frame clip is refused in about a second, not after reading it all).
FACE_SEARCH_S = 30.0


class InputError(ValueError):
    """Bad input from the user: reported in one line, exit status 2."""


class OutputError(RuntimeError):
    """The output could not be written (disk full, permissions): one line, exit status 1."""


def _ref_frame(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        index = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a frame index or 'auto', got {text!r}") from None
    return index  # AnimateOptions checks the range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="portrait image(s), or a bundled portrait's name (" + ", ".join(PORTRAITS) + "); "
                             "the first is animated, the others are extra appearance references")
    parser.add_argument("driving", metavar="DRIVING", help="driving video (any format ffmpeg reads)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.mp4",
                        help="video to write; its extension chooses the format: " + ", ".join(
                            f"{ext} ({c.description})" for ext, c in CONTAINERS.items() if ext != ".y4m"))
    parser.add_argument("--ref-frame", type=_ref_frame, default=None, metavar="INDEX|auto",
                        help="driving frame that stands for the portrait's own pose and expression; "
                             "auto (default) picks the frame whose face is closest to the portrait's")
    add_retarget_arguments(parser)
    add_engine_arguments(parser)


def source_image(path: str) -> np.ndarray:
    """An image file, or a bundled portrait named on the command line (streamer/images.py)."""
    from . import images

    try:
        return images.source_image(path)
    except images.ImageError as e:
        raise InputError(str(e)) from None


def _fmt_rate(fps) -> str:
    return f"{float(fps):.3f}".rstrip("0").rstrip(".")


def run(args: argparse.Namespace) -> int:
    options = animate_options(args)
    try:
        with exit_cleanly_on_signals():  # SIGTERM/SIGHUP clean up as Ctrl-C does
            return animate(options)
    except (InputError, OutputPathError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OutputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except EngineError as e:
        print(f"{PROG}: error: engine {options.engine.name!r}: {e}", file=sys.stderr)
        return EXIT_FAILURE


def animate(args: AnimateOptions) -> int:
    started = time.perf_counter()
    out, container = check_output(args.output, [*args.sources, args.driving])
    # Cheap checks first: the face mesh and the engine are only loaded for valid input.
    images = [source_image(path) for path in args.sources]
    try:
        info = probe(args.driving)
    except VideoError as e:
        raise InputError(str(e)) from None

    from engines.animator import Animator
    from engines.face import FaceTracker, NoFaceError, best_reference_frame

    size = args.engine.size
    steps = _StepBar()
    try:
        engine = create_engine(args.engine, progress=steps)
    except EngineError as e:  # missing weights or backend, a bad combination of options
        raise InputError(f"engine {args.engine.name!r}: {e}") from None
    if getattr(engine, "random_weights", False):
        print(f"{PROG}: WARNING: random weights: the output is labelled and shows no real animation", file=sys.stderr)
    animator = Animator(engine, tracker=FaceTracker(video=True), retargeting=args.retargeting)
    try:
        try:
            animator.set_sources(images)
        except NoFaceError:
            raise InputError(_which_source_has_no_face(args.sources, images, size)) from None
        for path, source in zip(args.sources, animator.sources):
            if source.faces > 1:
                print(f"{PROG}: note: {source.faces} faces in {path}: animating the largest", file=sys.stderr)

        landmarks, times = _track(animator, args.driving, info)
        count = len(landmarks)
        if args.ref_frame is None:
            reference = best_reference_frame(animator.sources[0].landmarks, landmarks)
        elif args.ref_frame >= count:
            raise InputError(f"--ref-frame {args.ref_frame} is out of range: the driving video has {count} frames")
        elif landmarks[args.ref_frame] is None:
            raise InputError(f"driving frame {args.ref_frame} has no face: choose another --ref-frame or 'auto'")
        else:
            reference = args.ref_frame
        animator.set_reference(landmarks[reference], _reference_image(args, engine, reference))

        # Pass 2: animate and write. The file is hidden until complete; any failure,
        # Ctrl-C and SIGTERM included, removes it.
        written, audio = _render(animator, args.driving, landmarks, times, info, out, container, size)
    finally:
        steps.close()
        animator.close()

    elapsed = time.perf_counter() - started
    held = animator.frames_without_face
    if audio:
        sound = f", audio {audio}"
    else:
        sound = ", no audio" + (f" ({out.suffix} holds none)" if info.has_audio and container.audio is None else "")
    print(f"wrote {args.output}: {written} frames, {size}x{size} at {_fmt_rate(info.fps)} fps" + sound)
    print(f"frames without a face: {held}" + (" (the last good pose was held)" if held else "")
          + f"; reference frame {reference}")
    print(f"elapsed {elapsed:.1f} s, {written / elapsed:.1f} frames/s")
    return 0


def _track(animator, driving: str, info) -> tuple[list[np.ndarray | None], list[float]]:
    """Pass 1: the face mesh of every frame, with one tracker (it follows the face from
    frame to frame, re-detecting only when it loses it). Stops, with InputError, once
    FACE_SEARCH_S seconds of video have shown no face."""
    from tqdm import tqdm

    landmarks: list[np.ndarray | None] = []
    times: list[float] = []
    seen = False
    try:
        frames = read_frames(driving)
        with contextlib.closing(frames), tqdm(total=info.frames, desc="tracking faces", unit="frame",
                                              disable=None) as bar:
            for frame in frames:
                marks = animator.tracker.detect(frame.image)
                seen = seen or marks is not None
                landmarks.append(marks)
                times.append(frame.time)
                bar.update()
                if not seen and frame.time - times[0] >= FACE_SEARCH_S:
                    raise InputError(
                        f"no face found in the first {FACE_SEARCH_S:g} s ({len(landmarks)} frames) of the driving "
                        f"video {driving}: use a clip where one face is clearly visible, or trim it to start "
                        "where the face appears")
    except VideoError as e:
        raise InputError(str(e)) from None
    if not seen:
        raise InputError(f"no face found in any of the {len(landmarks)} frames of the driving video {driving}: "
                         "use a clip where one face is clearly visible")
    return landmarks, times


def _reference_image(args: AnimateOptions, engine, index: int) -> np.ndarray | None:
    """The reference frame itself, for an engine that reads driving pixels while the
    retargeting controls edit them (F re-poses that frame); None otherwise (nothing decoded)."""
    if args.retargeting.neutral or not engine.needs_driving_image:
        return None
    frames = read_frames(args.driving)
    with contextlib.closing(frames):
        for frame in frames:
            if frame.index == index:
                return frame.image
    return None


class _StepBar:
    """A progress bar of the denoising steps of an engine that renders the clip at the end,
    opened at its first step (the engine says how many there are)."""

    def __init__(self):
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc="denoising", unit="step", disable=None)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _render(animator, driving: str, landmarks: list, times: list[float], info, out: Path, container: Container,
            size: int):
    from tqdm import tqdm

    try:
        with atomic_output(out) as partial, \
                VideoWriter(partial, size, size, info.fps, time_base=_output_time_base(info, times),
                            audio_from=driving if info.has_audio else None, container=container) as writer:
            frames = read_frames(driving)
            with contextlib.closing(frames), tqdm(total=len(landmarks), desc="animating", unit="frame",
                                                  disable=None) as bar:
                # zip: the same decode yields the same frames as pass 1.
                for frame, marks in zip(frames, landmarks):
                    rendered = animator.drive(frame.image, frame.time, tag=frame.index, landmarks=marks)
                    if rendered is not None:
                        writer.write(rendered.image, times[rendered.tag])
                    bar.update()
            if animator.frames > writer.frames:
                # An engine that renders the whole clip at the end (the diffusion engine's windows).
                print(f"{PROG}: rendering {animator.frames - writer.frames} frames...", file=sys.stderr, flush=True)
            for rendered in animator.flush():
                writer.write(rendered.image, times[rendered.tag])
            written = writer.frames
            audio = None
            if writer.audio:
                audio = f"{writer.audio.codec} ({'copied' if writer.audio.copied else 're-encoded'})"
    except VideoError as e:
        raise InputError(str(e)) from None
    except OSError as e:  # disk full, permissions changed mid-run, ffmpeg write errors
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    return written, audio


def _output_time_base(info, times: list[float]) -> Fraction:
    """The driving's own time base, which keeps every frame's time as it was, unless it
    cannot express the frame period while the frames sit on the constant-rate grid (a
    29.97 fps clip in Matroska's milliseconds): then 1/fps, which puts them back on the
    grid exactly, so the MP4 states the clip's true rate."""
    tb = info.time_base
    if (1 / (info.fps * tb)).denominator == 1:
        return tb
    period, tick = 1 / float(info.fps), float(tb)
    start = times[0]
    if all(abs(t - start - i * period) <= tick for i, t in enumerate(times)):
        return 1 / Fraction(info.fps)
    return tb


def _which_source_has_no_face(paths: list[str], images: list[np.ndarray], size: int) -> str:
    """Name the portrait without a face (only runs on that error, so the extra meshing is fine)."""
    from engines.face import NO_FACE_ADVICE, FaceTracker, NoFaceError, prepare_source

    if len(paths) > 1:
        with FaceTracker(video=False) as still:
            for path, image in zip(paths, images):
                try:
                    prepare_source(image, size, still)
                except NoFaceError:
                    return f"no face found in the source image {path}: {NO_FACE_ADVICE}"
    return f"no face found in the source image {paths[0]}: {NO_FACE_ADVICE}"
