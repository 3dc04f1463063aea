"""Batch rendering end to end: specs, the Ray pipeline, moto's S3, the real ffmpeg.

Tiny untrained models (built, not trained: rendering does not care what they learned), a
testsrc2 input video, a logo, a sine jingle and subtitles, all in moto's S3. The big batch renders
once (module fixture) and the tests after it look at what landed, re-run it, and edit it.
"""

from __future__ import annotations

import copy
import hashlib
import html.parser
import io
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml

from vidgen import media, models, storage
from vidgen.render import load_batch, parse_batch, render_batch
from vidgen.errors import InputError
from vidgen.render.spec import MAX_ITEMS, SpecError

FPS, SECONDS, SIDE = 8, 1.5, 64
INPUT_FPS, INPUT_FRAMES = 10, 16  # differs from the defaults: restore must keep the input's


def _ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def assets(s3_bucket, tmp_path_factory):
    """Models and inputs in moto's S3: URIs by name."""
    import torch
    from PIL import Image

    root = f"s3://{s3_bucket}/render-assets-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    uris = {name: storage.join(root, "models", name) for name in ("gan", "restore", "convlstm", "style")}
    models.save(models.build("gan", "tiny", num_classes=3, label_names=["circle", "square", "triangle"]), uris["gan"])
    models.save(models.build("restore", "tiny"), uris["restore"])
    models.save(models.build("convlstm", "tiny"), uris["convlstm"])
    models.save(models.build("style", "tiny"), uris["style"])
    tmp = tmp_path_factory.mktemp("render-assets")
    _ffmpeg("-f", "lavfi", "-i", f"testsrc2=s=64x48:r={INPUT_FPS}", "-frames:v", str(INPUT_FRAMES),
            "-pix_fmt", "yuv420p", str(tmp / "lecture.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=3", "-c:a", "aac", str(tmp / "jingle.m4a"))
    logo = io.BytesIO()
    Image.new("RGBA", (40, 20), (230, 20, 20, 220)).save(logo, format="PNG")
    uris["logo"] = storage.join(root, "brand", "logo.png")
    storage.write_bytes(uris["logo"], logo.getvalue())
    uris["lecture"] = storage.join(root, "raw", "lecture.mp4")
    storage.upload_file(tmp / "lecture.mp4", uris["lecture"])
    uris["audio"] = storage.join(root, "audio", "jingle.m4a")
    storage.upload_file(tmp / "jingle.m4a", uris["audio"])
    uris["subtitles"] = storage.join(root, "subs", "lecture.vtt")
    storage.write_text(uris["subtitles"], "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nWelcome\n")
    uris["root"] = root
    return uris


def six_item_spec(assets: dict, out: str) -> dict:
    return {
        "name": "render-test",
        "output": out,
        "model": assets["gan"],
        "defaults": {"fps": FPS, "seconds": SECONDS, "size": [SIDE, SIDE], "preset": "ultrafast"},
        "items": [
            {"id": "ad", "mode": "generate", "seed": 7, "label": "square", "title": "Spring sale -20%",
             "logo": assets["logo"], "logo_corner": "bottom-right", "watermark": "ACME", "audio": assets["audio"]},
            # the same video without overlays, plus renditions: the plain render the overlays are compared to
            {"id": "plain", "mode": "generate", "seed": 7, "label": 1,
             "renditions": [{"name": "16x9", "size": [96, 54]}, {"name": "9x16", "size": "54x96", "fit": "pad"}]},
            {"id": "lecture", "mode": "restore", "input": assets["lecture"], "model": assets["restore"],
             "compare": True, "subtitles": assets["subtitles"]},
            {"id": "styled", "mode": "stylize", "input": assets["lecture"], "model": assets["style"]},
            {"id": "extend", "mode": "predict", "input": assets["lecture"], "model": assets["convlstm"], "seconds": 2},
            {"id": "missing", "mode": "restore", "input": storage.join(assets["root"], "raw", "nope.mp4"),
             "model": assets["restore"]},
        ],
    }


def snapshot(prefix: str) -> dict[str, tuple[str, str]]:
    """Every object under a prefix as seen by the server: key -> (ETag, LastModified)."""
    bucket, key = storage.split_s3(prefix)
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
    return {o["Key"]: (o["ETag"], o["LastModified"].isoformat()) for p in pages for o in p.get("Contents", [])}


@pytest.fixture(scope="module")
def rendered(assets, s3_bucket, ray_session):
    out = f"s3://{s3_bucket}/renders-{uuid.uuid4().hex[:8]}"
    spec = six_item_spec(assets, out)
    started = time.monotonic()
    result = render_batch(parse_batch(spec), workers=2, progress=False)
    from vidgen.render import batch

    kept = {key[2] for key in batch.WARM.kept}
    return {"spec": spec, "out": out, "result": result, "seconds": time.monotonic() - started, "kept": kept}


def records_by_id(out: str) -> dict[str, dict]:
    lines = storage.read_text(storage.join(out, "manifest.jsonl")).splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


# --------------------------------------------------------------------------------------------
# The batch


def test_batch_renders_five_ok_and_records_one_error(rendered):
    result, out = rendered["result"], rendered["out"]
    records = records_by_id(out)
    assert list(records) == ["ad", "plain", "lecture", "styled", "extend", "missing"]
    assert [r["status"] for r in records.values()].count("ok") == 5
    assert result.failed == ["missing"] and not result.ok
    missing = records["missing"]
    assert missing["status"] == "error" and "nope.mp4" in missing["error"] and "no such key" in missing["error"]
    for item_id, record in records.items():  # each record is also its own object, written after the outputs
        assert storage.read_json(storage.join(out, "items", f"{item_id}.json")) == record
    assert not storage.exists(storage.join(out, "missing.mp4"))
    # Four models on 2 CPUs: a worker done while another model's items waited was ended, not kept
    # warm (its half CPU stalled the next model's encodes until its timer, 60 s). Only the workers
    # still live when the last model's items were all inferred may be kept.
    assert 1 <= len(rendered["kept"]) <= 2, rendered["kept"]


def test_outputs_have_the_asked_fps_size_and_duration(rendered, assets):
    out, records = rendered["out"], records_by_id(rendered["out"])

    def check(name, width, height, fps, frames):
        info = media.probe(storage.join(out, name))
        assert (info.width, info.height, info.frames) == (width, height, frames), name
        assert info.fps == pytest.approx(fps) and info.seconds == pytest.approx(frames / fps, abs=0.01), name
        return info

    generated = round(FPS * SECONDS)
    ad = check("ad.mp4", SIDE, SIDE, FPS, generated)
    check("plain.mp4", SIDE, SIDE, FPS, generated)
    check("plain--16x9.mp4", 96, 54, FPS, generated)
    check("plain--9x16.mp4", 54, 96, FPS, generated)
    check("lecture.mp4", SIDE, SIDE, INPUT_FPS, INPUT_FRAMES)  # restore keeps the input's fps and length
    check("lecture--compare.mp4", 2 * SIDE, SIDE, INPUT_FPS, INPUT_FRAMES)
    check("styled.mp4", SIDE, SIDE, INPUT_FPS, INPUT_FRAMES)
    check("extend.mp4", SIDE, SIDE, FPS, 2 * FPS)  # predict rolls out to seconds x fps
    assert ad.audio and ad.audio_codec == "aac"
    assert not media.probe(storage.join(out, "plain.mp4")).audio
    # provenance in the mp4 and the record
    digest = models.read_manifest(assets["gan"]).weights_sha256
    provenance = json.loads(ad.metadata["comment"])
    assert provenance["model_sha256"] == digest and provenance["seed"] == 7 and provenance["label"] == 1
    assert provenance["vidgen"] and records["ad"]["model_sha256"] == digest
    assert records["ad"]["spec_hash"] == provenance["spec_hash"]
    assert [r["name"] for r in records["plain"]["renditions"]] == ["16x9", "9x16"]
    assert records["lecture"]["compare"]["width"] == 2 * SIDE
    for record in records.values():
        if record["status"] == "ok":
            data = storage.read_bytes(record["uri"])
            assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"]
            assert storage.read_bytes(record["poster"])[:2] == b"\xff\xd8"  # a JPEG


def test_overlays_change_pixels_of_the_same_video(rendered):
    ad = media.decode(storage.join(rendered["out"], "ad.mp4")).astype(np.int16)
    plain = media.decode(storage.join(rendered["out"], "plain.mp4")).astype(np.int16)
    top = slice(0, SIDE // 4)  # the title box
    assert np.abs(ad[:, top] - plain[:, top]).mean() > 20
    # same seed and label: away from the overlays the frames are the same video
    bottom_left = (slice(None), slice(3 * SIDE // 4, SIDE), slice(0, SIDE // 4))
    assert np.abs(ad[bottom_left] - plain[bottom_left]).mean() < 8


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src", "poster") and v]


def test_gallery_links_and_sources_resolve(rendered):
    out = rendered["out"]
    page = storage.read_text(storage.join(out, "index.html"))
    parser = _Links()
    parser.feed(page)
    assert "ad.mp4" in parser.links and "ad.jpg" in parser.links and "plain--9x16.mp4" in parser.links
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), link  # relative: works local and served
        assert storage.exists(storage.join(out, link)), link
    assert "nope.mp4" in page  # the failed item shows its error


def test_a_stored_record_reads_through_one_typed_home_for_its_fields_and_defaults():
    """items/<id>.json is a RenderRecord: a record of an older vidgen (fields missing) reads with the
    defaults, a newer one's unknown fields survive a rewrite, and what is not a record at all is
    not mistaken for one (the planner treats it as unreadable: it never turns into an error)."""
    from vidgen.render.record import RenderRecord

    older = {"id": "a", "status": "ok", "mode": "generate", "uri": "a.mp4", "poster": "a.jpg", "width": 64,
             "height": 48, "seconds": 1.0}
    record = RenderRecord.parse(older)
    assert record.is_ok and record.renditions == [] and record.compare is None and record.error is None
    assert record["uri"] == "a.mp4" and record["seconds"] == 1.0
    with pytest.raises(KeyError):
        record["nope"]
    assert RenderRecord.parse({**older, "from_the_future": [1]}).to_json()["from_the_future"] == [1]
    for not_a_record in ({"id": "a"}, {**older, "status": "maybe"}, ["a"], "a"):
        assert RenderRecord.parse(not_a_record) is None, not_a_record
    assert set(RenderRecord.parse(older).to_json()) == {
        "id", "status", "mode", "uri", "poster", "bytes", "frames", "seconds", "fps", "width", "height", "sha256",
        "renditions", "compare", "model", "model_sha256", "seed", "label", "input", "spec_hash", "vidgen_version",
        "error", "rendered_at", "elapsed_s"}  # the stored form, as before the type


def test_gallery_escapes_user_text():
    from vidgen.render import gallery

    from vidgen.render.record import RenderRecord

    record = {"id": "x", "mode": "generate", "status": "error", "error": "<script>alert(1)</script>", "model": "m"}
    page = gallery.render_html("<b>batch</b>", [RenderRecord.model_validate(record)])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;batch" in page


def test_a_batch_without_workers_keeps_two_encodes_in_flight_per_cpu_at_most_16():
    from vidgen.render.batch import default_workers

    # `vidgen render --help` and the README promise this; a fraction of a CPU still gets one encode
    assert [default_workers(c) for c in (0.5, 1, 2, 8, 64)] == [1, 2, 4, 16, 16]


def test_rerun_uploads_nothing(rendered):
    out = rendered["out"]
    before = snapshot(out)
    result = render_batch(parse_batch(rendered["spec"]), workers=2, progress=False)
    assert snapshot(out) == before  # observed on the server: same keys, ETags and LastModified
    assert result.rendered == [] and result.unchanged == ["ad", "plain", "lecture", "styled", "extend"]
    assert result.failed == ["missing"]


def test_edited_item_rerenders_alone(rendered):
    out = rendered["out"]
    spec = copy.deepcopy(rendered["spec"])
    spec["items"][0]["title"] = "Summer sale -30%"
    before = snapshot(out)
    time.sleep(1.0)  # LastModified has one-second resolution on some servers
    result = render_batch(parse_batch(spec), workers=2, progress=False)
    after = snapshot(out)
    changed = {k.rsplit("/", 1)[-1] for k in after if after[k] != before.get(k)}
    assert result.rendered == ["ad"]
    assert changed == {"ad.mp4", "ad.jpg", "ad.json", "manifest.jsonl", "index.html"}


# --------------------------------------------------------------------------------------------
# A render killed mid-batch


def test_killed_render_reruns_with_every_object_uploaded_once(assets, ray_address, tmp_path):
    client = storage.s3_client()
    bucket = "vidgen-versioned"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    out = f"s3://{bucket}/kill-{uuid.uuid4().hex[:8]}"
    # lossless 480x480 2 s videos: each over the tests' multipart threshold (conftest), so uploads are multipart
    spec = {"name": "kill-test", "output": out, "model": assets["gan"],
            "defaults": {"fps": FPS, "seconds": 2, "size": [480, 480], "preset": "ultrafast", "crf": 0},
            "items": [{"id": f"gen-{i}", "mode": "generate", "seed": i,
                       "renditions": [{"name": "wide", "size": [96, 54]}]} for i in range(5)]}
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    command = [sys.executable, "-m", "vidgen.cli", "render", str(path), "--workers", "2"]

    killed = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:  # SIGKILL, as a node's death or an OOM kill would, once two items have their records
        deadline = time.monotonic() + 180
        while len([k for k in snapshot(out) if "/items/" in k]) < 2:
            assert killed.poll() is None and time.monotonic() < deadline, killed.stdout.read()[-3000:]
            time.sleep(0.05)
    finally:
        killed.kill()
    assert killed.wait(60) == -9
    records = [k for k in snapshot(out) if "/items/" in k]
    assert 2 <= len(records) < 5
    assert not any(k.endswith(("manifest.jsonl", "index.html")) for k in snapshot(out))
    for key in snapshot(out):  # what is visible is whole
        if key.endswith(".mp4"):
            assert media.probe(f"s3://{bucket}/{key}").frames == 2 * FPS
    time.sleep(2.0)  # Ray ends the killed driver's workers
    # what an encoder killed mid-upload leaves: an unfinished multipart upload to an unrendered item
    unrendered = next(i for i in range(5) if f"{storage.split_s3(out)[1]}/items/gen-{i}.json" not in snapshot(out))
    left = f"{storage.split_s3(out)[1]}/gen-{unrendered}.mp4"
    upload = client.create_multipart_upload(Bucket=bucket, Key=left)["UploadId"]
    client.upload_part(Bucket=bucket, Key=left, UploadId=upload, PartNumber=1, Body=b"x" * 1024)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "5 items" in again.stdout
    keys = snapshot(out)
    assert len([k for k in keys if k.endswith(".mp4")]) == 10 and len([k for k in keys if "/items/" in k]) == 5
    versions = client.list_object_versions(Bucket=bucket, Prefix=storage.split_s3(out)[1] + "/")["Versions"]
    counts: dict[str, int] = {}
    for v in versions:
        counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    assert counts == dict.fromkeys(keys, 1)  # every object uploaded exactly once over both runs
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # the rerun cleaned up after the kill
    main_videos = [v for v in versions if v["Key"].endswith(".mp4") and "--" not in v["Key"]]
    assert all("-" in v["ETag"] for v in main_videos), main_videos  # each went up as a multipart upload


@pytest.mark.parametrize("grace", ["20", "0"])
def test_sigterm_finishes_the_items_in_flight_leaves_no_partial_object_and_the_rerun_completes(
        assets, ray_address, s3_root, tmp_path, grace):
    """A spot node's notice to `vidgen render`: no new item starts, the encodes in flight land (grace
    20 s) or are cancelled and their uploads aborted (grace 0), the exit code says it was stopped,
    and the same command renders the rest."""
    import signal

    out = f"{s3_root}/sigterm-{grace}"
    bucket, prefix = storage.split_s3(out)
    spec = {"name": "sigterm-test", "output": out, "model": assets["gan"],  # multipart-sized videos (conftest)
            "defaults": {"fps": FPS, "seconds": 2, "size": [480, 480], "preset": "ultrafast", "crf": 0},
            "items": [{"id": f"gen-{i}", "mode": "generate", "seed": i} for i in range(10)]}
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    command = [sys.executable, "-m", "vidgen.cli", "render", str(path), "--workers", "2"]
    proc = subprocess.Popen(command, env={**env, "VIDGEN_RENDER_STOP_GRACE_S": grace}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not any("/items/" in k for k in snapshot(out)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output, output[-2000:]
    keys = snapshot(out)
    records = [k for k in keys if "/items/" in k]
    assert 1 <= len(records) < 10, records
    time.sleep(1.0)  # a cancelled encoder's process is gone before its upload is looked for
    assert not storage.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")
    for key in keys:  # what is visible is whole
        if key.endswith(".mp4"):
            assert media.probe(f"s3://{bucket}/{key}").frames == 2 * FPS
    for record in records:
        stored = storage.read_json(f"s3://{bucket}/{record}")
        assert stored["status"] == "ok", (stored["error"], output[-1500:])

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(records)} unchanged" in again.stdout, again.stdout  # nothing rendered twice
    final = records_by_id(out)
    assert len(final) == 10 and all(r["status"] == "ok" for r in final.values())


def test_an_encoder_whose_ffmpeg_is_killed_raises_for_a_retry_instead_of_recording_an_error(tmp_path):
    """Ray's force-cancel (a stop with no grace) kills an encode task's children a moment before the
    task: the encoder saw "ffmpeg exited with code -9" and recorded its stopped item as an error
    (CI and a loaded run, 2026-11-30). A Ray encode task raises instead (its caller tries the item
    again, or has stopped); in one process the item's error is recorded, naming the signal."""
    import signal

    import psutil

    from vidgen.render import engine

    out = str(tmp_path / "out")
    [item] = parse_batch({"name": "killed", "output": out, "model": "unused", "defaults": {"fps": FPS},
                          "items": [{"id": "g", "mode": "generate", "seed": 0}]}).resolve()
    meta = {"fps": FPS, "frames": 16, "width": 64, "height": 48, "scale": 1}
    info = engine.ModelInfo("unused", "gan", "0" * 64)

    def frames_with_ffmpeg_killed_after(n):
        for i in range(16):
            if i == n:
                for child in psutil.Process().children(recursive=True):
                    if "ffmpeg" in child.name():
                        child.send_signal(signal.SIGKILL)  # not reaped here: the encoder's wait() reads the signal
            yield "video", np.full((1, 48, 64, 3), 16 * i, np.uint8)

    with pytest.raises(media.EncoderKilledError, match="SIGKILL"):
        engine.encode_item(item, out, meta, frames_with_ffmpeg_killed_after(4), info, "hash", retry_killed=True)
    assert not os.path.exists(os.path.join(out, "items", "g.json"))
    record = engine.encode_item(item, out, meta, frames_with_ffmpeg_killed_after(4), info, "hash")
    assert record["status"] == "error" and "killed by SIGKILL" in record["error"], record
    record = engine.encode_item(item, out, meta, frames_with_ffmpeg_killed_after(99), info, "hash", retry_killed=True)
    assert record["status"] == "ok" and media.probe(os.path.join(out, "g.mp4")).frames == 16


def test_a_stop_aborts_an_encoders_upload_only_after_its_cancel_has_landed(assets, s3_root, ray_session,
                                                                           monkeypatch):
    """Ray's force-cancel ends an encoder a moment after it is asked (seconds on a loaded machine).
    Aborting the encoder's upload before then made it fail under a live encoder, which recorded its
    item as an error (CI, 2026-11-30). Here every cancel lands 2 s late: the upload must be aborted
    after the encoder is gone, and never seen aborted by it."""
    import threading
    from contextlib import contextmanager

    import ray

    from vidgen import runtime
    from vidgen.render import batch, engine

    def uploading_encoder(item, out, meta, refs, model, item_hash, previous, resume, threads):
        """An encoder uploading its video until it is cancelled; it leaves a mark if its upload fails."""
        bucket, key = storage.split_s3(engine.item_outputs(item, out)[0].video)
        client = storage.s3_client()
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        for part in range(1, 1200):
            try:
                client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=part, Body=b"x" * 1024)
            except Exception:
                storage.write_text(storage.join(out, f"aborted-under-{item.id}"), "")
                raise
            time.sleep(0.05)

    worker_cls, _ = batch._remote()
    monkeypatch.setattr(batch, "_remote", lambda: (worker_cls, ray.remote(max_retries=0)(uploading_encoder)))
    cancel = ray.cancel
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: threading.Timer(2.0, cancel, (ref,),
                                                                              {"force": force}).start())
    stop = runtime.StopRequest()
    monkeypatch.setattr(runtime, "stop_on_signal", contextmanager(lambda what, on_stop=None: (yield stop)))
    monkeypatch.setenv("VIDGEN_RENDER_STOP_GRACE_S", "0")
    out = storage.join(s3_root, "out")
    bucket, prefix = storage.split_s3(out)
    spec = {"name": "late-cancel", "output": out, "model": assets["gan"],
            "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"},
            "items": [{"id": f"gen-{i}", "mode": "generate", "seed": i} for i in range(2)]}

    def stop_when_both_upload():
        deadline = time.monotonic() + 120
        while len(storage.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])) < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stop.by, stop.at = "SIGTERM", time.monotonic()

    threading.Thread(target=stop_when_both_upload, daemon=True).start()
    result = render_batch(parse_batch(spec), workers=2, progress=False)
    assert result.stopped_by == "SIGTERM" and sorted(result.left) == ["gen-0", "gen-1"]
    time.sleep(1.0)  # an encoder that outlived the stop would leave its mark by now
    assert not [k for k in snapshot(out) if "aborted-under-" in k]
    assert not storage.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")


