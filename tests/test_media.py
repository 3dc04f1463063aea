"""vidgen.media against the real ffmpeg binary (whichever `media.ffmpeg_binary()` resolves).

Test videos come from ffmpeg's lavfi sources (testsrc2, mandelbrot, sine), small and short.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import av
import ffmpeg
import numpy as np
import pytest
from PIL import Image

from vidgen import media, storage

W, H, FPS = 128, 96, 24


# --------------------------------------------------------------------------------------------
# Helpers


def lavfi_frames(source: str, frames: int, width: int = W, height: int = H, fps: int = FPS) -> np.ndarray:
    """uint8 (T, H, W, 3) from an ffmpeg lavfi source, e.g. "testsrc2"."""
    out, _ = (
        ffmpeg.input(f"{source}=s={width}x{height}:r={fps}", format="lavfi")
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", **{"frames:v": frames})
        .run(cmd=media.ffmpeg_binary(), quiet=True)
    )
    return np.frombuffer(out, np.uint8).reshape(frames, height, width, 3)


def lavfi_file(path: str, video: str, seconds: float, **options) -> str:
    """A video file made by the ffmpeg CLI itself (not by media.encode)."""
    (
        ffmpeg.input(f"{video}=s={W}x{H}:r={FPS}:d={seconds}", format="lavfi")
        .output(path, pix_fmt="yuv420p", **options)
        .overwrite_output()
        .run(cmd=media.ffmpeg_binary(), quiet=True)
    )
    return path


def sine_file(path: str, seconds: float) -> str:
    ffmpeg.input(f"sine=frequency=440:duration={seconds}", format="lavfi").output(path).overwrite_output().run(
        cmd=media.ffmpeg_binary(), quiet=True
    )
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])  # BT.709 Y'


def yuv420_ceiling(frames: np.ndarray) -> np.ndarray:
    """frames through RGB -> yuv420p (BT.709) -> RGB with no codec: the best any yuv420p video can do."""
    t, h, w, _ = frames.shape
    out, _ = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}")
        .filter("scale", out_color_matrix="bt709", out_range="tv")
        .filter("format", "yuv420p")
        .filter("scale", in_color_matrix="bt709", in_range="tv")
        .output("pipe:", format="rawvideo", pix_fmt="rgb24")
        .run(cmd=media.ffmpeg_binary(), input=frames.tobytes(), quiet=True)
    )
    return np.frombuffer(out, np.uint8).reshape(frames.shape)


def stream_ends(data: bytes) -> dict[str, float]:
    """The end time (s) of the last packet of each stream type, read with PyAV."""
    ends: dict[str, float] = {}
    with av.open(io.BytesIO(data)) as container:
        for packet in container.demux():
            if packet.size and packet.pts is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                ends[packet.stream.type] = max(ends.get(packet.stream.type, 0.0), end)
    return ends


def static_frames(frames: int = 12) -> np.ndarray:
    """A constant blue background: overlay pixels are the only thing that can change."""
    out = np.zeros((frames, H, W, 3), np.uint8)
    out[..., 2] = 170
    out[..., 1] = 40
    return out


def ffmpeg_children() -> list:
    psutil = pytest.importorskip("psutil")  # installed with ray
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


@pytest.fixture(scope="module")
def testsrc() -> np.ndarray:
    return lavfi_frames("testsrc2", 48)


@pytest.fixture(scope="module")
def clip(testsrc) -> bytes:
    """2 s of testsrc2, 48 frames, encoded by us."""
    return media.encode(testsrc, FPS, crf=18)


@pytest.fixture(scope="module")
def cli_mp4(tmp_path_factory) -> str:
    """An mp4 the ffmpeg CLI wrote (faststart, with an audio track)."""
    path = str(tmp_path_factory.mktemp("media") / "cli.mp4")
    (
        ffmpeg.output(
            ffmpeg.input(f"testsrc2=s={W}x{H}:r={FPS}:d=2", format="lavfi"),
            ffmpeg.input("sine=d=2", format="lavfi"),
            path, vcodec="libx264", pix_fmt="yuv420p", acodec="aac", movflags="+faststart",
        )
        .overwrite_output()
        .run(cmd=media.ffmpeg_binary(), quiet=True)
    )
    return path


@pytest.fixture(scope="module")
def logo_png() -> bytes:
    """A 40x40 PNG: an opaque orange disc on a fully transparent square."""
    yy, xx = np.mgrid[:40, :40]
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = (255, 160, 0)
    rgba[..., 3] = np.where((yy - 20) ** 2 + (xx - 20) ** 2 < 18**2, 255, 0)
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# The binary


def test_binary_resolves_and_setting_wins(monkeypatch, tmp_path):
    binary = media.ffmpeg_binary()
    assert os.access(binary, os.X_OK)
    monkeypatch.setenv(media.FFMPEG_ENV, binary)
    assert media.ffmpeg_binary() == binary
    monkeypatch.setenv(media.FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(media.MediaError, match="VIDGEN_FFMPEG"):
        media.ffmpeg_binary()


def test_probe_and_decode_without_ffprobe(monkeypatch, tmp_path, clip):
    binary = media.ffmpeg_binary()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv(media.FFMPEG_ENV, binary)
    assert shutil.which("ffprobe") is None and shutil.which("ffmpeg") is None
    info = media.probe(clip)
    assert (info.width, info.height, info.frames) == (W, H, 48)
    assert media.decode(clip, max_frames=2).shape == (2, H, W, 3)


def test_playlists_and_concat_lists_are_refused_not_followed(tmp_path):
    """An HLS playlist or a concat list makes ffmpeg open the files (or hosts) it names: an input
    root must not become a way to read other files. Real containers still open."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "inputs").mkdir()
    secret = lavfi_file(str(tmp_path / "outside" / "secret.ts"), "testsrc2", 1, f="mpegts")
    part = lavfi_file(str(tmp_path / "inputs" / "part.ts"), "testsrc2", 1, f="mpegts")
    playlist = tmp_path / "inputs" / "lecture.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "inputs" / "course.ffconcat"
    concat.write_text("ffconcat version 1.0\nfile part.ts\n")
    for path in (playlist, concat):
        with pytest.raises(media.MediaError, match=f"{path.name}: not a readable video"):
            media.probe(str(path))
        with pytest.raises(media.MediaError):
            media.decode(str(path), max_frames=1)
    for real in (secret, part):
        assert media.probe(real).frames == FPS and media.decode(real, max_frames=1).shape == (1, H, W, 3)


