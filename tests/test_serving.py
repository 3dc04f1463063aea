"""The render API on a real Ray Serve (127.0.0.1), moto's S3 and the real ffmpeg.

One application serves the whole module (a tiny untrained GAN named `g`, a restorer `r`); tests talk HTTP to it
like a client would, kill its replicas, and read what landed in S3. Small limits (4 unfinished jobs,
an ingress queue of 4 on each of 2 ingress replicas) make overload cheap to provoke. The last test runs Ray's own `serve run`
on serve/config.yaml, so it shuts the module's application down first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass

import pytest
import requests
import yaml

from conftest import free_port
from vidgen import __version__, media, models, serving, storage
from vidgen.serving.ingress import MAX_BODY_BYTES
from vidgen.serving.settings import RunnerDeployment, readable
from vidgen.serving.store import Conflict, Lease, _executor, new_job_id, put_json

TOKEN = "test-token-" + uuid.uuid4().hex
LABELS = ["circle", "square", "triangle"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Service:
    url: str
    root: str  # output root
    inputs: str  # the input root
    http: requests.Session

    def post(self, body: dict, **headers) -> requests.Response:
        return self.http.post(f"{self.url}/v1/renders", json=body, headers=headers, timeout=30)

    def get(self, job_id: str) -> requests.Response:
        return self.http.get(f"{self.url}/v1/renders/{job_id}", timeout=30)

    def wait(self, job_id: str, timeout: float = 120, through_outages: bool = False) -> dict:
        """Poll until the job is done, failed or cancelled; with `through_outages`, keep polling
        across refused connections and 5xx answers (a replica being replaced)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                r = self.get(job_id)
                last = r.status_code, r.text[:300]
                if r.status_code == 200 and r.json()["status"] in serving.TERMINAL:
                    return r.json()
                assert r.status_code == 200 or (through_outages and r.status_code >= 500), last
            except requests.RequestException:  # refused or timed out: a replica being replaced
                if not through_outages:
                    raise
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s; last answer {last}")


INGRESS_REPLICAS = 2


def batch(n: int = 2, name: str = "ads", seconds: float = 1, **item) -> dict:
    return {"name": name, "model": "g", "defaults": {"fps": 8, "seconds": seconds, "size": [64, 64],
                                                     "preset": "ultrafast"},
            "items": [{"id": f"ad-{i:02d}", "mode": "generate", "seed": i, **item} for i in range(n)]}


