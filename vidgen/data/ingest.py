"""Real videos -> Parquet clips: decode, cut into clips, resize, write shards, commit.

    vidgen data ingest videos/ s3://bucket/raw/ one.mp4 --out s3://bucket/ds --frames 16 --size 64
    vidgen data ingest lecture.mkv --out data/lectures --frames 32 --size 128 --fps 8 --stride 16

Sources are local files, local folders and S3 prefixes (mp4, webm, mov, mkv), decoded with
vidgen.media as a stream (a long video never sits in memory whole), one Ray task per source. A
source that fails to decode is recorded in the manifest's `failed_sources` with the reason, and
contributes no clips at all (its partial shards are deleted); the rest are ingested. Re-ingesting
into the same URI replaces the dataset atomically: the old version stays readable until the new
manifest lands.

`start_frame` counts frames of the decoded stream, i.e. after `--fps` resampling.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from vidgen import storage
from vidgen.errors import InputError
from vidgen.data.format import Clip, DatasetError, DatasetManifest, ShardStats, ShardWriter, assign_split, commit, new_version

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")


def expand_sources(sources: list[str]) -> list[str]:
    """Files as given; folders and S3 prefixes -> the videos under them (sorted)."""
    out: list[str] = []
    for src in sources:
        uri = storage.normalize(src)
        if not storage.is_s3(uri) and os.path.isfile(uri):
            out.append(uri)
            continue
        if storage.is_s3(uri) and uri.lower().endswith(VIDEO_EXTENSIONS) and storage.exists(uri):
            out.append(uri)
            continue
        found = [u for u in storage.list_prefix(uri) if u.lower().endswith(VIDEO_EXTENSIONS)]
        if not found:
            raise DatasetError(f"{src}: no such video, and no {'/'.join(VIDEO_EXTENSIONS)} files under it")
        out += found
    return list(dict.fromkeys(out))  # unique, order kept


class _ShardNumbers:
    """Hands out shard numbers so parallel writers never collide (a Ray actor when parallel)."""

    def __init__(self):
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n - 1


def ingest_source(
    root: str,
    version: str,
    source: str,
    frames: int,
    size: int,
    fps: float | None,
    stride: int,
    val_fraction: float,
    next_shard: Callable[[], int],
) -> tuple[ShardStats, float, str | None]:
    """Cut one source into clips and write its shards; returns (stats, fps, failure reason).

    On failure, the shards this source wrote are deleted, so it contributes nothing.
    """
    from vidgen import media

    split = assign_split(source, val_fraction)
    writer = _NumberedWriter(root, version, next_shard)
    out_fps = fps
    try:
        if out_fps is None:
            out_fps = media.probe(source).fps
        buffer = None
        start = 0  # frame index (in the decoded stream) of buffer[0]
        skip = 0  # frames still to drop before the next clip: a stride longer than what was buffered
        for chunk in media.iter_decode(source, chunk_frames=max(64, frames), size=size, fps=fps):
            cut = min(skip, len(chunk))
            chunk, skip, start = chunk[cut:], skip - cut, start + cut
            buffer = chunk if buffer is None else np.concatenate([buffer, chunk])
            while len(buffer) >= frames:
                writer.add(Clip(source, start, np.ascontiguousarray(buffer[:frames]), float(out_fps), split))
                drop = min(stride, len(buffer))
                buffer, start, skip = buffer[drop:], start + drop, stride - drop
        stats = writer.close()
        return stats, float(out_fps), None
    except (media.MediaError, storage.StorageError) as e:
        writer.discard()
        return ShardStats(), 0.0, str(e)


class _NumberedWriter(ShardWriter):
    """A ShardWriter whose shard numbers come from a shared counter; can discard what it wrote."""

    def __init__(self, root: str, version: str, next_shard: Callable[[], int]):
        super().__init__(root, version)
        self.next_number = next_shard

    def flush(self) -> None:
        if self.pending:
            self.next_shard = self.next_number()
        super().flush()

    def discard(self) -> None:
        for s in self.stats.shards:
            storage.delete(storage.join(self.root, *s["path"].split("/")))
        self.pending, self.stats = [], ShardStats()


def _ingest_task(root, version, source, frames, size, fps, stride, val_fraction, counter):
    import ray

    return ingest_source(
        root, version, source, frames, size, fps, stride, val_fraction, lambda: ray.get(counter.next.remote())
    )


def ingest(
    sources: list[str],
    out: str,
    frames: int,
    size: int,
    fps: float | None = None,
    stride: int | None = None,
    val_fraction: float = 0.1,
    parallel: bool | None = None,
    progress: bool = True,
) -> DatasetManifest:
    """Ingest videos into a dataset at `out` and commit it; returns the manifest."""
    if frames < 1:
        raise InputError(f"--frames {frames}: must be at least 1")
    if not 8 <= size <= 4096:
        raise InputError(f"--size {size}: must be between 8 and 4096")
    if fps is not None and fps <= 0:
        raise InputError(f"--fps {fps}: must be positive")
    stride = stride or frames
    if stride < 1:
        raise InputError(f"--stride {stride}: must be at least 1")
    root = storage.normalize(out)
    uris = expand_sources(sources)
    version = new_version()
    args = (frames, size, fps, stride, val_fraction)
    results: list[tuple[str, tuple[ShardStats, float, str | None]]] = []
    bar = tqdm(total=len(uris), desc="ingest", unit="video", disable=not progress)
    if parallel is None:
        parallel = len(uris) > 1
    if parallel:
        import ray

        from vidgen.runtime import init_ray

        init_ray()
        counter = ray.remote(num_cpus=0)(_ShardNumbers).remote()
        task = ray.remote(num_cpus=1)(_ingest_task)
        refs = {task.remote(root, version, u, *args, counter): u for u in uris}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.append((refs[done[0]], ray.get(done[0])))
            bar.update(1)
        ray.kill(counter)
    else:
        numbers = _ShardNumbers()
        for u in uris:
            results.append((u, ingest_source(root, version, u, *args, numbers.next)))
            bar.update(1)
    bar.close()

    stats, failed, used, fps_seen = ShardStats(), [], [], set()
    for uri, (s, src_fps, reason) in sorted(results):
        if reason is not None:
            failed.append({"source": uri, "reason": reason})
        elif s.rows == 0:
            failed.append({"source": uri, "reason": f"shorter than {frames} frames"})
        else:
            stats = stats.merge(s)
            used.append(uri)
            fps_seen.add(round(src_fps, 3))
    if stats.rows == 0:
        reasons = "; ".join(f"{f['source']}: {f['reason']}" for f in failed)
        raise DatasetError(f"ingest found no usable clip in {len(uris)} source(s): {reasons}")
    return commit(
        root,
        version,
        stats,
        clip_shape=(frames, size, size, 3),
        fps=float(fps) if fps else float(sorted(fps_seen)[0]),
        kind="ingest",
        labels=None,
        sources=used,
        failed_sources=failed,
        extra={"ingest": {"stride": stride, "fps": fps, "val_fraction": val_fraction, "fps_seen": sorted(fps_seen)}},
    )