# --------------------------------------------------------------------------------------------
# Round trips: encode -> probe -> decode


@pytest.mark.parametrize("source", ["testsrc2", "mandelbrot"])
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_round_trip(source, codec):
    frames = lavfi_frames(source, 24)
    assert frames.std() > 40  # not flat content
    data = media.encode(frames, FPS, codec=codec, crf=18)

    info = media.probe(data)
    assert (info.width, info.height, info.frames) == (W, H, 24)
    assert info.fps == pytest.approx(FPS)
    assert info.seconds == pytest.approx(1.0, abs=0.01)
    assert info.video_codec == codec and not info.audio
    assert set(info.to_json()) >= {"width", "height", "fps", "frames", "seconds", "video_codec", "audio"}

    back = media.decode(data)
    assert back.shape == frames.shape and back.dtype == np.uint8
    # PSNR is measured on luma, the way codecs are judged: in RGB, yuv420p's half-resolution
    # chroma alone caps mandelbrot at ~22 dB at this size (no encoder involved), so RGB is
    # checked against that ceiling instead.
    assert psnr(luma(frames), luma(back)) >= 35
    assert psnr(frames, back) >= psnr(frames, yuv420_ceiling(frames)) - 2.5


def test_colours_survive(tmp_path):
    frames = np.empty((6, 64, 64, 3), np.uint8)
    frames[:] = (200, 60, 30)
    for codec in ["h264", "vp9"]:
        back = media.decode(media.encode(frames, 10, codec=codec, crf=10))
        assert np.abs(back.astype(int) - frames).max() <= 3, codec


