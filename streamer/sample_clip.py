"""`xportrait sample-clip OUT.mp4`: write a driving clip made in code, so that `animate` can be
tried before one has a video of one's own.

A bundled portrait (or any portrait image) is moved by the synthetic puppet
(streamer.samples.puppet): a neutral hold, head rolls, shifts, the mouth opening, blinks,
then all at once as in speech. The file is written as `animate` writes (container by
extension, hidden until complete, nothing left behind on an error or a signal).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from engines.options import OptionError

from .output import OutputPathError, atomic_output, check_output, exit_cleanly_on_signals
from .samples.gallery import PORTRAITS

PROG = "xportrait sample-clip"


@dataclass(frozen=True)
class SampleClipOptions:
    """`xportrait sample-clip`. `seconds` None: the puppet's default script once (10 s)."""

    output: str
    portrait: str = "astronaut"  # a bundled portrait's name or an image file
    seconds: float | None = None
    fps: float = 25.0
    size: tuple[int, int] = (640, 480)  # width, height

    def __post_init__(self):
        if self.seconds is not None and not 0 < self.seconds <= 600:
            raise OptionError(f"--seconds must lie in (0, 600], got {self.seconds:g}")
        if not 1 <= self.fps <= 120:
            raise OptionError(f"--fps must lie in [1, 120], got {self.fps:g}")
        width, height = self.size
        if width < 64 or height < 64 or width % 2 or height % 2 or max(width, height) > 3840:
            raise OptionError(f"--size sides must be even, from 64 to 3840, got {width}x{height}")


def sample_clip_options(args: argparse.Namespace) -> SampleClipOptions:
    return SampleClipOptions(output=args.output, portrait=args.portrait, seconds=args.seconds, fps=args.fps,
                             size=args.size)


def _frame_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    return width, height  # SampleClipOptions checks the sides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUT.mp4",
                        help="the clip to write; the extension chooses the format (.mp4, .webm, .y4m, ...)")
    parser.add_argument("--portrait", default="astronaut", metavar="NAME|IMAGE",
                        help=f"who moves: a bundled portrait ({', '.join(PORTRAITS)}) or a portrait image "
                             "(default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="length (default: the 10 s script once: rolls, shifts, mouth, blinks, speech)")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate (default: 25)")
    parser.add_argument("--size", type=_frame_size, default=(640, 480), metavar="WxH",
                        help="frame size, a webcam's by default (640x480)")


def run(args: argparse.Namespace) -> int:
    options = sample_clip_options(args)
    try:
        with exit_cleanly_on_signals():
            return write_sample_clip(options)
    except (OutputPathError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1


def write_sample_clip(args: SampleClipOptions) -> int:
    from tqdm import tqdm

    from engines.face import NoFaceError

    from .samples.puppet import DEFAULT_SCRIPT_SECONDS, driving_clip
    from .video import VideoWriter

    out, container = check_output(args.output, [args.portrait])
    if os.path.exists(args.portrait) or args.portrait not in PORTRAITS:
        from .images import ImageError, source_image

        try:
            source = source_image(args.portrait)
        except ImageError as e:
            raise ValueError(f"{e} (or name a bundled portrait: {', '.join(PORTRAITS)})") from None
    else:
        source = args.portrait
    seconds = DEFAULT_SCRIPT_SECONDS if args.seconds is None else args.seconds
    count = max(1, round(seconds * args.fps))
    width, height = args.size
    try:
        clip = driving_clip(source, frames=count, fps=args.fps, size=(width, height))
    except NoFaceError as e:
        raise ValueError(str(e).replace("the source portrait", args.portrait)) from None
    with atomic_output(out) as partial, \
            VideoWriter(partial, width, height, args.fps, container=container, preset="veryfast") as writer, \
            tqdm(total=count, desc="writing", unit="frame", disable=None) as bar:
        for frame, _ in clip:
            writer.write(frame)
            bar.update()
    print(f"wrote {args.output}: {writer.frames} frames, {width}x{height} at {args.fps:g} fps, "
          f"{writer.frames / args.fps:g} s of {args.portrait if isinstance(source, str) else 'the portrait'} "
          "moving (head rolls, shifts, mouth, blinks)")
    return 0
