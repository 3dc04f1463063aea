"""The job runner deployment: claims queued jobs with a lease in storage, renders their items
through the model deployments and encode tasks, and takes over jobs whose runner died."""

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
import uuid

from ray import serve

from vidgen.render.record import RenderRecord
from vidgen.render.spec import INPUT_MODES, ResolvedItem, SpecError, parse_batch
from vidgen.serving.model_server import Served
from vidgen.serving.settings import MAX_WAIT_S, ServiceSettings, input_limits
from vidgen.serving.store import Conflict, Job, JobStore, Lease, _executor, _io, read_json_etag

POKED_RECORDS = 64  # job records a runner keeps from pokes (a request is up to 2 MiB); beyond, claims read them

logger = logging.getLogger("ray.serve")  # Serve adds the request id to each line logged in a request


@functools.cache
def _encode_task():
    import ray

    from vidgen.render.batch import encode_task

    return ray.remote(max_retries=0)(encode_task)  # the runner retries an item itself


class _Run:
    """A job this runner holds: its lease (and etag), and what the heartbeat has learnt."""

    def __init__(self, job_id: str, lease: Lease, etag: str, job: Job | None = None):
        self.job_id, self.lease, self.etag = job_id, lease, etag
        self.job = job  # the job record, when claiming read it
        # The first runner of the job: nothing was ever written to its output folder, so its plan
        # looks for no records, outputs or unfinished uploads there (three LISTs fewer a job)
        self.fresh = lease.attempt == 1
        self.cancelled = False
        self.lost = False  # another runner took the lease: stop
        self.finishing = False
        self.stop = asyncio.Event()  # wakes the heartbeat to end (never cancelled: a write may be on its way)
        self.kept: dict[str, str] = {}  # items whose model could not be read: their stored records stand
        self.lock = asyncio.Lock()  # lease writes, one at a time