def test_objects_that_landed_before_their_record_are_adopted_not_uploaded_again(assets, s3_root):
    """What a kill between an item's uploads and its record leaves: outputs, no record."""
    spec = {"name": "adopt", "output": s3_root, "model": assets["gan"],
            "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"},
            "items": [{"id": f"gen-{i}", "mode": "generate", "seed": i,
                       "renditions": [{"name": "wide", "size": [96, 54]}]} for i in range(2)]}
    render_batch(parse_batch(spec), workers=0, progress=False)  # in this process, no Ray
    for name in ("items/gen-0.json", "items/gen-1.json", "manifest.jsonl", "index.html", "gen-1--wide.jpg"):
        storage.delete(storage.join(s3_root, name))
    before = snapshot(s3_root)
    bucket, prefix = storage.split_s3(s3_root)
    client = storage.s3_client()  # an encoder of gen-0 killed mid-upload after its outputs had landed once
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/gen-0.mp4")["UploadId"]
    client.upload_part(Bucket=bucket, Key=f"{prefix}/gen-0.mp4", UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    time.sleep(1.0)
    result = render_batch(parse_batch(spec), workers=0, progress=False)
    after = snapshot(s3_root)
    assert result.resumed == ["gen-0"] and result.rendered == ["gen-1"] and result.ok
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")  # adopted: cleaned too
    assert {k: after[k] for k in before} == before  # nothing that was there is uploaded again
    assert {k.split("/", 1)[1] for k in set(after) - set(before)} == {
        "items/gen-0.json", "items/gen-1.json", "manifest.jsonl", "index.html", "gen-1--wide.jpg"}
    assert media.probe(storage.join(s3_root, "gen-1--wide.mp4")).width == 96


def test_a_model_that_will_not_load_fails_its_items_only(assets, s3_root, ray_session):
    broken, broken_restore = (storage.join(s3_root, "models", name) for name in ("broken", "broken-restore"))
    for uri, source in ((broken, assets["gan"]), (broken_restore, assets["restore"])):
        storage.copy(storage.join(source, "model.json"), storage.join(uri, "model.json"))
        storage.write_bytes(storage.join(uri, "model.safetensors"), b"not the weights")
    spec = {"name": "broken", "output": storage.join(s3_root, "out"), "model": assets["gan"],
            "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"},
            "items": [{"id": "good", "mode": "generate", "seed": 1},
                      {"id": "bad", "mode": "generate", "seed": 1, "model": broken},
                      {"id": "bad-restore", "mode": "restore", "input": assets["lecture"], "model": broken_restore}]}
    result = render_batch(parse_batch(spec), workers=2, progress=False)
    records = {r["id"]: r for r in result.records}
    assert records["good"]["status"] == "ok" and result.failed == ["bad", "bad-restore"]
    for bad, uri in (("bad", broken), ("bad-restore", broken_restore)):  # streamed too: said once, not retried
        assert uri in records[bad]["error"] and "sha256" in records[bad]["error"], records[bad]["error"]
        assert "attempts" not in records[bad]["error"]

    # Mended (the same model.json, its weights now whole): the next batch loads it, rather than taking
    # the worker that could not load it as one kept warm for these weights
    for uri, source in ((broken, assets["gan"]), (broken_restore, assets["restore"])):
        storage.copy(storage.join(source, "model.safetensors"), storage.join(uri, "model.safetensors"))
    result = render_batch(parse_batch(spec), workers=2, progress=False)
    assert result.ok and result.rendered == ["bad", "bad-restore"], result.summary()