@pytest.fixture(scope="module")
def service(ray_session, s3_bucket):
    import torch
    from ray import serve

    base = f"s3://{s3_bucket}/serving-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    models.save(models.build("gan", "tiny", num_classes=3, label_names=LABELS), storage.join(base, "models", "g"))
    models.save(models.build("restore", "tiny"), storage.join(base, "models", "r"))
    settings = serving.load_settings({
        "models": {"g": storage.join(base, "models", "g"), "r": storage.join(base, "models", "r")},
        "output_root": storage.join(base, "renders"),
        "input_roots": [storage.join(base, "inputs")],
        "url_expiry_s": 600,
        "limits": {"max_items": 8, "max_seconds": 4, "max_side": 256, "max_queued_jobs": 4},
        # two ingress replicas: concurrent requests race on storage's conditional writes, not on one lock
        "ingress": {"max_ongoing_requests": 4, "max_queued_requests": 4,
                    "autoscaling": {"min_replicas": INGRESS_REPLICAS, "max_replicas": INGRESS_REPLICAS}},
        # two items at a time: a job of 8 still needs the model after its first item has landed
        "runner": {"heartbeat_s": 0.5, "stale_s": 3, "poll_s": 0.5, "encode_cpus": 0.4, "max_items_in_flight": 2},
        "model": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build_app(settings, token=TOKEN), name=serving.APP_NAME, route_prefix="/")
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        yield Service(f"http://127.0.0.1:{port}", settings.output_root, settings.input_roots[0], http)
    finally:
        serve.shutdown()


def replica_actors(deployment: str, count: int = 1, other_than: tuple[str, ...] = (), timeout: float = 60):
    """[(name, handle)] of the `count` live Serve replica actors of a deployment, none of them in
    `other_than` (waits for Serve to replace killed ones)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and f"{serving.APP_NAME}#{deployment}#" in a["name"]
                 and a["name"] not in other_than]
        if len(names) == count:
            return [(name, ray.get_actor(name, namespace="serve")) for name in names]
        assert time.monotonic() < deadline, names
        time.sleep(0.2)


def replica_actor(deployment: str, other_than: str | None = None, timeout: float = 60):
    """(name, handle) of the one live replica of a deployment of one replica (see replica_actors)."""
    return replica_actors(deployment, 1, (other_than,) if other_than else (), timeout)[0]


def model_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("model-g", serving.APP_NAME).get_stats.remote().result()


def wait_for_first_record(svc: Service, job_id: str) -> None:
    store = serving.JobStore(svc.root)
    deadline = time.monotonic() + 60
    while not store.record_uris(job_id):
        assert time.monotonic() < deadline, "no item landed"
        time.sleep(0.05)


def wait_for_queue_to_drain(svc: Service, timeout: float = 60) -> None:
    store = serving.JobStore(svc.root)
    deadline = time.monotonic() + timeout
    while store.queued():
        assert time.monotonic() < deadline, f"jobs still queued: {store.queued()}"
        time.sleep(0.3)


# --------------------------------------------------------------------------------------------
# The API


def test_submit_poll_done_and_presigned_urls_download(service):
    r = service.post(batch(3, label="square", title="Spring sale -20%"))
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued" and accepted["status_url"] == f"/v1/renders/{accepted['id']}"
    job = service.wait(accepted["id"])
    assert job["status"] == "done" and job["counts"] == {"items": 3, "ok": 3, "failed": 0, "pending": 0}
    out = storage.join(service.root, accepted["id"])
    assert job["output"] == out
    for item in job["items"]:
        assert item["status"] == "ok" and item["uri"] == storage.join(out, f"{item['id']}.mp4")
        data = requests.get(item["url"], timeout=30).content  # presigned: no credentials needed
        assert hashlib.sha256(data).hexdigest() == item["sha256"] == hashlib.sha256(
            storage.read_bytes(item["uri"])).hexdigest()
        assert "X-Amz-Expires=600" in item["url"] or "Expires=" in item["url"]
        assert requests.get(item["poster_url"], timeout=30).content[:2] == b"\xff\xd8"
        info = media.probe(item["uri"])
        assert (info.width, info.height, info.frames) == (64, 64, 8)
    assert storage.exists(storage.join(out, "manifest.jsonl"))
    assert requests.get(job["gallery_url"], timeout=30).status_code == 200
    assert model_stats()["max_batch"] > 1  # one @serve.batch call inferred several items
    listed = service.http.get(f"{service.url}/v1/renders", timeout=30).json()["jobs"]
    assert listed[0]["id"] == accepted["id"] and listed[0]["status"] == "done"


def test_a_status_request_with_wait_s_answers_when_the_job_ends(service):
    """GET ?wait_s= is a long poll: one request, answered as the job ends, not a request a second."""
    job_id = service.post(batch(2)).json()["id"]
    t0 = time.monotonic()
    r = service.http.get(f"{service.url}/v1/renders/{job_id}", params={"wait_s": 25}, timeout=60)
    waited = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["status"] == "done", r.text[:300]
    assert r.json()["counts"]["ok"] == 2 and waited < 20, waited  # answered at the end, not at wait_s
    t0 = time.monotonic()
    again = service.http.get(f"{service.url}/v1/renders/{job_id}", params={"wait_s": 25}, timeout=60)
    assert again.json()["status"] == "done" and time.monotonic() - t0 < 5  # over already: at once
    unknown = service.http.get(f"{service.url}/v1/renders/{new_job_id()}", params={"wait_s": 25}, timeout=60)
    assert unknown.status_code == 404 and time.monotonic() - t0 < 10
    too_long = service.http.get(f"{service.url}/v1/renders/{job_id}", params={"wait_s": 31}, timeout=60)
    assert too_long.status_code == 422 and "wait_s" in too_long.text


def test_a_reexported_model_is_reloaded_and_records_name_the_weights_used(service):
    import torch

    model_uri = storage.join(service.root.rsplit("/", 1)[0], "models", "g")
    before = service.wait(service.post(batch(1, name="before")).json()["id"])
    old = storage.read_json(storage.join(before["output"], "items", "ad-00.json"))["model_sha256"]
    assert model_stats()["sha256"] == old
    original = models.load(model_uri)
    torch.manual_seed(7)  # a re-export to the same URI: other weights, same config
    models.save(models.build("gan", "tiny", num_classes=3, label_names=LABELS), model_uri)
    try:
        new = models.read_manifest(model_uri).weights_sha256
        after = service.wait(service.post(batch(1, name="after")).json()["id"])
        assert after["status"] == "done" and new != old
        assert storage.read_json(storage.join(after["output"], "items", "ad-00.json"))["model_sha256"] == new
        assert model_stats()["sha256"] == new  # the replica rendered with the weights the record names
    finally:
        models.save(original, model_uri)  # the module's other tests use the first weights


def test_healthz_and_docs_are_public_and_v1_needs_the_token(service):
    assert requests.get(f"{service.url}/healthz", timeout=30).json()["models"] == ["g", "r"]
    assert requests.get(f"{service.url}/docs", timeout=30).status_code == 200
    schema = requests.get(f"{service.url}/openapi.json", timeout=30).json()
    assert "/v1/renders" in schema["paths"] and "/v1/renders/{job_id}" in schema["paths"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        for method, path in (("post", "/v1/renders"), ("get", "/v1/renders"), ("get", "/v1/renders/x"),
                             ("delete", "/v1/renders/x")):
            r = requests.request(method, f"{service.url}{path}", json=batch(1), headers=headers, timeout=30)
            assert r.status_code == 401, (headers, method, path, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer" and TOKEN not in r.text
    r = requests.post(f"{service.url}/v1/renders", data=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 401  # auth comes before the body is even parsed
    assert requests.get(f"{service.url}/v2/anything", timeout=30).status_code == 401  # deny by default
    big = service.http.post(f"{service.url}/v1/renders", data=b" " * (MAX_BODY_BYTES + 1),
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert big.status_code == 413


def _unprocessable(service, body, named: str, **headers) -> None:
    r = service.post(body, **headers) if isinstance(body, dict) else service.http.post(
        f"{service.url}/v1/renders", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert named in r.json()["message"], r.json()["message"]
    return r.json()


@pytest.mark.parametrize("edit, named", [
    (lambda b: b["items"][0].update(mode="upscale"), "items[0].mode"),
    (lambda b: b["items"][0].update(id="../escape"), "items[0].id"),
    (lambda b: b["items"][0].update(id="a/b"), "items[0].id"),
    (lambda b: b.update(items=[dict(b["items"][0], id=f"i{i}") for i in range(9)]), "items: 9 items"),
    (lambda b: b["items"][0].update(seconds=30), "items[0].seconds: 30 s"),
    (lambda b: b["defaults"].update(seconds=5), "defaults.seconds: 5 s"),
    (lambda b: b["items"][0].update(size=[512, 64]), "items[0].size: 512x64"),
    (lambda b: b["items"][0].update(renditions=[{"name": "big", "size": [64, 1024]}]), "items[0].renditions[0].size"),
    (lambda b: b.update(model="nope"), "model: unknown model 'nope'"),
    (lambda b: b["items"][1].update(model="s3://vidgen-test/models/g"), "items[1].model"),
    (lambda b: b.update(output="s3://vidgen-test/elsewhere"), "output: not accepted"),
    (lambda b: b.update(items_from="rows.csv"), "items_from: not accepted"),
    (lambda b: b["items"][0].update(mode="restore", input="s3://vidgen-test/private/x.mp4", seed=None),
     "items[0].input: not under this service's input roots"),
    (lambda b: b["items"][0].update(logo="/etc/passwd"), "items[0].logo: not under"),
    (lambda b: b["items"][0].update(mode="restore", input="INPUTS/../models/g/model.safetensors", seed=None),
     "items[0].input: not under"),
    (lambda b: b["items"][0].update(mode="stylize", input="INPUTS/a.mp4", seed=None),
     "items[0].mode: model g is a gan"),
    (lambda b: b["items"][0].update(label="hexagon"), "unknown label 'hexagon'"),
    (lambda b: b["items"][0].update(colour="red"), "items[0].colour"),
    (lambda b: b["items"][0].update(crf=60), "items[0].crf: 60 is out of range for h264"),
])
def test_bad_requests_are_422_naming_the_field(service, edit, named):
    body = batch(2)
    edit(body)
    for item in body["items"]:
        if isinstance(item.get("input"), str):
            item["input"] = item["input"].replace("INPUTS", service.inputs)
        if item.get("seed") is None:
            item.pop("seed", None)
    _unprocessable(service, body, named)


def test_restore_and_stylize_items_count_their_inputs_against_the_limits(service):
    """The service's limits (4 s an item, 256 pixels a side) hold for what an input makes render."""
    import numpy as np

    long, wide = (storage.join(service.inputs, "limits", name) for name in ("long.mp4", "wide.mp4"))
    storage.write_bytes(long, media.encode(np.zeros((40, 64, 64, 3), np.uint8), fps=8, preset="ultrafast"))
    storage.write_bytes(wide, media.encode(np.zeros((8, 200, 300, 3), np.uint8), fps=8, preset="ultrafast"))
    body = batch(2)
    body["model"] = "r"
    body["items"] = [{"id": "lecture", "mode": "restore", "input": long},
                     {"id": "banner", "mode": "restore", "input": wide},
                     {"id": "short-cut", "mode": "restore", "input": long, "seconds": 2}]
    r = service.post(body)
    assert r.status_code == 422, r.text
    errors = {tuple(e["loc"][1:]): e["msg"] for e in r.json()["detail"]}
    assert errors.keys() == {("items", 0, "input"), ("items", 1, "input")}, errors  # 2 s of it is within the limits
    assert "5 s long; this service renders at most 4 s" in errors["items", 0, "input"]
    assert "300x200; this service renders at most 256 pixels a side" in errors["items", 1, "input"]
    body["items"] = body["items"][2:]
    accepted = service.post(body)
    assert accepted.status_code == 202, accepted.text
    assert service.wait(accepted.json()["id"])["status"] == "done"


def test_a_restore_item_streams_from_the_model_to_its_encoder(service):
    """The endpoint's restore items are read by their encode task from the model deployment while
    it infers them (a streaming handle), not inferred whole into the object store first; the video,
    a rendition and the comparison come from that one pass."""
    import numpy as np
    from ray import serve

    source = storage.join(service.inputs, "stream", "lecture.mp4")
    frames = np.random.default_rng(0).integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)
    storage.write_bytes(source, media.encode(frames, fps=8, preset="ultrafast", crf=10))
    body = {"name": "streamed", "model": "r", "defaults": {"preset": "ultrafast"},
            "items": [{"id": "lecture", "mode": "restore", "input": source, "compare": True,
                       "renditions": [{"name": "small", "size": [32, 24]}]}]}
    accepted = service.post(body)
    assert accepted.status_code == 202, accepted.text
    job = service.wait(accepted.json()["id"])
    assert job["status"] == "done", job
    out = storage.join(service.root, accepted.json()["id"])
    for name, size in (("lecture.mp4", (64, 48)), ("lecture--small.mp4", (32, 24)), ("lecture--compare.mp4", (128, 48))):
        info = media.probe(storage.join(out, name))
        assert (info.width, info.height, info.frames) == (*size, 20), name
    stats = serve.get_deployment_handle("model-r", serving.APP_NAME).get_stats.remote().result()
    assert stats.get("streams", 0) >= 1 and stats["items"] == 0, stats  # streamed, never a whole-item infer