class JobRunner:
    """Claims queued jobs and renders them; any runner may take over a job whose heartbeat went stale."""

    async def __init__(self, settings: ServiceSettings, model_handles: dict):
        self.settings = settings
        self.conf = settings.runner
        self.store = JobStore(settings.output_root)
        self.handles = model_handles  # model name -> DeploymentHandle
        self.names = {settings.model_uri(name): name for name in settings.models}
        self.runner_id = f"{serve.get_replica_context().replica_tag}-{uuid.uuid4().hex[:6]}"
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()  # in the lease: where a job runs
        self.pool = _executor()
        self.slots = asyncio.Semaphore(self.conf.max_items_in_flight)
        self.running: dict[str, asyncio.Task] = {}
        self.seen: dict[str, tuple[str, float]] = {}  # job -> (its lease's version, monotonic time it was first seen)
        self.markers: dict[str, tuple[str, float]] = {}  # the same for queue markers still without a job record
        self.poked: list[str] = []  # jobs the ingress created since the last poll: claimed without a LIST
        self.poked_jobs: dict[str, Job] = {}  # their records, as the ingress wrote them
        self.wake = asyncio.Event()
        self.loop_task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def poke(self, job_id: str | None = None, job: Job | None = None) -> None:
        """A job was queued (`job_id`: which one; it is then claimed without listing the queue;
        `job`: its record, which the claim then need not read)."""
        if job_id is not None:
            self.poked.append(job_id)
            if job is not None and len(self.poked_jobs) < POKED_RECORDS:
                self.poked_jobs[job_id] = job
        self.wake.set()

    async def wait_ended(self, job_id: str, timeout: float) -> bool | None:
        """For a status request that waits (`GET /v1/renders/{id}?wait_s=`): None when this runner
        does not run the job (queued, another runner's, or over); else whether its run here ended
        within `timeout` seconds (its lease then says how). Waits in memory: no storage reads."""
        task = self.running.get(job_id)
        if task is None:
            return None
        await asyncio.wait({task}, timeout=max(0.0, min(timeout, MAX_WAIT_S)))
        return task.done()

    def check_health(self) -> None:
        if self.loop_task.done():
            raise RuntimeError("the runner's polling loop ended")

    async def _poll_loop(self) -> None:
        listed = -math.inf
        while True:
            poked, self.poked = self.poked, []
            try:
                # Poked jobs are claimed by name; the queue is listed every poll_s (jobs poked to
                # another runner, released, or orphaned) and on a wake that names no job
                listing = not poked or time.monotonic() - listed >= self.conf.poll_s
                if listing:
                    listed = time.monotonic()
                await self._poll(poked, listing)
            except Exception as e:  # noqa: BLE001 - storage hiccups: try again next round
                logger.warning(f"runner {self.runner_id}: polling failed: {type(e).__name__}: {e}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.conf.poll_s)
            self.wake.clear()

    async def _poll(self, poked: list[str], listing: bool) -> None:
        """Claim what this runner has room for: the `poked` jobs, and with `listing` every queued one.
        Poked jobs left for want of room are kept, and claimed when a job here ends."""
        candidates, named = list(poked), set(poked)
        if listing and len(self.running) < self.conf.max_jobs:
            queued = await _io(self.pool, self.store.queued)
            listed = set(queued)
            self.seen = {j: v for j, v in self.seen.items() if j in listed}
            self.markers = {j: v for j, v in self.markers.items() if j in listed}
            candidates += [j for j in queued if j not in named]
        for n, job_id in enumerate(candidates):
            if len(self.running) >= self.conf.max_jobs:
                self.poked[:0] = [j for j in candidates[n:] if j in named]
                break
            changed = self.seen.get(job_id, (None, -math.inf))[1]
            if job_id in self.running or time.monotonic() - changed < self.conf.stale_s / 2:
                continue
            run = await _io(self.pool, self._claim, job_id, self.poked_jobs.pop(job_id, None))
            if run is not None:
                self.running[job_id] = asyncio.get_running_loop().create_task(self._run(run))
                self.running[job_id].add_done_callback(lambda _t, j=job_id: self._ended(j))
        waiting = set(self.poked)  # the records of jobs claimed elsewhere (or gone) are not kept
        self.poked_jobs = {j: v for j, v in self.poked_jobs.items() if j in waiting}

    def _ended(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        if self.poked:  # poked jobs waited for room
            self.wake.set()

    def _stale(self, job_id: str, lease: dict, etag: str | None, seen: dict | None = None) -> bool:
        """Whether the lease has stayed the same for `stale_s` of this runner's own monotonic time.
        Every heartbeat rewrites the lease (a new `beat`, so a new version): no host's wall clock is
        compared with another's, so clock skew neither takes over a live job nor keeps a dead one.
        `seen`: where first sights are kept (`self.seen`, which `_poll` also reads to leave a job
        another runner holds alone for a while; `self.markers` for queue markers)."""
        seen = self.seen if seen is None else seen
        version = etag or json.dumps(lease, sort_keys=True)
        first = seen.get(job_id)
        if first is None or first[0] != version:  # first sight, or it changed since: its holder is alive
            seen[job_id] = (version, time.monotonic())
            return False
        return time.monotonic() - first[1] >= self.conf.stale_s

    def _claim(self, job_id: str, job: Job | None = None) -> _Run | None:
        """Take the job's lease when it has none, or a stale one; None when another runner holds it.
        `job`: its record, from the ingress that wrote it: the first lease is then written without
        reading anything (one conditional PUT, not two GETs and a PUT); a lease already there fails
        that write, and the job is claimed as any other."""
        if job is not None:
            now = time.time()
            first = Lease(runner=self.runner_id, node=self.node_id, heartbeat=now, started=now, attempt=1)
            try:
                return _Run(job_id, first, self.store.swap_lease(job_id, first, None), job)
            except Conflict:
                pass
        lease, etag = self.store.lease(job_id)
        now = time.time()
        job = self.store.read(job_id) if lease is None else None
        if lease is None and job is None:  # its record is being written, or never will be
            # (kept apart from the leases' first sights: the next poll must look again, not wait stale_s / 2)
            marker, marker_etag = read_json_etag(self.store.queue_uri(job_id))
            if (marker is not None and self._stale(job_id, marker, marker_etag, self.markers)
                    and self.store.drop_orphan_marker(job_id)):
                logger.warning(f"runner {self.runner_id}: dropped the queue marker of job {job_id}: no job record came")
            return None
        if lease is not None:
            if lease.ended:
                self.store.finish(job_id)  # its runner died between the lease and the marker
                return None
            if not lease.released and not self._stale(job_id, lease.model_dump(mode="json"), etag):
                return None
        attempt = (lease.attempt if lease else 0) + 1
        new = Lease(runner=self.runner_id, node=self.node_id, heartbeat=now, started=now, attempt=attempt)
        if attempt > self.conf.job_attempts:
            new = new.model_copy(update={"state": "failed", "error": f"gave up after {self.conf.job_attempts} "
                                                                     f"runners took the job and stopped"})
        try:
            etag = self.store.swap_lease(job_id, new, etag)
        except Conflict:
            return None
        if new.state == "failed":
            self.store.finish(job_id)
            return None
        if lease is not None:
            why = "released" if lease.released else f"its lease unchanged for {self.conf.stale_s:g} s"
            logger.warning(f"runner {self.runner_id}: took over job {job_id} from {lease.runner} ({why}), "
                           f"attempt {attempt}")
        return _Run(job_id, new, etag, job)

    async def _write_lease(self, run: _Run, **changes) -> bool:
        async with run.lock:
            lease = run.lease.beaten(**changes)
            try:
                run.etag = await _io(self.pool, self.store.swap_lease, run.job_id, lease, run.etag)
            except Conflict:
                run.lost = True
                logger.warning(f"runner {self.runner_id}: lost the lease of job {run.job_id}; stopping it")
                return False
            run.lease = lease
            return True

    async def _heartbeat(self, run: _Run) -> None:
        last_ok = time.monotonic()
        while not (run.lost or run.finishing):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.stop.wait(), timeout=self.conf.heartbeat_s)
            if run.finishing:
                return
            try:
                run.cancelled = run.cancelled or await _io(self.pool, self.store.cancelled, run.job_id)
                if run.finishing or not await self._write_lease(run):
                    return
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a storage hiccup; stop only once the lease may be gone
                logger.warning(f"runner {self.runner_id}: heartbeat of job {run.job_id} failed: {e}")
                if time.monotonic() - last_ok > self.conf.stale_s:
                    run.lost = True

    async def _run(self, run: _Run) -> None:
        job_id = run.job_id
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(run))
        state, error, counts = None, None, None  # state None: not ended here; release the lease for a retry
        try:
            job = run.job or await _io(self.pool, self.store.read, job_id)
            run.cancelled = await _io(self.pool, self.store.cancelled, job_id)
            if job is None:
                state, error = "failed", "the job record is missing"
            elif run.cancelled:
                state = "cancelled"
            else:
                logger.info(f"runner {self.runner_id}: job {job_id} started (attempt {run.lease.attempt}, "
                            f"request {job.request_id})")
                records = await self._render(job, run)
                if run.cancelled:
                    state = "cancelled"
                elif not run.lost:
                    from vidgen.render.batch import write_index

                    # The job's folder is its own, and only the lease holder writes there
                    await _io(self.pool, write_index, job.batch["output"], job.batch["name"], records,
                              sole_writer=True)
                    failed = sum(not r.is_ok or r.id in run.kept for r in records)
                    state, counts = "finished", {"items": len(records), "ok": len(records) - failed, "failed": failed}
                    if run.kept:  # their earlier ok records stand; the job says why they were not rendered
                        error = f"{len(run.kept)} item(s) kept their earlier records: {next(iter(run.kept.values()))}"
        except SpecError as e:  # the models changed since the job was accepted (a label they no longer know)
            state, error = "failed", str(e)
        except Exception:  # noqa: BLE001 - e.g. storage down: release the lease, the job is retried
            logger.exception(f"runner {self.runner_id}: job {job_id} stopped")
        finally:  # also on cancellation (the replica stopping): then the lease is released
            # Cancelling the heartbeat mid-write would lose the etag of a write that lands anyway, and
            # the final write would then fail its condition on our own lease: let it finish instead.
            run.finishing = True
            run.stop.set()
            await asyncio.gather(heartbeat, return_exceptions=True)
            if run.lost:
                pass
            elif state is not None:
                if await self._write_lease(run, state=state, error=error, counts=counts):
                    await _io(self.pool, self.store.finish, job_id)
                    logger.info(f"runner {self.runner_id}: job {job_id} {state}" + (f": {error}" if error else ""))
            else:
                await self._write_lease(run, released=True)  # the next poll of any runner takes it again

    async def _render(self, job: Job, run: _Run) -> list[RenderRecord]:
        """Plan the batch (items with an ok record are kept), render the rest; the records, in order."""
        from vidgen.render import engine
        from vidgen.render.batch import abort_killed_runs_uploads, plan_batch, unwritten_error

        batch = parse_batch(job.batch, source=f"job {job.id}")
        plan = await _io(self.pool, plan_batch, batch, run.fresh)
        out = batch.output
        records: dict[str, RenderRecord] = {}
        todo = []
        for entry in plan.entries:
            if entry.action == "skip":
                records[entry.item.id] = entry.previous
            elif entry.action == "adopt":
                record = RenderRecord.ok(entry.item, entry.model, entry.spec_hash, entry.adopted)
                records[entry.item.id] = await _io(self.pool, engine.write_record, out, record, entry.previous)
            elif entry.action == "fail":
                records[entry.item.id] = await self._error(out, entry, entry.error)
            elif entry.action == "keep":  # the model could not be read: its stored record stays what it was
                records[entry.item.id] = entry.previous or unwritten_error(entry)
                run.kept[entry.item.id] = entry.error
            else:
                todo.append(entry)

        if not run.fresh:
            await _io(self.pool, abort_killed_runs_uploads, plan)

        async def one(entry) -> None:
            async with self.slots:
                if run.cancelled or run.lost:
                    return
                records[entry.item.id] = await self._render_item(out, entry, run)

        await asyncio.gather(*(one(e) for e in todo))
        return [records[e.item.id] for e in plan.entries if e.item.id in records]

    async def _error(self, out: str, entry, error: str) -> RenderRecord:
        from vidgen.render import engine

        record = RenderRecord.failed(entry.item, entry.item.model, entry.model and entry.model.sha256,
                                     entry.spec_hash, error)
        return await _io(self.pool, engine.write_record, out, record, entry.previous)

    async def _render_item(self, out: str, entry, run: _Run) -> RenderRecord:
        """Model, then an encode task; a replica or encoder that dies costs a retry, not the item."""
        from vidgen.render import engine
        from vidgen.render.batch import ModelUnavailableError

        item = entry.item
        name = self.names.get(item.model)
        if name is None:
            return await self._error(out, entry, f"model {item.model} is no longer served by this service")
        if item.mode in INPUT_MODES:
            problem = await _io(self.pool, self._input_problem, item, entry.model.scale if item.mode == "restore" else 1)
            if problem:
                return await self._error(out, entry, problem)
        last = None
        for attempt in range(1, self.conf.item_attempts + 1):
            try:
                if item.mode in engine.STREAMED_MODES:  # the encode task reads it from the model as it is made
                    meta, source = None, Served(self.handles[name], entry.model.sha256)
                else:
                    result = await self.handles[name].infer.remote((item, entry.model.sha256))
                    if "error" in result and result.get("model_trouble"):
                        return await self._model_trouble(out, entry, run, result["error"])
                    if "error" in result:
                        return await self._error(out, entry, result["error"])
                    meta, source = result["meta"], result["chunks"]
                task = _encode_task().options(num_cpus=self.conf.encode_cpus)
                return await task.remote(item, out, meta, source, entry.model, entry.spec_hash,
                                         entry.previous, entry.resume or attempt > 1,
                                         threads=max(1, int(self.conf.encode_cpus)))
            except ModelUnavailableError as e:
                return await self._model_trouble(out, entry, run, str(getattr(e, "cause", None) or e))
            except Exception as e:  # noqa: BLE001 - a model replica or an encoder died: try again
                last = e
                logger.warning(f"runner {self.runner_id}: item {item.id} attempt {attempt} failed: "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
        return await self._error(out, entry, f"gave up after {self.conf.item_attempts} attempts: "
                                             f"{type(last).__name__}")

    async def _model_trouble(self, out: str, entry, run: _Run, error: str) -> RenderRecord:
        """The model could not be loaded as planned: an ok record stays (the item fails this job)."""
        if entry.previous and entry.previous.is_ok:
            run.kept[entry.item.id] = error
            return entry.previous
        return await self._error(out, entry, error)

    def _input_problem(self, item: ResolvedItem, scale: int) -> str | None:
        """The service's limits on an input video, again at render time (it may have changed since
        the request was checked)."""
        from vidgen import media

        try:
            info = media.probe(item.input)
        except Exception:  # noqa: BLE001 - the engine reports a bad input as the item's error
            return None
        problems = input_limits(info, item, scale, self.settings.limits)
        return f"input: {item.input} is {problems[0]}" if problems else None