def _model_workers(state: str | None = None) -> set[str]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "ModelWorker")] + ([("state", "=", state)] if state else [])
    return {a.actor_id for a in list_actors(filters=filters, limit=10_000, raise_on_missing_output=False)}


def _alive_model_workers_become(expected: set[str]) -> set[str]:
    deadline = time.monotonic() + 30  # the State API sees a kill a moment later
    while (alive := _model_workers("ALIVE")) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def test_a_process_renders_its_next_batch_of_the_same_weights_on_the_model_worker_it_kept(
        assets, s3_root, ray_session, monkeypatch):
    """A finished batch keeps its last model worker warm for this process's next batch of the same
    weights (its start, mostly `import torch`, would come before any frame): not a worker that died,
    nor one of other weights; every other stage's init_ray ends the kept ones; the timer ends them."""
    import ray
    import torch

    from vidgen.render import batch
    from vidgen.runtime import init_ray

    model = storage.join(s3_root, "models", "gan")

    def export(seed: int) -> None:
        torch.manual_seed(seed)
        models.save(models.build("gan", "tiny", num_classes=3, label_names=["circle", "square", "triangle"]), model)

    def render(name: str, also: str | None = None) -> None:
        items = [{"id": f"gen-{i}", "mode": "generate", "seed": i} for i in range(3)]
        if also:  # a first model's item, before this model's
            items = [{"id": "first-model", "mode": "generate", "seed": 9, "model": also}, *items]
        spec = {"name": name, "output": storage.join(s3_root, name), "model": model,
                "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"}, "items": items}
        result = render_batch(parse_batch(spec), workers=2, progress=False)
        assert result.ok and len(result.rendered) == len(items), result.summary()

    export(1)
    earlier = _model_workers()
    # Two models, one at a time so that `model`'s worker is the batch's last: the worker kept is the
    # one that finishes last, and with both live at once that would be whichever infers faster.
    monkeypatch.setattr(batch, "MAX_LIVE_MODELS", 1)
    render("first", also=assets["gan"])
    monkeypatch.undo()
    made = _model_workers() - earlier
    [kept] = [w._actor_id.hex() for key, (w, _) in batch.WARM.kept.items() if key[2] == model]
    assert len(made) == 2 and kept in made
    render("second")  # the other model's worker, if it was kept too, is ended
    assert _model_workers() - earlier == made and _alive_model_workers_become({kept}) == {kept}

    export(2)  # re-exported: new weights, a new worker; the old one is ended
    render("third")
    [new] = _model_workers() - earlier - made
    assert _alive_model_workers_become({new}) == {new}

    ray.kill(next(iter(batch.WARM.kept.values()))[0])  # the kept worker dies (its node went)
    render("fourth")  # a new worker at once: no item spends an attempt on the dead one
    [replacement] = _model_workers() - earlier - made - {new}
    assert _alive_model_workers_become({replacement}) == {replacement}

    init_ray()  # ingest, training, ...: they want the cores
    assert _alive_model_workers_become(set()) == set()

    monkeypatch.setenv("VIDGEN_RENDER_KEEP_WARM_S", "1")
    render("fifth")
    assert _alive_model_workers_become(set()) == set()  # ended by its timer
    monkeypatch.setenv("VIDGEN_RENDER_KEEP_WARM_S", "0")
    render("sixth")
    assert not batch.WARM.kept and _alive_model_workers_become(set()) == set()
    monkeypatch.setenv("VIDGEN_RENDER_KEEP_WARM_S", "soon")
    with pytest.raises(InputError, match="VIDGEN_RENDER_KEEP_WARM_S='soon'"):
        render("seventh")