def test_malformed_json_is_422_and_nothing_is_queued(service):
    before = serving.JobStore(service.root).jobs()
    _unprocessable(service, b'{"name": "x", "items": [', "body")
    _unprocessable(service, b'[1, 2]', "body")
    assert serving.JobStore(service.root).jobs() == before


def test_retried_post_with_the_same_idempotency_key_is_one_job(service):
    """8 concurrent POSTs with one key: each ingress replica has room for 4 at once, so both take
    some, and only storage's conditional writes (not a replica's lock) keep it to one job."""
    wait_for_queue_to_drain(service)
    key = f"order-{uuid.uuid4().hex}"
    body = batch(1, name="idem")
    def post_through_overload(_):  # what a client does with Serve's 503 (its proxy queue full): retry
        for _ in range(20):
            answer = service.post(body, **{"Idempotency-Key": key})
            if answer.status_code != 503:
                return answer
            time.sleep(0.2)
        return answer

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # a client retrying in a hurry
        answers = list(pool.map(post_through_overload, range(8)))
    assert {r.status_code for r in answers} <= {202, 409}, [r.text for r in answers]
    ids = {r.json()["id"] for r in answers if r.status_code == 202}
    assert len(ids) == 1
    job_id = ids.pop()
    again = service.post(body, **{"Idempotency-Key": key})
    assert again.status_code == 202 and again.json() == {"id": job_id, "status": "replayed",
                                                         "status_url": f"/v1/renders/{job_id}"}
    jobs = serving.JobStore(service.root).jobs()
    assert sum(serving.JobStore(service.root).read(j).name == "idem" for j in jobs) == 1
    assert service.wait(job_id)["status"] == "done"
    other = service.post(batch(2, name="idem"), **{"Idempotency-Key": key})
    assert other.status_code == 409  # the same key with another request


