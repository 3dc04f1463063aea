"""Look at a dataset: counts, shape, label histogram, pixel statistics, failed sources, a preview.

    vidgen data inspect data/shapes
    vidgen data inspect s3://bucket/ds --json
    vidgen data inspect data/shapes --preview shapes.mp4     (or .gif: a grid of a few clips)
"""

from __future__ import annotations

import io

import numpy as np

from vidgen import storage
from vidgen.errors import InputError
from vidgen.data.format import open_dataset
from vidgen.data.tensors import tile


def summarize(uri: str) -> dict:
    """The facts of a committed dataset; the keys of `vidgen data inspect --json` (a contract)."""
    ds = open_dataset(uri)
    m = ds.manifest
    names = m.labels
    labels = {(names[int(k)] if names and int(k) < len(names) else k): n for k, n in m.label_counts.items()}
    return {
        "uri": ds.root,
        "clips": m.rows,
        "shards": m.shard_count,
        "bytes": m.bytes,
        "shape": list(m.clip_shape),
        "fps": m.fps,
        "splits": m.splits,
        "labels": labels,
        "label_names": names,
        "pixel_mean": m.pixel_mean,
        "pixel_std": m.pixel_std,
        "failed_sources": m.failed_sources,
        "kind": m.kind,
        "version": m.version,
        "created_at": m.created_at,
    }


def format_summary(s: dict) -> str:
    t, h, w, c = s["shape"]
    lines = [
        f"dataset   {s['uri']}  ({s['kind']}, {s['version']})",
        f"clips     {s['clips']} in {s['shards']} shard(s), {s['bytes'] / 1e6:.1f} MB",
        f"shape     {t} frames x {h} x {w} x {c} at {s['fps']:g} fps",
        "splits    " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
        f"pixels    mean {s['pixel_mean']}  std {s['pixel_std']}",
    ]
    if s["labels"]:
        width = max(s["labels"].values())
        lines.append("labels")
        for name, n in s["labels"].items():
            lines.append(f"  {name:>12} {n:6d} {'#' * max(1, round(30 * n / width))}")
    for f in s["failed_sources"]:
        lines.append(f"failed    {f['source']}: {f['reason']}")
    return "\n".join(lines)


def preview_grid(uri: str, clips: int = 16, split: str | None = None) -> np.ndarray:
    """Up to `clips` clips tiled into one video (T, rows*H, cols*W, 3), uint8, 2 px gutters."""
    ds = open_dataset(uri)
    chosen = []
    for row in ds.iter_clips(split):
        chosen.append(row["frames"][..., :3] if row["frames"].shape[-1] >= 3 else np.repeat(row["frames"], 3, -1))
        if len(chosen) == clips:
            break
    return tile(chosen)


def write_preview(uri: str, out: str, clips: int = 16, fps: float | None = None) -> str:
    """Write a preview grid as mp4/webm (via ffmpeg) or gif (via Pillow) to a local path or URI."""
    grid = preview_grid(uri, clips)
    fps = fps or open_dataset(uri, validate_shards=False).manifest.fps
    lower = out.lower()
    if lower.endswith(".gif"):
        from PIL import Image

        frames = [Image.fromarray(f) for f in grid]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
        storage.write_bytes(out, buf.getvalue(), "image/gif")
    elif lower.endswith((".mp4", ".webm")):
        from vidgen import media

        # Small clips are upscaled so a person can see them; nearest keeps pixels crisp.
        scale = max(1, 256 // grid.shape[1])
        big = grid.repeat(scale, 1).repeat(scale, 2)
        codec = "vp9" if lower.endswith(".webm") else "h264"
        storage.write_bytes(out, media.encode(big, fps=fps, codec=codec, crf=18))
    else:
        raise InputError(f"--preview {out!r}: expected a .mp4, .webm or .gif name")
    return storage.normalize(out)
