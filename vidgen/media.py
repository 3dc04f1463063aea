"""Video in and out through ffmpeg: probe, decode, encode, overlays, posters.

    info = probe("s3://bucket/clip.mp4")            # VideoInfo: width, height, fps, frames, seconds, ...
    frames = decode("clip.mp4", size=128, fps=8)     # uint8 (T, 128, 128, 3), short side scaled, centre-cropped
    for chunk in iter_decode("lecture.mp4", chunk_frames=64):   # (<=64, H, W, 3) at a time
        ...
    data = encode(frames, fps=24)                    # mp4 bytes (H.264, yuv420p, faststart)
    encode_to("s3://bucket/out/a.webm", chunks, fps=24, overlays=Overlays(title="Lesson 1"))
    jpg = poster_jpeg(frames)                        # JPEG of the middle frame

Pure functions at the edges: `frames -> bytes` and `bytes/uri -> frames`. Frames are uint8 arrays
(T, H, W, 3), RGB, row-major. A source is a local path, a `file://` or `s3://` URI, or `bytes`.

The ffmpeg binary: `VIDGEN_FFMPEG`, else `ffmpeg` on PATH, else the one imageio-ffmpeg ships, so a
pip install alone is enough. Probing reads the container with PyAV, so no ffprobe is needed.
The overlay font: `VIDGEN_FONT`, else the DejaVu Sans this package ships (vidgen/assets).

Every failure to read or write a video raises `MediaError` with one line naming the source
(its URI, or "<bytes>") and the cause.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.resources
import io
import itertools
import numbers
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Union

import av
import ffmpeg
import numpy as np
from PIL import Image, ImageFont

from vidgen import storage
from vidgen.errors import VidgenError

Source = Union[str, os.PathLike, bytes]  # local path, file:// or s3:// URI, or the file's bytes
Frames = Union[np.ndarray, Iterable[np.ndarray]]  # (T, H, W, 3) uint8, or chunks of that shape

FFMPEG_ENV = "VIDGEN_FFMPEG"
FONT_ENV = "VIDGEN_FONT"

# ffmpeg talks only when something is wrong; it never reads the terminal (stdin is ours or unused).
_QUIET = ["-hide_banner", "-nostdin", "-loglevel", "error"]


class MediaError(VidgenError):
    """A video (or an overlay input) could not be read or written; the message names the source."""


class EncoderKilledError(MediaError):
    """ffmpeg was killed by a signal from outside: its worker being cancelled or torn down (Ray kills
    a task's children first), or the OOM killer. Not the video's fault: worth another attempt."""


class MissingGlyphWarning(UserWarning):
    """Overlay text has characters the overlay font cannot draw (they would render as boxes)."""


# --------------------------------------------------------------------------------------------
# The ffmpeg binary and the overlay font, located deliberately


def ffmpeg_binary() -> str:
    """The ffmpeg executable: $VIDGEN_FFMPEG, else `ffmpeg` on PATH, else imageio-ffmpeg's."""
    return _find_ffmpeg(os.environ.get(FFMPEG_ENV) or None, os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=8)
def _find_ffmpeg(setting: str | None, path: str) -> str:
    # Cached per (setting, PATH): resolving is a filesystem walk, but a changed setting must win.
    if setting:
        found = shutil.which(setting)
        if not found:
            raise MediaError(f"{FFMPEG_ENV}={setting!r}: not an executable ffmpeg")
        return found
    found = shutil.which("ffmpeg", path=path)
    if found:
        return found
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        raise MediaError(f"no ffmpeg found: set {FFMPEG_ENV}, put ffmpeg on PATH, or reinstall imageio-ffmpeg ({e})") from None


@functools.lru_cache(maxsize=8)
def _ffmpeg_filters(binary: str) -> frozenset[str]:
    """Names of the filters this ffmpeg build has (builds differ: libass is optional)."""
    out = subprocess.run([binary, "-hide_banner", "-filters"], capture_output=True, text=True, check=False).stdout
    return frozenset(m.group(1) for m in re.finditer(r"^\s*[A-Z.]{2,3}\s+(\w+)\s", out, re.MULTILINE))


def font_path() -> str:
    """The overlay font file: $VIDGEN_FONT, else the DejaVu Sans shipped in vidgen/assets."""
    setting = os.environ.get(FONT_ENV)
    path = setting or str(importlib.resources.files("vidgen").joinpath("assets", "DejaVuSans.ttf"))
    if not os.path.isfile(path):
        where = f"{FONT_ENV}={setting!r}" if setting else f"packaged font {path!r}"
        raise MediaError(f"{where}: no such font file")
    return os.path.abspath(path)


@functools.lru_cache(maxsize=8)
def _font(path: str) -> ImageFont.FreeTypeFont:
    # BASIC layout: one glyph per character, which is what the missing-glyph check compares.
    return ImageFont.truetype(path, 32, layout_engine=ImageFont.Layout.BASIC)


def _glyph(font: ImageFont.FreeTypeFont, ch: str) -> tuple:
    mask = font.getmask(ch)
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=8)
def _notdef(path: str) -> tuple:
    # A private-use code point of plane 16 that no font maps: FreeType draws glyph 0 (.notdef).
    return _glyph(_font(path), "\U0010fffd")


def missing_glyphs(text: str, font: str | None = None) -> list[str]:
    """Characters of `text` that the font draws as its .notdef box (sorted, unique)."""
    path = font or font_path()
    notdef = _notdef(path)
    chars = {ch for ch in text if ch.isprintable() and not ch.isspace()}
    return sorted(ch for ch in chars if _glyph(_font(path), ch) == notdef)


