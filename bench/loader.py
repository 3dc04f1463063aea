"""Clips/s of vidgen's loader against a naive mp4 DataLoader, measured in the same run.

    python bench/loader.py                                   # 512 clips, 16 frames of 64x64, batch 32 (~1-2 min on 2 cores)
    python bench/loader.py --clips 128 --frames 8 --size 32  # CPU-quick check (~30 s, mostly Ray start-up)
    python bench/loader.py --out-json loader.json            # also write the figures as JSON

What runs, on the same synthetic `shapes` clips made at the start of the run:
- ours: `read_split(uri, "train")` -> `ds.iterator()` -> `iter_epoch(...)`, i.e. Ray Data reading
  the Parquet shards and `ClipCollate` building (B, C, T, H, W) float tensors in [-1, 1], on a local
  Ray with `num_cpus=2`.
- baseline: the same train clips stored as one mp4 each (H.264, crf 18, veryfast), read by a
  `torch.utils.data.DataLoader` (num_workers=2, shuffled, same batch size) whose `__getitem__` calls
  `vidgen.media.decode` (one real ffmpeg process per clip) and converts to the same float tensor.
- decode-only limit: the Parquet shards read with pyarrow (zstd decompression; the next shard read
  by a thread while this one is converted) and the frame bytes turned into the same tensors with
  `np.frombuffer` + reshape + float conversion: no Ray, no shuffle, no copy before the conversion.
  It is about the rate the loader would have if Ray Data and collation cost nothing.

Each reader runs one warm-up epoch, then timed epochs (--epochs for ours and the limit, median;
--baseline-epochs for the baseline, whose epoch is long enough to average by itself). Start-up
is excluded and printed separately: Ray start, `read_split`, and each reader's time to its first
batch in the warm-up epoch. Every epoch includes its own pipeline start (DataLoader workers are
forked per epoch; Ray Data starts a new execution per epoch), as it does in training.
Ratio = clips/s over the baseline's clips/s. The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch


from harness import cpu_name

from vidgen import media, storage
from vidgen.data import synth
from vidgen.data.format import open_dataset

SPLIT = "train"
SEED = 0


# --------------------------------------------------------------------------------------------
# Data: one Parquet dataset, and its train clips again as one mp4 each


def make_data(root: str, clips: int, frames: int, size: int) -> tuple[str, list[str], list[int]]:
    """Synthesize the dataset (in-process: no Ray yet) and write its train clips as mp4 files.

    Returns (dataset uri, mp4 paths, labels), the mp4s in the dataset's order."""
    uri = os.path.join(root, "shapes")
    synth.synthesize("shapes", clips, frames, size, uri, seed=SEED, parallel=False, progress=False)
    rows = [(row["frames"], row["label"], row["fps"]) for row in open_dataset(uri).iter_clips(split=SPLIT)]
    mp4_dir = os.path.join(root, "mp4")
    os.makedirs(mp4_dir)
    paths = [os.path.join(mp4_dir, f"clip-{i:04d}.mp4") for i in range(len(rows))]

    def write(i: int) -> None:
        data = media.encode(rows[i][0], fps=rows[i][2], crf=18, preset="veryfast")
        with open(paths[i], "wb") as f:
            f.write(data)

    # ffmpeg runs in subprocesses, so threads keep both cores busy.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(write, range(len(rows))))
    return uri, paths, [int(label) for _, label, _ in rows]


# --------------------------------------------------------------------------------------------
# The three readers; each yields {"video": (B, C, T, H, W) float32 in [-1, 1], "label": (B,)}


class Mp4Clips(torch.utils.data.Dataset):
    """The naive baseline: one mp4 per clip, decoded by an ffmpeg process per `__getitem__`."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        frames = torch.from_numpy(media.decode(self.paths[i]))  # (T, H, W, C) uint8
        video = frames.permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)  # (C, T, H, W)
        return {"video": video.contiguous(), "label": torch.tensor(self.labels[i], dtype=torch.int64)}


def baseline_loader(paths: list[str], labels: list[int], batch_size: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(SEED)
    return torch.utils.data.DataLoader(
        Mp4Clips(paths, labels), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=2, generator=generator,
    )


def decode_only_epoch(uri: str, batch_size: int):
    """Parquet -> pyarrow (zstd) -> np.frombuffer -> (B, C, T, H, W) float tensors; no Ray.

    The next shard is read by a thread (pyarrow releases the GIL) while this one is converted, so
    both cores work, as they do under Ray. Batches run across shard boundaries (drop_last at the
    end only), like the loader's."""
    ds = open_dataset(uri, validate_shards=False)
    t, h, w, c = ds.clip_shape
    fs, _ = storage.pyarrow_filesystem(ds.root)

    def read(shard_uri: str) -> pa.Table:
        table = pq.read_table(storage.pyarrow_filesystem(shard_uri)[1], filesystem=fs, columns=["frames", "label", "split"])
        return table.filter(pc.equal(table["split"], SPLIT))

    rest = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        shards = list(ds.shard_uris)
        pending = pool.submit(read, shards.pop(0))
        while pending is not None:
            table = pending.result()
            pending = pool.submit(read, shards.pop(0)) if shards else None
            table = table if rest is None else pa.concat_tables([rest, table])  # zero-copy: chunks
            full = table.num_rows - table.num_rows % batch_size
            for start in range(0, full, batch_size):
                batch = table.slice(start, batch_size)
                with warnings.catch_warnings():  # a read-only view of Arrow's buffer; never written to
                    warnings.simplefilter("ignore", UserWarning)
                    x = torch.from_numpy(frame_bytes(batch["frames"]).reshape(batch_size, t, h, w, c))  # (B, T, H, W, C)
                video = x.permute(0, 4, 1, 2, 3).contiguous().float().div_(127.5).sub_(1.0)  # (B, C, T, H, W)
                yield {"video": video, "label": torch.tensor(batch["label"].to_numpy())}
            rest = table.slice(full)