def test_a_crash_between_a_jobs_two_writes_never_leaves_a_job_no_runner_sees(tmp_path, monkeypatch):
    store = serving.JobStore(str(tmp_path))
    job = serving.Job(id=new_job_id(), created="2026-11-29T00:00:00Z", created_ts=time.time())
    real_put = put_json

    def crash_on_the_record(uri, obj, **kw):
        if uri == store.job_uri(job.id):
            raise ConnectionError("the ingress died here")
        return real_put(uri, obj, **kw)

    monkeypatch.setattr(serving.store, "put_json", crash_on_the_record)  # where JobStore looks it up
    with pytest.raises(ConnectionError):
        store.create(job)
    monkeypatch.setattr(serving.store, "put_json", real_put)
    assert store.read(job.id) is None and store.queued() == [job.id]  # never a record without a marker
    store.create(job)  # the Idempotency-Key retry creates the job again: a runner finds it
    assert store.read(job.id) == job and store.queued() == [job.id]
    assert not store.drop_orphan_marker(job.id) and store.queued() == [job.id]  # it has its record: kept

    orphan = new_job_id()  # a marker whose ingress died before the record: a runner drops it
    put_json(store.queue_uri(orphan), {"id": orphan})
    runner = bare_runner(store, stale_s=0.3)
    assert runner._claim(orphan) is None and store.queued() == sorted([job.id, orphan])  # maybe still coming
    time.sleep(0.35)
    assert runner._claim(orphan) is None and store.queued() == [job.id]


def test_a_job_whose_record_lands_after_a_poll_saw_its_marker_is_claimed_at_the_next_poll(tmp_path, monkeypatch):
    """The ingress writes a job's queue marker, then its record. A poll between the two writes saw a
    marker without a record, and the runner then skipped that job for stale_s / 2 (15 s by default),
    as if another runner held it: bench/serve.py's p99 latency was 18.8 s against a p50 of 2.7 s."""
    store = serving.JobStore(str(tmp_path))
    job = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
    put_json(store.queue_uri(job.id), {"id": job.id})  # the marker; the record is on its way
    runner = bare_runner(store, stale_s=30)
    runner.pool, runner.running = _executor(), {}
    started = []

    async def run(claimed):
        started.append(claimed.job_id)

    monkeypatch.setattr(runner, "_run", run)

    async def poll_before_and_after_the_record():
        await runner._poll([], True)
        await asyncio.sleep(0)
        assert started == []  # no record yet: nothing to run, and the marker stays
        store.create(job)
        await runner._poll([], True)  # the ingress's poke: the very next poll
        await asyncio.sleep(0)

    asyncio.run(poll_before_and_after_the_record())
    assert started == [job.id] and store.queued() == [job.id]


def test_replicas_admitting_at_once_never_queue_more_jobs_than_the_limit(root):
    """Each ingress replica used to count the queue and then create its job: two replicas that
    counted at the same moment both took the last place (CI: 5 jobs queued under a limit of 4)."""
    barrier = threading.Barrier(12)

    def submit(_):
        store = serving.JobStore(root)  # one store per replica, as in the deployment
        job = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
        barrier.wait()
        if store.admit(job.id, limit=4) is not None:
            return None
        store.create(job)
        return job.id

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        created = [j for j in pool.map(submit, range(12)) if j]
    store = serving.JobStore(root)
    assert len(created) == 4 and sorted(created) == store.queued()
    late = new_job_id()
    assert store.admit(late, limit=4) == 4  # full: refused, with the count
    store.finish(created[0])  # a job ends: its place frees
    assert store.admit(late, limit=4) is None
    store.unadmit(late)  # its creation failed after all: the place frees again
    assert store.admit(new_job_id(), limit=4) is None


def test_one_replicas_concurrent_admissions_share_swaps_of_the_ledger_and_keep_the_limit(tmp_path, monkeypatch):
    """12 requests of one replica admitted at once: the ones waiting while a swap is on its way are
    taken together by the next (not 12 swaps racing on one object), in order, and never past the limit."""
    from vidgen.serving.ingress import _Admissions

    store = serving.JobStore(str(tmp_path))
    calls = []
    real = store.admit_many

    def counted(job_ids, limit, **kwargs):
        calls.append(list(job_ids))
        time.sleep(0.05)  # a round trip to storage, during which more requests arrive
        return real(job_ids, limit, **kwargs)

    monkeypatch.setattr(store, "admit_many", counted)
    admissions = _Admissions(store, _executor())
    ids = [new_job_id() for _ in range(12)]

    async def submit_all():
        return await asyncio.gather(*(admissions.admit(job_id, 5) for job_id in ids))

    answers = asyncio.run(submit_all())
    assert [job_id for batch in calls for job_id in batch] == ids and len(calls) <= 3, calls
    assert answers == [None] * 5 + [5] * 7  # the first five took the places; the rest were told how full it is
    assert real([ids[0], new_job_id()], 5) == [None, 5]  # a retry of an admitted job keeps its place


def test_a_job_created_while_the_ledger_is_read_keeps_its_place(tmp_path, monkeypatch):
    """An admission lists the queue, then asks which ledger entries not in it have their record (and
    so are finished). A job created between the two looked finished: its place was given away, and
    CI's burst test saw 5 jobs accepted under a limit of 4."""
    store = serving.JobStore(str(tmp_path))
    first = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
    assert store.admit(first.id, limit=1) is None
    real_queued = store.queued

    def created_right_after_the_listing():
        listed = real_queued()
        if store.read(first.id) is None:
            store.create(first)  # its marker, then its record, after the listing
        return listed

    monkeypatch.setattr(store, "queued", created_right_after_the_listing)
    assert store.admit(new_job_id(), limit=1) == 1  # full: the first job holds the only place
    assert real_queued() == [first.id]


