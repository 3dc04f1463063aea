"""Clips into training: a Ray Data dataset per split, and a collate to (B, C, T, H, W) tensors.

In the trainer (driver side):

    ds = read_split("s3://bucket/shapes", "train")
    TorchTrainer(..., datasets={"train": ds}, dataset_config=loader_data_config())

and in each worker (the shard is disjoint from the other workers'):

    shard = ray.train.get_dataset_shard("train")
    for batch in iter_epoch(shard, batch_size=8, seed=0, epoch=3, skip_batches=5):
        video, label = batch["video"], batch["label"]     # (B, C, T, H, W) in [-1, 1], (B,)

Reading goes through pyarrow (S3 or local) over exactly the manifest's shards, with only the
needed columns and the split filter applied as rows stream by: nothing is materialised whole.
Shuffling is per epoch and deterministic from (seed, epoch): rows are shuffled in a bounded local
buffer seeded from (seed, epoch), and Ray Data runs with `preserve_order` so the split of blocks
across workers is the same on every run. A resumed run skips the
batches it has already consumed with `skip_batches`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vidgen import storage
from vidgen.data.format import DatasetError, open_dataset
from vidgen.data.tensors import frames_to_video

TRAIN_COLUMNS = ["frames", "num_frames", "height", "width", "channels", "label"]
READ_CPUS = 0.5  # logical CPUs of one Parquet read task
SHUFFLE_BUFFER = 256  # rows kept for the local shuffle: bounds memory at ~256 clips per worker


def read_split(uri: str, split: str = "train", columns: list[str] | None = None, version: str | None = None):
    """A Ray Data dataset of one split's clips, read from the manifest's shards (no listing); of
    `version` when given (each epoch reads those shards again: pin the version while it runs)."""
    import ray.data
    from ray.data.expressions import col

    from vidgen.runtime import init_ray

    ds = open_dataset(uri, version=version)
    counts = ds.manifest.splits
    if not counts.get(split):
        raise DatasetError(f"{uri}: split {split!r} has no clips (splits: {counts})")
    init_ray()
    fs, _ = storage.pyarrow_filesystem(ds.root)
    paths = [storage.pyarrow_filesystem(u)[1] for u in ds.shard_uris]
    wanted = list(dict.fromkeys([*(columns or TRAIN_COLUMNS), "split"]))
    # Ray 2.60's default Parquet reader (DataSourceV2) starts 32 footer-reading actors, i.e. 32
    # new worker processes, on every execution (every epoch): 2-10 s per epoch on 2 cores, and it
    # packs all shards into one read task. The V1 reader reads the footers once, here, and then
    # one read task per shard (bench/loader.py measures the difference).
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        # Half a CPU per read task: the trainer leaves Ray Data about one CPU in all, which on a
        # cluster is a fraction on each node (e.g. 0.5 + 0.5); a 1-CPU task would never be placed.
        data = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths), num_cpus=READ_CPUS)
    finally:
        context.use_datasource_v2 = use_v2
    data = data.select_columns(wanted)
    data = data.filter(expr=col("split") == split)
    return data if "split" in (columns or TRAIN_COLUMNS) else data.drop_columns(["split"])


def loader_data_config(split: tuple[str, ...] = ("train",)):
    """Ray Train's DataConfig: ordered execution (reproducible epochs); only `split` datasets are
    sharded across workers, the others (validation) reach every worker whole."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    options = ExecutionOptions(preserve_order=True)
    return DataConfig(datasets_to_split=list(split), execution_options=options)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def collate_clips(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rows -> {"video": (B, C, T, H, W) float32 in [-1, 1], "label": (B,) int64, -1 = none}."""
    shapes = np.stack([batch[k] for k in ("num_frames", "height", "width", "channels")], 1)
    if (shapes != shapes[0]).any():
        raise DatasetError(f"clips in one batch have different shapes: {np.unique(shapes, axis=0).tolist()}")
    shape = tuple(int(x) for x in shapes[0])
    need = int(np.prod(shape))
    arrays = []
    for data in batch["frames"]:
        if len(data) != need:
            raise DatasetError(f"frame bytes ({len(data)}) disagree with shape {list(shape)} ({need} bytes)")
        arrays.append(np.frombuffer(data, np.uint8))
    video = frames_to_video(np.stack(arrays).reshape(-1, *shape))  # (B, C, T, H, W)
    label = batch.get("label")
    labels = [-1] * len(arrays) if label is None else [_label_or_none(v) for v in label]
    return {"video": video, "label": torch.as_tensor(labels, dtype=torch.int64)}


class ClipCollate(NumpyBatchCollateFn):
    """`collate_clips` in the callable-class form Ray Data's iter_torch_batches asks for."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_clips(batch)


def _label_or_none(v) -> int:
    """Null labels arrive as None or NaN depending on the batch's other values."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return -1
    return int(v)


def iter_epoch(
    shard,
    batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of collated batches from a DataIterator (e.g. `ray.train.get_dataset_shard`).

    The order depends only on (seed, epoch) and the dataset; `skip_batches` drops the first
    batches (those a resumed run already trained on).
    """
    kwargs = {}
    if shuffle:
        kwargs = {"local_shuffle_buffer_size": SHUFFLE_BUFFER, "local_shuffle_seed": epoch_seed(seed, epoch)}
    batches = shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=ClipCollate(), drop_last=drop_last, device="cpu", **kwargs
    )
    return itertools.islice(batches, skip_batches, None)
