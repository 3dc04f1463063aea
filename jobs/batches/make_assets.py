"""Make the brand and input assets the example batches use, under data/assets/ (or --out).

    python jobs/batches/make_assets.py            # logo, jingle, lecture/intro/life clips, subtitles

Everything is generated (ffmpeg's lavfi sources, Pillow, the Game of Life from `vidgen data`), so
the examples in jobs/batches/ run on a fresh checkout with nothing downloaded.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

from vidgen import media, storage
from vidgen.data.synth import life_clip


def ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/assets", help="folder or s3:// prefix")
    out = parser.parse_args(argv).out
    tmp = "data/assets-tmp" if storage.is_s3(out) else storage.local_path(out)
    os.makedirs(tmp, exist_ok=True)

    logo = Image.new("RGBA", (240, 120), (0, 0, 0, 0))
    draw = ImageDraw.Draw(logo)
    draw.rounded_rectangle((4, 4, 236, 116), radius=24, fill=(20, 90, 200, 230))
    draw.text((120, 60), "ACME", fill=(255, 255, 255, 255), anchor="mm", font_size=56)
    buf = io.BytesIO()
    logo.save(buf, format="PNG")
    storage.write_bytes(storage.join(out, "logo.png"), buf.getvalue())

    ffmpeg("-f", "lavfi", "-i", "sine=frequency=523:duration=8", "-f", "lavfi", "-i", "sine=frequency=659:duration=8",
           "-filter_complex", "amix=inputs=2,volume=0.5", "-c:a", "aac", os.path.join(tmp, "jingle.m4a"))
    # a "lecture": a test card with blur and noise, the kind of input restoration is for
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x180:r=24:d=6", "-vf", "gblur=sigma=1.5,noise=alls=18:allf=t",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "30", os.path.join(tmp, "lecture-03.mp4"))
    ffmpeg("-f", "lavfi", "-i", "mandelbrot=s=256x256:r=24", "-t", "4", "-pix_fmt", "yuv420p",
           os.path.join(tmp, "intro.mp4"))
    frames, _ = life_clip(np.random.default_rng(5), 24, 64)
    storage.write_bytes(storage.join(out, "life-05.mp4"), media.encode(frames, fps=8, crf=10, preset="veryfast"))
    for name in ("jingle.m4a", "lecture-03.mp4", "intro.mp4"):
        if storage.is_s3(out):
            storage.upload_file(os.path.join(tmp, name), storage.join(out, name))
    storage.write_text(storage.join(out, "lecture-03.vtt"),
                       "WEBVTT\n\n00:00:00.000 --> 00:00:03.000\nWelcome to lecture 3\n\n"
                       "00:00:03.000 --> 00:00:06.000\nToday: signals and noise\n")
    print(f"assets in {out}: logo.png jingle.m4a lecture-03.mp4 lecture-03.vtt intro.mp4 life-05.mp4")


if __name__ == "__main__":
    sys.exit(main())