def test_a_conditional_write_retried_after_it_landed_is_not_a_conflict(s3_root):
    """botocore retries a PUT whose answer was lost; if the first try landed, the retry's condition
    fails on our own write. That must not read as another runner taking the lease."""
    uri = f"{s3_root}/leases/lease.json"
    first = put_json(uri, {"runner": "a", "beat": 0}, if_absent=True)
    landed = put_json(uri, {"runner": "a", "beat": 1}, if_match=first)
    assert put_json(uri, {"runner": "a", "beat": 1}, if_match=first) == landed  # the retried request
    with pytest.raises(Conflict):  # someone else's write: still a conflict
        put_json(uri, {"runner": "b", "beat": 1}, if_match=first)


def bare_runner(store, stale_s: float):
    """A JobRunner's claiming logic without Serve: what `_claim` reads and writes."""
    runner = serving.JobRunner.__new__(serving.JobRunner)
    runner.store, runner.runner_id, runner.seen, runner.markers = store, f"test-{uuid.uuid4().hex[:6]}", {}, {}
    runner.node_id, runner.poked, runner.poked_jobs = "test-node", [], {}
    runner.conf = RunnerDeployment(heartbeat_s=stale_s / 2, stale_s=stale_s)
    return runner


def test_a_jobs_first_runner_plans_without_looking_in_its_folder_and_a_later_one_looks(tmp_path, monkeypatch):
    """The first runner of a job (its lease had none) reads the job's record once, while claiming,
    and its plan looks for no records, outputs or unfinished uploads in the job's folder, where
    nothing was ever written (three LISTs a job, of moto's costliest calls). A runner that takes the
    job over may find a killed runner's work there: it plans as a batch does, and keeps an ok record."""
    from vidgen.render.batch import plan_batch
    from vidgen.render.record import RenderRecord
    from vidgen.render.spec import parse_batch

    model = str(tmp_path / "model")
    models.save(models.build("gan", "tiny", num_classes=3, label_names=["circle", "square", "triangle"]), model)
    out = str(tmp_path / "renders" / "out")
    store = serving.JobStore(str(tmp_path / "renders"))
    job = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time(),
                      batch={"output": out, "name": "ads", "model": model,
                             "items": [{"id": "a", "mode": "generate", "seed": 1}]})
    store.create(job)
    first = bare_runner(store, stale_s=30)._claim(job.id)
    assert first.fresh and first.job == job
    listed = []
    real_list = storage.list_prefix
    monkeypatch.setattr(storage, "list_prefix", lambda uri, *a, **k: listed.append(uri) or real_list(uri, *a, **k))
    batch = parse_batch(job.batch)
    assert [e.action for e in plan_batch(batch, first.fresh).entries] == ["render"] and listed == []

    # the first runner rendered item a, then died; its lease was released
    entry = plan_batch(batch).entries[0]
    storage.write_json(storage.join(out, "items", "a.json"),
                       RenderRecord.ok(entry.item, entry.model, entry.spec_hash, {"": {
                           "uri": storage.join(out, "a.mp4"), "poster": storage.join(out, "a.jpg"), "bytes": 1,
                           "frames": 16, "seconds": 2.0, "fps": 8.0, "width": 64, "height": 64, "sha256": "0" * 64,
                       }}).to_json())
    store.swap_lease(job.id, first.lease.model_copy(update={"released": True}), first.etag)
    second = bare_runner(store, stale_s=30)._claim(job.id)
    assert not second.fresh and second.lease.attempt == 2
    listed.clear()
    assert [e.action for e in plan_batch(batch, second.fresh).entries] == ["skip"] and listed


def test_a_heartbeat_in_flight_when_the_job_ends_does_not_lose_the_lease(tmp_path, monkeypatch):
    """The job ends while a heartbeat's write is on its way: that write lands, and the final write
    (state finished) must follow it, not fail its condition as if another runner held the job."""
    store = serving.JobStore(str(tmp_path / "renders"))
    job = serving.Job(id=new_job_id(), created="2026-11-29T00:00:00Z", created_ts=time.time(),
                      batch={"output": str(tmp_path / "out"), "name": "ads"})
    store.create(job)
    runner = bare_runner(store, stale_s=0.2)
    runner.pool = _executor()
    writing = threading.Event()
    real_swap = store.swap_lease

    def slow_swap(job_id, lease, etag):
        etag = real_swap(job_id, lease, etag)
        if lease.state == "running" and lease.beat > 0:  # a heartbeat whose answer is slow to come
            writing.set()
            time.sleep(0.3)
        return etag

    async def render_until_a_heartbeat_is_writing(_job, _run):
        while not writing.is_set():
            await asyncio.sleep(0.01)
        return []

    monkeypatch.setattr(store, "swap_lease", slow_swap)
    monkeypatch.setattr(runner, "_render", render_until_a_heartbeat_is_writing)
    run = runner._claim(job.id)
    asyncio.run(runner._run(run))
    lease = store.lease(job.id)[0]
    assert not run.lost and lease.state == "finished" and lease.attempt == 1, lease
    assert store.queued() == []


@pytest.mark.parametrize("skew_s", [-3600, 3600])
def test_a_lease_is_judged_by_the_claimers_own_clock_not_the_holders(tmp_path, skew_s):
    """The holder's clock is an hour behind (its heartbeats look old) or ahead (they look young)."""
    store = serving.JobStore(str(tmp_path))
    job = serving.Job(id=new_job_id(), created="2026-11-29T00:00:00Z", created_ts=time.time())
    store.create(job)
    lease = Lease(runner="holder", state="running", heartbeat=time.time() + skew_s, beat=1, attempt=1)
    etag = store.swap_lease(job.id, lease, None)
    claimer = bare_runner(store, stale_s=0.4)
    for beat in range(2, 5):  # the holder keeps beating: never taken over, however old its clock says it is
        assert claimer._claim(job.id) is None
        time.sleep(0.25)
        lease = lease.model_copy(update={"heartbeat": time.time() + skew_s, "beat": beat})
        etag = store.swap_lease(job.id, lease, etag)
    assert claimer._claim(job.id) is None
    time.sleep(0.45)  # the holder stopped: taken over after stale_s of the claimer's own time
    run = claimer._claim(job.id)
    assert run is not None and store.lease(job.id)[0].runner == claimer.runner_id


