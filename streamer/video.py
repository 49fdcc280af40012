"""Small PyAV helpers: probe a video, read its frames as RGB arrays, write H.264 MP4.

The offline `animate` command uses them, and the server may reuse them (recordings,
uploaded driving clips). Every failure to read a file becomes a `VideoError` with a
message fit for a user; PyAV's own errors never leak out of `probe` and `read_frames`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

# The rates ffmpeg's native AAC encoder accepts; anything else is resampled to 48 kHz.
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# Audio codecs copied into MP4 untouched: those the format holds and common players decode.
# (ffmpeg accepts more, e.g. PCM, but writes no playable file for them.) The rest become AAC.
MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"})
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


class _AudioCarrier:
    """Carries the first audio stream of one file into an output container.

    Packets are copied untouched where the output format can hold the codec (AAC, MP3,
    Opus, ... in MP4); anything else is decoded and re-encoded as AAC. `until(t)` moves
    the audio up to time t so audio and video interleave in the file as they play.
    """

    def __init__(self, output: av.container.OutputContainer, source: str):
        self._input = av.open(source, mode="r")
        self._in = self._input.streams.audio[0]
        self.copied = self._in.codec_context.codec.canonical_name in MP4_AUDIO_CODECS
        if self.copied:
            self.stream = output.add_stream_from_template(self._in)
        else:
            rate = self._in.rate if self._in.rate in AAC_SAMPLE_RATES else 48000
            self.stream = output.add_stream("aac", rate=rate)
            self.stream.layout = "mono" if self._in.channels == 1 else "stereo"
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

    def finish(self) -> None:
        self.until(math.inf)
        if not self.copied:
            self._output.mux(self.stream.encode(None))
        self.close()

    def close(self) -> None:
        self._input.close()


class VideoWriter:
    """H.264 (yuv420p) MP4 writer, optionally carrying another file's audio. A context manager.

    Frames are written with their presentation time in seconds; `time_base` (e.g. the
    driving video's) keeps those times exact. On leaving the `with` block normally the
    encoders are drained and the file finalised; on an exception the file is only closed
    (the caller discards it).
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
        crf: int = 18,
        preset: str = "medium",
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even, positive dimensions, got {width}x{height}")
        self.width, self.height = width, height
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        self.time_base = Fraction(time_base) if time_base else 1 / self.fps
        self.frames = 0
        self._last_pts: int | None = None
        self._container = av.open(os.fspath(path), mode="w", format="mp4",
                                  options={"movflags": "+faststart"})  # playable while downloading
        try:
            self._video = self._container.add_stream("libx264", rate=self.fps)
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"  # the one every player decodes
            self._video.time_base = self.time_base
            self._video.codec_context.time_base = self.time_base
            self._video.options = {"crf": str(crf), "preset": preset}
            self.audio = _AudioCarrier(self._container, os.fspath(audio_from)) if audio_from else None
        except BaseException:
            self._container.close()
            raise

    def write(self, rgb: np.ndarray, time: float | None = None) -> None:
        """Encode one (height, width, 3) uint8 RGB frame shown at `time` seconds
        (default: one frame period after the previous one)."""
        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"expected a {self.height}x{self.width} RGB frame, got shape {rgb.shape}")
        if time is None:
            pts = 0 if self._last_pts is None else self._last_pts + max(1, round(1 / (self.fps * self.time_base)))
        else:
            pts = round(time / self.time_base)
            if self._last_pts is not None and pts <= self._last_pts:  # the muxer needs rising times
                pts = self._last_pts + 1
        self._last_pts = pts
        if self.audio:
            self.audio.until(float(pts * self.time_base))
        # Wraps the caller's buffer (no copy): the encoder converts it to yuv420p before returning.
        frame = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = pts
        frame.time_base = self.time_base
        self._container.mux(self._video.encode(frame))
        self.frames += 1

    def close(self) -> None:
        """Drain the encoders, carry the rest of the audio, finalise the file."""
        try:
            self._container.mux(self._video.encode(None))
            if self.audio:
                self.audio.finish()
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