def test_chunked_encode_matches_array_encode(testsrc, clip):
    chunks = (testsrc[i : i + 10] for i in range(0, len(testsrc), 10))  # 10 + ... + 8 frames
    data = media.encode(chunks, FPS, crf=18)
    assert media.probe(data).frames == media.probe(clip).frames == 48
    assert psnr(luma(media.decode(data)), luma(testsrc)) >= 35


def test_odd_size_is_padded_to_even():
    frames = lavfi_frames("testsrc2", 12)[:, :95, :127].copy()
    data = media.encode(frames, FPS, crf=18)
    info = media.probe(data)
    assert (info.width, info.height) == (128, 96)
    back = media.decode(data)
    assert psnr(luma(back[:, :95, :127]), luma(frames)) >= 35
    # the added column repeats its neighbour (no black line)
    assert np.abs(back[:, :95, 127].astype(int) - back[:, :95, 126]).mean() < 12


def test_iter_decode_concatenates_to_decode(clip):
    whole = media.decode(clip)
    chunks = list(media.iter_decode(clip, chunk_frames=20))
    assert [len(c) for c in chunks] == [20, 20, 8]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


@pytest.mark.timeout(60)  # an ffmpeg left running blocks on its full stdout pipe: fail, don't hang
def test_iter_decode_stopped_early_leaves_no_ffmpeg(clip):
    it = media.iter_decode(clip, chunk_frames=4)
    assert next(it).shape == (4, H, W, 3)
    assert ffmpeg_children()
    it.close()
    assert not ffmpeg_children()


# --------------------------------------------------------------------------------------------
# Decode options


def test_decode_size_int_scales_short_side_and_centre_crops(clip):
    square = media.decode(clip, size=48)
    assert square.shape == (48, 48, 48, 3)
    scaled = media.decode(clip, size=(64, 48))  # short side 96 -> 48, so 128 -> 64
    assert scaled.shape == (48, 48, 64, 3)
    np.testing.assert_array_equal(square, scaled[:, :, 8:56])


def test_decode_fps_and_frame_window(clip):
    full = media.decode(clip)
    assert len(media.decode(clip, fps=12)) == 24
    assert len(media.decode(clip, fps=48)) == 96
    np.testing.assert_array_equal(media.decode(clip, start_frame=10, max_frames=5), full[10:15])
    np.testing.assert_array_equal(media.decode(clip, fps=12, start_frame=3, max_frames=2), media.decode(clip, fps=12)[3:5])
    assert media.decode(clip, start_frame=100).shape == (0, H, W, 3)
    assert media.decode(clip, max_frames=0).shape == (0, H, W, 3)


def test_an_encode_with_one_thread_is_the_same_video(tmp_path):
    """The pipeline gives each of its parallel encodes one x264 thread: the frames come back the same
    as with ffmpeg's own thread count, and ffmpeg is asked for one."""
    frames = static_frames(12)
    one = media.decode(media.encode(frames, FPS, threads=1))
    auto = media.decode(media.encode(frames, FPS))
    assert one.shape == auto.shape == frames.shape and np.abs(one.astype(int) - auto.astype(int)).mean() < 1.0
    assert media._video_options(media._codec("h264"), 23, "medium", 1)["threads"] == 1


def test_decode_reads_a_file_the_cli_wrote(cli_mp4):
    info = media.probe(cli_mp4)
    assert (info.frames, info.audio, info.audio_codec) == (48, True, "aac")
    assert media.probe("file://" + cli_mp4).frames == 48
    assert media.decode(cli_mp4, size=(32, 24)).shape == (48, 24, 32, 3)


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"size": (10,)}, {"size": 1.5}, {"fps": 0}, {"start_frame": -1}, {"max_frames": -2}]
)
def test_decode_rejects_bad_options(clip, kwargs):
    with pytest.raises(ValueError):
        media.decode(clip, **kwargs)


