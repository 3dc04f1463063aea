"""Offline batch rendering on Ray: `vidgen render BATCH [--out URI] [--model URI] [--workers N]`.

    vidgen render jobs/batches/ads.yaml --dry-run          # validate, print the plan, render nothing
    vidgen render jobs/batches/ads.yaml --workers 2        # CPU-sized: a local Ray on this machine

    from vidgen.render import load_batch, render_batch
    result = render_batch(load_batch("jobs/batches/ads.yaml"))

The pipeline, on Ray actors and tasks:
    driver       plans (model manifests, existing records -> skip / adopt / render), feeds the stages,
                 writes error records, then OUT/manifest.jsonl and OUT/index.html at the end
    ModelWorker  an actor per model (one load each; a GPU when the cluster has one) that infers a
                 group of compatible items and leaves their frames in the object store, chunk by chunk
    encode task  a CPU task per item: frames -> ffmpeg (scale, overlays, audio) -> poster -> upload
                 of every output -> the item's record, last
Models, encoders and uploads work at once: while a worker infers the next group, up to `workers`
encode tasks run (each one's upload overlapping the others' encodes). Memory is bounded: the driver
asks for more inference only while fewer than `workers + max_batch` items are inferred (or being
inferred) and not yet encoding, and an encoder fetches one chunk at a time. A model's first group
is small (`workers` items), so the encoders start before a whole batch is inferred. At most
MAX_LIVE_MODELS model workers live at once; a worker is done once its groups are inferred and their
encodes have finished (the chunks it put in the object store live as long as it does). The batch's
last worker is kept warm for VIDGEN_RENDER_KEEP_WARM_S (default 60 s) in case this process renders
the same weights again (a service calling render_batch, a notebook): its start (1.6 s on 2 cores,
mostly `import torch`; far more for a GPU's) would come before any frame of that batch. A batch ends
the kept workers of other weights; every other stage this process starts (init_ray without
keep_warm: ingest, training; an endpoint's build_app) ends them all, as they size themselves by the
cluster's cores.

Why actors and tasks rather than Ray Data: items differ in mode, model and length, one item's
failure must become its record while the rest go on, each item commits with its own record, and
restore/stylize stream video chunks of unknown count; Ray Data's row blocks and operator-level
retries fit none of these well. Measured (bench/render.py runs the same stages as a Ray Data
pipeline: an actor pool for the model, map_batches of 8, a map of encodes), 48 generate items on 2
cores, each starting its model worker, two runs: 10.8-11.5 videos/s here against 8.9-9.1 with Ray
Data into S3 (1.21-1.26x), 12.1-12.6 against 9.6-10.2 into a local folder (1.24-1.26x). Both are
slower than a plain loop in a process that has torch loaded (0.85-0.88x into S3): the worker's start
(1.6-1.7 s) comes before any frame. With the worker kept from the batch before, this pipeline renders
1.41-1.49x the loop into S3 (0.83-0.87 of what 2 cores can do) and 1.49-1.55x into a local folder
(four runs); past fixed costs (48 -> 240 items), 1.46-1.55x, 0.80-0.90 of the limit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vidgen import storage
from vidgen.errors import InputError
from vidgen.manifest import MODE_FAMILIES, ModelManifest
from vidgen.render import engine, gallery
from vidgen.render.engine import CHUNK_FRAMES, ItemError, ModelInfo
from vidgen.render.record import RenderRecord
from vidgen.render.spec import RenderBatch, ResolvedItem
from vidgen.runtime import env_seconds, keep_warm_s, release_warm_workers_on

ACTOR_CPUS = 0.5  # logical CPUs of a model worker: torch and ffmpeg share the cores; `workers` bounds the work
ENCODE_CPUS = 0.5
# Encode tasks in flight by default: two per CPU, at most 16 (`default_workers`). An encode waits
# for part of its time (ffmpeg's and the poster's processes starting, its frames coming from the
# object store, its uploads' round trips), so with one per CPU the cores stood idle for 17% of a
# 48-item batch on 2 cores; two per CPU rendered it 7-12% faster into S3 and 9% into a local folder
# (ENCODE_CPUS lets Ray run three of the four beside a model worker there; the fourth waits ready).
ENCODES_PER_CPU = 2
MAX_DEFAULT_ENCODES = 16
MAX_LIVE_MODELS = 2
MAX_BATCH = 8  # generate/predict items inferred in one call
ITEM_ATTEMPTS = 3  # an item whose model worker or encoder dies is inferred again, up to this many times in all
STOP_GRACE_ENV = "VIDGEN_RENDER_STOP_GRACE_S"  # told to stop: encodes in flight get this long to land (default
STOP_GRACE_S = 20.0                             # 20 s, within a spot notice), then are cancelled, uploads aborted
CANCEL_WAIT_S = 30.0  # how long a stop waits for cancelled encoders to be gone before aborting their uploads


# --------------------------------------------------------------------------------------------
# The plan: what each item needs


@dataclass
class PlanEntry:
    item: ResolvedItem
    action: str  # "skip" (an ok record with this spec hash), "adopt", "render", "fail", or "keep" (the
                 # model could not be read: an earlier ok record stays as it is, and the item fails this run)
    model: ModelInfo | None = None
    spec_hash: str | None = None
    previous: RenderRecord | None = None  # the item's record from an earlier run
    error: str | None = None  # why it fails before rendering ("fail")
    adopted: dict | None = None  # output name -> facts, for "adopt"
    resume: bool = False  # some of its outputs are already there (a killed run): reuse what matches


@dataclass
class Plan:
    batch: RenderBatch
    entries: list[PlanEntry]

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.entries)

    @property
    def failing(self) -> int:
        """Items that fail before rendering (an earlier ok record kept or not)."""
        return self.count("fail") + self.count("keep")


def plan_batch(batch: RenderBatch, fresh: bool = False) -> Plan:
    """Read the models' manifests and the existing records; decide what each item needs.
    A label the model does not know raises SpecError (nothing has rendered yet). `fresh`: nothing
    was ever written under OUT (an endpoint job's first attempt, in a folder of its own), so no
    records or outputs are looked for there."""
    manifests: dict[str, ModelManifest | None] = {}
    model_errors: dict[str, str] = {}
    for uri in batch.models():
        try:
            manifests[uri] = read_model_manifest(uri)
        except (storage.StorageError, ValueError) as e:
            manifests[uri] = None
            model_errors[uri] = f"model {uri}: {e}" if uri not in str(e) else str(e)
    items = batch.resolve(manifests)
    out = batch.output
    stored = {} if fresh else _read_records(out, [item.id for item in items])
    unreadable = {i for i, r in stored.items() if r is UNREADABLE}
    previous = {i: r for i, r in stored.items() if r is not UNREADABLE}
    existing = set() if fresh else set(storage.list_prefix(out, recursive=False))
    missing = _missing_assets(items)
    entries = []
    for item in items:
        manifest = manifests[item.model]
        if manifest is None:  # a failed read says nothing about what was rendered: never overwrite an ok record
            prev = previous.get(item.id)
            action = "keep" if (prev and prev.is_ok) or item.id in unreadable else "fail"
            entries.append(PlanEntry(item, action, previous=prev, error=model_errors[item.model]))
            continue
        info = ModelInfo.from_manifest(item.model, manifest)
        item_hash = engine.spec_hash(item, info.sha256)
        prev = previous.get(item.id)
        entry = PlanEntry(item, "render", info, item_hash, prev)
        problem = manifest.mode_problem(item.mode, item.model)
        if problem:
            entry.action, entry.error = "fail", problem
        if prev and prev.is_ok and prev.spec_hash == item_hash:
            entry.action = "skip"
        elif entry.action == "render" and any(uri in missing for uri in _assets(item).values()):
            entry.action, entry.error = "fail", next(missing[u] for u in _assets(item).values() if u in missing)
        elif entry.action == "render":
            outputs = engine.item_outputs(item, out)
            present = [uri for o in outputs for uri in (o.video, o.poster) if uri in existing]
            entry.resume = bool(present)
            if len(present) == 2 * len(outputs):
                facts = {o.name: engine.adopt(o, item_hash) for o in outputs}
                if all(facts.values()):
                    entry.action, entry.adopted = "adopt", facts
        entries.append(entry)
    return Plan(batch, entries)


def read_model_manifest(uri: str) -> ModelManifest:
    """A saved model's model.json, for a family that renders; the driver plans from it without
    importing torch (the model workers load the weights)."""
    return ModelManifest.read(uri, {f for fams in MODE_FAMILIES.values() for f in fams})


ASSETS = ("input", "logo", "audio", "subtitles")  # the files an item reads besides its model


def _assets(item: ResolvedItem) -> dict[str, str]:
    """role -> URI of each file the item reads."""
    return {role: getattr(item, role) for role in ASSETS if getattr(item, role)}


def _missing_assets(items: list[ResolvedItem]) -> dict[str, str]:
    """URIs of inputs, logos, audio and subtitles that do not exist -> the item error, found before
    any model loads."""
    roles = {uri: role for item in items for role, uri in _assets(item).items()}

    def check(uri: str) -> tuple[str, str | None]:
        try:
            if storage.exists(uri):
                return uri, None
            return uri, f"{roles[uri]}: {uri}: no such {'key' if storage.is_s3(uri) else 'file'}"
        except storage.StorageError as e:
            return uri, f"{roles[uri]}: {e}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {uri: error for uri, error in pool.map(check, roles) if error}


UNREADABLE = object()  # a record that is there but could not be read or parsed: maybe ok


def _read_records(out: str, ids: list[str], present: set[str] | None = None) -> dict[str, RenderRecord | object]:
    """id -> its stored record; UNREADABLE where one is there but could not be read or is not a
    record (rendering again replaces it; a failure must not). `present`: the record URIs a listing
    of OUT/items just found (else it is listed here)."""
    if present is None:
        present = set(storage.list_prefix(storage.join(out, "items"), recursive=False))
    wanted = [i for i in ids if engine.record_uri(out, i) in present]

    def read(item_id: str) -> tuple[str, RenderRecord | object | None]:
        try:
            record = storage.read_json(engine.record_uri(out, item_id))
        except storage.NotFoundError:
            return item_id, None
        except storage.StorageError:
            return item_id, UNREADABLE
        return item_id, RenderRecord.parse(record) or UNREADABLE

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {i: r for i, r in pool.map(read, wanted) if r is not None}


def format_plan(plan: Plan) -> str:
    """The dry run's table: one line per item, then the counts."""
    lines = [f"{plan.batch.name}: {len(plan.entries)} items -> {plan.batch.output}"]
    for e in plan.entries:
        it = e.item
        frames = it.num_frames if it.num_frames is not None else "input's"
        size = f"{it.size[0]}x{it.size[1]}" if it.size else "native"
        what = {"skip": "unchanged", "adopt": "resume (objects already uploaded)", "render": "render",
                "fail": f"fail: {e.error}", "keep": f"fail, earlier ok record kept: {e.error}"}[e.action]
        extra = f" +{len(it.renditions)} renditions" if it.renditions else ""
        lines.append(f"  {it.id:<24} {it.mode:<9} {frames!s:>7} frames {size:>9}{extra}  {it.model}  [{what}]")
    lines.append(f"render {plan.count('render')}, unchanged {plan.count('skip')}, "
                 f"resume {plan.count('adopt')}, fail {plan.failing}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running a batch


@dataclass
class BatchResult:
    name: str
    output: str
    records: list[RenderRecord]  # one per item, in spec order
    rendered: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # why an item whose record stays ok failed this run
    seconds: float = 0.0
    stopped_by: str | None = None  # "SIGTERM"/"SIGINT": told to stop; `left` were not rendered
    left: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        errors = {r.id: r.error for r in self.records if not r.is_ok} | self.errors
        text = (f"{self.name}: {len(self.records)} items: {len(self.rendered)} rendered, "
                f"{len(self.resumed)} resumed, {len(self.unchanged)} unchanged, {len(self.failed)} failed "
                f"in {self.seconds:.1f} s -> {storage.join(self.output, 'index.html')}")
        for item_id in self.failed:
            text += f"\n  failed {item_id}: {errors.get(item_id)}"
        if self.stopped_by:
            text += (f"\nstopped by {self.stopped_by}: {len(self.left)} item(s) not rendered; the same command "
                     f"renders them (the others are kept)")
        return text


def render_batch(
    batch: RenderBatch,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    chunk_frames: int = CHUNK_FRAMES,
    max_batch: int = MAX_BATCH,
) -> BatchResult:
    """Render every item that has no ok record with its current spec hash; write the records,
    then OUT/manifest.jsonl and OUT/index.html. `workers`: concurrent encode tasks (default: two
    per CPU of the cluster, at most 16, `default_workers`); 0 renders in this process without Ray."""
    from tqdm import tqdm

    started = time.monotonic()
    plan = plan_batch(batch)
    out = batch.output
    result = BatchResult(batch.name, out, [])
    records: dict[str, RenderRecord] = {}
    bar = tqdm(total=len(plan.entries), desc=batch.name, unit="item", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def finish(entry: PlanEntry, record: RenderRecord, kind: str) -> None:
        records[entry.item.id] = record
        if not record.is_ok or kind == "kept":
            result.failed.append(entry.item.id)
            if kind == "kept":
                result.errors[entry.item.id] = entry.error
        else:
            getattr(result, kind).append(entry.item.id)
        bar.update(1)
        bar.set_postfix(failed=len(result.failed), refresh=False)

    todo = []
    for entry in plan.entries:
        if entry.action == "skip":
            finish(entry, entry.previous, "unchanged")
        elif entry.action == "adopt":
            record = RenderRecord.ok(entry.item, entry.model, entry.spec_hash, entry.adopted)
            finish(entry, engine.write_record(out, record, entry.previous), "resumed")
        elif entry.action == "fail":
            _fail(out, entry, entry.error, finish)
        elif entry.action == "keep":  # nothing written: the stored record stays what it was
            finish(entry, entry.previous or unwritten_error(entry), "kept")
        else:
            todo.append(entry)
    abort_killed_runs_uploads(plan)
    from vidgen.runtime import init_ray, stop_on_signal

    if todo and workers != 0:
        init_ray(address, keep_warm=True)  # before the signal handlers: ray.init installs its own
    try:
        grace = _stop_grace_s()
        keep_warm_s()  # a wrong value fails here, before any item
        with stop_on_signal(f"finishing the items in flight (at most {grace:g} s), then stopping") as stop:
            if todo and workers == 0:
                _render_in_process(todo, out, chunk_frames, max_batch, finish, stop)
            elif todo:
                _render_on_ray(todo, out, workers, address, chunk_frames, max_batch, finish, stop, grace)
    finally:
        bar.close()
    if stop:
        result.stopped_by = stop.by
        result.left = [e.item.id for e in plan.entries if e.item.id not in records]
    result.records = [records[e.item.id] for e in plan.entries if e.item.id in records]
    order = {e.item.id: i for i, e in enumerate(plan.entries)}
    for ids in (result.rendered, result.resumed, result.unchanged, result.failed):
        ids.sort(key=order.__getitem__)
    write_index(out, batch.name, result.records)
    result.seconds = time.monotonic() - started
    return result


def write_index(out: str, name: str, records: list[RenderRecord], sole_writer: bool = False) -> None:
    """OUT/manifest.jsonl and OUT/index.html, built from every item record stored under OUT (this
    run's `records` first, in their order, then the folder's other items: another render's, or
    items an edited spec no longer has, whose outputs are still there), each written only when it
    changed. Two renders into one folder may finish in any order: the last
    writer reads the records after its own have landed, and writes again if records changed while
    it wrote, so neither index drops the other's items or shows an older record.
    `sole_writer`: `records` are every item the folder will ever hold, and no one else writes there
    (an endpoint job's folder, its lease held): built from them alone, with no LIST of the folder
    (S3 prices one as 12.5 GETs) and no reads."""
    if sole_writer:
        storage.write_bytes(storage.join(out, "manifest.jsonl"), _manifest(records))
        storage.write_bytes(storage.join(out, "index.html"), gallery.render_html(name, records).encode())
        return
    ours = {r.id: r for r in records}
    etags = {i: _etag_of(r) for i, r in ours.items()}
    for _ in range(3):
        before = _record_versions(out)
        ids_there = {storage.basename(u)[:-5]: u for u in before}
        # a stored record whose ETag is the MD5 of ours is ours, byte for byte: not read back
        same = {i for i, u in ids_there.items() if i in ours and before[u][1] == etags[i]}
        stored = {i: r for i, r in _read_records(out, [i for i in ids_there if i not in same], set(before)).items()
                  if r is not UNREADABLE}
        stored.update({i: ours[i] for i in same})
        ids = [r.id for r in records] + sorted(set(stored) - {r.id for r in records})
        merged = [stored.get(i) or ours[i] for i in ids]
        _write_if_changed(storage.join(out, "manifest.jsonl"), _manifest(merged))
        _write_if_changed(storage.join(out, "index.html"), gallery.render_html(name, merged).encode())
        if _record_versions(out) == before:
            return


def _manifest(records: list[RenderRecord]) -> bytes:
    return "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in records).encode()


def _etag_of(record: RenderRecord) -> str:
    """The S3 ETag of the record as `engine.write_record` stores it (a single-part object's ETag is
    the MD5 of its bytes); a listed ETag that differs (another writer's record, or a bucket whose
    ETags are not MD5s, e.g. with SSE-KMS) means the record is read."""
    return f'"{hashlib.md5(storage.json_bytes(record.to_json()), usedforsecurity=False).hexdigest()}"'


def _record_versions(out: str) -> dict[str, tuple]:
    """OUT/items/<id>.json -> (size, etag, mtime): what changes when a record is rewritten."""
    return {o.uri: (o.bytes, o.etag, o.last_modified) for o in storage.list_info(storage.join(out, "items"))
            if o.uri.endswith(".json")}


def _write_if_changed(uri: str, data: bytes) -> bool:
    try:
        if storage.read_bytes(uri) == data:
            return False
    except storage.NotFoundError:
        pass
    storage.write_bytes(uri, data)
    return True


def _groups(entries: list[PlanEntry], max_batch: int, first: int | None = None) -> list[list[PlanEntry]]:
    """Compatible groups, model by model (each model is loaded once): generate items of one
    length, predict items (up to max_batch a group, the first of a model up to `first`);
    restore and stylize items one by one."""
    by_model: dict[str, list[PlanEntry]] = {}
    for e in entries:
        by_model.setdefault(e.item.model, []).append(e)
    groups = []
    for model_entries in by_model.values():
        keyed: dict[tuple, list[PlanEntry]] = {}
        for e in model_entries:
            it = e.item
            key = (it.mode, it.num_frames) if it.mode in ("generate", "predict") else (it.mode, it.id)
            keyed.setdefault(key, []).append(e)
        start = len(groups)
        for group in keyed.values():
            groups += [group[i:i + max_batch] for i in range(0, len(group), max_batch)]
        if first and len(groups[start]) > first:  # ramp up: the encoders get work sooner
            groups[start:start + 1] = [groups[start][:first], groups[start][first:]]
    return groups


Finish = Callable[[PlanEntry, RenderRecord, str], None]


def _render_in_process(todo: list[PlanEntry], out: str, chunk_frames: int, max_batch: int, finish: Finish,
                       stop=None) -> None:
    loaded: tuple[str, object] | None = None
    for group in _groups(todo, max_batch):
        if stop:  # the group in flight has finished; the rest are left for the next run
            return
        uri = group[0].item.model
        try:
            if loaded is None or loaded[0] != uri:
                loaded = (uri, _load_planned(uri, group[0].model.sha256))
        except (storage.StorageError, ValueError, KeyError) as e:
            for entry in group:
                _fail(out, entry, f"model {uri}: {e}", finish, model_trouble=True)
            continue
        info = group[0].model
        records = engine.render_items([e.item for e in group], loaded[1], out, info, chunk_frames,
                                      {e.item.id: e.previous for e in group if e.previous},
                                      resume=any(e.resume for e in group))
        for entry, record in zip(group, records, strict=True):
            finish(entry, record, "rendered")


def _fail(out: str, entry: PlanEntry, error: str, finish: Finish, model_trouble: bool = False) -> None:
    """Record the item's error. When its model could not be loaded (`model_trouble`: unreadable,
    re-exported since the plan), an earlier ok record stays as it is and the item fails this run."""
    if model_trouble and entry.previous and entry.previous.is_ok:
        entry.error = error
        finish(entry, entry.previous, "kept")
        return
    record = RenderRecord.failed(entry.item, entry.item.model, entry.model and entry.model.sha256,
                                 entry.spec_hash, error)
    finish(entry, engine.write_record(out, record, entry.previous), "rendered")


def abort_leftover_uploads(entries: list[PlanEntry], out: str) -> int:
    """Abort unfinished multipart uploads to the outputs of the items about to render (what a
    killed render leaves behind; these items upload their outputs again); the number aborted."""
    uris = [u for e in entries for o in engine.item_outputs(e.item, out) for u in (o.video, o.poster)]
    try:
        return storage.abort_uploads(uris)
    except storage.StorageError as e:  # the uploads stay; S3's lifecycle rules are the backstop
        print(f"vidgen: could not clean up unfinished uploads under {out}: {e}", file=sys.stderr)
        return 0


def abort_killed_runs_uploads(plan: Plan) -> int:
    """Abort what a killed run left half-uploaded: to the items this run renders again, and to those
    whose outputs landed before the kill (adopted; a retried encoder of theirs may have left one)."""
    entries = [e for e in plan.entries if e.action in ("render", "adopt")]
    return abort_leftover_uploads(entries, plan.batch.output) if entries else 0


def unwritten_error(entry: PlanEntry) -> RenderRecord:
    """The error record of an item whose stored record could not be read, for this run's report only."""
    return RenderRecord.failed(entry.item, entry.item.model, entry.model and entry.model.sha256, entry.spec_hash,
                               entry.error or "failed")


def _load_planned(uri: str, planned_sha256: str, device: str = "cpu"):
    """The model at `uri`, if its weights are still the ones the batch was planned with (their digest
    is in every record); ValueError if it was re-exported since."""
    from vidgen import models

    model = models.load(uri, device)
    loaded = engine.ModelInfo.from_manifest(uri, model.manifest).sha256
    if loaded != planned_sha256:
        raise ValueError(f"re-exported since this batch was planned (weights {loaded[:12]}, planned with "
                         f"{planned_sha256[:12]}); render again")
    return model


class ModelWorker:
    """A Ray actor holding one loaded model; `infer` leaves each item's frames in the object store."""

    def __init__(self, uri: str, planned_sha256: str, family: type | None = None):
        import ray
        import torch

        if family is not None:  # registered at run time in the driver (see _runtime_family)
            from vidgen import models

            models.register(family, replace=True)
        self.model = _load_planned(uri, planned_sha256, "cuda" if torch.cuda.is_available() else "cpu")
        # Where it runs, for the driver's log: the node, and whether Ray gave it a GPU
        self.where = ray.get_runtime_context().get_node_id()[:12] + (" (GPU)" if ray.get_gpu_ids() else "")

    def infer(self, items: list[ResolvedItem], chunk_frames: int) -> list[dict]:
        """Per item: {"meta": ..., "chunks": {stream: [ObjectRef, ...]}} or {"error": message}."""
        results = infer_into_object_store(self.model, items, chunk_frames)
        for result in results:
            if "meta" in result:
                result["meta"]["node"] = self.where
        return results

    def stream(self, item: ResolvedItem, chunk_frames: int):
        """A streamed item (restore, stylize) as a Ray streaming generator, read by its encode task
        (see `stream_events`). The caller's backpressure pauses it: the item is never held whole."""
        for kind, data in stream_events(self.model, item, chunk_frames):
            yield kind, ({**data, "node": self.where} if kind == "begin" else data)


def infer_into_object_store(model, items: list[ResolvedItem], chunk_frames: int) -> list[dict]:
    """Infer a batch of items (a model worker's, or a model server's `@serve.batch` call); per item:
    {"meta": ..., "chunks": {stream: [ObjectRef, ...]}} or {"error": message}. The small chunks of
    a batch's forward passes are put together, up to `chunk_frames` frames an object."""
    import numpy as np
    import ray

    results: dict[int, dict] = {}
    held: dict[tuple[int, str], list] = {}

    def put(index: int, stream: str) -> None:
        frames = held.pop((index, stream), [])
        if frames:
            chunk = frames[0] if len(frames) == 1 else np.concatenate(frames)
            results[index]["chunks"].setdefault(stream, []).append(ray.put(chunk))

    for event in engine.infer(model, items, chunk_frames):
        slot = results.setdefault(event.index, {"chunks": {}})
        if isinstance(event, engine.Begin):  # its meta comes again with Done
            continue
        if isinstance(event, engine.Chunk):
            key = (event.index, event.stream)
            held.setdefault(key, []).append(event.frames)
            if sum(len(f) for f in held[key]) >= chunk_frames:
                put(*key)
        elif isinstance(event, engine.Done):
            for stream in ("video", "input"):
                put(event.index, stream)
            slot["meta"] = dict(event.meta)
        else:
            for stream in ("video", "input"):
                held.pop((event.index, stream), None)
            results[event.index] = {"error": event.error}
    return [results.get(i) or {"error": "the model produced nothing for this item"} for i in range(len(items))]


def stream_events(model, item: ResolvedItem, chunk_frames: int):
    """One streamed item's messages, for a model worker or a model server to send to the encoder:
    ("begin", meta), then ("video" | "input", frames) chunks as the model makes them; or
    ("error", message) when the item cannot render (a bad input)."""
    for event in engine.infer(model, [item], chunk_frames):
        if isinstance(event, engine.Begin):
            yield "begin", event.meta
        elif isinstance(event, engine.Chunk):
            yield event.stream, event.frames
        elif isinstance(event, engine.Failed):
            yield "error", event.error


@dataclass(frozen=True)
class Streamed:
    """Where an encode task reads a streamed item's messages: a model worker's `stream`."""

    worker: object  # a ModelWorker actor handle
    chunk_frames: int

    def open(self, item: ResolvedItem):
        return self.worker.stream.options(num_returns="streaming", _generator_backpressure_num_objects=STREAM_AHEAD
                                          ).remote(item, self.chunk_frames)


STREAM_AHEAD = 2  # chunks a model worker may make ahead of the encoder reading them


class ModelUnavailableError(Exception):
    """A streamed item's model worker could not load its model (not a lost worker: no retry)."""


class FramesLostError(Exception):
    """An item's frames are gone from the object store (the model worker that held them died)."""


class _FramesLost(BaseException):
    # Raised inside encode_item's frame iterator. Not an Exception, so encode_item's per-item
    # error handling lets it through: lost frames are a reason to infer the item again, not its error.
    pass


def encode_task(item, out, meta, source, model, item_hash, previous, resume, threads=None) -> RenderRecord:
    """The encode stage as a Ray task, for batches and the endpoint alike: the item's frames -> its
    outputs and record. `source`: {stream: [ObjectRef, ...]} (a batch's inferred frames, fetched one
    chunk at a time), or a streamed item's source (`open(item)` -> the messages of `stream_events`,
    read while the model makes them; its meta comes first): a model worker's (Streamed) or a model
    server's. FramesLostError when the frames are gone (their model worker died): the caller infers
    the item again; ModelUnavailableError when a streamed item's model could not be loaded;
    media.EncoderKilledError when its ffmpeg was killed (a cancel kills it first): no record, the
    caller tries the item again."""
    import ray

    def fetch(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.ActorDiedError as e:
            if e.actor_init_failed:
                raise ModelUnavailableError(f"model {item.model}: {_ray_error(e)}") from None
            raise _FramesLost(type(e).__name__) from None
        except ray.exceptions.RayError as e:
            raise _FramesLost(type(e).__name__) from None

    def receive(messages):  # a model worker's object refs, or a model server's values
        for message in messages:
            yield fetch(message) if isinstance(message, ray.ObjectRef) else message

    def streamed(messages):
        for stream, data in messages:
            if stream == "error":
                raise ItemError(data)
            yield stream, data

    def inferred():
        streams = [[(name, ref) for ref in source.get(name, [])] for name in ("video", "input")]
        for pair in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
            if pair is not None:
                yield pair[0], fetch(pair[1])

    try:
        if isinstance(source, dict):
            return engine.encode_item(item, out, meta, inferred(), model, item_hash, previous, resume, threads,
                                      retry_killed=True)
        messages = receive(source.open(item))
        kind, meta = next(messages, ("error", "the model produced nothing for this item"))
        if kind == "unavailable":  # the model could not be loaded (as planned): not this item's error
            raise ModelUnavailableError(meta)
        if kind == "error":
            record = RenderRecord.failed(item, model.uri, model.sha256, item_hash, meta)
            return engine.write_record(out, record, previous)
        return engine.encode_item(item, out, meta, streamed(messages), model, item_hash, previous, resume, threads,
                                  retry_killed=True)
    except _FramesLost as e:
        raise FramesLostError(f"item {item.id}: its frames were lost ({e})") from None


def _runtime_family(name: str) -> type | None:
    """The class of a family registered at run time in this process (`models.register`, e.g. from a
    user's module), which a worker process never registered: it travels with the worker's arguments,
    as a training run's does. Ray pickles it by reference (its module must be importable on the
    workers) unless the module asked for pickling by value (`ray.cloudpickle.register_pickle_by_value`,
    as tests/test_family_contract.py does). None for vidgen's own families, and when this process never
    imported vidgen.models (then no family was registered here, and the driver stays free of torch)."""
    registry = sys.modules.get("vidgen.models")
    cls = registry.FAMILIES.get(name) if registry is not None else None
    return cls if cls is not None and not cls.__module__.startswith("vidgen.models.") else None


@functools.cache
def _remote():
    import ray

    # No retries by Ray: the pipeline infers an item again when its encoder died (its frames may be gone too)
    return ray.remote(max_restarts=0)(ModelWorker), ray.remote(max_retries=0)(encode_task)


def _ray_error(e: BaseException) -> str:
    """A one-line reason from a Ray error (its cause, or the last line of the remote traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return engine._describe(cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _stop_grace_s() -> float:
    return env_seconds(STOP_GRACE_ENV, STOP_GRACE_S)


def _render_on_ray(todo, out, workers, address, chunk_frames, max_batch, finish: Finish, stop=None,
                   grace: float = STOP_GRACE_S) -> None:
    import ray

    from vidgen.runtime import init_ray

    init_ray(address, keep_warm=True)
    if workers is None:
        workers = default_workers(ray.cluster_resources().get("CPU", 1))
    _RayPipeline(todo, out, workers, chunk_frames, max_batch, finish, stop, grace).run()


def default_workers(cpus: float) -> int:
    """Encode tasks in flight when `workers` is not given, for a Ray of `cpus` CPUs (ENCODES_PER_CPU)."""
    return max(1, min(MAX_DEFAULT_ENCODES, ENCODES_PER_CPU * int(cpus)))


class _RayPipeline:
    """The stages of one batch on Ray: model workers infer groups, encode tasks encode and upload.

    A model worker or an encoder that dies (its process, or its node) costs the items it held one
    attempt each: they are inferred again (their frames may have gone with the node) by a new
    worker, up to ITEM_ATTEMPTS; a model that cannot be loaded fails its items at once."""

    def __init__(self, todo, out, workers, chunk_frames, max_batch, finish: Finish, stop, grace: float):
        import ray

        self.out, self.workers, self.chunk_frames, self.finish = out, workers, chunk_frames, finish
        self.stop, self.grace, self.max_batch = stop, grace, max_batch
        # Each encode gets its share of the cores: x264's own threads (1.5 per core by default) cost
        # 20% more CPU per video at these sizes, and `workers` encodes already keep the cores busy.
        self.threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        self.worker_cls, self.encode = _remote()
        self.pending = deque(_groups(todo, max_batch, first=workers))
        models_ = {g[0].item.model for g in self.pending}
        self.groups_left = {uri: sum(g[0].item.model == uri for g in self.pending) for uri in models_}
        self.encodes_of = dict.fromkeys(models_, 0)  # per model: items inferred and not yet encoded
        self.actors: dict[str, object] = {}
        self.inferring: dict = {}  # ObjectRef -> (model uri, group, the worker inferring it)
        self.encoding: dict = {}  # ObjectRef -> (entry, model uri, the worker holding its frames)
        self.waiting: deque = deque()  # (entry, uri, meta, refs, worker): inferred, waiting for an encode slot
        self.attempts: dict[str, int] = {}  # item id -> attempts its worker or encoder died in
        self.retried: list[PlanEntry] = []  # their dead attempts may have left unfinished uploads
        self.placed: set = set()  # (model uri, node) already reported
        self.keys: dict[str, tuple] = {}  # model uri -> its worker's WarmWorkers key
        self.failed_workers: set = set()  # workers whose model did not load: ended, never kept
        session = _session()
        WARM.end_all_but({(*session, g[0].item.model, g[0].model.sha256) for g in self.pending})

    def run(self) -> None:
        import ray

        try:
            while self.pending or self.inferring or self.encoding or self.waiting:
                if self.stop and not self._stopping():
                    break
                self._start_encodes()
                self._start_inference()
                done, _ = ray.wait([*self.inferring, *self.encoding], num_returns=1, timeout=0.5)
                if done and done[0] in self.inferring:
                    self._inferred(done[0])
                elif done:
                    self._encoded(done[0])
                self._retire_idle_workers()
        finally:
            for actor in self.actors.values():  # all done, or told to stop
                ray.kill(actor)
        if self.retried:
            abort_leftover_uploads(self.retried, self.out)

    def _stopping(self) -> bool:
        """Told to stop: no new work, what is inferred is dropped, the encodes in flight get the
        grace period. False once nothing is left to wait for."""
        import ray

        self.pending.clear(), self.inferring.clear(), self.waiting.clear()
        if self.encoding and time.monotonic() - self.stop.at >= self.grace:  # out of time
            refs = list(self.encoding)
            for ref in refs:
                ray.cancel(ref, force=True)
            # A cancel lands a moment later (seconds on a loaded machine): an encoder still running
            # would see its upload aborted under it and record its item as an error.
            _, alive = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
            if alive:
                print(f"vidgen: {len(alive)} cancelled encoder(s) still running after {CANCEL_WAIT_S:g} s; "
                      "aborting their uploads anyway", file=sys.stderr, flush=True)
            abort_leftover_uploads([entry for entry, _, _ in self.encoding.values()], self.out)
            self.encoding.clear()
        return bool(self.encoding)

    def _start_encodes(self) -> None:
        while self.waiting and len(self.encoding) < self.workers:
            entry, uri, meta, refs, worker = self.waiting.popleft()
            ref = self.encode.options(num_cpus=ENCODE_CPUS).remote(
                entry.item, self.out, meta, refs, entry.model, entry.spec_hash, entry.previous,
                entry.resume or entry.item.id in self.attempts, self.threads)
            self.encoding[ref] = (entry, uri, worker)

    def _start_inference(self) -> None:
        # Backpressure: inferred-or-inferring items stay under workers + max_batch, so the model
        # works on the next group while the encoders drain this one, and memory stays bounded.
        while (self.pending and len(self.inferring) < 2 and len(self.waiting) + sum(
                len(g) for _, g, _ in self.inferring.values()) < self.workers + self.max_batch):
            first = self.pending[0][0]
            uri = first.item.model
            if uri not in self.actors:
                if len(self.actors) >= MAX_LIVE_MODELS:
                    break
                self.actors[uri] = self._new_worker(first.model)
            group, worker = self.pending.popleft(), self.actors[uri]
            if first.item.mode in engine.STREAMED_MODES:  # its encode task reads it from the worker as it is made
                self.groups_left[uri] -= 1
                self.encodes_of[uri] += 1
                self.waiting.append((first, uri, None, Streamed(worker, self.chunk_frames), worker))
                continue
            self.inferring[worker.infer.remote([e.item for e in group], self.chunk_frames)] = (uri, group, worker)

    def _new_worker(self, model: ModelInfo):
        """A kept worker of the same weights (see WarmWorkers), or a new model worker: on a GPU when
        the cluster has one now (a pending worker waits for one, as for a node the autoscaler is
        adding), else on CPUs."""
        import ray

        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        key = _worker_key(model, gpu)
        self.keys[model.uri] = key
        return WARM.take(key) or self.worker_cls.options(num_cpus=ACTOR_CPUS, num_gpus=1 if gpu else 0).remote(
            model.uri, model.sha256, _runtime_family(model.family))

    def _inferred(self, ref) -> None:
        import ray

        uri, group, worker = self.inferring.pop(ref)
        self.groups_left[uri] -= 1
        try:
            results = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the worker died
            if _lost_worker(e):  # its process or node, not the model: a new worker infers the group again
                self._forget(uri, worker)
                for entry in group:
                    self._again(entry, uri, _ray_error(e))
                return
            results = [{"error": f"model {uri}: {_ray_error(e)}", "model_trouble": True}] * len(group)
            self.failed_workers.add(worker)
        for entry, res in zip(group, results, strict=True):
            if "error" in res:
                _fail(self.out, entry, res["error"], self.finish, model_trouble=res.get("model_trouble", False))
                continue
            self.encodes_of[uri] += 1
            self.waiting.append((entry, uri, res["meta"], res["chunks"], worker))
            where = res["meta"].get("node")
            if where and (uri, where) not in self.placed:
                self.placed.add((uri, where))
                print(f"vidgen: model {uri} infers on node {where}", file=sys.stderr, flush=True)

    def _encoded(self, ref) -> None:
        import ray

        entry, uri, worker = self.encoding.pop(ref)
        self.encodes_of[uri] -= 1
        try:
            record = ray.get(ref)
        except ModelUnavailableError as e:
            self.failed_workers.add(worker)
            _fail(self.out, entry, str(getattr(e, "cause", None) or e), self.finish, model_trouble=True)
        except Exception as e:  # noqa: BLE001 - the encoder died, or the frames went with their node
            if isinstance(e, FramesLostError):  # their owner, the model worker that inferred them, is gone
                self._forget(uri, worker)
            self._again(entry, uri, _ray_error(e))
        else:
            self.finish(entry, record, "rendered")

    def _again(self, entry: PlanEntry, uri: str, why: str) -> None:
        """Infer and encode the item again, or record why not after ITEM_ATTEMPTS."""
        attempts = self.attempts[entry.item.id] = self.attempts.get(entry.item.id, 1) + 1
        self.retried.append(entry)
        if attempts > ITEM_ATTEMPTS:
            _fail(self.out, entry, f"gave up after {ITEM_ATTEMPTS} attempts: {why}", self.finish)
            return
        print(f"vidgen: item {entry.item.id}: {why}; attempt {attempts} of {ITEM_ATTEMPTS}", file=sys.stderr,
              flush=True)
        self.pending.appendleft([entry])  # first: its model is live (or may start), so no other model waits on it
        self.groups_left[uri] += 1

    def _forget(self, uri: str, worker) -> None:
        """A model worker that died: the model's next group goes to a new one (unless one was made
        already, after an earlier item of the dead one failed)."""
        import ray

        if self.actors.get(uri) is worker:
            ray.kill(self.actors.pop(uri))

    def _retire_idle_workers(self) -> None:
        """End the workers whose groups are inferred and encoded; keep the batch's last ones warm
        (while another model's groups wait, its worker would want the cores or the GPU)."""
        for uri in [u for u in self.actors if self.groups_left[u] == 0 and self.encodes_of[u] == 0]:
            worker = self.actors.pop(uri)
            if worker in self.failed_workers or any(self.groups_left.values()):
                _kill(worker)
            else:
                WARM.keep(self.keys[uri], worker)


def _worker_key(model: ModelInfo, gpu: bool) -> tuple:
    """What makes a kept worker fit a batch: this Ray (a process may join another one), the
    weights, the family class that loaded them, and the kind of device."""
    return *_session(), model.uri, model.sha256, _runtime_family(model.family), gpu


def _session() -> tuple[str, str]:
    """This Ray session: a Ray started again on the same address gives its first job the same id."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public name for the session
    return f"{ray.get_runtime_context().gcs_address} {getattr(node, 'session_name', '')}", \
        ray.get_runtime_context().get_job_id()


TAKE_TIMEOUT_S = 5.0  # a kept worker that does not answer this fast is replaced


class WarmWorkers:
    """Model workers of finished batches, each kept for KEEP_WARM_S (runtime.KEEP_WARM_ENV) for a
    later batch of the same weights in this process, then ended (a timer; the process's exit ends
    them too: they are its actors). A kept worker must answer before it is taken, so one that died
    meanwhile (its node went) is replaced rather than costing its first group an attempt."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kept: dict[tuple, tuple[object, threading.Timer]] = {}
        self.taken = 0  # kept workers handed to a batch, in all (bench/render.py checks its batches got one)

    def keep(self, key: tuple, worker) -> None:
        seconds = keep_warm_s()
        if seconds <= 0:
            _kill(worker)
            return
        timer = threading.Timer(seconds, self._expire, (key, worker))
        timer.daemon = True
        with self.lock:
            old = self.kept.pop(key, None)
            self.kept[key] = (worker, timer)
        if old:
            old[1].cancel()
            _kill(old[0])
        timer.start()

    def take(self, key: tuple):
        """The worker kept for `key` if it still answers (its node may have gone), else None."""
        import ray

        with self.lock:
            worker, timer = self.kept.pop(key, (None, None))
        if timer is None:
            return None
        timer.cancel()
        try:
            ray.get(worker.__ray_ready__.remote(), timeout=TAKE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - dead, or too slow to answer: a new worker instead
            _kill(worker)
            return None
        self.taken += 1
        return worker

    def end_all_but(self, models: set[tuple] = frozenset()) -> None:
        """End the kept workers of every model but `models`: (*_session(), uri, sha256), the start
        of their keys."""
        with self.lock:
            ended = [k for k in self.kept if k[:4] not in models]
            pairs = [self.kept.pop(k) for k in ended]
        for worker, timer in pairs:
            timer.cancel()
            _kill(worker)

    def _expire(self, key: tuple, worker) -> None:
        with self.lock:
            if self.kept.get(key, (None,))[0] is not worker:
                return
            del self.kept[key]
        _kill(worker)


def _kill(worker) -> None:
    import ray

    with contextlib.suppress(Exception):  # gone already, or its Ray was shut down
        ray.kill(worker)


WARM = WarmWorkers()
release_warm_workers_on(WARM.end_all_but)


def _lost_worker(e: BaseException) -> bool:
    """Whether a model worker's call failed because the worker (its process or its node) died,
    rather than because its model could not be loaded."""
    import ray

    if isinstance(e, ray.exceptions.ActorDiedError):
        return not e.actor_init_failed
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                          ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError))