def test_an_unreadable_model_json_never_turns_an_ok_record_into_an_error(assets, s3_root, capsys):
    from vidgen import cli

    model = storage.join(s3_root, "models", "gan")
    for name in ("model.json", "model.safetensors"):
        storage.copy(storage.join(assets["gan"], name), storage.join(model, name))
    spec = {"name": "reexport", "output": storage.join(s3_root, "out"), "model": model,
            "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"},
            "items": [{"id": f"gen-{i}", "mode": "generate", "seed": i} for i in range(2)]}
    assert render_batch(parse_batch(spec), workers=0, progress=False).ok
    before = snapshot(spec["output"])
    storage.delete(storage.join(model, "model.json"))  # a re-export in progress, or a read that failed
    result = render_batch(parse_batch(spec), workers=0, progress=False)
    assert result.failed == ["gen-0", "gen-1"] and "model.json" in result.summary()
    assert [r["status"] for r in result.records] == ["ok", "ok"]
    assert snapshot(spec["output"]) == before  # every record, video and poster as it was

    storage.write_text(storage.join(s3_root, "batch.yaml"), yaml.safe_dump(spec))
    assert cli.main(["render", storage.join(s3_root, "batch.yaml"), "--dry-run"]) == 1
    assert "earlier ok record kept" in capsys.readouterr().out