@pytest.mark.parametrize("kwargs", [{"codec": "h265"}, {"crf": 99}, {"preset": "warp"}, {"fps": 0}, {"metadata": {"a=b": "x"}},
                                    {"threads": 0}, {"threads": 1.5}])
def test_encode_rejects_bad_options(kwargs):
    args = {"fps": FPS, **kwargs}
    with pytest.raises(ValueError):
        media.encode(static_frames(2), **args)
    with pytest.raises(ValueError, match="uint8"):
        media.encode(static_frames(2).astype(np.float32), FPS)


# --------------------------------------------------------------------------------------------
# Bad input: one MediaError naming the source


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, clip) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    text = folder / "notes.mp4"
    text.write_text("this is not a video\n")
    webm = media.encode(lavfi_frames("testsrc2", 24), FPS, codec="vp9")
    return {
        "empty": (b"", "<bytes>"),
        "random": (np.random.default_rng(0).bytes(4096), "<bytes>"),
        "truncated-mp4": (clip[: len(clip) // 2], "<bytes>"),
        "truncated-webm": (webm[: len(webm) // 2], "<bytes>"),
        "text-file": (str(text), str(text)),
        "missing": (str(folder / "missing.mp4"), str(folder / "missing.mp4")),
    }


@pytest.mark.parametrize("case", ["empty", "random", "truncated-mp4", "truncated-webm", "text-file", "missing"])
@pytest.mark.parametrize("call", [media.probe, media.decode, lambda s: list(media.iter_decode(s))])
def test_bad_input_raises_media_error_naming_the_source(bad_inputs, case, call):
    src, label = bad_inputs[case]
    with pytest.raises(media.MediaError) as info:
        call(src)
    message = str(info.value)
    assert message.startswith(label + ":") and "\n" not in message
    assert "vidgen-media-" not in message  # our temporary copy is never what the user reads


def test_ffmpeg_failure_is_a_media_error(monkeypatch, clip):
    monkeypatch.setenv(media.FFMPEG_ENV, shutil.which("false"))
    with pytest.raises(media.MediaError, match="^<frames>: ffmpeg failed"):
        media.encode(static_frames(4), FPS)
    with pytest.raises(media.MediaError, match="^<bytes>: ffmpeg failed"):
        media.decode(clip)


def test_file_without_video_stream(tmp_path):
    path = sine_file(str(tmp_path / "tone.m4a"), 0.5)
    with pytest.raises(media.MediaError, match="no video stream"):
        media.probe(path)


# --------------------------------------------------------------------------------------------
# Overlays


# crf 0 is lossless (in yuv420p): pixel differences are the overlay's, not the codec's.
LOSSLESS = 0
TRICKY = "It's: a\\b {x} 100% %{pts} Привет Ελλάδα"


def test_title_is_drawn_literally():
    plain = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS))
    with warnings.catch_warnings():
        warnings.simplefilter("error", media.MissingGlyphWarning)  # DejaVu draws all of these
        titled = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS, overlays=media.Overlays(title=TRICKY)))
    # If %{pts} were expanded the text would change every frame; drawn literally, a static
    # background gives identical frames.
    assert np.abs(titled.astype(int) - titled[0]).max() <= 2
    assert (np.abs(titled[0].astype(int) - plain[0]).max(axis=-1) > 40).sum() > 200  # text pixels exist


def test_literal_pts_title_is_static():
    out = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS, overlays=media.Overlays(title="%{pts}")))
    assert np.abs(out.astype(int) - out[0]).max() <= 2