def test_inputs_under_a_symlinked_root_are_readable_and_links_out_of_a_root_are_not(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "in.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (tmp_path / "inputs").symlink_to(tmp_path / "real")           # the root is a link (e.g. /data -> /mnt/disk1)
    (tmp_path / "real" / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    roots = [str(tmp_path / "inputs")]
    assert readable(str(tmp_path / "inputs" / "in.mp4"), roots)
    assert not readable(str(tmp_path / "inputs" / "escape.mp4"), roots)
    assert not readable(str(tmp_path / "inputs" / ".." / "secret.mp4"), roots)
    assert readable("s3://b/in/x.mp4", ["s3://b/in"]) and not readable("s3://b/inx/x.mp4", ["s3://b/in"])


def test_cancel(service):
    r = service.post(batch(8, seconds=2, name="to-cancel"))
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert service.http.delete(f"{service.url}/v1/renders/{job_id}", timeout=30).status_code == 202
    job = service.wait(job_id)
    assert job["status"] == "cancelled" and job["counts"]["pending"] > 0, job["counts"]
    assert service.http.delete(f"{service.url}/v1/renders/{job_id}", timeout=30).status_code == 202
    wait_for_queue_to_drain(service)
    assert service.http.delete(f"{service.url}/v1/renders/20990101T000000Z-00000000", timeout=30).status_code == 404
    assert service.get("not-a-job").status_code == 404
    done = service.post(batch(1, name="done-then-cancel")).json()["id"]
    service.wait(done)
    assert service.http.delete(f"{service.url}/v1/renders/{done}", timeout=30).status_code == 409


def test_burst_beyond_the_queue_gets_503_or_429_and_the_service_goes_on(service):
    wait_for_queue_to_drain(service)
    body = batch(8, seconds=2, name="burst")  # seconds of work each: none finishes (and frees a queue slot) mid-burst
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{service.url}/v1/renders", json=body, timeout=30,
                                                        headers={"Authorization": f"Bearer {TOKEN}"}), range(24)))
    codes = [r.status_code for r in answers]
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    assert set(codes) <= {202, 429, 503}, codes
    assert 1 <= len(accepted) <= 4 and codes.count(429) + codes.count(503) >= 20, codes
    assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 429)
    assert requests.get(f"{service.url}/healthz", timeout=30).status_code == 200
    for job_id in accepted:
        assert service.wait(job_id)["status"] == "done"
    assert service.post(batch(1, name="after-burst")).status_code == 202


# --------------------------------------------------------------------------------------------
# Replicas that die


def test_model_replica_killed_mid_job_the_job_completes_on_a_new_replica(service):
    import ray

    wait_for_queue_to_drain(service)
    job_id = service.post(batch(8, seconds=2, name="model-kill")).json()["id"]
    wait_for_first_record(service, job_id)
    name, actor = replica_actor("model-g")
    assert service.get(job_id).json()["counts"]["pending"] >= 4  # mid-job
    ray.kill(actor, no_restart=True)
    job = service.wait(job_id, timeout=150)
    assert job["status"] == "done" and job["counts"]["ok"] == 8, job
    replica_actor("model-g", other_than=name)  # Serve replaced it...
    assert model_stats()["items"] >= 4  # ...and the rest of the job was inferred there


def test_ingress_restarted_mid_job_polling_goes_on_and_the_job_completes(service):
    import ray

    wait_for_queue_to_drain(service)
    job_id = service.post(batch(8, seconds=2, name="ingress-kill")).json()["id"]
    assert service.get(job_id).json()["status"] in ("queued", "running")
    killed = replica_actors("ingress", INGRESS_REPLICAS)
    for _, actor in killed:  # every ingress replica: the API is down until Serve starts new ones
        ray.kill(actor, no_restart=True)
    job = service.wait(job_id, timeout=150, through_outages=True)
    assert job["status"] == "done" and job["counts"]["ok"] == 8
    replica_actors("ingress", INGRESS_REPLICAS, other_than=tuple(name for name, _ in killed))


def test_runner_killed_mid_job_another_takes_the_job_over(service):
    import ray

    wait_for_queue_to_drain(service)
    job_id = service.post(batch(8, seconds=2, name="runner-kill")).json()["id"]
    wait_for_first_record(service, job_id)
    assert service.get(job_id).json()["counts"]["pending"] >= 4
    ray.kill(replica_actor("runner")[1], no_restart=True)
    job = service.wait(job_id, timeout=150)
    assert job["status"] == "done" and job["counts"]["ok"] == 8 and job["attempt"] == 2, job


# --------------------------------------------------------------------------------------------
# Starting the service


