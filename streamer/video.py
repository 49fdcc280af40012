"""The project's video I/O, on PyAV: probe a video, read its frames as upright RGB arrays,
and the one video writer (H.264 MP4 by default; the container follows the file name).

`animate` reads driving clips and writes its output with them, `xportrait client` records
the avatar stream with `VideoWriter`, and `sample-clip` and the tests write clips with
`write_video`. Every failure to read a file becomes a `VideoError` with a message fit for a
user; PyAV's own errors never leak out of `probe` and `read_frames`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

# The rates ffmpeg's native AAC encoder accepts; anything else is resampled to 48 kHz.
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# Audio codecs copied into MP4 untouched: those the format holds and common players decode.
# (ffmpeg accepts more, e.g. PCM, but writes no playable file for them.) The rest become AAC.
MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"})
OPUS_SAMPLE_RATES = (48000, 24000, 16000, 12000, 8000)
FALLBACK_FPS = Fraction(25)  # only for streams that state no rate at all (a lone image, raw streams)


class VideoError(ValueError):
    """A video that cannot be opened, has no video stream, or cannot be decoded."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction  # average frame rate
    time_base: Fraction  # of the video stream: keep it to keep the frames' exact times
    frames: int  # counted from the container's index or, where it states none, by demuxing
    duration: float | None  # seconds, when the container states it
    audio_codec: str | None  # of the first audio stream; None when there is no audio

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


@dataclass
class DecodedFrame:
    image: np.ndarray  # (height, width, 3) uint8 RGB
    time: float  # presentation time in seconds
    index: int


def _describe(error: BaseException) -> str:
    """The useful part of an ffmpeg error ("Invalid data found when processing input")."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def open_video(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a container that holds a video stream; raise VideoError otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"video not found: {path}")
    if os.path.isdir(path):
        raise VideoError(f"expected a video file, got a directory: {path}")
    try:
        container = av.open(path, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot read video {path}: {_describe(e)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"no video stream in {path}")
    return container


def _rate(stream: av.video.stream.VideoStream) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    return FALLBACK_FPS


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size (as displayed), rate, frame count and audio of a video. Decodes only the first
    frame: that proves the video stream decodable and gives its display rotation."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        fps = _rate(stream)
        time_base = Fraction(stream.time_base) if stream.time_base else 1 / fps
        frames = stream.frames
        duration = None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        audio = container.streams.audio[0].codec_context.codec.canonical_name if container.streams.audio else None
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode video {path}: {_describe(e)}") from None
        if first is None:
            raise VideoError(f"no frames could be decoded from {path}")
        width, height = first.width, first.height
        if _quarter_turns(first) % 2:
            width, height = height, width
    if frames <= 0:  # Matroska/WebM and raw streams state no count: demuxing counts it cheaply
        frames = _count_packets(path)
    return VideoInfo(width, height, fps, time_base, frames, duration, audio)


def _count_packets(path: str | os.PathLike) -> int:
    with open_video(path) as container:
        try:
            return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        except av.FFmpegError as e:
            raise VideoError(f"cannot read video {path}: {_describe(e)}") from None


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns that show the frame upright (phones store portrait
    video sideways, with a display matrix that says how to turn it)."""
    return round(frame.rotation / 90) % 4


def read_frames(path: str | os.PathLike) -> Iterator[DecodedFrame]:
    """Decode every frame of the first video stream, in presentation order, as upright RGB.

    Frames without a timestamp get index / rate. Raises VideoError on unreadable data.
    """
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: decoding is not the bottleneck then
        fps = _rate(stream)
        index = 0
        try:
            for frame in container.decode(stream):
                time = frame.time if frame.pts is not None else index / fps
                image = frame.to_ndarray(format="rgb24")
                if turns := _quarter_turns(frame):
                    image = np.ascontiguousarray(np.rot90(image, turns))
                yield DecodedFrame(image, float(time), index)
                index += 1
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode video {path} at frame {index}: {_describe(e)}") from None
    if index == 0:
        raise VideoError(f"no frames could be decoded from {path}")