def test_missing_glyphs_warn():
    assert media.missing_glyphs("abc Привет Ελλάδα") == []
    assert media.missing_glyphs("日本語 ok") == ["日", "本", "語"]
    with pytest.warns(media.MissingGlyphWarning, match="U\\+4E2D"):
        media.encode(static_frames(2), FPS, overlays=media.Overlays(title="中文 title"))


def test_logo_changes_only_its_corner(logo_png):
    plain = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS))
    for corner in ["top-right", "bottom-left"]:
        ov = media.Overlays(logo=logo_png, logo_corner=corner, logo_height=0.3)
        out = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS, overlays=ov))
        changed = np.abs(out[0].astype(int) - plain[0]).max(axis=-1) > 30
        ys, xs = np.nonzero(changed)
        assert len(ys) > 100
        if corner == "top-right":
            assert ys.max() < H // 2 and xs.min() >= W // 2
        else:
            assert ys.min() >= H // 2 and xs.max() < W // 2
        # the transparent part of the logo's square shows the background: its corner pixel is unchanged
        assert not changed[(3 if corner == "top-right" else H - 4), (W - 4 if corner == "top-right" else 3)]


@pytest.mark.parametrize("corner", ["top-right", "top-left"])
@pytest.mark.parametrize("title,beside", [("Sale!", True), ("Spring sale: 20% off every circle, square and triangle",
                                                            False)], ids=["fits-beside", "goes-under"])
def test_a_title_keeps_clear_of_a_logo_in_a_top_corner(logo_png, corner, title, beside):
    """The title is centred at the top and the logo sits in a top corner (the demo's ads drew the
    title's box over it): a title that fits between the logo and its mirror image is drawn there;
    one that does not (here 8 lines of 12 px, or a word wider than that room) starts under the logo."""
    logo = media.Overlays(logo=logo_png, logo_corner=corner, logo_height=0.3)
    both = media.Overlays(logo=logo_png, logo_corner=corner, logo_height=0.3, title=title)
    alone = media.decode(media.encode(static_frames(2), FPS, crf=LOSSLESS, overlays=logo))[0].astype(int)
    out = media.decode(media.encode(static_frames(2), FPS, crf=LOSSLESS, overlays=both))[0].astype(int)
    # the logo: 29 px square at a 3 px margin (round(0.3 * H), round(0.03 * H))
    logo_box = (slice(3, 32), slice(W - 32, W - 3) if corner == "top-right" else slice(3, 32))
    assert np.abs(out[logo_box] - alone[logo_box]).max() <= 3
    titled = np.abs(out - alone).max(axis=-1) > 40
    assert titled.sum() > 60
    assert titled[:32].any() == beside  # beside the logo, or wholly under it (its box from row 35)


def test_watermark_is_translucent():
    plain = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS))
    ov = media.Overlays(watermark="PREVIEW 'draft': 50%")
    out = media.decode(media.encode(static_frames(), FPS, crf=LOSSLESS, overlays=ov))
    diff = np.abs(out[0].astype(int) - plain[0]).max(axis=-1)
    assert (diff > 20).sum() > 100
    # semi-transparent white over the background: never pure white
    assert out[0].min(axis=-1).max() < 230


@pytest.mark.parametrize("codec", ["h264", "vp9"])
@pytest.mark.parametrize("audio_seconds", [3.0, 0.4])
def test_audio_is_cut_or_padded_to_the_video(tmp_path, codec, audio_seconds):
    audio = sine_file(str(tmp_path / "tone.m4a"), audio_seconds)
    data = media.encode(static_frames(24), FPS, codec=codec, overlays=media.Overlays(audio=audio))
    info = media.probe(data)
    assert info.audio and info.audio_codec == ("aac" if codec == "h264" else "opus")
    ends = stream_ends(data)
    assert ends["video"] == pytest.approx(1.0, abs=0.01)
    assert ends["audio"] == pytest.approx(ends["video"], abs=0.05)


SRT = b"1\n00:00:00,500 --> 00:00:01,000\nCue: it's 100%\n\n"
VTT = "WEBVTT\n\n00:00.500 --> 00:01.000\nПривет, мир\n".encode()


