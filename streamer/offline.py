"""`xportrait animate SOURCE [SOURCE ...] DRIVING -o OUT.mp4`: animate a portrait offline.

Two passes over the driving video, as the released X-Portrait code works on a whole clip:
pass 1 tracks the face mesh in every frame (landmarks only, a few KB a frame) so that the
reference frame can be chosen among all of them; pass 2 decodes again and drives the
engine with the stored landmarks, writing each rendered frame as it comes. The MP4 keeps
the driving video's frame times and its audio.

Bad input (unreadable image or video, no face in the source or in the whole driving clip,
missing output directory) is reported in one line on stderr with exit status 2, and no
output file is left behind: the video is written to a hidden file next to OUT and renamed
only once it is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import secrets
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from engines import EngineError, create_engine

from .options import AnimateOptions, add_engine_arguments, animate_options
from .video import VideoError, VideoWriter, probe, read_frames

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
PROG = "xportrait animate"


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
                        help="portrait image(s); the first is animated, the others are extra appearance references")
    parser.add_argument("driving", metavar="DRIVING", help="driving video (any format ffmpeg reads)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.mp4", help="H.264 MP4 to write")
    parser.add_argument("--ref-frame", type=_ref_frame, default=None, metavar="INDEX|auto",
                        help="driving frame that stands for the portrait's own pose and expression; "
                             "auto (default) picks the frame whose face is closest to the portrait's")
    add_engine_arguments(parser)


def load_image(path: str) -> np.ndarray:
    """Any image Pillow reads, as uint8 RGB, upright: the loader `serve` uses for uploads."""
    from .images import ImageError, read_image

    try:
        return read_image(path, what="source image")
    except ImageError as e:
        raise InputError(str(e)) from None


def _output_paths(args: AnimateOptions) -> Path:
    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"output is a directory, expected a file name: {out}")
    folder = out.parent
    if not folder.is_dir():
        raise InputError(f"output directory does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write to output directory: {folder}")
    inputs = {Path(p).resolve() for p in [*args.sources, args.driving] if os.path.exists(p)}
    if out.resolve() in inputs:
        raise InputError(f"output would overwrite an input: {out}")
    return out


def _fmt_rate(fps) -> str:
    return f"{float(fps):.3f}".rstrip("0").rstrip(".")


def run(args: argparse.Namespace) -> int:
    options = animate_options(args)
    try:
        return animate(options)
    except InputError as e:
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
    out = _output_paths(args)
    # Cheap checks first: the face mesh and the engine are only loaded for valid input.
    images = [load_image(path) for path in args.sources]
    try:
        info = probe(args.driving)
    except VideoError as e:
        raise InputError(str(e)) from None

    from tqdm import tqdm

    from engines.animator import Animator
    from engines.face import FaceTracker, NoFaceError, best_reference_frame

    size = args.engine.size
    engine = create_engine(args.engine)
    if getattr(engine, "random_weights", False):
        print(f"{PROG}: WARNING: random weights: the output is labelled and shows no real animation", file=sys.stderr)
    animator = Animator(engine, tracker=FaceTracker(video=True))
    try:
        try:
            animator.set_sources(images)
        except NoFaceError:
            raise InputError(_which_source_has_no_face(args.sources, images, size)) from None

        # Pass 1: the face mesh of every frame, with one tracker (it follows the face from
        # frame to frame, re-detecting only when it loses it).
        landmarks: list[np.ndarray | None] = []
        times: list[float] = []
        try:
            frames = read_frames(args.driving)
            with contextlib.closing(frames):
                for frame in tqdm(frames, total=info.frames, desc="tracking", unit="frame", disable=None):
                    landmarks.append(animator.tracker.detect(frame.image))
                    times.append(frame.time)
        except VideoError as e:
            raise InputError(str(e)) from None
        count = len(landmarks)
        if all(marks is None for marks in landmarks):
            raise InputError(f"no face found in any of the {count} frames of the driving video {args.driving}")

        if args.ref_frame is None:
            reference = best_reference_frame(animator.sources[0].landmarks, landmarks)
        elif args.ref_frame >= count:
            raise InputError(f"--ref-frame {args.ref_frame} is out of range: the driving video has {count} frames")
        elif landmarks[args.ref_frame] is None:
            raise InputError(f"driving frame {args.ref_frame} has no face: choose another --ref-frame or 'auto'")
        else:
            reference = args.ref_frame
        animator.set_reference(landmarks[reference])

        # Pass 2: animate and write. The file is hidden until complete; any failure,
        # Ctrl-C included, removes it.
        written, audio = _render(animator, args.driving, landmarks, times, info, out, size)
    finally:
        animator.close()

    elapsed = time.perf_counter() - started
    held = animator.frames_without_face
    print(f"wrote {out}: {written} frames, {size}x{size} at {_fmt_rate(info.fps)} fps"
          + (f", audio {audio}" if audio else ", no audio"))
    print(f"frames without a face: {held}" + (" (the last good pose was held)" if held else "")
          + f"; reference frame {reference}")
    print(f"elapsed {elapsed:.1f} s, {written / elapsed:.1f} frames/s")
    return 0


def _render(animator, driving: str, landmarks: list, times: list[float], info, out: Path, size: int):
    from tqdm import tqdm

    partial = _create_partial(out)
    try:
        try:
            with VideoWriter(partial, size, size, info.fps, time_base=_output_time_base(info, times),
                             audio_from=driving if info.has_audio else None) as writer:
                frames = read_frames(driving)
                with contextlib.closing(frames):
                    bar = tqdm(total=len(landmarks), desc="animating", unit="frame", disable=None)
                    with bar:
                        # zip: the same decode yields the same frames as pass 1.
                        for frame, marks in zip(frames, landmarks):
                            rendered = animator.drive(frame.image, frame.time, tag=frame.index, landmarks=marks)
                            if rendered is not None:
                                writer.write(rendered.image, times[rendered.tag])
                            bar.update()
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
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
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


def _create_partial(out: Path) -> str:
    """A new hidden file next to `out` (same file system, so the final rename is atomic).
    Unlike tempfile.mkstemp's 0600, it gets the permissions the umask gives any new file."""
    for _ in range(100):
        partial = out.parent / f".{out.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(partial)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot write to {out.parent}: {e.strerror or e}") from None
    raise OutputError(f"cannot create a temporary file in {out.parent}")


def _which_source_has_no_face(paths: list[str], images: list[np.ndarray], size: int) -> str:
    """Name the portrait without a face (only runs on that error, so the extra meshing is fine)."""
    from engines.face import FaceTracker, NoFaceError, prepare_source

    if len(paths) > 1:
        with FaceTracker(video=False) as still:
            for path, image in zip(paths, images):
                try:
                    prepare_source(image, size, still)
                except NoFaceError:
                    return f"no face found in the source image {path}"
    return f"no face found in the source image {paths[0]}"
