"""The Parquet clip format: schema, manifest, shard writer and validating reader.

A dataset is a prefix `URI` holding `URI/v-<UTC timestamp>/part-NNNNN.parquet` shards and
`URI/_vidgen_dataset.json`, written last (the commit marker), naming the version folder and its
shards. Readers read the manifest, then exactly the shards it lists, never a listing of the prefix:
a half-written version is invisible, and a rewrite replaces the dataset atomically.

Versions under concurrent use. A commit also leaves a copy of its manifest in its version folder
(`URI/v-.../_manifest.json`), so a reader can open the version it started with after newer ones
were committed, and then removes the other versions, except those that may still be in use:
  - a version written to within the grace period (VIDGEN_DATASET_GRACE_S, default 3600 s, counted
    from its newest object): another ingest still writing, or a reader that has just opened it;
  - a version pinned by a live pin, `URI/_pins/<holder>.json` (`pin`/`unpin`): `vidgen train` pins
    the version a run starts with for the run's length (and records it in RUN/dataset.json, so a
    resumed run reads the same clips); a pin whose holder died expires after its TTL (7 days).
Removed versions go at the next commit after that; nothing else deletes them.

One row per clip; `frames` holds raw uint8 frames (T, H, W, C), row-major, zstd-compressed by
Parquet. Splits are assigned by a hash of the clip's source, so one video never straddles splits.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from vidgen import __version__, storage
from vidgen.errors import VidgenError

logger = logging.getLogger("vidgen.data")

MANIFEST = "_vidgen_dataset.json"
VERSION_MANIFEST = "_manifest.json"  # the copy of a version's manifest inside its folder
PINS = "_pins"
GRACE_ENV = "VIDGEN_DATASET_GRACE_S"
DEFAULT_GRACE_S = 3600.0
PIN_TTL_S = 7 * 24 * 3600.0
FORMAT_VERSION = 1
FRAME_ENCODING = "raw-uint8-THWC"
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024  # of raw frame bytes per shard, before compression
ROW_GROUP_BYTES = 16 * 1024 * 1024

CLIP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("start_frame", pa.int32()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("fps", pa.float32()),
        ("frames", pa.binary()),
        ("label", pa.int32()),
        ("caption", pa.string()),
        ("split", pa.string()),
    ]
)
SPLITS = ("train", "val", "test")


class DatasetError(VidgenError):
    """A dataset is missing, malformed or does not match the clip format."""


def clip_id(source: str, start_frame: int) -> str:
    """A stable id for a clip: a hash of its source and first frame."""
    return hashlib.sha1(f"{source}#{start_frame}".encode()).hexdigest()[:16]


def assign_split(source: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """train/val/test by a hash of the source, so all clips of one video share a split."""
    u = int(hashlib.sha1(source.encode()).hexdigest()[:12], 16) / float(16**12)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


@dataclass
class Clip:
    """One clip before it is written: frames (T, H, W, C) uint8."""

    source: str
    start_frame: int
    frames: np.ndarray
    fps: float
    split: str
    label: int | None = None
    caption: str | None = None


class DatasetManifest(BaseModel):
    """URI/_vidgen_dataset.json (and its copy in each version folder) as a typed record, with one
    home for every default. Keys a newer vidgen (or an ingest's `extra`) adds are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format_version: int
    version: str
    shards: list[dict[str, Any]]         # {"path": "v-.../part-00000.parquet", "rows": n, "bytes": n}
    clip_shape: tuple[int, int, int, int]  # (T, H, W, C) of every clip
    frame_encoding: str
    rows: int
    fps: float = 30.0
    shard_count: int = 0
    bytes: int = 0
    splits: dict[str, int] = {}          # split -> clips
    labels: list[str] | None = None      # label names, index = label id; None: unlabelled
    label_counts: dict[str, int] = {}    # label id (as text) -> clips
    pixel_mean: list[float] | None = None
    pixel_std: list[float] | None = None
    kind: str | None = None
    sources: list[str] = []
    failed_sources: list[dict[str, Any]] = []
    created_at: str | None = None
    vidgen_version: str | None = None
    life: dict[str, Any] | None = None   # Game of Life sets: {"cell": pixels per cell, ...}


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardStats:
    """What a shard writer learned; merged across shards (and Ray tasks) into the manifest."""

    rows: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)
    pixel_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_sq_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixels: int = 0
    shards: list[dict] = field(default_factory=list)

    def add(self, clip: Clip) -> None:
        self.rows += 1
        self.splits[clip.split] = self.splits.get(clip.split, 0) + 1
        if clip.label is not None:
            self.labels[int(clip.label)] = self.labels.get(int(clip.label), 0) + 1
        x = clip.frames.reshape(-1, clip.frames.shape[-1]).astype(np.float64) / 255.0
        self.pixel_sum = [a + b for a, b in zip(self.pixel_sum, x.sum(0).tolist(), strict=False)]
        self.pixel_sq_sum = [a + b for a, b in zip(self.pixel_sq_sum, (x * x).sum(0).tolist(), strict=False)]
        self.pixels += x.shape[0]

    def merge(self, other: ShardStats) -> ShardStats:
        out = ShardStats(rows=self.rows + other.rows, pixels=self.pixels + other.pixels)
        for k in {*self.splits, *other.splits}:
            out.splits[k] = self.splits.get(k, 0) + other.splits.get(k, 0)
        for k in {*self.labels, *other.labels}:
            out.labels[k] = self.labels.get(k, 0) + other.labels.get(k, 0)
        out.pixel_sum = [a + b for a, b in zip(self.pixel_sum, other.pixel_sum, strict=True)]
        out.pixel_sq_sum = [a + b for a, b in zip(self.pixel_sq_sum, other.pixel_sq_sum, strict=True)]
        out.shards = self.shards + other.shards
        return out

    def mean_std(self) -> tuple[list[float], list[float]]:
        if not self.pixels:
            return [0.0] * 3, [0.0] * 3
        mean = [s / self.pixels for s in self.pixel_sum]
        std = [max(q / self.pixels - m * m, 0.0) ** 0.5 for q, m in zip(self.pixel_sq_sum, mean, strict=True)]
        return [round(m, 6) for m in mean], [round(s, 6) for s in std]