@pytest.mark.parametrize("subtitles", [SRT, VTT], ids=["srt", "vtt"])
def test_subtitles_burned_only_during_the_cue(subtitles):
    plain = media.decode(media.encode(static_frames(36), FPS, crf=LOSSLESS))
    out = media.decode(media.encode(static_frames(36), FPS, crf=LOSSLESS, overlays=media.Overlays(subtitles=subtitles)))
    changed = [(np.abs(a.astype(int) - b).max(axis=-1) > 40).sum() for a, b in zip(out, plain)]
    cue = range(12, 24)  # 0.5 s .. 1.0 s at 24 fps
    assert all(changed[i] > 20 for i in cue[1:-1]), changed
    assert all(changed[i] == 0 for i in range(36) if i < cue[0] - 1 or i > cue[-1] + 1), changed


@pytest.mark.parametrize("codec,expected", [("h264", "mov_text"), ("vp9", "webvtt")])
def test_subtitles_muxed_as_a_track(codec, expected):
    ov = media.Overlays(subtitles=SRT, burn_subtitles=False)
    data = media.encode(static_frames(24), FPS, codec=codec, overlays=ov)
    assert media.probe(data).subtitles == (expected,)
    assert len(media.decode(data)) == 24


def test_bad_subtitles_and_logo(tmp_path):
    with pytest.raises(media.MediaError, match="not WebVTT or SRT"):
        media.encode(static_frames(2), FPS, overlays=media.Overlays(subtitles=b"just words"))
    with pytest.raises(media.MediaError, match="not a readable image"):
        media.encode(static_frames(2), FPS, overlays=media.Overlays(logo=b"not a png"))
    with pytest.raises(media.MediaError, match="no such file"):
        media.encode(static_frames(2), FPS, overlays=media.Overlays(audio=str(tmp_path / "none.m4a")))
    with pytest.raises(ValueError, match="logo_corner"):
        media.Overlays(logo_corner="middle")


def test_all_overlays_in_one_pass(tmp_path, logo_png):
    ov = media.Overlays(
        title="Lesson 1: what's 50%?", logo=logo_png, watermark="DRAFT",
        audio=sine_file(str(tmp_path / "tone.m4a"), 2.0), subtitles=SRT,
    )
    data = media.encode(lavfi_frames("testsrc2", 24), FPS, overlays=ov, metadata={"title": "Lesson 1"})
    info = media.probe(data)
    assert (info.frames, info.audio, info.metadata["title"]) == (24, True, "Lesson 1")


def test_metadata_tags(tmp_path):
    tags = {"title": "Spring ad: 'v2' = 50% off", "comment": "batch=7\nseed=3"}
    for codec in ["h264", "vp9"]:
        data = media.encode(static_frames(4), FPS, codec=codec, metadata=tags)
        with av.open(io.BytesIO(data)) as container:
            found = {k.lower(): v for k, v in container.metadata.items()}
        assert found["title"] == tags["title"] and found["comment"] == tags["comment"], codec


# --------------------------------------------------------------------------------------------
# Storage and posters


def test_s3_probe_decode_and_encode_to(s3_root, clip):
    uri = f"{s3_root}/in/clip.mp4"
    storage.write_bytes(uri, clip)
    assert media.probe(uri).frames == 48
    np.testing.assert_array_equal(media.decode(uri, max_frames=6), media.decode(clip, max_frames=6))
    assert sum(len(c) for c in media.iter_decode(uri, chunk_frames=16)) == 48

    out = media.encode_to(f"{s3_root}/out/a.webm", static_frames(12), FPS)
    assert (out.frames, out.content_type) == (12, "video/webm")
    bucket, key = storage.split_s3(out.uri)
    head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "video/webm" and head["ContentLength"] == out.bytes
    assert media.probe(out.uri).video_codec == "vp9"

    with pytest.raises(media.MediaError, match=f"{s3_root}/in/missing.mp4"):
        media.probe(f"{s3_root}/in/missing.mp4")


