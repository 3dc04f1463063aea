"""Encode and decode speed of vidgen.media against the plain ffmpeg CLI, measured in the same run.

    python bench/media.py                          # 240 frames of 256x256 (runs in seconds on a CPU)
    python bench/media.py --frames 480 --size 512 --repeat 5

The content is procedural and not flat (moving interference bands plus noise), so the encoders
have real work to do. The baseline is the ffmpeg binary that vidgen resolves, driven by
`subprocess` with the same frames piped in and the same codec settings, writing a temporary file
(encode) or rgb24 to a pipe (decode). A ratio of 1.00 means our wrapper costs nothing; above 1 is
faster than the baseline. Each number is the median of --repeat runs, ours and the
baseline interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np


from vidgen import media

FPS = 24
CASES = [  # (name, codec, preset)
    ("h264 ultrafast", "h264", "ultrafast"),
    ("h264 medium", "h264", "medium"),
    ("vp9 realtime", "vp9", "ultrafast"),  # ultrafast maps to -deadline realtime -cpu-used 8
]


def procedural_frames(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (T, S, S, 3): drifting sine interference per channel, plus mild noise."""
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    t = np.arange(count, dtype=np.float32)[:, None, None] / FPS
    channels = [
        np.sin(2 * np.pi * (3 * x + 2 * y + 0.5 * t)) + np.sin(2 * np.pi * (5 * x * y - 0.3 * t)),
        np.sin(2 * np.pi * (4 * np.hypot(x - 0.5, y - 0.5) - 0.7 * t)),
        np.cos(2 * np.pi * (2 * x - 3 * y + 0.2 * t)) * np.sin(2 * np.pi * (x + 0.1 * t)),
    ]
    frames = np.stack([(c - c.min()) / (np.ptp(c) + 1e-6) for c in channels], axis=-1) * 235
    frames += np.random.default_rng(seed).uniform(0, 20, frames.shape).astype(np.float32)
    return frames.clip(0, 255).astype(np.uint8)


# The CLI settings a person would type for each case (what `media.encode` asks ffmpeg for too,
# minus our BT.709 conversion/tags, whose cost is part of what the ratio measures).
RAW_CODEC_ARGS = {
    ("h264", "ultrafast"): ["-c:v", "libx264", "-preset", "ultrafast", "-movflags", "+faststart"],
    ("h264", "medium"): ["-c:v", "libx264", "-preset", "medium", "-movflags", "+faststart"],
    ("vp9", "ultrafast"): ["-c:v", "libvpx-vp9", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1"],
}


def raw_encode(frames: np.ndarray, codec: str, preset: str, crf: int, path: str) -> None:
    """The baseline: the ffmpeg CLI, frames piped to stdin, same codec settings, output to a file."""
    t, h, w, _ = frames.shape
    args = [media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(FPS), "-i", "pipe:",
            *RAW_CODEC_ARGS[codec, preset], "-crf", str(crf), "-pix_fmt", "yuv420p", path]
    subprocess.run(args, input=frames.tobytes(), check=True)


def raw_decode(path: str, shape: tuple[int, ...]) -> np.ndarray:
    args = [media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error",
            "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    out = subprocess.run(args, capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(shape)


def paired_seconds(ours, raw, repeat: int) -> tuple[float, float]:
    """Median seconds of each, runs interleaved so drift on a busy machine hits both alike."""
    times: dict[str, list[float]] = {"ours": [], "raw": []}
    for _ in range(repeat):
        for key, fn in (("ours", ours), ("raw", raw)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["raw"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crf", type=int, default=23)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out-json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    results: dict = {"settings": {"frames": args.frames, "size": args.size, "crf": args.crf, "repeat": args.repeat}, "cases": {}}

    frames = procedural_frames(args.frames, args.size)
    n = len(frames)
    print(f"ffmpeg: {media.ffmpeg_binary()}")
    print(f"{n} frames of {args.size}x{args.size}, crf {args.crf}, median of {args.repeat} runs; "
          f"frames/s, ours/raw = our speed over the CLI's")
    print(f"{'case':<16} {'encode ours':>12} {'raw':>8} {'ours/raw':>9}   {'decode ours':>12} {'raw':>8} {'ours/raw':>9}   {'bytes':>8}")
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-") as tmp:
        for name, codec, preset in CASES:
            path = os.path.join(tmp, "raw." + media.container_for(codec))
            data = media.encode(frames, FPS, codec=codec, crf=args.crf, preset=preset)  # warm-up
            enc_ours, enc_raw = paired_seconds(
                lambda: media.encode(frames, FPS, codec=codec, crf=args.crf, preset=preset),
                lambda: raw_encode(frames, codec, preset, args.crf, path),
                args.repeat,
            )

            assert media.decode(data).shape == frames.shape
            ours_path = os.path.join(tmp, "ours." + media.container_for(codec))
            with open(ours_path, "wb") as f:
                f.write(data)
            # both decode the same file: ours from bytes (temp file + probe + pipe), raw from the path
            dec_ours, dec_raw = paired_seconds(lambda: media.decode(data), lambda: raw_decode(ours_path, frames.shape), args.repeat)
            print(f"{name:<16} {n / enc_ours:>12.0f} {n / enc_raw:>8.0f} {enc_raw / enc_ours:>9.2f}   "
                  f"{n / dec_ours:>12.0f} {n / dec_raw:>8.0f} {dec_raw / dec_ours:>9.2f}   {len(data):>8}")
            results["cases"][name] = {"encode_fps": n / enc_ours, "encode_raw_fps": n / enc_raw,
                                      "encode_ratio": enc_raw / enc_ours, "decode_fps": n / dec_ours,
                                      "decode_raw_fps": n / dec_raw, "decode_ratio": dec_raw / dec_ours, "bytes": len(data)}
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
