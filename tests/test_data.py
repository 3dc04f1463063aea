"""Datasets: synth, ingest, inspect, validation and the training loader (local folders and moto S3)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vidgen import storage
from vidgen.data import format as fmt
from vidgen.data import synth
from vidgen.data.format import DatasetError, open_dataset
from vidgen.data.inspect import summarize

VIDGEN = [sys.executable, "-m", "vidgen.cli"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*VIDGEN, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"vidgen {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_synth_then_inspect_json(root):
    out = storage.join(root, "shapes")
    run_cli("data", "synth", "--kind", "shapes", "--clips", "24", "--frames", "8", "--size", "32", "--out", out)
    facts = json.loads(run_cli("data", "inspect", out, "--json").stdout)
    for key in ("clips", "shards", "bytes", "shape", "fps", "splits", "labels", "failed_sources"):
        assert key in facts, key
    assert facts["clips"] == 24 and facts["shape"] == [8, 32, 32, 3]
    assert sum(facts["splits"].values()) == 24 and facts["failed_sources"] == []
    assert set(facts["labels"]) <= {"circle", "square", "triangle"} and sum(facts["labels"].values()) == 24
    rows = list(open_dataset(out).iter_clips())
    assert len(rows) == 24 and rows[0]["frames"].shape == (8, 32, 32, 3)
    assert storage.exists(open_dataset(out).shard_uris[0])


@pytest.mark.parametrize("kind", ["shapes", "digits", "life"])
def test_synth_is_deterministic_for_a_seed(tmp_path, kind):
    a = synth.synthesize(kind, 6, 6, 32, str(tmp_path / "a"), seed=3, progress=False)
    b = synth.synthesize(kind, 6, 6, 32, str(tmp_path / "b"), seed=3, progress=False)
    c = synth.synthesize(kind, 6, 6, 32, str(tmp_path / "c"), seed=4, progress=False)
    clips = [[r["frames"] for r in open_dataset(str(tmp_path / x)).iter_clips()] for x in "abc"]
    assert all(np.array_equal(x, y) for x, y in zip(clips[0], clips[1], strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(clips[0], clips[2], strict=True))
    assert a.splits == b.splits and a.pixel_mean == b.pixel_mean != c.pixel_mean


def test_life_frames_obey_the_rule(tmp_path):
    synth.synthesize("life", 3, 5, 32, str(tmp_path / "life"), progress=False)
    for row in open_dataset(str(tmp_path / "life")).iter_clips():
        grid = row["frames"][..., 0] > 127  # cell = 1 px at size 32
        for t in range(len(grid) - 1):
            assert np.array_equal(synth.life_step(grid[t]), grid[t + 1])


def test_synth_in_parallel_on_ray_equals_in_process(tmp_path, ray_session):
    serial = synth.synthesize("shapes", 10, 4, 16, str(tmp_path / "s"), seed=1, shard_bytes=4 * 16 * 16 * 3 * 3, parallel=False, progress=False)
    par = synth.synthesize("shapes", 10, 4, 16, str(tmp_path / "p"), seed=1, shard_bytes=4 * 16 * 16 * 3 * 3, parallel=True, progress=False)
    assert par.shard_count == serial.shard_count == 4
    ids = [[r["clip_id"] for r in open_dataset(str(tmp_path / x)).iter_clips()] for x in "sp"]
    assert ids[0] == ids[1]


def test_rewrite_killed_before_manifest_leaves_old_dataset(root, monkeypatch):
    out = storage.join(root, "ds")
    first = synth.synthesize("shapes", 8, 4, 16, out, seed=1, progress=False)
    before = [r["frames"].tobytes() for r in open_dataset(out).iter_clips()]

    def die(*a, **k):
        raise SystemExit("killed before the manifest")

    monkeypatch.setattr(fmt.storage, "write_json", die)
    with pytest.raises(SystemExit):
        synth.synthesize("shapes", 12, 4, 16, out, seed=2, progress=False)
    monkeypatch.undo()
    ds = open_dataset(out)
    assert ds.manifest == first
    assert [r["frames"].tobytes() for r in ds.iter_clips()] == before
    # A completed rewrite replaces it atomically and cleans the old version up (once nothing may use it).
    monkeypatch.setenv(fmt.GRACE_ENV, "0")
    second = synth.synthesize("shapes", 12, 4, 16, out, seed=2, progress=False)
    assert open_dataset(out).manifest.rows == 12
    versions = {u.replace(os.sep, "/").split("/ds/")[1].split("/")[0] for u in storage.list_prefix(out)}
    assert versions == {second.version, fmt.MANIFEST}


def test_two_ingests_into_one_uri_at_once_both_stay_readable(root, monkeypatch):
    """B starts and commits while A is between its shards: B's commit must not delete what A has
    written (a version written to within the grace period may be another ingest's)."""
    out = storage.join(root, "ds")
    real_write = synth._write_range
    state = {"b": None}

    def write_then_let_b_commit(*args, **kwargs):
        stats = real_write(*args, **kwargs)
        if state["b"] is None:
            state["b"] = "running"
            state["b"] = synth.synthesize("shapes", 6, 4, 16, out, seed=7, progress=False)
        return stats

    monkeypatch.setattr(synth, "_write_range", write_then_let_b_commit)
    a = synth.synthesize("shapes", 12, 4, 16, out, seed=1, shard_bytes=4 * 16 * 16 * 3 * 4, progress=False)
    b = state["b"]
    assert a.shard_count == 3 and a.version != b.version
    assert open_dataset(out).manifest == a  # the last commit is the dataset
    assert len(list(open_dataset(out).iter_clips())) == 12  # every shard A wrote before B's commit is there
    assert len(list(open_dataset(out, version=b.version).iter_clips())) == 6  # and B's own version too


def test_a_pinned_version_outlives_newer_commits_and_an_expired_pin_does_not(root, monkeypatch):
    out = storage.join(root, "ds")
    first = synth.synthesize("shapes", 6, 4, 16, out, seed=1, progress=False)
    monkeypatch.setenv(fmt.GRACE_ENV, "0")
    fmt.pin(out, first.version, holder="s3://runs/a")
    synth.synthesize("shapes", 6, 4, 16, out, seed=2, progress=False)
    third = synth.synthesize("shapes", 6, 4, 16, out, seed=3, progress=False)
    assert len(list(open_dataset(out, version=first.version).iter_clips())) == 6  # pinned: kept
    fmt.pin(out, first.version, holder="s3://runs/a", ttl_s=-1)  # its holder died long ago: expired
    fourth = synth.synthesize("shapes", 6, 4, 16, out, seed=4, progress=False)
    with pytest.raises(DatasetError, match=f"version {first.version} is gone"):
        open_dataset(out, version=first.version)
    versions = {u.replace(os.sep, "/").split("/ds/")[1].split("/")[0] for u in storage.list_prefix(out)}
    assert versions == {fourth.version, fmt.MANIFEST, fmt.PINS} and third.version not in versions
    with pytest.raises(DatasetError, match="not a version name"):
        open_dataset(out, version="../other")


def test_a_dataset_committed_before_version_manifests_opens_at_its_version(root):
    """Datasets written before each version kept its own manifest copy: the current version opens
    by name from the root manifest (a run pins it), and an older one is reported gone."""
    out = storage.join(root, "ds")
    first = synth.synthesize("shapes", 6, 4, 16, out, seed=1, progress=False)
    storage.delete(storage.join(out, first.version, fmt.VERSION_MANIFEST))  # as an older vidgen wrote it
    assert open_dataset(out, version=first.version).manifest == first
    with pytest.raises(DatasetError, match="version v-20000101T000000000000Z is gone"):
        open_dataset(out, version="v-20000101T000000000000Z")


def test_a_bad_field_in_a_versions_manifest_is_one_error_naming_that_file(tmp_path):
    """The typed manifest names the file it read: an older version's own copy, not the root's."""
    out = str(tmp_path / "ds")
    first = synth.synthesize("shapes", 6, 4, 16, out, seed=1, progress=False)
    synth.synthesize("shapes", 6, 4, 16, out, seed=2, progress=False)  # a newer version; the first stays (grace)
    copy = storage.join(out, first.version, fmt.VERSION_MANIFEST)
    storage.write_json(copy, {**storage.read_json(copy), "rows": "many"})
    with pytest.raises(DatasetError, match=rf"^{re.escape(copy)}: rows: "):
        open_dataset(out, version=first.version)
    assert open_dataset(out).manifest.rows == 6  # the current version reads on


def test_missing_manifest_is_a_clear_error(root):
    with pytest.raises(DatasetError, match="no dataset here"):
        open_dataset(storage.join(root, "nothing"))
    proc = run_cli("data", "inspect", storage.join(root, "nothing"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("vidgen: error:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_missing_bucket_is_named_as_such(s3_bucket):
    with pytest.raises(DatasetError, match="s3://no-such-bucket-vidgen/ds/_vidgen_dataset.json: no such bucket"):
        open_dataset("s3://no-such-bucket-vidgen/ds")


def _rewrite_shard(ds_uri: str, table: pa.Table) -> None:
    ds = open_dataset(ds_uri, validate_shards=False)
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(ds.shard_uris[0], buf.getvalue())


def test_schema_mismatch_is_a_clear_error(tmp_path):
    out = str(tmp_path / "ds")
    synth.synthesize("shapes", 4, 4, 16, out, progress=False)
    table = pq.read_table(open_dataset(out).shard_uris[0])
    _rewrite_shard(out, table.drop_columns(["fps"]))
    with pytest.raises(DatasetError, match="missing column 'fps'"):
        open_dataset(out)
    _rewrite_shard(out, table.set_column(table.schema.get_field_index("label"), "label", table["label"].cast(pa.string())))
    with pytest.raises(DatasetError, match="column 'label' has type string, expected int32"):
        open_dataset(out)
    frames = pa.array([b"\x00" * 10] * len(table), pa.binary())
    _rewrite_shard(out, table.set_column(table.schema.get_field_index("frames"), "frames", frames))
    with pytest.raises(DatasetError, match=r"10 frame bytes disagree with shape \[4, 16, 16, 3\]"):
        list(open_dataset(out).iter_clips())


def test_loader_yields_tensors_in_range_with_labels(tmp_path, ray_session):
    from vidgen.data.loader import collate_clips, iter_epoch, read_split

    out = str(tmp_path / "ds")
    synth.synthesize("shapes", 20, 4, 16, out, seed=0, val_fraction=0.25, progress=False)
    counts = open_dataset(out).manifest.splits
    ds = read_split(out, "train")
    batches = list(iter_epoch(ds.iterator(), batch_size=4, seed=0, epoch=0, drop_last=False))
    assert sum(b["video"].shape[0] for b in batches) == counts["train"]
    video, label = batches[0]["video"], batches[0]["label"]
    assert video.shape == (4, 3, 4, 16, 16) and video.dtype.is_floating_point
    assert video.min() >= -1 and video.max() <= 1 and video.min() < -0.5 and video.max() > 0.5
    assert set(label.tolist()) <= {0, 1, 2}
    # The same (seed, epoch) gives the same order; another epoch another order.
    again = [b["label"].tolist() for b in iter_epoch(ds.iterator(), 4, seed=0, epoch=0, drop_last=False)]
    assert again == [b["label"].tolist() for b in batches]
    def clip_sums(epoch: int) -> list[float]:  # one number per clip, in the order the epoch gives them
        return [v.sum().item() for b in iter_epoch(ds.iterator(), 4, seed=0, epoch=epoch, drop_last=False)
                for v in b["video"]]

    first, second = clip_sums(0), clip_sums(1)
    assert first != second and sorted(first) == sorted(second)  # the same clips in another order
    skipped = list(iter_epoch(ds.iterator(), 4, seed=0, epoch=0, skip_batches=2, drop_last=False))
    assert [b["label"].tolist() for b in skipped] == again[2:]
    # Labels come back as -1 for unlabelled sets.
    row = {"frames": np.array([b"\x00" * 12], object), "num_frames": np.array([1]), "height": np.array([2]),
           "width": np.array([2]), "channels": np.array([3]), "label": np.array([None], object)}
    assert collate_clips(row)["label"].tolist() == [-1]


def test_reading_a_split_passes_ray_data_no_deprecated_argument(tmp_path, ray_session):
    """Every training run's console showed Ray's RayDeprecationWarning for `ray_remote_args`."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from vidgen.data.loader import read_split

    out = str(tmp_path / "ds")
    synth.synthesize("shapes", 4, 2, 8, out, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        read_split(out, "train")


def test_loader_workers_see_disjoint_shards(tmp_path, ray_session):
    import ray

    from vidgen.data.loader import iter_epoch, read_split

    out = str(tmp_path / "ds")
    synth.synthesize("shapes", 24, 4, 16, out, seed=0, val_fraction=0.0, shard_bytes=6 * 4 * 16 * 16 * 3, progress=False)
    ds = read_split(out, "train", columns=["clip_id", "frames", "num_frames", "height", "width", "channels", "label"])
    splits = ds.streaming_split(2, equal=True)

    @ray.remote(num_cpus=0)
    def consume(it):
        return [cid for batch in it.iter_batches(batch_size=4) for cid in batch["clip_id"].tolist()]

    a, b = ray.get([consume.remote(splits[0]), consume.remote(splits[1])])
    assert a and b and not set(a) & set(b)
    assert len(a) + len(b) == 24


def _lavfi(path, source: str, seconds: float = 2.0, size: str = "96x72", rate: int = 8) -> None:
    from vidgen import media

    subprocess.run(
        [media.ffmpeg_binary(), "-v", "error", "-y", "-f", "lavfi", "-i", f"{source}=size={size}:rate={rate}",
         "-t", str(seconds), "-pix_fmt", "yuv420p", str(path)],
        check=True, timeout=60,
    )


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Three real videos from ffmpeg's own sources, one truncated mp4 and one non-video."""
    d = tmp_path_factory.mktemp("videos")
    _lavfi(d / "testsrc2.mp4", "testsrc2")
    _lavfi(d / "life.mkv", "life")
    _lavfi(d / "mandelbrot.webm", "mandelbrot")
    whole = (d / "testsrc2.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (d / "notes.mov").write_text("this is not a video\n")
    return d


def test_ingest_real_videos_records_failed_sources(video_folder, tmp_path, ray_session):
    from vidgen.data.ingest import ingest

    out = str(tmp_path / "ds")
    manifest = ingest([str(video_folder)], out, frames=4, size=32, stride=4, progress=False)
    failed = {os.path.basename(f["source"]): f["reason"] for f in manifest.failed_sources}
    assert set(failed) == {"truncated.mp4", "notes.mov"}
    assert all("truncated.mp4" in r or "notes.mov" in r for r in failed.values())
    assert {os.path.basename(s) for s in manifest.sources} == {"testsrc2.mp4", "life.mkv", "mandelbrot.webm"}
    # 2 s at 8 fps = 16 frames per source -> 4 clips of 4 frames each
    assert manifest.rows == 12 and manifest.clip_shape == (4, 32, 32, 3)
    rows = list(open_dataset(out).iter_clips())
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], set()).add(r["split"])
        assert r["frames"].std() > 5  # real picture content, not blank frames
    assert all(len(splits) == 1 for splits in by_source.values())  # a video never straddles splits
    assert sorted(r["start_frame"] for r in rows if r["source"].endswith("life.mkv")) == [0, 4, 8, 12]


def test_ingest_cli_two_good_one_corrupt_from_s3(video_folder, s3_root):
    for name in ("testsrc2.mp4", "mandelbrot.webm", "truncated.mp4"):
        storage.upload_file(video_folder / name, storage.join(s3_root, "raw", name))
    out = storage.join(s3_root, "ds")
    proc = run_cli("data", "ingest", storage.join(s3_root, "raw"), "--out", out, "--frames", "8", "--size", "32",
                   "--fps", "4", check=False)
    assert proc.returncode == 1, proc.stderr  # a failed source is reported, and the good clips are kept
    assert "failed" in proc.stdout and "truncated.mp4" in proc.stdout
    facts = json.loads(run_cli("data", "inspect", out, "--json").stdout)
    assert facts["clips"] == 2 and facts["shape"] == [8, 32, 32, 3] and facts["fps"] == 4.0
    assert [os.path.basename(f["source"]) for f in facts["failed_sources"]] == ["truncated.mp4"]


@pytest.mark.parametrize("stride", [8, 100])
def test_ingest_stride_longer_than_a_decoded_chunk_starts_clips_stride_apart(tmp_path, monkeypatch, stride):
    from vidgen import media
    from vidgen.data import ingest as ingest_mod

    grey = np.arange(300) * 255 // 299  # frame i is a flat grey that grows with i: its index shows
    frames = np.repeat(grey[:, None, None, None], 32 * 32 * 3).reshape(300, 32, 32, 3).astype(np.uint8)
    source = tmp_path / "counter.mp4"
    source.write_bytes(media.encode(frames, fps=25, crf=0, preset="ultrafast"))
    clips = []
    monkeypatch.setattr(ingest_mod._NumberedWriter, "add", lambda self, clip: clips.append(clip))
    ingest_mod.ingest_source(str(tmp_path / "ds"), "v1", str(source), 4, 32, None, stride, 0.0, lambda: 0)
    starts = list(range(0, 300 - 4 + 1, stride))
    assert [c.start_frame for c in clips] == starts
    shown = [float(c.frames[0].mean()) for c in clips]
    assert np.allclose(shown, grey[starts], atol=2), shown  # each clip's first frame is the frame it claims


def test_ingest_with_no_usable_clip_fails_clearly(video_folder, tmp_path):
    from vidgen.data.ingest import ingest

    with pytest.raises(DatasetError, match="no usable clip"):
        ingest([str(video_folder / "notes.mov"), str(video_folder / "truncated.mp4")], str(tmp_path / "x"),
               frames=4, size=32, parallel=False, progress=False)
    with pytest.raises(DatasetError, match="no such video"):
        ingest([str(tmp_path / "missing.mp4")], str(tmp_path / "x"), frames=4, size=32, progress=False)
    assert not os.path.exists(tmp_path / "x" / fmt.MANIFEST)


def test_inspect_preview_writes_a_playable_grid(tmp_path):
    from vidgen import media

    out = str(tmp_path / "ds")
    synth.synthesize("digits", 9, 6, 32, out, progress=False)
    facts = json.loads(run_cli("data", "inspect", out, "--json", "--preview", str(tmp_path / "p.mp4")).stdout)
    info = media.probe(str(tmp_path / "p.mp4"))
    assert info.frames == 6 and info.width >= 96 and facts["preview"] == str(tmp_path / "p.mp4")
    run_cli("data", "inspect", out, "--preview", str(tmp_path / "p.gif"))
    assert (tmp_path / "p.gif").read_bytes()[:3] == b"GIF"
