"""Procedural video datasets, so that everything runs with no download.

    vidgen data synth --kind shapes --clips 64 --frames 16 --size 64 --out data/shapes
    vidgen data synth --kind life --clips 2000 --frames 16 --size 64 --out s3://bucket/life

Kinds (clip i of seed K is drawn from `np.random.default_rng([K, i])`, so a set is the same for a
seed however it is split across processes):
- `shapes`: one bouncing circle, square or triangle of a random colour on a plain background;
  `label` is the shape class (for conditional generation).
- `digits`: one glyph 0-9 drawn from the shipped DejaVu Sans font, bouncing in the frame like
  Moving MNIST; `label` is the digit.
- `life`: Conway's Game of Life on a grid with a dead boundary, each cell `cell` x `cell` pixels;
  frame t+1 follows from frame t by the rule, so next-frame prediction can be checked exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources

import numpy as np
from tqdm import tqdm

from vidgen import storage
from vidgen.errors import InputError
from vidgen.data.format import (
    Clip,
    DatasetManifest,
    ShardStats,
    ShardWriter,
    assign_split,
    clips_per_shard,
    commit,
    new_version,
)

SHAPE_NAMES = ["circle", "square", "triangle"]
DIGIT_NAMES = [str(d) for d in range(10)]
KINDS = ("shapes", "digits", "life")
FPS = 8.0
# Sets larger than this many raw bytes are written by parallel Ray tasks, one shard each.
PARALLEL_BYTES = 64 * 1024 * 1024


def _bounce(rng: np.random.Generator, frames: int, size: int, extent: int) -> np.ndarray:
    """Top-left positions (T, 2) of an object `extent` px wide bouncing inside a `size` frame."""
    room = max(size - extent, 1)
    pos = rng.uniform(0, room, 2)
    vel = rng.uniform(1.0, 2.5, 2) * rng.choice([-1, 1], 2) * size / 64
    out = np.empty((frames, 2))
    for t in range(frames):
        out[t] = pos
        pos = pos + vel
        for k in range(2):  # reflect off the walls
            if pos[k] < 0:
                pos[k], vel[k] = -pos[k], -vel[k]
            elif pos[k] > room:
                pos[k], vel[k] = 2 * room - pos[k], -vel[k]
    return out


def _shape_mask(kind: int, extent: int) -> np.ndarray:
    """A boolean (extent, extent) mask of a circle, square or triangle, sampled at pixel centres."""
    c = (np.arange(extent) + 0.5) / extent  # [0, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    if kind == 0:
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if kind == 1:
        return np.ones((extent, extent), bool) & (x >= 0.06) & (x <= 0.94) & (y >= 0.06) & (y <= 0.94)
    # An upright triangle: apex at the top centre, base along the bottom.
    return (y >= 0.05) & (y <= 0.95) & (np.abs(x - 0.5) <= 0.5 * (y - 0.05) / 0.9)


def _distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark plain background and a bright object colour, so the object always stands out."""
    background = rng.integers(0, 90, 3)
    colour = rng.integers(120, 256, 3)
    colour[rng.integers(0, 3)] = 255
    return background.astype(np.uint8), colour.astype(np.uint8)


def _paste(frames: np.ndarray, mask: np.ndarray, path: np.ndarray, colour: np.ndarray) -> None:
    for t, (py, px) in enumerate(path.round().astype(int)):
        h, w = mask.shape
        region = frames[t, py : py + h, px : px + w]
        region[mask[: region.shape[0], : region.shape[1]]] = colour