def test_vidgen_serve_refuses_a_public_host_without_a_token(monkeypatch, capsys):
    from vidgen import cli

    monkeypatch.delenv(serving.TOKEN_ENV, raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--model", "g=s3://vidgen-test/models/g"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "g"]) == 2
    assert "NAME=URI" in capsys.readouterr().err


def _signal_masks(pid: int) -> dict[str, str]:
    """A process's signal masks from /proc (SigBlk, SigIgn, SigCgt: hex bit masks, bit N-1 for
    signal N); empty where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.split(":\t")[0:2] for line in f.read().splitlines()
                        if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    except OSError:
        return {}


def test_serve_run_with_the_config_file_answers_healthz(ray_address, tmp_path):
    """Ray's own CLI on serve/config.yaml (only the port changed): no model, no token, loopback."""
    from ray import serve

    serve.shutdown()  # the module's application: `serve run` starts Serve with the config's http_options
    with open(os.path.join(REPO, "serve", "config.yaml")) as f:
        config = yaml.safe_load(f)
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != serving.TOKEN_ENV}
    env["RAY_ADDRESS"] = ray_address
    command = [os.path.join(os.path.dirname(sys.executable), "serve"), "run", str(path)]
    # Its output goes to a file, not a pipe this test never reads (a CLI that fills a pipe's 64 KB
    # blocks on its next line)
    log = tmp_path / "serve-run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if r.status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app still deploying
                pass
            assert time.monotonic() < deadline, "serve run did not answer /healthz"
            time.sleep(0.5)
        assert r.json() == {"status": "ok", "version": __version__, "models": []}
    finally:
        # Ctrl-C: Ray's CLI shuts Serve down (up to 30 s for its controller) and exits, in a few
        # seconds. Except where this test process ignores SIGINT: a suite started as a background job
        # (`cmd &` in a non-interactive bash, as the clean-clone CI runs are) gets SIG_IGN from bash,
        # and the CLI inherits it across exec, so no signal can stop it (its /proc status says so):
        # then it is killed at once, else after 20 s, with a warning and its output in the CI log;
        # this process's serve.shutdown() ends what it left.
        masks = _signal_masks(proc.pid)
        ignored = bool(int(masks.get("SigIgn", "0"), 16) >> (signal.SIGINT - 1) & 1)
        proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        try:
            proc.wait(timeout=0.1 if ignored else 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            tail = log.read_text()[-1500:]
            warnings.warn(f"`serve run` still running {time.monotonic() - stopping:.0f} s after SIGINT "
                          f"(SIGINT ignored there: {ignored}; its masks {masks}; this process's SIGINT "
                          f"handler: {signal.getsignal(signal.SIGINT)!r}); its last output: {tail}")
        serve.shutdown()


def test_a_poked_job_is_claimed_without_listing_the_queue_and_waits_for_room_when_full(tmp_path, monkeypatch):
    """The ingress pokes a runner with the id of the job it queued: the runner claims that job by
    name. It used to list the queue at every poke, one LIST a job (moto's costliest call). A poked
    job that finds the runner full is claimed when one of its jobs ends."""
    store = serving.JobStore(str(tmp_path))
    jobs = [serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time()) for _ in range(2)]
    for job in jobs:
        store.create(job)
    runner = bare_runner(store, stale_s=30)
    runner.conf = RunnerDeployment(heartbeat_s=15, stale_s=30, max_jobs=1)
    runner.pool, runner.running, runner.wake = _executor(), {}, None
    monkeypatch.setattr(store, "queued", lambda: pytest.fail("the queue was listed for a poked job"))
    ends = {}

    async def run(claimed):
        ends[claimed.job_id] = asyncio.get_running_loop().create_future()
        await ends[claimed.job_id]

    monkeypatch.setattr(runner, "_run", run)

    async def poke_both_then_end_the_first():
        runner.wake = asyncio.Event()
        await runner._poll([j.id for j in jobs], False)
        await asyncio.sleep(0)
        assert list(runner.running) == [jobs[0].id] and runner.poked == [jobs[1].id]  # full: the second waits
        ends[jobs[0].id].set_result(None)
        await asyncio.sleep(0.01)
        assert runner.wake.is_set() and runner.running == {}  # the loop is woken to claim it
        poked, runner.poked = runner.poked, []
        await runner._poll(poked, False)
        await asyncio.sleep(0)
        assert list(runner.running) == [jobs[1].id]
        await runner._poll([jobs[0].id], True)  # poked again while full, at a round that lists the queue
        assert runner.poked == [jobs[0].id]  # kept for when there is room, not dropped with the listing
        ends[jobs[1].id].set_result(None)
        await asyncio.sleep(0.01)

    asyncio.run(poke_both_then_end_the_first())


def test_wait_ended_answers_from_the_runners_memory(tmp_path):
    """`wait_ended` (behind GET ?wait_s=): None for a job this runner does not run, False while its
    run goes on past the timeout, True as soon as the run ends."""
    runner = bare_runner(serving.JobStore(str(tmp_path)), stale_s=30)

    async def scenario():
        gate = asyncio.Event()
        runner.running = {"j": asyncio.get_running_loop().create_task(gate.wait())}
        assert await runner.wait_ended("other", 5) is None
        t0 = time.monotonic()
        assert await runner.wait_ended("j", 0.2) is False and 0.15 < time.monotonic() - t0 < 2
        asyncio.get_running_loop().call_later(0.2, gate.set)
        t0 = time.monotonic()
        assert await runner.wait_ended("j", 20) is True and time.monotonic() - t0 < 5

    asyncio.run(scenario())


def test_a_job_poked_with_its_record_is_claimed_with_one_write_and_a_held_one_is_not_taken(tmp_path, monkeypatch):
    """The ingress hands the runner the job record it wrote: the claim writes the first lease
    (create-if-absent) without reading the lease or the record (two GETs a job). A lease already
    there (another runner's, or the ingress's cancel) fails that write: the job is then claimed as
    any other, and a live one is left alone."""
    store = serving.JobStore(str(tmp_path))
    job = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
    store.create(job)
    first, second = bare_runner(store, stale_s=30), bare_runner(store, stale_s=30)
    reads = []
    real_lease, real_read = store.lease, store.read
    monkeypatch.setattr(store, "lease", lambda j: reads.append("lease") or real_lease(j))
    monkeypatch.setattr(store, "read", lambda j: reads.append("record") or real_read(j))
    run = first._claim(job.id, job)
    assert run is not None and run.job is job and run.lease.attempt == 1 and reads == []
    assert real_lease(job.id)[0].runner == first.runner_id
    assert second._claim(job.id, job) is None and reads == ["lease"]  # held and fresh: not taken
    assert real_lease(job.id)[0].runner == first.runner_id