def test_two_renders_into_one_folder_keep_each_others_items_in_the_index(assets, s3_root, monkeypatch):
    """And the index reads back only the records that are not this render's own, byte for byte (their
    S3 ETags tell): a batch's index used to GET every record it had just written."""
    from vidgen.render.batch import write_index
    from vidgen.render.engine import record_uri

    def spec(name: str, ids: list[str]) -> dict:
        return {"name": name, "output": storage.join(s3_root, "shared"), "model": assets["gan"],
                "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"},
                "items": [{"id": i, "mode": "generate", "seed": n} for n, i in enumerate(ids)]}

    first = render_batch(parse_batch(spec("first", ["a-1", "a-2"])), workers=0, progress=False)
    render_batch(parse_batch(spec("second", ["b-1"])), workers=0, progress=False)
    def manifest() -> list[dict]:
        text = storage.read_text(storage.join(first.output, "manifest.jsonl"))
        return [json.loads(line) for line in text.splitlines()]

    reads = []
    real_read = storage.read_json
    monkeypatch.setattr(storage, "read_json", lambda uri: reads.append(storage.basename(uri)) or real_read(uri))
    write_index(first.output, "first", first.records)  # the first render's index write lands last
    assert [r["id"] for r in manifest()] == ["a-1", "a-2", "b-1"] and all(r["status"] == "ok" for r in manifest())
    assert "b-1.mp4" in storage.read_text(storage.join(first.output, "index.html"))
    assert reads == ["b-1.json"]

    # a-2 rendered again by another writer since: its stored record differs from ours, and is read
    storage.write_json(record_uri(first.output, "a-2"), {**first.records[1].to_json(), "elapsed_s": 99.0})
    reads.clear()
    write_index(first.output, "first", first.records)
    assert sorted(reads) == ["a-2.json", "b-1.json"] and manifest()[1]["elapsed_s"] == 99.0