def _warn_missing_glyphs(text: str, what: str) -> None:
    missing = missing_glyphs(text)
    if missing:
        name = " ".join(_font(font_path()).getname())
        codes = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in missing[:12])
        more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
        warnings.warn(f"{what}: font {name!r} cannot draw {codes}{more}; set {FONT_ENV} to a font that can",
                      MissingGlyphWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# Sources: every input becomes one local file for the length of a call


def _label(src: Source) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)


@contextlib.contextmanager
def _local_file(src: Source, what: str = "video") -> Iterator[str]:
    """A local path holding `src`'s bytes, for the length of the `with`.

    S3 objects are downloaded to ONE temporary file rather than streamed: an mp4 written without
    faststart keeps its index at the end, so demuxing needs to seek, and a pipe cannot; a presigned
    URL would let ffmpeg seek over HTTP but puts a signed URL on ffmpeg's command line (visible in
    `ps`). Bytes go to a temporary file for the same seeking reason.
    """
    label = _label(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if not len(src):
            raise MediaError(f"{label}: empty input (0 bytes), expected a {what}")
        with tempfile.TemporaryDirectory(prefix="vidgen-media-") as tmp:
            path = os.path.join(tmp, "input")
            with open(path, "wb") as f:
                f.write(src)
            yield path
        return
    if storage.is_s3(label):
        with tempfile.TemporaryDirectory(prefix="vidgen-media-") as tmp:
            path = os.path.join(tmp, "input" + os.path.splitext(label)[1][:8])
            try:
                storage.download_file(label, path)
            except storage.StorageError as e:
                raise MediaError(str(e)) from None
            if os.path.getsize(path) == 0:
                raise MediaError(f"{label}: empty object (0 bytes), expected a {what}")
            yield path
        return
    try:
        path = storage.local_path(label)
    except storage.StorageError as e:
        raise MediaError(str(e)) from None
    if not os.path.exists(path):
        raise MediaError(f"{label}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{label}: is a directory, expected a {what}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{label}: empty file (0 bytes), expected a {what}")
    yield path


def _read_source(src: Source, what: str) -> bytes:
    """The bytes of a small input (subtitles, a logo)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if not len(src):
            raise MediaError(f"<bytes>: empty input (0 bytes), expected {what}")
        return bytes(src)
    try:
        return storage.read_bytes(os.fspath(src))
    except storage.StorageError as e:
        raise MediaError(f"{e} (expected {what})") from None


# --------------------------------------------------------------------------------------------
# probe: container facts through PyAV (no ffprobe needed)


@dataclass(frozen=True)
class VideoInfo:
    """Facts of one video. `to_json()` is the `vidgen probe --json` contract."""

    width: int
    height: int
    fps: float
    frames: int
    seconds: float  # of the video stream
    video_codec: str  # "h264", "vp9", ...
    audio: bool
    audio_codec: str | None = None
    audio_seconds: float | None = None
    subtitles: tuple[str, ...] = ()  # codecs of the subtitle streams, e.g. ("mov_text",)
    pix_fmt: str | None = None
    container: str = ""  # the demuxer, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    bit_rate: int | None = None
    size_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # container tags (title, comment, ...)

    def to_json(self) -> dict:
        d = asdict(self)
        d["subtitles"] = list(self.subtitles)
        return d


def probe(src: Source) -> VideoInfo:
    """Facts of a video: a local path, `file://` or `s3://` URI, or the file's bytes."""
    with _local_file(src) as path:
        return _probe_file(path, _label(src))


# What an input may be: local files (no network or other protocols) in the containers vidgen reads.
# Not playlists (hls), concat lists or image sequences, which point ffmpeg at other files or hosts.
INPUT_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": "mov,matroska,avi,mpegts,flv,mpeg,ogg,gif"}
AUDIO_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": "mov,matroska,mp3,wav,ogg,flac,aac"}
SUBTITLE_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": "srt,webvtt,ass"}


def _probe_file(path: str, label: str) -> VideoInfo:
    try:
        with av.open(path, options=INPUT_OPTIONS) as container:
            return _read_info(container, label, os.path.getsize(path))
    except av.FFmpegError as e:
        raise MediaError(f"{label}: not a readable video ({_av_cause(e)})") from None


def _av_cause(e: av.FFmpegError) -> str:
    # str(e) repeats the (temporary) file name; the cause alone reads better after the label.
    return getattr(e, "strerror", None) or type(e).__name__


# Containers whose durations are written by the muxer (not estimated from a bitrate), so a video
# whose packets stop well short of its declared duration is truncated, not odd.
_DURATION_TRUSTED = {"mov", "mp4", "matroska", "webm"}


def _read_info(container, label: str, size_bytes: int) -> VideoInfo:
    video = next(iter(container.streams.video), None)
    if video is None:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise MediaError(f"{label}: no video stream (streams: {kinds})")
    cc = video.codec_context
    if not cc.width or not cc.height:
        raise MediaError(f"{label}: the video stream has no frame size")
    rate = video.average_rate or video.guessed_rate or video.base_rate
    if not rate:
        raise MediaError(f"{label}: the video stream has no frame rate")
    fps = float(rate)
    declared = _stream_seconds(video)
    if video.frames > 0:
        frames = video.frames
        end = _tail_end_seconds(container, video, declared) if declared else None
    else:  # the container keeps no count (webm): count packets, no decode
        frames, end = _count_packets(container, video)
    if frames == 0:
        raise MediaError(f"{label}: the video stream has no frames")
    trusted = _DURATION_TRUSTED & set(container.format.name.split(","))
    if trusted and declared and (end is None or end < declared - max(2 / fps, 0.1)):
        got = "no readable packets" if end is None else f"packets up to {end:.2f} s"
        raise MediaError(f"{label}: truncated video: declares {declared:.2f} s but has {got}")
    seconds = declared or (container.duration / av.time_base if container.duration else frames / fps)
    audio = next(iter(container.streams.audio), None)
    return VideoInfo(
        width=cc.width,
        height=cc.height,
        fps=fps,
        frames=int(frames),
        seconds=float(seconds),
        video_codec=cc.name,
        audio=audio is not None,
        audio_codec=audio.codec_context.name if audio is not None else None,
        audio_seconds=_stream_seconds(audio) if audio is not None else None,
        subtitles=tuple(s.codec_context.name for s in container.streams.subtitles),
        pix_fmt=cc.pix_fmt,
        container=container.format.name,
        bit_rate=container.bit_rate or None,
        size_bytes=size_bytes,
        metadata={str(k): str(v) for k, v in container.metadata.items()},
    )


def _stream_seconds(stream) -> float | None:
    """A stream's declared duration: its own, else Matroska's per-stream DURATION tag."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    m = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", tag or "")
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def _packet_end(packet, start: float) -> float:
    return float((packet.pts + (packet.duration or 0)) * packet.time_base) - start


def _count_packets(container, video) -> tuple[int, float | None]:
    """(video packets, end of the last one in seconds), by demuxing the video stream only."""
    start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
    count, end = 0, None
    for packet in container.demux(video):
        if packet.size and packet.pts is not None and not packet.is_corrupt:
            count += 1
            end = max(end or 0.0, _packet_end(packet, start))
    return count, end


def _tail_end_seconds(container, video, declared: float) -> float | None:
    """Where the video's packets really end: seek near the declared end and demux from there.

    A file cut short keeps its header (an mp4 with faststart declares all its frames) but loses
    the data; this reads only the last GOP or so, not the file.
    """
    start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
    try:
        target = max(0.0, start + declared - 2.0)
        container.seek(int(target / video.time_base), stream=video, backward=True, any_frame=False)
        return _count_packets(container, video)[1]
    except av.FFmpegError:
        return declared  # cannot seek (odd file): trust the header rather than fail a good video


# --------------------------------------------------------------------------------------------
# Running ffmpeg


class _FFmpeg:
    """One running ffmpeg process built with ffmpeg-python.

    Its stderr is drained by a thread (a full stderr pipe would block ffmpeg while we wait on
    stdout); the last lines explain a failure. Leaving the `with` kills and reaps the process, so a
    consumer that stops reading early leaves no ffmpeg behind.
    """

    def __init__(self, spec, label: str, temp_paths: Iterable[str] = (), stdin: bool = False, stdout: bool = False):
        self.label = label
        self._temp_paths = [p for p in temp_paths if p]
        binary = ffmpeg_binary()
        try:
            self.proc = spec.run_async(cmd=[binary, *_QUIET], pipe_stdin=stdin, pipe_stdout=stdout, pipe_stderr=True)
        except OSError as e:
            raise MediaError(f"{label}: cannot run ffmpeg {binary!r}: {e.strerror or e}") from None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def write(self, frames: np.ndarray) -> bool:
        """Send frames to stdin; False when ffmpeg has stopped reading (`finish` says why)."""
        try:
            self.proc.stdin.write(memoryview(np.ascontiguousarray(frames)).cast("B"))
            return True
        except (BrokenPipeError, ValueError):
            return False

    def read_into(self, buf: np.ndarray) -> int:
        """Fill `buf` from stdout; returns the bytes read (fewer only at the end of the stream)."""
        view, got = memoryview(buf).cast("B"), 0
        while got < len(view):
            n = self.proc.stdout.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def finish(self) -> None:
        """Close stdin, wait for the exit, raise MediaError if ffmpeg failed."""
        if self.proc.stdin:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.proc.stdin.close()
        code = self.proc.wait()
        self._drain.join()
        if code < 0:
            raise EncoderKilledError(f"{self.label}: ffmpeg was killed by {_signal_name(-code)}")
        if code != 0:
            raise self.error(f"ffmpeg exited with code {code}")

    def error(self, fallback: str) -> MediaError:
        lines = [ln for ln in self._stderr if ln.strip()]
        cause = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", lines[-1]) if lines else fallback
        for p in self._temp_paths:  # name the user's source, not our temporary copy of it
            cause = cause.replace(p, self.label)
        return MediaError(f"{self.label}: ffmpeg failed: {cause}")

    def __enter__(self) -> _FFmpeg:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._drain.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _rate(fps: float) -> str:
    """fps as an exact fraction for ffmpeg (29.97002997 -> 30000/1001)."""
    return str(Fraction(float(fps)).limit_denominator(10000))


# --------------------------------------------------------------------------------------------
# decode: source -> uint8 frames (T, H, W, 3), through a rawvideo rgb24 pipe


Size = Union[int, tuple[int, int], list[int]]


def decode(
    src: Source,
    size: Size | None = None,
    fps: float | None = None,
    start_frame: int = 0,
    max_frames: int | None = None,
) -> np.ndarray:
    """All (selected) frames of a video as uint8 (T, H, W, 3).

    size: int S -> S x S (scale so the short side is S, then centre-crop: the dataset's `--size S`);
          (width, height) -> scaled to exactly that. None keeps the stored size.
    fps: resample to this rate (ffmpeg's fps filter: frames are dropped or repeated).
    start_frame, max_frames: which frames, counted after the fps resampling.
    """
    with _Decoder(src, size, fps, start_frame, max_frames) as decoder:
        chunks = list(decoder.chunks(256))
        if not chunks:
            return np.zeros((0, decoder.height, decoder.width, 3), np.uint8)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def iter_decode(
    src: Source,
    chunk_frames: int = 64,
    size: Size | None = None,
    fps: float | None = None,
    start_frame: int = 0,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Like `decode`, in chunks of up to `chunk_frames` frames (t, H, W, 3), so a long video never
    sits in memory whole. Arguments are checked now; the source is opened at the first `next()`.
    Stopping early (break, close, garbage collection) kills the ffmpeg process."""
    if not _is_int(chunk_frames) or chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames!r}: expected a positive int")
    _check_decode_args(size, fps, start_frame, max_frames)

    def chunks() -> Iterator[np.ndarray]:
        with _Decoder(src, size, fps, start_frame, max_frames) as decoder:
            yield from decoder.chunks(chunk_frames)

    return chunks()


def _check_decode_args(size, fps, start_frame, max_frames) -> None:
    if size is not None:
        pair = isinstance(size, (tuple, list)) and len(size) == 2
        values = list(size) if pair else [size]
        if not (pair or _is_int(size)) or any(not _is_int(v) or v < 1 for v in values):
            raise ValueError(f"size={size!r}: expected an int S (S x S, centre-cropped) or a pair (width, height)")
    if fps is not None and not (_is_number(fps) and fps > 0):
        raise ValueError(f"fps={fps!r}: expected a positive number")
    if not _is_int(start_frame) or start_frame < 0:
        raise ValueError(f"start_frame={start_frame!r}: expected an int >= 0")
    if max_frames is not None and not (_is_int(max_frames) and max_frames >= 0):
        raise ValueError(f"max_frames={max_frames!r}: expected an int >= 0 or None")


class _Decoder:
    """A source opened for decoding: probed (so the output size is known before reading), then
    ffmpeg writing rgb24 frames to a pipe that `chunks()` reads in chunk-sized reads."""

    def __init__(self, src: Source, size, fps, start_frame: int, max_frames: int | None):
        _check_decode_args(size, fps, start_frame, max_frames)
        self.src, self.size, self.fps = src, size, fps
        self.start_frame, self.max_frames = start_frame, max_frames
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Decoder:
        with self._stack as stack:
            label = _label(self.src)
            path = stack.enter_context(_local_file(self.src))
            info = _probe_file(path, label)
            # noautorotate: frames come out as stored, so their size is the probed one (ffmpeg
            # would otherwise turn a phone video's 1920x1080 into 1080x1920 behind our back).
            source = ffmpeg.input(path, noautorotate=None, **INPUT_OPTIONS)["v:0"]
            video, (self.width, self.height) = _decode_filters(source, info, self.size, self.fps, self.start_frame)
            options = {"format": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
            if self.max_frames is not None:
                options["frames:v"] = self.max_frames
            spec = video.output("pipe:", **options)
            self._proc = None if self.max_frames == 0 else stack.enter_context(_FFmpeg(spec, label, [path], stdout=True))
            self._stack = stack.pop_all()
        return self

    def chunks(self, chunk_frames: int) -> Iterator[np.ndarray]:
        if self._proc is None:
            return
        frame_bytes = self.height * self.width * 3
        while True:
            buf = np.empty((chunk_frames, self.height, self.width, 3), np.uint8)
            got = self._proc.read_into(buf)
            n = got // frame_bytes
            if n:
                yield buf[:n] if n == chunk_frames else buf[:n].copy()
            if n < chunk_frames:
                break
        self._proc.finish()
        if got % frame_bytes:
            raise MediaError(f"{self._proc.label}: ffmpeg ended inside a frame ({got % frame_bytes} stray bytes)")

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _decode_filters(video, info: VideoInfo, size, fps, start_frame: int):
    """The filter chain for decode's options -> (stream, (width, height) of the output)."""
    width, height = info.width, info.height
    if fps is not None:
        video = video.filter("fps", fps=_rate(fps))
    if start_frame:
        # Exact frame selection (decodes what it skips); -ss before -i would seek to a keyframe.
        video = video.trim(start_frame=start_frame).setpts("PTS-STARTPTS")
    if size is None:
        return video, (width, height)
    if _is_int(size):
        size = int(size)
        scale = size / min(width, height)  # short side -> S, then centre-crop S x S
        scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
        out = (size, size)
    else:
        scaled = out = (int(size[0]), int(size[1]))
    # area averaging when shrinking avoids aliasing shimmer in downscaled clips
    flags = "area" if scaled[0] * scaled[1] < width * height else "bicubic"
    video = video.filter("scale", w=scaled[0], h=scaled[1], flags=flags).filter("setsar", 1)
    if scaled != out:
        video = video.crop((scaled[0] - out[0]) // 2, (scaled[1] - out[1]) // 2, out[0], out[1])
    return video, out


# --------------------------------------------------------------------------------------------
# Overlays for ad and education renders, drawn in the encode pass

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class Overlays:
    """What `encode` draws or muxes onto the frames.

    title, watermark: text drawn literally (any Unicode; `%{pts}`, quotes, colons, backslashes,
        braces are drawn as written, never expanded). Characters the font lacks -> a warning.
    logo: an image with alpha (path, URI or bytes), `logo_height` of the frame high, in a corner.
    audio: a sound track (path, URI or bytes), trimmed or padded with silence to the video's length.
    subtitles: WebVTT or SRT (path, URI or bytes), burned in (`burn_subtitles`) or muxed as a track.
        Burned cues follow SRT/WebVTT semantics as players render them (libass): <i>/<b> markup and
        {\\an8}-style tags are honoured, exactly as the same file muxed as a track would show.
    """

    title: str | None = None
    logo: Source | None = None
    logo_corner: str = "top-right"
    logo_height: float = 0.15
    watermark: str | None = None
    watermark_opacity: float = 0.35
    audio: Source | None = None
    subtitles: Source | None = None
    burn_subtitles: bool = True

    def __post_init__(self):
        if self.logo_corner not in CORNERS:
            raise ValueError(f"logo_corner={self.logo_corner!r}: expected one of {', '.join(CORNERS)}")
        if not 0 < self.logo_height <= 1:
            raise ValueError(f"logo_height={self.logo_height!r}: expected a fraction of the frame height in (0, 1]")
        if not 0 < self.watermark_opacity <= 1:
            raise ValueError(f"watermark_opacity={self.watermark_opacity!r}: expected a value in (0, 1]")
        for name in ("title", "watermark"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected text")


def _draw_text(video, text: str, tmp: str, name: str, **style):
    """drawtext with the text read from a UTF-8 file and `expansion=none`.

    The text never enters the filter graph, so no filter-syntax escaping can go wrong, and with
    expansion off `%{pts}` is drawn as written. The file paths are escaped by ffmpeg-python.
    """
    _warn_missing_glyphs(text, name)
    textfile = os.path.join(tmp, f"{name}.txt")
    with open(textfile, "w", encoding="utf-8") as f:
        f.write(text.replace("\r\n", "\n").replace("\r", "\n"))
    return video.filter("drawtext", textfile=textfile, fontfile=font_path(), expansion="none", fix_bounds=1, **style)


def _wrap(text: str, fontsize: int, max_width: float) -> str:
    """Greedy word wrap at the font's real advance widths (drawtext does not wrap)."""
    font = ImageFont.truetype(font_path(), fontsize)
    lines = []
    for paragraph in text.replace("\r\n", "\n").split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and font.getlength(trial) > max_width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return "\n".join(lines)


TITLE_LINES_BESIDE_A_LOGO = 3  # more, and the title goes under the logo at the frame's width instead


def _draw_title(video, title: str, width: int, height: int, tmp: str, logo: tuple[int, int] = (0, 0)):
    """The title centred at the top, wrapped to 90% of the frame's width, clear of a logo in a top
    corner: `logo` is the (width, bottom) that logo takes, margins included. The title wraps between
    the logo and its mirror image when it fits there in TITLE_LINES_BESIDE_A_LOGO lines (no word
    wider than that room); otherwise it starts under the logo."""
    size = max(12, height // 12)
    border = max(2, size // 4)
    top = max(2, height // 25)
    text = _wrap(title, size, 0.9 * width)
    beside, bottom = logo
    if beside:
        room = width - 2 * beside - 2 * border
        narrow = _wrap(title, size, room)
        font = ImageFont.truetype(font_path(), size)
        lines = narrow.split("\n")
        if len(lines) <= TITLE_LINES_BESIDE_A_LOGO and max(map(font.getlength, lines)) <= room:
            text = narrow
        else:
            top = max(top, bottom + border)
    return _draw_text(
        video, text, tmp, "title",
        fontsize=size, fontcolor="white", x="(w-text_w)/2", y=top,
        box=1, boxcolor="black@0.55", boxborderw=border,
    )


def _draw_watermark(video, text: str, width: int, height: int, opacity: float, tmp: str):
    size = max(12, height // 8)
    return _draw_text(
        video, _wrap(text, size, 0.9 * width), tmp, "watermark",
        fontsize=size, fontcolor=f"white@{opacity:g}", x="(w-text_w)/2", y="(h-text_h)/2",
        shadowcolor=f"black@{opacity / 2:g}", shadowx=1, shadowy=1,
    )


def _overlay_logo(video, logo: Source, corner: str, fraction: float, width: int, height: int, tmp: str):
    """Scale the logo (Pillow, high-quality Lanczos) and place it in a corner with a margin; the
    overlay filter blends with its alpha channel. Returns the video and, for a logo in a top corner,
    the (width with both margins, bottom with its margin) a title at the top keeps clear of; else (0, 0)."""
    data = _read_source(logo, "an image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise MediaError(f"{_label(logo)}: not a readable image ({e})") from None
    image = image.convert("RGBA")
    h = max(2, round(height * fraction))
    w = max(2, round(image.width * h / image.height))
    path = os.path.join(tmp, "logo.png")
    image.resize((w, h), Image.Resampling.LANCZOS).save(path)
    margin = max(2, round(0.03 * height))
    x = margin if corner.endswith("left") else width - w - margin
    y = margin if corner.startswith("top") else height - h - margin
    taken = (w + 2 * margin, y + h + margin) if corner.startswith("top") else (0, 0)
    return ffmpeg.filter([video, ffmpeg.input(path)], "overlay", x=x, y=y, eof_action="repeat"), taken


def _subtitles_file(subtitles: Source, tmp: str) -> str:
    """Validate WebVTT/SRT subtitles, warn about characters the font lacks, write them to a file."""
    label = _label(subtitles)
    try:
        text = _read_source(subtitles, "WebVTT or SRT subtitles").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MediaError(f"{label}: subtitles are not UTF-8 text") from None
    text = text.replace("\r\n", "\n")
    if text.lstrip().startswith("WEBVTT"):
        ext = ".vtt"
    elif re.search(r"\d\d:\d\d[:.,\d]*\s*-->\s*[\d:.,]+", text):
        ext = ".srt"
    else:
        raise MediaError(f"{label}: not WebVTT or SRT subtitles (no WEBVTT header and no 'start --> end' cue)")
    cue_text = [
        re.sub(r"<[^>]*>|\{[^}]*\}", "", line)
        for line in text.split("\n")
        if line.strip() and "-->" not in line and not line.strip().isdigit() and not line.startswith(("WEBVTT", "NOTE"))
    ]
    _warn_missing_glyphs("\n".join(cue_text), f"subtitles {label}")
    path = os.path.join(tmp, "subtitles" + ext)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _burn_subtitles(video, path: str, label: str):
    """libass's `subtitles` filter, told to use our font (fontsdir + force_style), so the look does
    not depend on what fontconfig finds on the machine."""
    if "subtitles" not in _ffmpeg_filters(ffmpeg_binary()):
        raise MediaError(
            f"{label}: this ffmpeg ({ffmpeg_binary()}) has no libass 'subtitles' filter: "
            f"set {FFMPEG_ENV} to a build with libass, or mux them with burn_subtitles=False"
        )
    font = font_path()
    family = _font(font).getname()[0]
    return video.filter("subtitles", filename=path, fontsdir=os.path.dirname(font), force_style=f"FontName={family}")


# --------------------------------------------------------------------------------------------
# encode: uint8 frames (T, H, W, 3) or chunks of them -> mp4 (H.264) or webm (VP9) bytes


@dataclass(frozen=True)
class _Codec:
    container: str  # ffmpeg muxer and file extension
    video: str
    audio: str
    audio_bitrate: str
    subtitles: str
    max_crf: int


CODECS = {
    "h264": _Codec("mp4", "libx264", "aac", "128k", "mov_text", 51),
    "vp9": _Codec("webm", "libvpx-vp9", "libopus", "96k", "webvtt", 63),
}
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# libvpx has no presets: map x264's names to its speed knobs. 5 and up use the realtime deadline,
# which is several times faster than `good` at a small quality cost (renders are batch jobs).
_VP9_SPEED = dict(zip(PRESETS, [8, 8, 8, 7, 6, 6, 4, 2, 1]))


def container_for(codec: str) -> str:
    """"h264" -> "mp4", "vp9" -> "webm"."""
    return _codec(codec).container


def _codec(codec: str) -> _Codec:
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: expected one of {', '.join(CODECS)}")
    return CODECS[codec]


def encode(frames: Frames, fps: float, codec: str = "h264", **options) -> bytes:
    """Encode uint8 frames (T, H, W, 3), or an iterable of such chunks, to mp4 or webm bytes.

    options: crf, preset, metadata, overlays, size, fit, threads, as for `encode_to`.
    """
    with tempfile.TemporaryDirectory(prefix="vidgen-encode-") as tmp:
        path = os.path.join(tmp, "out." + _codec(codec).container)
        _encode_file(frames, fps, path, codec, label="<frames>", **options)
        with open(path, "rb") as f:
            return f.read()


@dataclass(frozen=True)
class EncodedVideo:
    """What `encode_to` wrote."""

    uri: str
    bytes: int
    frames: int
    seconds: float
    sha256: str
    content_type: str


def encode_to(
    uri: str,
    frames: Frames,
    fps: float,
    codec: str | None = None,
    crf: int = 23,
    preset: str = "medium",
    metadata: dict[str, str] | None = None,
    overlays: Overlays | None = None,
    size: tuple[int, int] | None = None,
    fit: str = "crop",
    object_metadata: dict[str, str] | None = None,
    threads: int | None = None,
) -> EncodedVideo:
    """Encode uint8 frames (T, H, W, 3), or an iterable of such chunks, straight to a storage URI
    (local or s3), with the video's content type.

    codec: h264 -> mp4 (libx264, yuv420p, +faststart); vp9 -> webm (libvpx-vp9, constant quality);
        None: from the extension (.webm -> vp9, else h264).
    Odd widths/heights are padded to even (yuv420p needs it) by repeating the last column/row.
    metadata: container tags, e.g. {"title": ..., "comment": ...}.
    size: (width, height), even, to scale the frames to in ffmpeg before the overlays are drawn;
        fit: "crop" (fill, centre-crop the excess), "pad" (fit inside, black bars) or "stretch".
    threads: the encoder's threads (None: ffmpeg's choice, about 1.5 per core). When several
        encodes share the cores, 1 each gets more videos/s: small frames gain little from threads.
    object_metadata: S3 user metadata of the uploaded object.
    Memory stays bounded for chunked input: frames stream into ffmpeg, the result lands in a
    temporary file and is uploaded from it.
    """
    ext = os.path.splitext(str(uri))[1].lower()
    codec = codec or ("vp9" if ext == ".webm" else "h264")
    container = _codec(codec).container
    if ext not in ("", "." + container):
        raise ValueError(f"{uri}: a {codec} video is a .{container} file, not {ext}")
    content_type = f"video/{container}"
    with tempfile.TemporaryDirectory(prefix="vidgen-encode-") as tmp:
        path = os.path.join(tmp, "out." + container)
        count = _encode_file(frames, fps, path, codec, crf, preset, metadata, overlays, size, fit, threads, str(uri))
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        try:
            storage.upload_file(path, uri, content_type=content_type, metadata=object_metadata)
        except storage.StorageError as e:
            raise MediaError(str(e)) from None
        return EncodedVideo(str(uri), os.path.getsize(path), count, count / fps, digest.hexdigest(), content_type)


def _frame_chunks(frames: Frames) -> Iterator[np.ndarray]:
    """Chunks (t, H, W, 3) uint8 of an array or an iterable of arrays; a bad chunk raises ValueError."""
    if isinstance(frames, np.ndarray):
        frames = [frames]
    for i, chunk in enumerate(frames):
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:
            chunk = chunk[None]
        if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise ValueError(f"frames chunk {i}: got {chunk.dtype} {chunk.shape}, expected uint8 (T, H, W, 3)")
        if len(chunk):
            yield from (chunk[j : j + 64] for j in range(0, len(chunk), 64))


FITS = ("crop", "pad", "stretch")


def _check_encode_args(fps, codec: str, crf, preset: str, metadata, size=None, fit: str = "crop",
                       threads=None) -> _Codec:
    spec = _codec(codec)
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise ValueError(f"threads={threads!r}: expected an int >= 1, or None for ffmpeg's choice")
    if size is not None:
        pair = isinstance(size, (tuple, list)) and len(size) == 2
        if not pair or any(not _is_int(v) or v < 2 or v % 2 for v in size):
            raise ValueError(f"size={size!r}: expected (width, height), even ints >= 2")
    if fit not in FITS:
        raise ValueError(f"fit={fit!r}: expected one of {', '.join(FITS)}")
    if not (_is_number(fps) and fps > 0):
        raise ValueError(f"fps={fps!r}: expected a positive number")
    if not _is_int(crf) or not 0 <= crf <= spec.max_crf:
        raise ValueError(f"crf={crf!r}: expected an int in 0..{spec.max_crf} for {codec}")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(PRESETS)}")
    for key in metadata or {}:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", key):
            raise ValueError(f"metadata key {key!r}: expected letters, digits, '_' or '-'")
    return spec


def _encode_file(frames, fps, path, codec, crf=23, preset="medium", metadata=None, overlays=None, size=None,
                 fit="crop", threads=None, label="<frames>") -> int:
    """Encode into the file `path` (`label` names the video in errors); returns the number of frames."""
    spec = _check_encode_args(fps, codec, crf, preset, metadata, size, fit, threads)
    overlays = overlays or Overlays()
    chunks = _frame_chunks(frames)
    first = next(chunks, None)
    if first is None:
        raise ValueError("no frames to encode")
    _, h, w, _ = first.shape
    # yuv420p stores chroma per 2x2 block, so both sides must be even: pad by one repeated
    # column/row (no pixel is resampled or lost; decode returns the padded, even size).
    pad_h, pad_w = h % 2, w % 2
    width, height = w + pad_w, h + pad_h

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vidgen-overlay-"))
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=_rate(fps))
        if size is not None and tuple(size) != (width, height):
            video = _fit(video, (width, height), (int(size[0]), int(size[1])), fit)
            width, height = int(size[0]), int(size[1])
        video = _overlay_graph(video, overlays, width, height, tmp)
        # Convert to yuv420p with the BT.709 matrix and tag the stream as such, so players
        # (browsers assume 709 for untagged video) and our decode convert back with that matrix.
        video = video.filter("scale", out_color_matrix="bt709", out_range="tv").filter("format", "yuv420p")
        # Tracks are read and checked before the (possibly long) video encode, not after it.
        audio = None
        if overlays.audio is not None:
            audio = stack.enter_context(_local_file(overlays.audio, "sound track"))
            _check_audio(audio, _label(overlays.audio))
        muxed_subtitles = None
        if overlays.subtitles is not None and not overlays.burn_subtitles:
            muxed_subtitles = _subtitles_file(overlays.subtitles, tmp)
        # Audio and subtitle tracks are muxed in a second, stream-copy pass: there the video's exact
        # length is known (chunked input has no length up front), so the audio is cut or padded to
        # it exactly; `-shortest` overshot by up to 0.7 s with VP9's encoder delay.
        two_pass = audio is not None or muxed_subtitles is not None
        video_path = os.path.join(tmp, "video." + spec.container) if two_pass else path
        options = _video_options(spec, crf, preset, threads)
        if not two_pass:
            options.update(_final_options(spec, metadata))
        out = video.output(video_path, **options).overwrite_output()
        count = 0
        with _FFmpeg(out, label, stdin=True) as proc:
            for chunk in itertools.chain([first], chunks):
                if chunk.shape[1:3] != (h, w):
                    raise ValueError(f"frames chunk of {chunk.shape[2]}x{chunk.shape[1]} after {w}x{h} frames: all frames need one size")
                if pad_h or pad_w:
                    chunk = np.pad(chunk, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                if not proc.write(chunk):
                    break  # ffmpeg stopped reading: finish() raises its reason
                count += len(chunk)
            proc.finish()
        if two_pass:
            _mux_tracks(video_path, path, count / fps, spec, audio, muxed_subtitles, metadata, label)
    return count


def _fit(video, source: tuple[int, int], size: tuple[int, int], fit: str):
    """Scale (w, h) frames to `size`: crop = fill and centre-crop, pad = fit inside with black
    bars, stretch = exactly `size`. Lanczos when enlarging, area averaging when shrinking."""
    w, h = size
    if fit == "stretch":
        scaled = (w, h)
    else:
        grow = max if fit == "crop" else min
        factor = grow(w / source[0], h / source[1])
        # even sides, never beyond the target on the fitted axis
        scaled = tuple(max(2, 2 * round(v * factor / 2)) for v in source)
        scaled = (max(scaled[0], w), max(scaled[1], h)) if fit == "crop" else (min(scaled[0], w), min(scaled[1], h))
    flags = "area" if scaled[0] * scaled[1] < source[0] * source[1] else "lanczos"
    video = video.filter("scale", w=scaled[0], h=scaled[1], flags=flags).filter("setsar", 1)
    if fit == "crop" and scaled != (w, h):
        video = video.crop((scaled[0] - w) // 2, (scaled[1] - h) // 2, w, h)
    elif fit == "pad" and scaled != (w, h):
        video = video.filter("pad", w, h, (w - scaled[0]) // 2, (h - scaled[1]) // 2, color="black")
    return video


def _overlay_graph(video, overlays: Overlays, width: int, height: int, tmp: str):
    """Burned-in overlays, bottom layer first: subtitles, logo, watermark, title."""
    if overlays.subtitles is not None and overlays.burn_subtitles:
        video = _burn_subtitles(video, _subtitles_file(overlays.subtitles, tmp), _label(overlays.subtitles))
    logo = (0, 0)  # what a logo in a top corner takes from the title's place
    if overlays.logo is not None:
        video, logo = _overlay_logo(video, overlays.logo, overlays.logo_corner, overlays.logo_height, width, height,
                                    tmp)
    if overlays.watermark:
        video = _draw_watermark(video, overlays.watermark, width, height, overlays.watermark_opacity, tmp)
    if overlays.title:
        video = _draw_title(video, overlays.title, width, height, tmp, logo=logo)
    return video


_BT709 = {"colorspace": "bt709", "color_primaries": "bt709", "color_trc": "bt709", "color_range": "tv"}


def _video_options(spec: _Codec, crf: int, preset: str, threads: int | None = None) -> dict:
    options = {"format": spec.container, "c:v": spec.video, "crf": crf, "pix_fmt": "yuv420p", **_BT709}
    if threads is not None:
        options["threads"] = threads
    if spec.video == "libx264":
        options["preset"] = preset
    else:  # VP9 constant quality needs b:v 0; row-mt spreads one frame over the cores
        speed = _VP9_SPEED[preset]
        options.update({"b:v": 0, "deadline": "realtime" if speed >= 5 else "good", "cpu-used": speed, "row-mt": 1})
    return options


def _final_options(spec: _Codec, metadata: dict[str, str] | None) -> dict:
    """Options of the file we hand back: faststart for mp4 (its index goes first, so players and
    browsers can start before the download ends) and the metadata tags."""
    options = {"movflags": "+faststart"} if spec.container == "mp4" else {}
    # ffmpeg-python writes one option per dict key, and ffmpeg reads anything after `g` in a
    # `-metadata:g...` specifier as "global", so `metadata:g:N` gives one `-metadata` per tag.
    for i, (key, value) in enumerate((metadata or {}).items()):
        options[f"metadata:g:{i}"] = f"{key}={value}"
    return options


def _mux_tracks(video_path, path, seconds, spec: _Codec, audio: str | None, subtitles: str | None, metadata, label) -> None:
    """Copy the encoded video into `path`, adding the audio (cut or padded with silence to
    `seconds`) and/or the subtitle track."""
    streams = [ffmpeg.input(video_path)["v:0"]]
    options = {"c:v": "copy", **_final_options(spec, metadata)}
    if audio is not None:
        streams.append(
            ffmpeg.input(audio, **AUDIO_OPTIONS)["a:0"]
            .filter("asetpts", "PTS-STARTPTS")
            .filter("atrim", duration=f"{seconds:.6f}")
            .filter("apad", whole_dur=f"{seconds:.6f}")
        )
        options.update({"c:a": spec.audio, "b:a": spec.audio_bitrate})
    if subtitles is not None:
        streams.append(ffmpeg.input(subtitles, **SUBTITLE_OPTIONS)["s:0"])
        options["c:s"] = spec.subtitles
    out = ffmpeg.output(*streams, path, format=spec.container, **options).overwrite_output()
    with _FFmpeg(out, label) as proc:
        proc.finish()


def _check_audio(path: str, label: str) -> None:
    try:
        with av.open(path, options=AUDIO_OPTIONS) as container:
            if not container.streams.audio:
                raise MediaError(f"{label}: no audio stream, expected a sound track")
    except av.FFmpegError as e:
        raise MediaError(f"{label}: not a readable sound track ({_av_cause(e)})") from None


# --------------------------------------------------------------------------------------------
# Posters


def poster_jpeg(video: np.ndarray | Source, index: int | None = None, quality: int = 90) -> bytes:
    """A JPEG of one frame (default: the middle one) of frames (T, H, W, 3) or of a video
    (bytes, path or URI)."""
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not len(video):
            raise ValueError(f"frames: got {video.dtype} {video.shape}, expected uint8 (T, H, W, 3) with T >= 1")
        count = len(video)
        frame = video[_poster_index(index, count)]
    else:
        with _local_file(video) as path:
            info = _probe_file(path, _label(video))
            frame = _frame_at(path, _label(video), _poster_index(index, info.frames), info)
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _frame_at(path: str, label: str, index: int, info: VideoInfo) -> np.ndarray:
    """Frame `index` (counted at the stream's frame rate) of a video file, decoded in this process
    with PyAV: seek to the keyframe before it, then decode forward. No ffmpeg process to start,
    and a poster of a long video reads one GOP, not the first half of the file."""
    try:
        with av.open(path, options=INPUT_OPTIONS) as container:
            stream = container.streams.video[0]
            start = stream.start_time or 0
            target = start + int(round(index / info.fps / stream.time_base))
            if index:
                container.seek(target, stream=stream, backward=True, any_frame=False)
            half = 0.5 / info.fps / stream.time_base  # pts rounding: the frame nearest the target
            last = None
            for frame in container.decode(stream):
                last = frame
                if frame.pts is None or frame.pts >= target - half:
                    break
            if last is None:
                raise MediaError(f"{label}: frame {index} could not be decoded")
            return last.to_ndarray(format="rgb24")
    except av.FFmpegError as e:
        raise MediaError(f"{label}: frame {index} could not be decoded ({_av_cause(e)})") from None


def _poster_index(index: int | None, count: int) -> int:
    if index is None:
        return count // 2
    if not -count <= index < count:
        raise ValueError(f"index={index}: the video has {count} frames")
    return index % count


def filter_frames(frames: np.ndarray, vf: str) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> the same frames through an ffmpeg video filter graph `vf` that
    keeps their size and count (e.g. `hqdn3d`, `nlmeans=s=4`): raw rgb24 in and out, no codec."""
    t, h, w, _ = frames.shape
    cmd = [ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-framerate", "8", "-i", "pipe:", "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if proc.returncode:
        raise MediaError(f"ffmpeg filter {vf!r} failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    out = np.frombuffer(proc.stdout, np.uint8)
    if out.size != frames.size:
        raise MediaError(f"ffmpeg filter {vf!r} changed the frames' size or count ({out.size} != {frames.size} bytes)")
    return out.reshape(frames.shape).copy()