def test_encode_to_local(tmp_path):
    out = media.encode_to(str(tmp_path / "sub" / "x.mp4"), iter([static_frames(5), static_frames(7)]), FPS)
    assert out.frames == 12 and media.probe(out.uri).frames == 12
    with pytest.raises(ValueError, match=".webm"):
        media.encode_to(str(tmp_path / "x.mp4"), static_frames(2), FPS, codec="vp9")


def test_poster_jpeg():
    frames = np.zeros((9, 40, 60, 3), np.uint8)
    frames[...] = (np.arange(9) * 25)[:, None, None, None]  # frame i is grey level 25 i
    jpg = media.poster_jpeg(frames)
    assert jpg[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(jpg))
    assert image.format == "JPEG" and image.size == (60, 40)
    assert abs(np.asarray(image).mean() - 100) < 3  # the middle frame, 4

    video = media.encode(frames, FPS, crf=10)
    image = Image.open(io.BytesIO(media.poster_jpeg(video, index=2)))
    assert image.size == (60, 40) and abs(np.asarray(image).mean() - 50) < 4
    with pytest.raises(ValueError, match="index"):
        media.poster_jpeg(frames, index=9)


def test_weird_temp_and_font_paths(monkeypatch, tmp_path, logo_png):
    """Paths inside the filter graph (textfile, fontfile, subtitles, logo) are escaped."""
    weird = tmp_path / "we'ird: dir,[x];=%{n}\\"
    weird.mkdir()
    font = weird / "font file's.ttf"
    shutil.copyfile(media.font_path(), font)
    monkeypatch.setenv(media.FONT_ENV, str(font))
    monkeypatch.setattr(tempfile, "tempdir", str(weird))
    ov = media.Overlays(title="t", watermark="w", logo=logo_png, subtitles=SRT)
    data = media.encode(static_frames(4), FPS, overlays=ov)
    assert media.probe(data).frames == 4


def test_rotated_video_decodes_at_its_probed_size(tmp_path, cli_mp4):
    rotated = str(tmp_path / "rotated.mp4")
    try:
        ffmpeg.input(cli_mp4, display_rotation=90).output(rotated, c="copy").run(cmd=media.ffmpeg_binary(), quiet=True)
    except ffmpeg.Error:
        pytest.skip("this ffmpeg cannot set -display_rotation (ffmpeg < 7)")
    info = media.probe(rotated)
    assert media.decode(rotated, max_frames=2).shape == (2, info.height, info.width, 3)


def test_probe_command_json_on_s3_and_help(s3_root, cli_mp4):
    """`vidgen probe s3://... --json` through the installed entry point, endpoint from the environment."""
    uri = f"{s3_root}/clips/cli.mp4"
    storage.upload_file(cli_mp4, uri)
    env = {**os.environ, "RAY_ADDRESS": ""}  # AWS_ENDPOINT_URL_S3 and the keys come from the fixture
    proc = subprocess.run([sys.executable, "-m", "vidgen.cli", "probe", uri, "--json"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert {"width", "height", "fps", "frames", "seconds", "video_codec", "audio"} <= set(facts)
    assert (facts["width"], facts["height"], facts["fps"], facts["frames"]) == (W, H, FPS, 2 * FPS)
    assert facts["seconds"] == pytest.approx(2.0, abs=0.05) and facts["audio"] is True
    assert facts["video_codec"] == "h264"

    missing = subprocess.run([sys.executable, "-m", "vidgen.cli", "probe", f"{s3_root}/clips/none.mp4"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode != 0 and "none.mp4" in missing.stderr and "Traceback" not in missing.stderr
    assert "testing" not in missing.stderr  # the secret key never shows

    helped = subprocess.run([sys.executable, "-m", "vidgen.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "probe" in helped.stdout and "render" in helped.stdout