def test_an_endpoint_jobs_index_is_the_same_without_listing_or_reading_its_folder(assets, s3_root, monkeypatch):
    """A folder with one writer that holds every record (an endpoint job's, its lease held) gets its
    manifest and index from those records alone: the same bytes, no LIST (12.5 GETs on S3's price
    list) and no read of what it just wrote."""
    from vidgen.render.batch import write_index

    spec = {"name": "job", "output": storage.join(s3_root, "job"), "model": assets["gan"],
            "defaults": {"fps": FPS, "seconds": 1, "size": [SIDE, SIDE], "preset": "ultrafast"},
            "items": [{"id": f"gen-{i}", "mode": "generate", "seed": i} for i in range(2)]}
    result = render_batch(parse_batch(spec), workers=0, progress=False)
    listed = {name: storage.read_bytes(storage.join(result.output, name)) for name in ("manifest.jsonl", "index.html")}
    for name in listed:
        storage.delete(storage.join(result.output, name))

    def refused(*args, **kwargs):
        raise AssertionError("the folder was listed or read")

    for name in ("list_info", "list_prefix", "read_bytes", "read_json", "read_text", "exists", "stat"):
        monkeypatch.setattr(storage, name, refused)
    write_index(result.output, "job", result.records, sole_writer=True)
    monkeypatch.undo()
    assert {name: storage.read_bytes(storage.join(result.output, name)) for name in listed} == listed


