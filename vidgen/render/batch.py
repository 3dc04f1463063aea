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
MAX_LIVE_MODELS model workers live at once; a worker is ended once its groups are inferred and
their encodes have finished (the chunks it put in the object store live as long as it does).

Why actors and tasks rather than Ray Data: items differ in mode, model and length, one item's
failure must become its record while the rest go on, each item commits with its own record, and
restore/predict stream video chunks of unknown count; Ray Data's row blocks and operator-level
retries fit none of these well, and on a 2-CPU machine its executor would reserve CPUs per operator.

Test hook: VIDGEN_TEST_KILL_AFTER_ITEMS=N makes the driver SIGKILL itself after N item records.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vidgen import storage
from vidgen.render import engine, gallery
from vidgen.render.engine import CHUNK_FRAMES, ItemError, ModelInfo
from vidgen.render.spec import MODE_FAMILIES, RenderBatch, ResolvedItem

ACTOR_CPUS = 0.5  # logical CPUs of a model worker: torch and ffmpeg share the cores; `workers` bounds the work
ENCODE_CPUS = 0.5
MAX_LIVE_MODELS = 2
MAX_BATCH = 8  # generate/predict items inferred in one call
KILL_ENV = "VIDGEN_TEST_KILL_AFTER_ITEMS"


# --------------------------------------------------------------------------------------------
# The plan: what each item needs


@dataclass
class PlanEntry:
    item: ResolvedItem
    action: str  # "skip" (an ok record with this spec hash), "adopt", "render" or "fail"
    model: ModelInfo | None = None
    spec_hash: str | None = None
    previous: dict | None = None  # the item's record from an earlier run
    error: str | None = None  # why it fails before rendering ("fail")
    adopted: dict | None = None  # output name -> facts, for "adopt"
    resume: bool = False  # some of its outputs are already there (a killed run): reuse what matches


@dataclass
class Plan:
    batch: RenderBatch
    entries: list[PlanEntry]

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.entries)


def plan_batch(batch: RenderBatch) -> Plan:
    """Read the models' manifests and the existing records; decide what each item needs.
    A label the model does not know raises SpecError (nothing has rendered yet)."""
    manifests: dict[str, dict | None] = {}
    model_errors: dict[str, str] = {}
    for uri in batch.models():
        try:
            manifests[uri] = read_model_manifest(uri)
        except (storage.StorageError, ValueError) as e:
            manifests[uri] = None
            model_errors[uri] = f"model {uri}: {e}" if uri not in str(e) else str(e)
    items = batch.resolve(manifests)
    out = batch.output
    previous = _read_records(out, [item.id for item in items])
    existing = set(storage.list_prefix(out, recursive=False))
    missing_inputs = _missing_inputs(items)
    entries = []
    for item in items:
        manifest = manifests[item.model]
        if manifest is None:
            entries.append(PlanEntry(item, "fail", previous=previous.get(item.id), error=model_errors[item.model]))
            continue
        info = ModelInfo.from_manifest(item.model, manifest)
        item_hash = engine.spec_hash(item, info.sha256)
        prev = previous.get(item.id)
        entry = PlanEntry(item, "render", info, item_hash, prev)
        try:
            engine.check_mode(item.mode, info.family, item.model)
        except ItemError as e:
            entry.action, entry.error = "fail", str(e)
        if prev and prev.get("status") == "ok" and prev.get("spec_hash") == item_hash:
            entry.action = "skip"
        elif entry.action == "render" and item.input in missing_inputs:
            entry.action, entry.error = "fail", missing_inputs[item.input]
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


MODEL_FORMAT = "vidgen-model/1"  # vidgen.models.FORMAT, read here without importing torch


def read_model_manifest(uri: str) -> dict:
    """A saved model's model.json, checked like `vidgen.models.read_manifest` does; the driver
    plans from it without importing torch (the model workers load the weights)."""
    path = storage.join(uri, "model.json")
    manifest = storage.read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: not a vidgen model (format {found!r}, expected {MODEL_FORMAT!r})")
    families = {f for fams in MODE_FAMILIES.values() for f in fams}
    if manifest.get("family") not in families:
        raise ValueError(f"{path}: unknown model family {manifest.get('family')!r}; expected one of {sorted(families)}")
    return manifest


def _missing_inputs(items: list[ResolvedItem]) -> dict[str, str]:
    """Input URIs that do not exist -> the item error, found before any model loads."""
    uris = list(dict.fromkeys(item.input for item in items if item.input))

    def check(uri: str) -> tuple[str, str | None]:
        try:
            if storage.exists(uri):
                return uri, None
            return uri, f"input: {uri}: no such {'key' if storage.is_s3(uri) else 'file'}"
        except storage.StorageError as e:
            return uri, f"input: {e}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {uri: error for uri, error in pool.map(check, uris) if error}