def frame_bytes(frames: pa.ChunkedArray) -> np.ndarray:
    """The rows' bytes of a binary column back to back: a view when they lie in one chunk."""
    parts = []
    for chunk in frames.chunks:
        offsets_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], offsets_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        parts.append(np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# Timing


def timed_epochs(make_epoch, expected_shape: tuple[int, ...], epochs: int) -> dict:
    """One warm-up epoch (its time to the first batch is reported), then `epochs` timed epochs;
    clips/s is the median epoch's."""
    rates, first_s = [], None
    for epoch in range(1 + epochs):
        clips, start = 0, time.perf_counter()
        for batch in make_epoch(epoch):
            if first_s is None:
                first_s = time.perf_counter() - start
            if batch["video"].dtype != torch.float32 or tuple(batch["video"].shape) != expected_shape:
                raise AssertionError(f"batch {batch['video'].dtype} {tuple(batch['video'].shape)}, expected float32 {expected_shape}")
            clips += batch["video"].shape[0]
        if epoch:
            rates.append(clips / (time.perf_counter() - start))
    return {"clips_per_epoch": clips, "epochs": epochs, "clips_per_s": statistics.median(rates),
            "epoch_clips_per_s": rates, "first_batch_s": first_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=512, help="clips synthesized (the train split is ~90%%)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of ours and of the limit (median)")
    parser.add_argument("--baseline-epochs", type=int, default=1, help="timed epochs of the baseline (median)")
    parser.add_argument("--out-json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {"clips": args.clips, "frames": args.frames, "size": args.size, "batch_size": args.batch_size,
                "cores": cores, "torch_threads": torch.get_num_threads(), "machine": cpu_name() + f", {platform.system()} {platform.release()}",
                "ffmpeg": media.ffmpeg_binary(), "load_average_at_start": round(os.getloadavg()[0], 1)}
    shape = (args.batch_size, 3, args.frames, args.size, args.size)
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-loader-") as tmp:
        start = time.perf_counter()
        uri, paths, labels = make_data(tmp, args.clips, args.frames, args.size)
        settings["train_clips"], settings["data_s"] = len(paths), round(time.perf_counter() - start, 1)
        if len(paths) < 2 * args.batch_size:
            raise SystemExit(f"--clips {args.clips} gives {len(paths)} train clips: need at least 2 batches of {args.batch_size}")

        # The baseline forks its DataLoader workers, so it runs before Ray starts.
        loader = baseline_loader(paths, labels, args.batch_size)

        def baseline_epoch(epoch: int):
            loader.generator.manual_seed(SEED + epoch)
            return iter(loader)

        baseline = timed_epochs(baseline_epoch, shape, args.baseline_epochs)
        del loader
        limit = timed_epochs(lambda epoch: decode_only_epoch(uri, args.batch_size), shape, args.epochs)

        from vidgen.data.loader import iter_epoch, read_split
        from vidgen.runtime import init_ray

        import ray.data

        start = time.perf_counter()
        init_ray(num_cpus=2)
        ray_start_s = time.perf_counter() - start
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-execution INFO lines
        start = time.perf_counter()
        ds = read_split(uri, SPLIT)
        read_split_s = time.perf_counter() - start
        ours = timed_epochs(lambda epoch: iter_epoch(ds.iterator(), args.batch_size, seed=SEED, epoch=epoch), shape, args.epochs)
        ours.update(ray_start_s=ray_start_s, read_split_s=read_split_s)

    results = {"settings": settings, "ours": ours, "baseline": baseline, "decode_only": limit,
               "ratio_vs_baseline": ours["clips_per_s"] / baseline["clips_per_s"],
               "fraction_of_decode_only": ours["clips_per_s"] / limit["clips_per_s"]}
    print(f"{settings['train_clips']} train clips of {args.frames} frames at {args.size}x{args.size} "
          f"(of {args.clips} synthesized in {settings['data_s']} s), batch {args.batch_size}, "
          f"{cores} cores, torch threads {settings['torch_threads']}")
    settings["load_average_at_end"] = round(os.getloadavg()[0], 1)
    print(f"machine: {settings['machine']}; 1-min load average {settings['load_average_at_start']} at start, "
          f"{settings['load_average_at_end']} at end")
    print(f"clips/s: median of {args.epochs} epochs (ours, limit) / {args.baseline_epochs} (baseline) after a warm-up epoch")
    print(f"{'reader':<50} {'clips/s':>9} {'vs baseline':>12} {'epochs min-max':>15} {'first batch s':>14}")
    rows = [("ours: Ray Data Parquet + ClipCollate", ours),
            ("baseline: DataLoader, ffmpeg per mp4 (2 workers)", baseline),
            ("decode-only limit: pyarrow + numpy, no Ray", limit)]
    for name, r in rows:
        spread = f"{min(r['epoch_clips_per_s']):.0f}-{max(r['epoch_clips_per_s']):.0f}"
        print(f"{name:<50} {r['clips_per_s']:>9.1f} {r['clips_per_s'] / baseline['clips_per_s']:>11.1f}x {spread:>15} {r['first_batch_s']:>14.2f}")
    print(f"ours = {results['ratio_vs_baseline']:.1f}x the baseline, {100 * results['fraction_of_decode_only']:.0f}% "
          f"of the decode-only limit; Ray start-up {ray_start_s:.1f} s and read_split {read_split_s:.2f} s "
          f"are not counted")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