@dataclass(frozen=True)
class Container:
    """How a file of one extension is written: ffmpeg's muxer, the video encoder and its
    pixel format, the audio codecs carried over untouched, and the audio encoder for the rest
    (None: the format holds no audio)."""

    format: str
    video: str
    pix_fmt: str
    audio_copied: frozenset[str] = frozenset()
    audio: str | None = None
    audio_rates: tuple[int, ...] = AAC_SAMPLE_RATES
    time_base: Fraction | None = None  # where the format fixes it (GIF: centiseconds)
    constant_rate: bool = False  # frames on the 1/fps grid only (AVI stores no timestamps)
    description: str = ""


CONTAINERS = {
    ".mp4": Container("mp4", "libx264", "yuv420p", MP4_AUDIO_CODECS, "aac", description="H.264 + AAC"),
    ".mov": Container("mov", "libx264", "yuv420p", MP4_AUDIO_CODECS | {"pcm_s16le", "pcm_s24le"}, "aac",
                      description="H.264 + AAC, QuickTime"),
    ".mkv": Container("matroska", "libx264", "yuv420p",
                      MP4_AUDIO_CODECS | {"vorbis", "pcm_s16le", "pcm_s24le", "pcm_f32le"}, "aac",
                      description="H.264 + AAC, Matroska"),
    ".webm": Container("webm", "libvpx-vp9", "yuv420p", frozenset({"opus", "vorbis"}), "libopus",
                       OPUS_SAMPLE_RATES, description="VP9 + Opus"),
    # MP3 in AVI shifts the video by a frame (the muxer pads for the encoder's delay): PCM.
    ".avi": Container("avi", "mpeg4", "yuv420p", frozenset({"pcm_s16le"}), "pcm_s16le", constant_rate=True,
                      description="MPEG-4 Part 2 + PCM"),
    ".gif": Container("gif", "gif", "pal8", time_base=Fraction(1, 100), description="animated GIF, no audio"),
    ".y4m": Container("yuv4mpegpipe", "rawvideo", "yuv420p", description="raw YUV 4:2:0, no audio"),
}


def supported_extensions() -> str:
    return ", ".join(CONTAINERS)