def _read_records(out: str, ids: list[str]) -> dict[str, dict]:
    present = set(storage.list_prefix(storage.join(out, "items"), recursive=False))
    wanted = [i for i in ids if engine.record_uri(out, i) in present]

    def read(item_id: str) -> tuple[str, dict | None]:
        try:
            record = storage.read_json(engine.record_uri(out, item_id))
            return item_id, record if isinstance(record, dict) else None
        except storage.StorageError:
            return item_id, None  # unreadable: render again

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
                "fail": f"fail: {e.error}"}[e.action]
        extra = f" +{len(it.renditions)} renditions" if it.renditions else ""
        lines.append(f"  {it.id:<24} {it.mode:<9} {frames!s:>7} frames {size:>9}{extra}  {it.model}  [{what}]")
    lines.append(f"render {plan.count('render')}, unchanged {plan.count('skip')}, "
                 f"resume {plan.count('adopt')}, fail {plan.count('fail')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running a batch


@dataclass
class BatchResult:
    name: str
    output: str
    records: list[dict]  # one per item, in spec order
    rendered: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        errors = {r["id"]: r["error"] for r in self.records if r["status"] != "ok"}
        text = (f"{self.name}: {len(self.records)} items: {len(self.rendered)} rendered, "
                f"{len(self.resumed)} resumed, {len(self.unchanged)} unchanged, {len(self.failed)} failed "
                f"in {self.seconds:.1f} s -> {storage.join(self.output, 'index.html')}")
        for item_id in self.failed:
            text += f"\n  failed {item_id}: {errors.get(item_id)}"
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
    then OUT/manifest.jsonl and OUT/index.html. `workers`: concurrent encode tasks (default: the
    cluster's CPUs, at most 8); 0 renders in this process without Ray."""
    from tqdm import tqdm

    started = time.monotonic()
    plan = plan_batch(batch)
    out = batch.output
    result = BatchResult(batch.name, out, [])
    records: dict[str, dict] = {}
    bar = tqdm(total=len(plan.entries), desc=batch.name, unit="item", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    written = 0

    def finish(entry: PlanEntry, record: dict, kind: str) -> None:
        nonlocal written
        records[entry.item.id] = record
        if record["status"] != "ok":
            result.failed.append(entry.item.id)
        else:
            getattr(result, kind).append(entry.item.id)
        bar.update(1)
        bar.set_postfix(failed=len(result.failed), refresh=False)
        if kind != "unchanged":
            written += 1
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a render killed mid-batch

    todo = []
    for entry in plan.entries:
        if entry.action == "skip":
            finish(entry, entry.previous, "unchanged")
        elif entry.action == "adopt":
            record = engine.ok_record(entry.item, entry.model, entry.spec_hash, entry.adopted)
            finish(entry, engine.write_record(out, record, entry.previous), "resumed")
        elif entry.action == "fail":
            _fail(out, entry, entry.error, finish)
        else:
            todo.append(entry)
    try:
        if todo and workers == 0:
            _render_in_process(todo, out, chunk_frames, max_batch, finish)
        elif todo:
            _render_on_ray(todo, out, workers, address, chunk_frames, max_batch, finish)
    finally:
        bar.close()
    result.records = [records[e.item.id] for e in plan.entries]
    order = {e.item.id: i for i, e in enumerate(plan.entries)}
    for ids in (result.rendered, result.resumed, result.unchanged, result.failed):
        ids.sort(key=order.__getitem__)
    write_index(out, batch.name, result.records)
    result.seconds = time.monotonic() - started
    return result


def write_index(out: str, name: str, records: list[dict]) -> None:
    """OUT/manifest.jsonl (all records) and OUT/index.html, each written only when it changed."""
    manifest = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    _write_if_changed(storage.join(out, "manifest.jsonl"), manifest.encode())
    _write_if_changed(storage.join(out, "index.html"), gallery.render_html(name, records).encode())


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


Finish = Callable[[PlanEntry, dict, str], None]


def _render_in_process(todo: list[PlanEntry], out: str, chunk_frames: int, max_batch: int, finish: Finish) -> None:
    from vidgen import models

    loaded: tuple[str, object] | None = None
    for group in _groups(todo, max_batch):
        uri = group[0].item.model
        try:
            if loaded is None or loaded[0] != uri:
                loaded = (uri, models.load(uri))
        except (storage.StorageError, ValueError, KeyError) as e:
            for entry in group:
                _fail(out, entry, f"model {uri}: {e}", finish)
            continue
        info = group[0].model
        records = engine.render_items([e.item for e in group], loaded[1], out, info, chunk_frames,
                                      {e.item.id: e.previous for e in group if e.previous},
                                      resume=any(e.resume for e in group))
        for entry, record in zip(group, records, strict=True):
            finish(entry, record, "rendered")


def _fail(out: str, entry: PlanEntry, error: str, finish: Finish) -> None:
    record = engine.error_record(entry.item, entry.item.model, entry.model and entry.model.sha256,
                                 entry.spec_hash, error)
    finish(entry, engine.write_record(out, record, entry.previous), "rendered")


class ModelWorker:
    """A Ray actor holding one loaded model; `infer` leaves each item's frames in the object store."""

    def __init__(self, uri: str):
        import torch

        from vidgen import models

        self.model = models.load(uri, "cuda" if torch.cuda.is_available() else "cpu")

    def infer(self, items: list[ResolvedItem], chunk_frames: int) -> list[dict]:
        """Per item: {"meta": ..., "chunks": {stream: [ObjectRef, ...]}} or {"error": message}."""
        import numpy as np
        import ray

        results: dict[int, dict] = {}
        held: dict[tuple[int, str], list] = {}  # small chunks (a batch's forward passes) gathered into one object

        def put(index: int, stream: str) -> None:
            frames = held.pop((index, stream), [])
            if frames:
                chunk = frames[0] if len(frames) == 1 else np.concatenate(frames)
                results[index]["chunks"].setdefault(stream, []).append(ray.put(chunk))

        for event in engine.infer(self.model, items, chunk_frames):
            slot = results.setdefault(event.index, {"chunks": {}})
            if isinstance(event, engine.Chunk):
                key = (event.index, event.stream)
                held.setdefault(key, []).append(event.frames)
                if sum(len(f) for f in held[key]) >= chunk_frames:
                    put(*key)
            elif isinstance(event, engine.Done):
                for stream in ("video", "input"):
                    put(event.index, stream)
                slot["meta"] = event.meta
            else:
                for stream in ("video", "input"):
                    held.pop((event.index, stream), None)
                results[event.index] = {"error": event.error}
        return [results.get(i) or {"error": "the model produced nothing for this item"} for i in range(len(items))]


def _encode_task(item, out, meta, refs, model, item_hash, previous, resume) -> dict:
    import ray

    def chunks(stream: str):
        return (ray.get(ref) for ref in refs.get(stream, []))  # one chunk in memory at a time

    return engine.encode_item(item, out, meta, chunks, model, item_hash, previous, resume)


@functools.cache
def _remote():
    import ray

    return ray.remote(max_restarts=0)(ModelWorker), ray.remote(max_retries=2)(_encode_task)


def _ray_error(e: BaseException) -> str:
    """A one-line reason from a Ray error (its cause, or the last line of the remote traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return engine._describe(cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _render_on_ray(todo, out, workers, address, chunk_frames, max_batch, finish: Finish) -> None:
    import ray

    from vidgen.runtime import init_ray

    init_ray(address)
    resources = ray.cluster_resources()
    if workers is None:
        workers = max(1, min(8, int(resources.get("CPU", 1))))
    gpu = resources.get("GPU", 0) >= 1
    worker_cls, encode = _remote()

    pending = deque(_groups(todo, max_batch, first=workers))
    actors: dict[str, object] = {}
    groups_left = {uri: sum(g[0].item.model == uri for g in pending) for uri in {g[0].item.model for g in pending}}
    encodes_of = dict.fromkeys(groups_left, 0)  # per model: items inferred and not yet encoded
    inferring: dict = {}  # ObjectRef -> (model uri, group)
    encoding: dict = {}  # ObjectRef -> (entry, model uri)
    waiting: deque = deque()  # (entry, uri, meta, refs): inferred, waiting for an encode slot

    def retire_idle_workers() -> None:
        for uri in [u for u in actors if groups_left[u] == 0 and encodes_of[u] == 0]:
            ray.kill(actors.pop(uri))

    while pending or inferring or encoding or waiting:
        while waiting and len(encoding) < workers:
            entry, uri, meta, refs = waiting.popleft()
            ref = encode.options(num_cpus=ENCODE_CPUS).remote(
                entry.item, out, meta, refs, entry.model, entry.spec_hash, entry.previous, entry.resume)
            encoding[ref] = (entry, uri)
        # Backpressure: inferred-or-inferring items stay under workers + max_batch, so the model
        # works on the next group while the encoders drain this one, and memory stays bounded.
        while (pending and len(inferring) < 2
               and len(waiting) + sum(len(g) for _, g in inferring.values()) < workers + max_batch):
            uri = pending[0][0].item.model
            if uri not in actors:
                if len(actors) >= MAX_LIVE_MODELS:
                    break
                options = {"num_cpus": ACTOR_CPUS, "num_gpus": 1 if gpu else 0}
                actors[uri] = worker_cls.options(**options).remote(uri)
            group = pending.popleft()
            inferring[actors[uri].infer.remote([e.item for e in group], chunk_frames)] = (uri, group)
        done, _ = ray.wait([*inferring, *encoding], num_returns=1)
        ref = done[0]
        if ref in inferring:
            uri, group = inferring.pop(ref)
            groups_left[uri] -= 1
            try:
                results = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died (e.g. its model would not load)
                results = [{"error": f"model {uri}: {_ray_error(e)}"}] * len(group)
            for entry, res in zip(group, results, strict=True):
                if "error" in res:
                    _fail(out, entry, res["error"], finish)
                else:
                    encodes_of[uri] += 1
                    waiting.append((entry, uri, res["meta"], res["chunks"]))
        else:
            entry, uri = encoding.pop(ref)
            encodes_of[uri] -= 1
            try:
                record = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the encoder died; the item records why
                _fail(out, entry, _ray_error(e), finish)
            else:
                finish(entry, record, "rendered")
        retire_idle_workers()
    retire_idle_workers()