# --------------------------------------------------------------------------------------------
# Specs rejected before any work


def _base(assets, out="s3://vidgen-test/never"):
    return {"name": "bad", "output": out, "model": assets["gan"],
            "items": [{"id": "a", "mode": "generate", "seed": 1}]}


@pytest.mark.parametrize("edit, named", [
    (lambda s: s["items"][0].update(id="../x"), "items[0] (../x).id"),
    (lambda s: s["items"][0].update(id="a--b"), "items[0] (a--b).id"),
    (lambda s: s["items"][0].update(mode="upscale"), "items[0] (a).mode"),
    (lambda s: s["items"][0].update(colour="red"), "items[0] (a).colour: unknown field"),
    (lambda s: s["items"].append({"id": "a", "mode": "generate"}), "id 'a' appears more than once"),
    (lambda s: s["items"][0].update(seconds=10_000), "items[0] (a).seconds"),
    (lambda s: s["items"][0].update(size=[65, 64]), "items[0] (a).size"),
    (lambda s: s["items"][0].update(size=[64, 8192]), "items[0] (a).size"),
    (lambda s: s["items"][0].update(mode="restore"), "items[0] (a).input"),
    (lambda s: s["items"][0].update(input="s3://vidgen-test/x.mp4"), "items[0] (a).input"),
    (lambda s: s["items"][0].update(renditions=[{"name": "16:9", "size": [96, 54]}]), "renditions[0].name"),
    (lambda s: s["items"].extend({"id": f"i{i}", "mode": "generate"} for i in range(MAX_ITEMS)), "at most 1000"),
    (lambda s: s.pop("output"), "output: required field is missing"),
    (lambda s: s["items"][0].update(label="hexagon"), "items[0] (a).label: unknown label 'hexagon'"),
    (lambda s: s["items"][0].update(label=5), "items[0] (a).label: label 5 is out of range"),
])
def test_wrong_specs_are_rejected_naming_the_field(assets, edit, named):
    from vidgen.render.batch import plan_batch

    spec = _base(assets)
    edit(spec)
    with pytest.raises(SpecError) as err:
        plan_batch(parse_batch(spec))  # labels are checked against the model when it is readable
    assert named in str(err.value)