def container_for(path: str | os.PathLike) -> Container:
    """The Container for a file name's extension; ValueError naming the supported ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        what = f"'{suffix}' files" if suffix else "a file name without an extension"
        raise ValueError(f"cannot write {what}: the output's extension chooses the format, one of "
                         f"{supported_extensions()}")
    return CONTAINERS[suffix]


class _AudioCarrier:
    """Carries the first audio stream of one file into an output container.

    Packets are copied untouched where the output format can hold the codec (AAC, MP3,
    Opus, ... in MP4); anything else is decoded and re-encoded with the format's encoder.
    `until(t)` moves the audio up to time t so audio and video interleave in the file as
    they play.
    """

    def __init__(self, output: av.container.OutputContainer, source: str, kind: Container):
        self._input = av.open(source, mode="r")
        try:
            self._in = self._input.streams.audio[0]
            self.copied = self._in.codec_context.codec.canonical_name in kind.audio_copied
            if self.copied:
                self.stream = output.add_stream_from_template(self._in)
            else:
                rate = self._in.rate if self._in.rate in kind.audio_rates else 48000
                self.stream = output.add_stream(kind.audio, rate=rate)
                self.stream.layout = "mono" if self._in.channels == 1 else "stereo"
        except BaseException:
            self._input.close()
            raise
        self._output = output
        self._packets = self._input.demux(self._in)
        self._pending: av.Packet | None = None
        self._done = False

    @property
    def codec(self) -> str:
        return self.stream.codec_context.codec.canonical_name

    def _next(self) -> av.Packet | None:
        if self._pending is None and not self._done:
            for packet in self._packets:
                if packet.dts is not None:  # demux ends with an empty flush packet
                    self._pending = packet
                    break
            else:
                self._done = True
        return self._pending

    def until(self, time: float) -> None:
        while (packet := self._next()) is not None:
            stamp = packet.pts if packet.pts is not None else packet.dts
            if float(stamp * packet.time_base) > time:
                return
            self._pending = None
            self._carry(packet)

    def _carry(self, packet: av.Packet) -> None:
        if self.copied:
            packet.stream = self.stream
            self._output.mux(packet)
            return
        for frame in packet.decode():
            self._output.mux(self.stream.encode(frame))

    def finish(self, end: float) -> None:
        """Carry the rest of the audio (all of it: `end`, the video's, does not cut it)."""
        self.until(math.inf)
        if not self.copied:
            self._output.mux(self.stream.encode(None))
        self.close()

    def close(self) -> None:
        self._input.close()


class _ToneTrack:
    """A sine test tone (amplitude 0.2) as the audio track, kept in step with the video: the
    synthetic clips' stand-in for a voice, so that carrying audio over can be tested."""

    copied = False

    def __init__(self, output: av.container.OutputContainer, hz: float, kind: Container, rate: int = 48000):
        if not (math.isfinite(hz) and 0 < hz < rate / 2):
            raise ValueError(f"tone_hz must lie in (0, {rate // 2}), got {hz!r}")
        self.hz, self.rate = hz, rate
        self.stream = output.add_stream(kind.audio, rate=rate, layout="mono")
        self._output = output
        self._done = 0  # samples written

    @property
    def codec(self) -> str:
        return self.stream.codec_context.codec.canonical_name

    def until(self, time: float) -> None:
        end = int(round(time * self.rate))
        if end <= self._done:
            return
        k = np.arange(self._done, end, dtype=np.float64)
        tone = (0.2 * np.sin(2 * np.pi * self.hz * k / self.rate)).astype(np.float32)
        chunk = av.AudioFrame.from_ndarray(tone[None, :], format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = self.rate, self._done
        self._output.mux(self.stream.encode(chunk))
        self._done = end

    def finish(self, end: float) -> None:
        self.until(end)
        self._output.mux(self.stream.encode(None))

    def close(self) -> None:
        pass


class _Palettes:
    """RGB frames to 8-bit palette frames for GIF, one palette made per frame (ffmpeg's
    palettegen + paletteuse: far better than one fixed palette)."""

    def __init__(self, width: int, height: int, time_base: Fraction):
        graph = av.filter.Graph()
        source = graph.add_buffer(width=width, height=height, format="rgb24", time_base=time_base)
        split = graph.add("split")
        palette = graph.add("palettegen", "stats_mode=single:reserve_transparent=0")
        use = graph.add("paletteuse", "new=1:dither=sierra2_4a")
        sink = graph.add("buffersink")
        source.link_to(split)
        split.link_to(use, 0, 0)
        split.link_to(palette, 1, 0)
        palette.link_to(use, 0, 1)
        use.link_to(sink)
        graph.configure()
        self._graph = graph

    def convert(self, frame: av.VideoFrame | None) -> list[av.VideoFrame]:
        """Push a frame (None: the end) and return the frames ready."""
        self._graph.push(frame)
        ready = []
        while True:
            try:
                ready.append(self._graph.pull())
            except (av.BlockingIOError, av.EOFError):
                return ready


class VideoWriter:
    """The one video writer: frames in (RGB uint8, with their times), a playable file out,
    optionally carrying another file's audio. A context manager.

    The container follows the file name's extension (`CONTAINERS`: .mp4 H.264 + AAC by
    default, .mov, .mkv, .webm VP9 + Opus, .avi, .gif, .y4m); `container` overrides it. Frames
    are written with their presentation time in seconds; `time_base` (e.g. the driving
    video's) keeps those times exact. On leaving the `with` block normally the encoders are
    drained and the file finalised; on an exception the file is only closed (the caller
    discards it). `tone_hz` writes a sine test tone as the audio instead (synthetic clips).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: Fraction | float,
        *,
        time_base: Fraction | None = None,
        audio_from: str | os.PathLike | None = None,
        tone_hz: float | None = None,
        crf: int = 18,
        preset: str = "medium",
        container: Container | None = None,
    ):
        kind = container or container_for(path)
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        if kind.pix_fmt == "yuv420p" and (width % 2 or height % 2):
            raise ValueError(f"4:2:0 video ({kind.description}) needs even dimensions, got {width}x{height}")
        self.kind = kind
        self.width, self.height = width, height
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        if kind.constant_rate:
            time_base = 1 / self.fps
        self.time_base = kind.time_base or (Fraction(time_base) if time_base else 1 / self.fps)
        self.frames = 0
        self._last_pts: int | None = None
        options = {"movflags": "+faststart"} if kind.format in ("mp4", "mov") else {}  # playable while downloading
        self._container = av.open(os.fspath(path), mode="w", format=kind.format, options=options)
        self.audio = None
        try:
            self._video = self._container.add_stream(kind.video, rate=self.fps)
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = kind.pix_fmt
            self._video.time_base = self.time_base
            self._video.codec_context.time_base = self.time_base
            if kind.video == "libx264":
                self._video.options = {"crf": str(crf), "preset": preset}
            elif kind.video == "libvpx-vp9":  # constant quality, fast enough to encode as it renders
                self._video.options = {"crf": str(crf + 14), "b": "0", "deadline": "good", "cpu-used": "5",
                                       "row-mt": "1"}
            elif kind.video == "mpeg4":
                self._video.bit_rate = max(1_000_000, int(width * height * float(self.fps) * 0.3))
            self._palettes = _Palettes(width, height, self.time_base) if kind.pix_fmt == "pal8" else None
            if (audio_from or tone_hz is not None) and kind.audio is None:
                self.audio = None  # the format holds no audio (GIF, Y4M): the video alone
            elif tone_hz is not None:
                self.audio = _ToneTrack(self._container, tone_hz, kind)
            elif audio_from:
                self.audio = _AudioCarrier(self._container, os.fspath(audio_from), kind)
        except BaseException:
            self._container.close()
            raise

    def write(self, rgb: np.ndarray, time: float | None = None) -> None:
        """Encode one (height, width, 3) uint8 RGB frame shown at `time` seconds
        (default: one frame period after the previous one)."""
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a {self.height}x{self.width} RGB uint8 frame, "
                             f"got {rgb.dtype} of shape {rgb.shape}")
        if time is None:
            pts = 0 if self._last_pts is None else self._last_pts + max(1, round(1 / (self.fps * self.time_base)))
        else:
            pts = round(time / self.time_base)
            if self._last_pts is not None and pts <= self._last_pts:  # the muxer needs rising times
                pts = self._last_pts + 1
        self._last_pts = pts
        if self.audio:
            self.audio.until(float(pts * self.time_base))
        # Wraps the caller's buffer (no copy): the encoder converts it before returning.
        frame = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = pts
        frame.time_base = self.time_base
        self._encode(frame)
        self.frames += 1

    def _encode(self, frame: av.VideoFrame | None) -> None:
        frames = self._palettes.convert(frame) if self._palettes else [frame]
        if self._palettes and frame is None:
            frames.append(None)
        for f in frames:
            self._container.mux(self._video.encode(f))

    @property
    def end(self) -> float:
        """The video's end in seconds: the last frame's time plus one frame period."""
        if self._last_pts is None:
            return 0.0
        return float(self._last_pts * self.time_base + 1 / self.fps)

    def close(self) -> None:
        """Drain the encoders, carry the rest of the audio, finalise the file."""
        try:
            self._encode(None)
            if self.audio:
                self.audio.finish(self.end)
        finally:
            self._container.close()

    def abort(self) -> None:
        """Close without finalising (the file is to be discarded)."""
        if self.audio:
            self.audio.close()
        try:
            self._container.close()
        except av.FFmpegError:
            pass

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _checked_frames(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The frames, each checked to be RGB uint8 of the first frame's size."""
    shape = None
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            what = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame {i}: expected an RGB uint8 array (height, width, 3), got {what}")
        if shape is None:
            shape = frame.shape
        elif frame.shape != shape:
            raise ValueError(f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, "
                             f"frame 0 was {shape[1]}x{shape[0]}")
        yield frame


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 25.0, *,
                tone_hz: float | None = None, preset: str = "veryfast") -> int:
    """Write RGB uint8 frames at a constant `fps` with `VideoWriter` (the container by
    extension); with `tone_hz`, a sine tone of that pitch as long as the video is the audio.
    Returns the number of frames. On any error no file is left behind."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not (0 < fps <= 240):
        raise ValueError(f"fps must be a number in (0, 240], got {fps!r}")
    checked = _checked_frames(frames)
    first = next(checked, None)
    if first is None:
        raise ValueError("no frames to write")
    path = Path(path)
    try:
        with VideoWriter(path, first.shape[1], first.shape[0], Fraction(fps).limit_denominator(1001),
                         tone_hz=tone_hz, preset=preset) as writer:
            for frame in chain((first,), checked):
                writer.write(frame)
        return writer.frames
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written file that looks like a clip
        raise