def test_a_status_view_reads_each_new_item_record_with_one_request(tmp_path, monkeypatch):
    """A job's view asked whether each item record exists (HEAD), then read the ones that did (GET):
    two requests an item at every status request. One GET answers both: an absent record is pending."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from vidgen.serving.ingress import _Ingress

    store = serving.JobStore(str(tmp_path))
    job = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time(), items=["a", "b"])
    store.create(job)
    storage.write_json(storage.join(store.output(job.id), "items", "a.json"),
                       {"id": "a", "status": "error", "mode": "generate", "error": "the model is gone"})
    ingress = _Ingress.__new__(_Ingress)
    ingress.store, ingress.pool, ingress.jobs, ingress.records = store, _executor(), OrderedDict(), OrderedDict()
    ingress.settings = SimpleNamespace(url_expiry_s=600)
    asked = []
    real_read = storage.read_json
    real_exists = storage.exists
    monkeypatch.setattr(storage, "exists", lambda uri: real_exists(uri) if uri.endswith("/cancel.json")
                        else pytest.fail(f"asked whether {uri} exists"))
    monkeypatch.setattr(storage, "read_json", lambda uri: asked.append(storage.basename(uri)) or real_read(uri))
    view = asyncio.run(ingress._view(job.id, detail=True))
    assert [(i["id"], i["status"]) for i in view["items"]] == [("a", "error"), ("b", "pending")]
    assert view["counts"] == {"items": 2, "ok": 0, "failed": 1, "pending": 1}
    assert sorted(asked) == sorted(["a.json", "b.json", f"{job.id}.json"])  # the job record, each item record: once


def test_an_admission_does_not_ask_storage_about_jobs_the_replica_knows_it_created(tmp_path, monkeypatch):
    """The ledger's entries missing from the queue listing are finished or being created: each one
    cost a HEAD of its job record at the next admission, about one a job at saturation. The ingress
    knows which records it wrote; only the queue marker (the race with a creation) is still asked."""
    store = serving.JobStore(str(tmp_path))
    done = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
    assert store.admit(done.id, limit=1) is None
    store.create(done)
    store.finish(done.id)  # ran and ended: its marker is gone, its ledger entry is not yet
    asked = []
    real_exists = storage.exists
    monkeypatch.setattr(storage, "exists", lambda uri: asked.append(uri) or real_exists(uri))
    assert store.admit_many([new_job_id()], limit=1, known={done.id}) == [None]  # its place is free again
    assert store.job_uri(done.id) not in asked and store.queue_uri(done.id) in asked


def test_creating_a_job_looks_for_its_marker_again_only_when_its_record_took_stale_s(tmp_path, monkeypatch):
    """A runner drops a queue marker only after seeing it without its record for stale_s. A record
    written sooner than that after its marker cannot have lost it: the HEAD that looked for the
    marker again, on every job, is spared. A slower one looks, and puts a dropped marker back."""
    from vidgen.serving import store as store_module

    store = serving.JobStore(str(tmp_path))
    asked = []
    real_exists, real_put = storage.exists, store_module.put_json
    monkeypatch.setattr(storage, "exists", lambda uri: asked.append(uri) or real_exists(uri))
    quick = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
    store.create(quick, orphan_after_s=30)
    assert asked == [] and store.queued() == [quick.id]

    slow = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())

    def record_after_a_runner_dropped_the_marker(uri, obj, **kwargs):
        if uri == store.job_uri(slow.id):
            time.sleep(0.2)  # slower than this test's stale_s: a runner took the marker for an orphan
            store.finish(slow.id)
        return real_put(uri, obj, **kwargs)

    monkeypatch.setattr(store_module, "put_json", record_after_a_runner_dropped_the_marker)
    store.create(slow, orphan_after_s=0.1)
    assert store.queue_uri(slow.id) in asked and slow.id in store.queued()  # looked for, and put back


def _bare_ingress(store, max_ongoing: int = 32, runner=None):
    """An ingress's status logic without Serve."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from vidgen.serving.ingress import _Ingress

    ingress = _Ingress.__new__(_Ingress)
    ingress.store, ingress.pool, ingress.jobs, ingress.records = store, _executor(), OrderedDict(), OrderedDict()
    ingress.settings = SimpleNamespace(url_expiry_s=600, ingress=SimpleNamespace(max_ongoing_requests=max_ongoing))
    ingress.runner, ingress.waiting_requests = runner, 0
    return ingress


def test_a_waiting_status_request_is_not_answered_when_a_run_stops_without_ending_the_job(tmp_path):
    """A run also stops when its runner releases the lease (a replica stopping) or loses it: the wait
    used to end there, and the client got `running` long before wait_s. The lease decides."""
    from types import SimpleNamespace

    store = serving.JobStore(str(tmp_path))
    job = serving.Job(id=new_job_id(), created="2026-11-30T00:00:00Z", created_ts=time.time())
    store.create(job)
    store.swap_lease(job.id, Lease(runner="r1", heartbeat=time.time(), released=True), None)
    answers = iter([True])  # the run here stopped; then no runner holds the job

    async def wait_ended(job_id, timeout):
        return next(answers, None)

    runner = SimpleNamespace(wait_ended=SimpleNamespace(remote=wait_ended))
    ingress = _bare_ingress(store, runner=runner)
    t0 = time.monotonic()
    asyncio.run(ingress._wait_for_end(job.id, 1.0))
    assert time.monotonic() - t0 > 0.9  # waited on: the job had not ended
    ingress.waiting_requests = 16  # half of max_ongoing_requests already wait: answered at once
    t0 = time.monotonic()
    asyncio.run(ingress._wait_for_end(job.id, 1.0))
    assert time.monotonic() - t0 < 0.2


def test_an_error_record_read_beside_the_lease_is_not_kept_as_final(tmp_path):
    """A view reads item records beside the lease. An error record read so may predate a resumed
    run that rewrote it ok and ended the job: kept as final, the replica showed the error for good."""
    store = serving.JobStore(str(tmp_path))
    ingress = _bare_ingress(store)
    error = {"id": "a", "status": "error", "mode": "generate", "error": "the encoder died"}
    record = asyncio.run(ingress._record("j", "items/a.json", True, error))
    assert record is not None and not record.is_ok and ingress.records == {}