def test_cli_rejects_unsafe_id_with_exit_2_and_writes_nothing(assets, s3_root, tmp_path, capsys):
    from vidgen import cli

    spec = _base(assets, out=s3_root)
    spec["items"].append({"id": "../escape", "mode": "generate"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["render", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "items[1] (../escape).id" in err
    assert storage.list_prefix(s3_root) == []


def test_the_planner_reads_model_json_like_models_does(assets):
    from vidgen.render import batch

    assert batch.read_model_manifest(assets["gan"]) == models.read_manifest(assets["gan"])


def test_items_from_csv_beside_the_spec_and_dry_run(assets, s3_root, capsys):
    from vidgen import cli

    storage.write_text(storage.join(s3_root, "jobs", "rows.csv"),
                       "id,mode,seed,label,title,size,renditions\n"
                       "row-1,generate,3,triangle,\"Hello, world\",96x54,\n"
                       "row-2,generate,4,0,,,\"[{\"\"name\"\": \"\"sq\"\", \"\"size\"\": [64, 64]}]\"\n")
    spec_uri = storage.join(s3_root, "jobs", "batch.yaml")
    storage.write_text(spec_uri, yaml.safe_dump({**_base(assets, out=storage.join(s3_root, "out")),
                                                 "items_from": "rows.csv"}))
    batch = load_batch(spec_uri)
    items = batch.resolve({assets["gan"]: models.read_manifest(assets["gan"])})
    assert [(i.id, i.seed, i.label, i.size) for i in items] == [
        ("a", 1, None, None), ("row-1", 3, 2, (96, 54)), ("row-2", 4, 0, None)]
    assert items[1].title == "Hello, world" and items[2].renditions[0].size == (64, 64)

    storage.write_text(storage.join(s3_root, "jobs", "rows.csv"), "id,mode,seed\nrow-1,generate,x\n")
    with pytest.raises(SpecError, match=r"items_from rows.csv line 2 \(row-1\).seed"):
        load_batch(spec_uri)

    storage.write_text(storage.join(s3_root, "jobs", "rows.csv"), "id,mode,seed\nrow-1,generate,5\n")
    assert cli.main(["render", spec_uri, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "row-1" in printed and "render 2" in printed
    assert not storage.list_prefix(storage.join(s3_root, "out"))

    logo = storage.join(s3_root, "brand", "missing.png")  # a dry run checks every file an item reads
    storage.write_text(spec_uri, yaml.safe_dump({**_base(assets, out=storage.join(s3_root, "out")),
                                                 "items_from": "rows.csv", "defaults": {"logo": logo}}))
    assert cli.main(["render", spec_uri, "--dry-run"]) == 1
    printed = capsys.readouterr().out
    assert f"logo: {logo}: no such key" in printed and "fail 2" in printed
    assert not storage.list_prefix(storage.join(s3_root, "out"))


# --------------------------------------------------------------------------------------------
# On a GPU


def test_a_restore_item_is_encoded_while_it_is_inferred_not_held_whole(tmp_path, monkeypatch):
    """A restore item of any length streams: each output's encoder gets the first chunk when the
    model has made one or two, and the video, a rendition and the comparison are encoded from that
    one pass. (Before: the whole video was inferred into memory, then encoded.)"""
    import torch

    from vidgen.render import engine

    frames, chunk = 40, 8
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x48:r=8", "-frames:v", str(frames), "-pix_fmt", "yuv420p",
            str(tmp_path / "in.mp4"))
    torch.manual_seed(0)
    model = models.build("restore", "tiny").eval()
    calls = []
    restore = model.restore
    monkeypatch.setattr(model, "restore", lambda video: calls.append(1) or restore(video))
    first_chunk_after = []
    encode_to = media.encode_to

    def encode_noting_the_first_chunk(uri, video, *args, **kwargs):
        def noted():
            for i, part in enumerate(video):
                if i == 0:
                    first_chunk_after.append(len(calls))
                yield part
        return encode_to(uri, noted(), *args, **kwargs)

    monkeypatch.setattr(media, "encode_to", encode_noting_the_first_chunk)
    out = str(tmp_path / "out")
    batch = parse_batch({"name": "stream", "output": out, "model": "unused", "defaults": {"fps": 8},
                         "items": [{"id": "r", "mode": "restore", "input": str(tmp_path / "in.mp4"), "compare": True,
                                    "renditions": [{"name": "small", "size": [64, 48]}]}]})
    info = engine.ModelInfo("unused", "restore", "0" * 64)
    [record] = engine.render_items(batch.resolve(), model, out, info, chunk_frames=chunk)
    assert record["status"] == "ok", record
    assert len(calls) == frames // chunk
    assert len(first_chunk_after) == 3 and max(first_chunk_after) <= 2, first_chunk_after
    for name in ("r.mp4", "r--small.mp4", "r--compare.mp4"):
        assert media.probe(os.path.join(out, name)).frames == frames


def test_a_streamed_items_chunks_hold_at_most_chunk_pixels(tmp_path, monkeypatch):
    """Chunks of large frames are shorter: 64 frames of 854x480 were 79 MB a chunk (325 MB as the
    model's floats), in the model worker, the object store and the encoder at once."""
    import torch

    from vidgen.render import engine

    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x48:r=8", "-frames:v", "20", "-pix_fmt", "yuv420p",
            str(tmp_path / "in.mp4"))
    monkeypatch.setattr(engine, "CHUNK_PIXELS", 5 * 64 * 48, raising=False)
    torch.manual_seed(0)
    batch = parse_batch({"name": "chunks", "output": str(tmp_path / "out"), "model": "unused", "defaults": {"fps": 8},
                         "items": [{"id": "r", "mode": "restore", "input": str(tmp_path / "in.mp4")}]})
    events = list(engine.infer(models.build("restore", "tiny").eval(), batch.resolve(), chunk_frames=64))
    lengths = [len(e.frames) for e in events if isinstance(e, engine.Chunk)]
    assert lengths == [5, 5, 5, 5], lengths


@pytest.mark.gpu
def test_inference_on_a_gpu_matches_the_cpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vidgen.render import engine

    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x48:r=8", "-frames:v", "20", "-pix_fmt", "yuv420p",
            str(tmp_path / "in.mp4"))
    cases = {
        "gan": [{"id": f"g{i}", "mode": "generate", "seed": i, "label": i % 3} for i in range(3)],
        "restore": [{"id": "r", "mode": "restore", "input": str(tmp_path / "in.mp4"), "compare": True}],
        "convlstm": [{"id": "p", "mode": "predict", "input": str(tmp_path / "in.mp4"), "seconds": 3}],
    }
    for family, items in cases.items():
        torch.manual_seed(0)
        model = models.build(family, "tiny", **({"num_classes": 3} if family == "gan" else {}))
        batch = parse_batch({"name": "gpu", "output": str(tmp_path / "out"), "model": "unused",
                             "defaults": {"fps": 8, "seconds": 2}, "items": items})
        outputs = []
        for device in ("cpu", "cuda"):
            frames: dict = {}
            for event in engine.infer(model.to(device).eval(), batch.resolve(), chunk_frames=8):
                assert not isinstance(event, engine.Failed), event.error
                if isinstance(event, engine.Chunk):
                    frames.setdefault((event.index, event.stream), []).append(event.frames)
            outputs.append({k: np.concatenate(v).astype(np.int16) for k, v in frames.items()})
        assert outputs[0].keys() == outputs[1].keys()
        for key in outputs[0]:
            assert np.abs(outputs[0][key] - outputs[1][key]).max() <= 2, (family, key)

