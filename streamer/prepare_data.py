"""`xportrait prepare-data VIDEOS... --out DIR`: talking-head videos -> a training set.

Per clip one fixed crop (the head with hair and shoulders), the face mesh of every frame;
clips end at cuts, lost faces and large head moves. See engines/xportrait/train/data.py
for the format. Exit codes: 0 done, 2 bad options or no clip could be made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".y4m", ".mpg", ".mpeg", ".flv", ".ts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files, or folders searched for videos")
    parser.add_argument("--out", required=True, metavar="DIR", help="training-set folder to write")
    parser.add_argument("--size", type=int, default=512, help="crop width and height (default: %(default)s)")
    parser.add_argument("--zoom", type=float, default=2.0,
                        help="crop side in head-box sides: room for hair and shoulders (default: %(default)s)")
    parser.add_argument("--min-frames", type=int, default=16, help="shortest clip kept (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=300, help="longer clips are split (default: %(default)s)")
    parser.add_argument("--min-iou", type=float, default=0.5,
                        help="a clip ends where the head box overlaps its first one less (default: %(default)s)")
    parser.add_argument("--cut-threshold", type=float, default=40.0,
                        help="mean grey-level change (0-255) between frames that marks a cut (default: %(default)s)")
    parser.add_argument("--format", choices=("jpeg", "npy"), default="jpeg",
                        help="frames as JPEG files (small) or one memory-mapped array per clip (fast) "
                             "(default: %(default)s)")
    parser.add_argument("--identity", choices=("clip", "video", "folder"), default="clip",
                        help="what stands for one person: each clip, each video, or the video's folder "
                             "(default: %(default)s)")
    parser.add_argument("--control-cache", action="store_true",
                        help="also render every frame's cross-identity control image once (for "
                             "`xportrait train --cached-controls`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _videos(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        else:
            found.append(p)
    return found


def run(args: argparse.Namespace) -> int:
    from engines.xportrait.train.data import DataError, PrepareOptions, prepare

    try:
        options = PrepareOptions(size=args.size, zoom=args.zoom, min_frames=args.min_frames,
                                 max_frames=args.max_frames, min_iou=args.min_iou, cut_threshold=args.cut_threshold,
                                 format=args.format, identity=args.identity)
        videos = _videos(args.videos)
        if not videos:
            raise DataError(f"no videos found in {', '.join(args.videos)}")
        summary = prepare(videos, args.out, options, progress=not args.quiet)
        cached = None
        if args.control_cache:
            from engines.xportrait.train.data import ClipSet
            from engines.xportrait.train.dataset import build_control_cache

            cached = build_control_cache(ClipSet(args.out), progress=not args.quiet)
    except DataError as e:
        print(f"xportrait prepare-data: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"xportrait prepare-data: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(summary.text())
    if cached is not None:
        print(f"control cache: {cached} control images")
    print(f"wrote {args.out} (summary: {Path(args.out) / 'summary.json'})")
    return 0