def new_version() -> str:
    """A version folder name: `v-<UTC timestamp>` with microseconds, sortable."""
    return "v-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def clips_to_table(clips: list[Clip]) -> pa.Table:
    for c in clips:
        if c.frames.dtype != np.uint8 or c.frames.ndim != 4:
            raise DatasetError(f"clip {c.source}#{c.start_frame}: frames must be uint8 (T, H, W, C)")
    return pa.table(
        {
            "clip_id": [clip_id(c.source, c.start_frame) for c in clips],
            "source": [c.source for c in clips],
            "start_frame": [c.start_frame for c in clips],
            "num_frames": [c.frames.shape[0] for c in clips],
            "height": [c.frames.shape[1] for c in clips],
            "width": [c.frames.shape[2] for c in clips],
            "channels": [c.frames.shape[3] for c in clips],
            "fps": [c.fps for c in clips],
            "frames": [np.ascontiguousarray(c.frames).tobytes() for c in clips],
            "label": [c.label for c in clips],
            "caption": [c.caption for c in clips],
            "split": [c.split for c in clips],
        },
        schema=CLIP_SCHEMA,
    )


def write_shard(uri: str, clips: list[Clip]) -> int:
    """Write one Parquet shard (zstd); returns its size in bytes."""
    buf = io.BytesIO()
    # Row groups of ~16 MB of frames let readers stream a shard instead of inflating it whole.
    rows_per_group = max(1, ROW_GROUP_BYTES // max(1, clips[0].frames.nbytes))
    pq.write_table(
        clips_to_table(clips),
        buf,
        compression="zstd",
        compression_level=3,
        use_dictionary=["source", "split", "caption"],  # frames are dense pixels: no dictionary
        row_group_size=rows_per_group,
    )
    data = buf.getvalue()
    storage.write_bytes(uri, data, "application/vnd.apache.parquet")
    return len(data)


class ShardWriter:
    """Writes clips into `version/part-NNNNN.parquet` shards of at most `shard_bytes` raw bytes.

    Used by one process or by one Ray task each (`first_shard` keeps the numbering disjoint).
    """

    def __init__(self, root: str, version: str, shard_bytes: int = DEFAULT_SHARD_BYTES, first_shard: int = 0):
        self.root, self.version, self.shard_bytes = root, version, shard_bytes
        self.next_shard = first_shard
        self.pending: list[Clip] = []
        self.pending_bytes = 0
        self.stats = ShardStats()

    def add(self, clip: Clip) -> None:
        self.pending.append(clip)
        self.pending_bytes += clip.frames.nbytes
        self.stats.add(clip)
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rel = f"{self.version}/part-{self.next_shard:05d}.parquet"
        nbytes = write_shard(storage.join(self.root, *rel.split("/")), self.pending)
        self.stats.shards.append({"path": rel, "rows": len(self.pending), "bytes": nbytes})
        self.next_shard += 1
        self.pending, self.pending_bytes = [], 0

    def close(self) -> ShardStats:
        self.flush()
        return self.stats


def clips_per_shard(clip_shape: tuple[int, int, int, int], shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    return max(1, shard_bytes // int(np.prod(clip_shape)))


def commit(
    root: str,
    version: str,
    stats: ShardStats,
    *,
    clip_shape: tuple[int, int, int, int],
    fps: float,
    kind: str,
    labels: list[str] | None,
    sources: list[str],
    failed_sources: list[dict] | None = None,
    extra: dict | None = None,
) -> DatasetManifest:
    """Write the manifest (the commit marker), then remove versions it does not name."""
    if stats.rows == 0:
        raise DatasetError(f"{root}: no clips to write")
    mean, std = stats.mean_std()
    shards = sorted(stats.shards, key=lambda s: s["path"])
    manifest = DatasetManifest(**{
        "format_version": FORMAT_VERSION,
        "version": version,
        "shards": shards,
        "clip_shape": list(clip_shape),
        "frame_encoding": FRAME_ENCODING,
        "fps": fps,
        "rows": stats.rows,
        "shard_count": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "splits": {k: stats.splits[k] for k in sorted(stats.splits)},
        "labels": labels,
        "label_counts": {str(k): stats.labels[k] for k in sorted(stats.labels)},
        "pixel_mean": mean,
        "pixel_std": std,
        "kind": kind,
        "sources": sources,
        "failed_sources": failed_sources or [],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "vidgen_version": __version__,
        **(extra or {}),
    })
    data = manifest.model_dump(mode="json")
    storage.write_json(storage.join(root, version, VERSION_MANIFEST), data)
    storage.write_json(storage.join(root, MANIFEST), data)
    remove_old_versions(root, keep=version)
    return manifest


def grace_s() -> float:
    value = os.environ.get(GRACE_ENV, "")
    try:
        grace = float(value) if value else DEFAULT_GRACE_S
    except ValueError:
        raise DatasetError(f"{GRACE_ENV}={value!r}: expected seconds, e.g. 3600") from None
    if grace < 0:
        raise DatasetError(f"{GRACE_ENV}={value!r}: expected seconds >= 0")
    return grace


def remove_old_versions(root: str, keep: str, now: float | None = None) -> list[str]:
    """Delete the version folders other than `keep` that nothing may still use (see the module
    docstring): not written to within the grace period and not pinned. Returns the versions removed."""
    now = time.time() if now is None else now
    root = root.rstrip("/")
    folders: dict[str, list[str]] = {}
    for uri in storage.list_prefix(root):
        rel = uri[len(root) + 1 :].replace("\\", "/")
        if "/" in rel and rel.startswith("v-"):
            folders.setdefault(rel.split("/", 1)[0], []).append(uri)
    pinned = {p["version"] for p in live_pins(root, now)}
    if "*" in pinned:
        return []
    grace = grace_s()
    removed = []
    for folder, uris in sorted(folders.items()):
        if folder == keep or folder in pinned:
            continue
        newest = max((o.last_modified for o in storage.list_info(storage.join(root, folder))), default=0.0)
        if now - newest < grace:
            continue  # another ingest may still be writing it, or a reader has just opened it
        for uri in uris:
            storage.delete(uri)
        removed.append(folder)
    return removed


def _pin_uri(root: str, holder: str) -> str:
    return storage.join(root, PINS, hashlib.sha256(holder.encode()).hexdigest()[:24] + ".json")


def pin(root: str, version: str, holder: str, ttl_s: float = PIN_TTL_S) -> None:
    """Keep `version` from being removed while `holder` (e.g. a run's URI) uses it, for at most ttl_s."""
    storage.write_json(_pin_uri(root, holder), {"version": version, "holder": holder,
                                                "pinned_at": datetime.now(UTC).isoformat(timespec="seconds"),
                                                "expires": time.time() + ttl_s})


def unpin(root: str, holder: str) -> None:
    storage.delete(_pin_uri(root, holder))


def live_pins(root: str, now: float | None = None) -> list[dict]:
    """The pins of `root` that have not expired (an unreadable pin counts as live: keep, don't guess)."""
    now = time.time() if now is None else now
    pins = []
    for uri in storage.list_prefix(storage.join(root, PINS)):
        try:
            pin_ = storage.read_json(uri)
            if float(pin_["expires"]) > now:
                pins.append(pin_)
        except storage.NotFoundError:
            continue  # unpinned meanwhile
        except (KeyError, TypeError, ValueError):
            logger.warning(f"{uri}: unreadable dataset pin; kept, and every version it could name is kept")
            pins.append({"version": "*"})
    return pins


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class ClipDataset:
    """A committed dataset: its root, its manifest and the shard URIs the manifest lists."""

    root: str
    manifest: DatasetManifest

    @property
    def shard_uris(self) -> list[str]:
        return [storage.join(self.root, *s["path"].split("/")) for s in self.manifest.shards]

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return self.manifest.clip_shape

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.labels

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Each shard as an Arrow table (one at a time: bounded memory)."""
        fs, _ = storage.pyarrow_filesystem(self.root)
        for uri in self.shard_uris:
            _, path = storage.pyarrow_filesystem(uri)
            try:
                table = pq.read_table(path, filesystem=fs, columns=columns)
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(f"{uri}: cannot read shard ({e})") from None
            yield table

    def iter_clips(self, split: str | None = None) -> Iterator[dict]:
        """Rows as dicts with `frames` decoded to uint8 (T, H, W, C); validates each row's shape."""
        for table in self.iter_tables():
            for row in table.to_pylist():
                if split is None or row["split"] == split:
                    row["frames"] = frames_of(row)
                    yield row


REQUIRED_MANIFEST_KEYS = ("format_version", "version", "shards", "clip_shape", "frame_encoding", "rows")


def open_dataset(uri: str, validate_shards: bool = True, version: str | None = None) -> ClipDataset:
    """Open a committed dataset: read and validate its manifest and its shards' schemas. `version`:
    that committed version (e.g. the one a run started with) rather than the current one."""
    root = storage.normalize(uri)
    if version is not None and not (version.startswith("v-") and "/" not in version and ".." not in version):
        raise DatasetError(f"{uri}: version {version!r} is not a version name (v-<timestamp>)")
    where = storage.join(root, MANIFEST)
    try:
        manifest = storage.read_json(where)
        if version is not None and manifest.get("version") != version:  # an older version: its own copy
            where = storage.join(root, version, VERSION_MANIFEST)
            manifest = storage.read_json(where)
    except storage.NoSuchBucketError as e:
        raise DatasetError(str(e)) from None
    except storage.NotFoundError:
        if version is not None and storage.exists(storage.join(root, MANIFEST)):
            raise DatasetError(f"{uri}: version {version} is gone (removed after newer versions were committed "
                               f"and its pin expired)") from None
        raise DatasetError(f"{uri}: no dataset here (no {MANIFEST}; an unfinished write is not a dataset)") from None
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DatasetError(f"{uri}/{MANIFEST}: manifest lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{uri}: format_version {manifest['format_version']} (this vidgen reads {FORMAT_VERSION})")
    if manifest["frame_encoding"] != FRAME_ENCODING:
        raise DatasetError(f"{uri}: frame_encoding {manifest['frame_encoding']!r}, expected {FRAME_ENCODING!r}")
    try:
        typed = DatasetManifest.model_validate(manifest)
    except ValidationError as e:
        first = e.errors()[0]
        raise DatasetError(f"{where}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    ds = ClipDataset(root, typed)
    if validate_shards:
        for shard in ds.shard_uris:
            check_schema(shard)
    return ds


def check_schema(shard_uri: str) -> None:
    """Fail with one message naming the shard and the first column that does not match."""
    fs, path = storage.pyarrow_filesystem(shard_uri)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except FileNotFoundError:
        raise DatasetError(f"{shard_uri}: shard named in the manifest is missing") from None
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{shard_uri}: not a Parquet shard ({e})") from None
    for f in CLIP_SCHEMA:
        if f.name not in schema.names:
            raise DatasetError(f"{shard_uri}: missing column {f.name!r} ({f.type})")
        got = schema.field(f.name).type
        if got != f.type and not (f.type == pa.binary() and got == pa.large_binary()):
            raise DatasetError(f"{shard_uri}: column {f.name!r} has type {got}, expected {f.type}")


def frames_of(row: dict) -> np.ndarray:
    """A row's `frames` bytes -> uint8 (T, H, W, C), checking the bytes agree with the shape."""
    shape = (row["num_frames"], row["height"], row["width"], row["channels"])
    data = row["frames"]
    if len(data) != int(np.prod(shape)):
        raise DatasetError(
            f"clip {row.get('clip_id')}: {len(data)} frame bytes disagree with shape {list(shape)} "
            f"({int(np.prod(shape))} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def write_dataset(
    root: str,
    clips: Iterable[Clip],
    *,
    kind: str,
    labels: list[str] | None,
    sources: list[str],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    failed_sources: list[dict] | None = None,
) -> DatasetManifest:
    """Write clips in one process as a new version and commit it; returns the manifest."""
    root = storage.normalize(root)
    version = new_version()
    writer = ShardWriter(root, version, shard_bytes)
    shape, fps = None, 0.0
    for clip in clips:
        shape, fps = shape or clip.frames.shape, clip.fps
        if clip.frames.shape != shape:
            raise DatasetError(f"clip {clip.source}#{clip.start_frame}: shape {clip.frames.shape} != {shape}")
        writer.add(clip)
    stats = writer.close()
    if shape is None:
        raise DatasetError(f"{root}: no clips to write")
    return commit(root, version, stats, clip_shape=shape, fps=fps, kind=kind, labels=labels, sources=sources, failed_sources=failed_sources)