def shapes_clip(rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, int]:
    label = int(rng.integers(0, 3))
    extent = int(rng.integers(size * 3 // 10, size * 9 // 20 + 1))
    background, colour = _distinct_colours(rng)
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = background
    _paste(video, _shape_mask(label, extent), _bounce(rng, frames, size, extent), colour)
    return video, label


@functools.lru_cache(maxsize=8)
def _digit_masks(extent: int) -> list[np.ndarray]:
    """Boolean masks (extent, extent) of the digits 0-9, rendered once from the shipped font."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = resources.files("vidgen") / "assets" / "DejaVuSans.ttf"
    font = ImageFont.truetype(str(font_path), size=int(extent * 1.4))
    masks = []
    for d in DIGIT_NAMES:
        img = Image.new("L", (extent, extent), 0)
        draw = ImageDraw.Draw(img)
        draw.text((extent / 2, extent / 2), d, fill=255, font=font, anchor="mm")
        masks.append(np.asarray(img) >= 128)
    return masks


def digits_clip(rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, int]:
    label = int(rng.integers(0, 10))
    extent = max(8, size // 2)
    video = np.zeros((frames, size, size, 3), np.uint8)
    _paste(video, _digit_masks(extent)[label], _bounce(rng, frames, size, extent), np.array([255, 255, 255], np.uint8))
    return video, label


def life_step(grid: np.ndarray) -> np.ndarray:
    """One Game of Life step on a bool grid (H, W); cells outside the grid are dead."""
    padded = np.pad(grid.astype(np.uint8), 1)
    h, w = grid.shape
    neighbours = sum(
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    )
    return (neighbours == 3) | (grid & (neighbours == 2))


def life_cell(size: int) -> int:
    """Pixels per cell: a 32 x 32 grid at size 64, never finer than one pixel."""
    return max(1, size // 32)


def life_clip(rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, None]:
    cell = life_cell(size)
    cells = size // cell
    grid = rng.random((cells, cells)) < rng.uniform(0.25, 0.45)
    for _ in range(int(rng.integers(2, 8))):  # let the soup settle into Life-like structure
        grid = life_step(grid)
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        pixels = np.kron(grid, np.ones((cell, cell), bool))
        video[t, : pixels.shape[0], : pixels.shape[1]] = np.where(pixels[..., None], 255, 0)
        grid = life_step(grid)
    return video, None


GENERATORS: dict[str, Callable[[np.random.Generator, int, int], tuple[np.ndarray, int | None]]] = {
    "shapes": shapes_clip,
    "digits": digits_clip,
    "life": life_clip,
}
LABELS = {"shapes": SHAPE_NAMES, "digits": DIGIT_NAMES, "life": None}


def synth_clip(kind: str, seed: int, index: int, frames: int, size: int, val_fraction: float) -> Clip:
    rng = np.random.default_rng([seed, index])
    video, label = GENERATORS[kind](rng, frames, size)
    source = f"synth:{kind}:seed={seed}:clip={index}"
    return Clip(source=source, start_frame=0, frames=video, fps=FPS, split=assign_split(source, val_fraction), label=label)


def _write_range(root, version, kind, seed, start, stop, frames, size, val_fraction, shard_index) -> ShardStats:
    """Generate clips [start, stop) into exactly one shard numbered `shard_index`."""
    writer = ShardWriter(root, version, shard_bytes=1 << 62, first_shard=shard_index)
    for i in range(start, stop):
        writer.add(synth_clip(kind, seed, i, frames, size, val_fraction))
    return writer.close()


def validate_args(kind: str, clips: int, frames: int, size: int, val_fraction: float) -> None:
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if clips < 1:
        raise InputError(f"--clips {clips}: must be at least 1")
    if frames < 2:
        raise InputError(f"--frames {frames}: must be at least 2")
    if not 8 <= size <= 1024:
        raise InputError(f"--size {size}: must be between 8 and 1024")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction}: must be in [0, 1)")


def synthesize(
    kind: str,
    clips: int,
    frames: int,
    size: int,
    out: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    shard_bytes: int | None = None,
    parallel: bool | None = None,
    progress: bool = True,
) -> DatasetManifest:
    """Write a procedural dataset to `out` and commit it; returns the manifest.

    Large sets are generated by Ray tasks (one shard each) in parallel; small ones in-process.
    """
    validate_args(kind, clips, frames, size, val_fraction)
    root = storage.normalize(out)
    version = new_version()
    shape = (frames, size, size, 3)
    per_shard = clips_per_shard(shape, shard_bytes) if shard_bytes else clips_per_shard(shape)
    ranges = [(s, min(s + per_shard, clips)) for s in range(0, clips, per_shard)]
    args = (kind, seed)
    if parallel is None:
        parallel = clips * int(np.prod(shape)) > PARALLEL_BYTES and len(ranges) > 1
    stats = ShardStats()
    bar = tqdm(total=len(ranges), desc=f"synth {kind}", unit="shard", disable=not progress)
    if parallel:
        import ray

        from vidgen.runtime import init_ray

        init_ray()
        task = ray.remote(num_cpus=1)(_write_range)
        pending = [
            task.remote(root, version, *args, a, b, frames, size, val_fraction, i) for i, (a, b) in enumerate(ranges)
        ]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            stats = stats.merge(ray.get(done[0]))
            bar.update(1)
    else:
        for i, (a, b) in enumerate(ranges):
            stats = stats.merge(_write_range(root, version, *args, a, b, frames, size, val_fraction, i))
            bar.update(1)
    bar.close()
    extra = {"synth": {"seed": seed, "val_fraction": val_fraction}}
    if kind == "life":
        extra["life"] = {"cell": life_cell(size), "boundary": "dead"}
    return commit(
        root,
        version,
        stats,
        clip_shape=shape,
        fps=FPS,
        kind=f"synth:{kind}",
        labels=LABELS[kind],
        sources=[f"synth:{kind}:seed={seed}"],
        extra=extra,
    )
