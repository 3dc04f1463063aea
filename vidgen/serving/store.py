"""Job state in object storage: conditional writes, the job store (the layout of jobs under one
output root, shared by the ingress and the runners) and the threads that blocking storage calls
run on."""

import asyncio
import concurrent.futures
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Container
from typing import Any, Literal

import botocore.exceptions
from pydantic import BaseModel, ConfigDict

from vidgen import storage

JOB_ID = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"
JOB_FORMAT = "vidgen-serve-job/1"
ADMISSION_GRACE_S = 60.0  # how long an admitted job may take to write its queue marker
TERMINAL = ("done", "failed", "cancelled")


# --------------------------------------------------------------------------------------------
# The records: a job (written once by the ingress) and its lease (rewritten by the runner that
# holds the job, and by nobody else). Every default lives here.


class Job(BaseModel):
    """ROOT/_jobs/<id>.json: what was asked, as the ingress accepted it."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    created: str                 # ISO time, UTC
    created_ts: float            # the same, in seconds since the epoch
    format: str = JOB_FORMAT
    name: str = ""
    request_id: str | None = None
    request_sha256: str | None = None           # the request's canonical digest (Idempotency-Key replays)
    idempotency_key_sha256: str | None = None
    items: list[str] = []                       # item ids, in the request's order
    batch: dict[str, Any] = {}                  # the render batch (a RenderBatch dumped as JSON)

    @functools.cached_property
    def modes(self) -> dict[str, str]:
        """item id -> its mode (one pass over the batch: a job view asks for every item's)."""
        return {it["id"]: it["mode"] for it in self.batch.get("items", [])}

    def mode_of(self, item_id: str) -> str:
        return self.modes.get(item_id, "")


class Lease(BaseModel):
    """ROOT/_leases/<id>.json: which runner holds a job, how alive it is, and how the job ended.
    The one source of truth for a job's end. Its holder rewrites it with a new `beat` at every
    heartbeat, so a claimer judges it stale by its own clock (an unchanged version), never by
    `heartbeat`'s wall time."""

    model_config = ConfigDict(frozen=True, extra="allow")

    runner: str
    heartbeat: float
    state: Literal["running", "finished", "failed", "cancelled"] = "running"
    node: str | None = None
    started: float | None = None
    attempt: int = 0             # how many runners have taken the job, this one included
    beat: int = 0
    released: bool = False       # its runner stopped without ending it: any runner takes it now
    error: str | None = None
    counts: dict[str, int] | None = None

    @property
    def ended(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    def beaten(self, **changes) -> "Lease":
        """This lease at its next heartbeat (a new version), with `changes`."""
        return self.model_copy(update={"heartbeat": time.time(), "beat": self.beat + 1, **changes})


# --------------------------------------------------------------------------------------------
# Object-storage primitives the job store needs: conditional writes (create-if-absent and
# compare-and-swap on the ETag). S3 (and moto, MinIO) honour If-None-Match / If-Match on PUT;
# a local folder uses a lock file (one machine).


class Conflict(Exception):
    """A conditional write lost: the object exists (create) or changed (swap)."""


def read_json_etag(uri: str) -> tuple[Any, str | None]:
    """(object, etag), or (None, None) when absent."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        try:
            got = storage.s3_client().get_object(Bucket=bucket, Key=key)
            data = got["Body"].read()
        except botocore.exceptions.ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise _s3_error(uri, e) from None
        return json.loads(data), got["ETag"]
    try:
        data = storage.read_bytes(uri)
    except storage.NotFoundError:
        return None, None
    return json.loads(data), hashlib.md5(data).hexdigest()


def put_json(uri: str, obj: Any, *, if_match: str | None = None, if_absent: bool = False) -> str:
    """Write JSON; with `if_absent` only when no object is there, with `if_match` only when the
    object still has that etag. Returns the new etag; raises Conflict when the condition fails."""
    data = (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match} if if_match else {}
        args = storage.S3Settings.from_env().put_args("application/json")
        try:
            return storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, **args, **condition)["ETag"]
        except botocore.exceptions.ClientError as e:
            code = _s3_code(e)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or (
                    if_match and code in ("NoSuchKey", "404")):
                landed = _landed(bucket, key, data)
                if landed:  # botocore retried a write that had landed: the condition failed on our own write
                    return landed
                raise Conflict(uri) from None
            raise _s3_error(uri, e) from None
    if not (if_absent or if_match):
        storage.write_bytes(uri, data, "application/json")
        return hashlib.md5(data).hexdigest()
    path = storage.local_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                current = hashlib.md5(f.read()).hexdigest()
        except FileNotFoundError:
            current = None
        if (if_absent and current is not None) or (if_match and current != if_match):
            raise Conflict(uri)
        storage.write_bytes(uri, data, "application/json")  # temp file + rename
    return hashlib.md5(data).hexdigest()


def _landed(bucket: str, key: str, data: bytes) -> str | None:
    """The object's etag if it holds exactly `data`, else None. Every conditional write of ours is
    unique (a lease names its runner and heartbeat count), so equal bytes mean our write landed."""
    try:
        got = storage.s3_client().get_object(Bucket=bucket, Key=key)
        return got["ETag"] if got["Body"].read() == data else None
    except botocore.exceptions.ClientError:
        return None


def _s3_code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _s3_error(uri: str, e: botocore.exceptions.ClientError) -> storage.StorageError:
    return storage.StorageError(f"{uri}: S3 error {_s3_code(e)}")


# --------------------------------------------------------------------------------------------
# The job store: plain functions of storage, shared by the ingress and the runners


def new_job_id() -> str:
    """`20261121T130501Z-3f2a9c1b`: sorts by creation time; unguessable enough to name outputs."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class JobStore:
    """The storage layout of jobs under one output root (see the `vidgen.serving` docstring)."""

    def __init__(self, root: str):
        self.root = root

    def output(self, job_id: str) -> str:
        return storage.join(self.root, job_id)

    def job_uri(self, job_id: str) -> str:
        return storage.join(self.root, "_jobs", f"{job_id}.json")

    def lease_uri(self, job_id: str) -> str:
        return storage.join(self.root, "_jobs", job_id, "lease.json")

    def cancel_uri(self, job_id: str) -> str:
        return storage.join(self.root, "_jobs", job_id, "cancel.json")

    def queue_uri(self, job_id: str) -> str:
        return storage.join(self.root, "_queue", f"{job_id}.json")

    def key_uri(self, key_sha256: str) -> str:
        return storage.join(self.root, "_idempotency", f"{key_sha256}.json")

    def admission_uri(self) -> str:
        return storage.join(self.root, "_admitted.json")

    def admit(self, job_id: str, limit: int, grace_s: float = ADMISSION_GRACE_S) -> int | None:
        """Take one of `limit` places for a job about to be created: None when it is taken, else
        the number of unfinished jobs that fill them. Every ingress replica admits through one
        ledger (`_admitted.json`, swapped on its ETag), so replicas that list the queue at the same
        moment cannot both take its last place. A ledger entry holds its place while the job's
        queue marker exists, or, before the marker is written, for `grace_s` (an ingress that died
        between admitting and creating frees its place then)."""
        return self.admit_many([job_id], limit, grace_s)[0]

    def admit_many(self, job_ids: list[str], limit: int, grace_s: float = ADMISSION_GRACE_S,
                   known: Container[str] = ()) -> list[int | None]:
        """`admit` for several jobs in one swap of the ledger (the requests one replica has waiting),
        in order, each answered as `admit` answers: N requests cost one read, list and write, not N.
        `known`: jobs whose record the caller knows exists (not asked again)."""
        def take(admitted: dict[str, float]):
            queued = set(self.queued())
            now = time.time()
            waiting = [i for i, ts in admitted.items() if i not in queued and now - ts < grace_s]
            # finished, or created since the listing: its marker came before its record
            created = {i for i in waiting if i in known or storage.exists(self.job_uri(i))}
            queued |= {i for i in created if storage.exists(self.queue_uri(i))}
            held = {i: ts for i, ts in admitted.items() if i in queued or (i in waiting and i not in created)}
            filled = len(held.keys() | queued)
            answers, taken = [], False
            for job_id in job_ids:
                if job_id in held or job_id in queued:  # an Idempotency-Key retry of a job that has its place
                    answers.append(None)
                elif filled >= limit:
                    answers.append(filled)
                else:
                    held[job_id], filled, taken = now, filled + 1, True
                    answers.append(None)
            return (held if taken else None), answers

        return self._swap_admissions(take)

    def unadmit(self, job_id: str) -> None:
        """Give back the place `admit` took for a job that will not be created after all."""
        self._swap_admissions(lambda admitted: (
            ({i: ts for i, ts in admitted.items() if i != job_id} if job_id in admitted else None), None))

    def _swap_admissions(self, change: Callable[[dict[str, float]], tuple[dict[str, float] | None, Any]]) -> Any:
        """`change(admitted)` -> (the new ledger, or None to leave it as it is; a result), applied
        by compare-and-swap on the ledger's ETag, again on a fresh read when another replica wrote
        it meanwhile. Returns the result."""
        uri = self.admission_uri()
        for attempt in range(100):
            data, etag = read_json_etag(uri)
            admitted, result = change((data or {}).get("admitted", {}))
            if admitted is None:
                return result
            try:
                put_json(uri, {"admitted": admitted}, if_match=etag, if_absent=etag is None)
                return result
            except Conflict:
                time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
        raise Conflict(uri)

    @staticmethod
    def _ids(uris: list[str]) -> list[str]:
        names = (storage.basename(u) for u in uris)
        return sorted(n[:-5] for n in names if n.endswith(".json") and re.fullmatch(JOB_ID, n[:-5]))

    def create(self, job: Job, orphan_after_s: float = 0.0) -> None:
        """The queue marker, then the job record (once). A runner finds jobs from their markers, so
        every record has one; a crash in between leaves a marker without a job, which runners drop
        once it has stayed so for `stale_s` (`drop_orphan_marker`), and an Idempotency-Key retry
        creates the job again. `orphan_after_s`: the runners' `stale_s`. They see a marker only once
        it is written, so a record that landed sooner than that after it cannot have lost its marker,
        and the marker is not looked for again."""
        marker = {"id": job.id, "created": job.created, "created_ts": job.created_ts}
        started = time.monotonic()
        put_json(self.queue_uri(job.id), marker)
        put_json(self.job_uri(job.id), job.model_dump(mode="json"), if_absent=True)
        # a runner may have taken it for an orphan while the record was slow
        if time.monotonic() - started >= orphan_after_s and not storage.exists(self.queue_uri(job.id)):
            put_json(self.queue_uri(job.id), marker)

    def drop_orphan_marker(self, job_id: str) -> bool:
        """Remove the queue marker of a job that has no record (its ingress died between the two
        writes; the caller decides when that is); True if it was removed, False if the record came."""
        if self.read(job_id) is not None:
            return False
        self.finish(job_id)
        if self.read(job_id) is not None:  # the record landed meanwhile: put its marker back
            put_json(self.queue_uri(job_id), {"id": job_id, "restored": _now_iso()})
            return False
        return True

    def read(self, job_id: str) -> Job | None:
        try:
            return Job.model_validate(storage.read_json(self.job_uri(job_id)))
        except storage.NotFoundError:
            return None

    def queued(self) -> list[str]:
        """Unfinished jobs, oldest first."""
        return self._ids(storage.list_prefix(storage.join(self.root, "_queue"), recursive=False))

    def jobs(self) -> list[str]:
        """Every job, oldest first."""
        return self._ids(storage.list_prefix(storage.join(self.root, "_jobs"), recursive=False))

    def lease(self, job_id: str) -> tuple[Lease | None, str | None]:
        data, etag = read_json_etag(self.lease_uri(job_id))
        return (None if data is None else Lease.model_validate(data)), etag

    def swap_lease(self, job_id: str, lease: Lease, etag: str | None) -> str:
        """Write the lease if it is still at `etag` (None: if there is none yet); Conflict otherwise."""
        return put_json(self.lease_uri(job_id), lease.model_dump(mode="json"), if_match=etag, if_absent=etag is None)

    def cancel(self, job_id: str) -> None:
        put_json(self.cancel_uri(job_id), {"cancelled": _now_iso()})

    def cancelled(self, job_id: str) -> bool:
        return storage.exists(self.cancel_uri(job_id))

    def finish(self, job_id: str) -> None:
        storage.delete(self.queue_uri(job_id))

    def record_uris(self, job_id: str) -> set[str]:
        return set(storage.list_prefix(storage.join(self.output(job_id), "items"), recursive=False))


def job_status(lease: Lease | None, cancelled: bool) -> str:
    """A job's status from its lease and its cancel mark. The lease is the one source of truth for
    the end: a runner marks a job finished after every record, the manifest and the gallery."""
    state = lease.state if lease else None
    if state == "finished":
        return "failed" if (lease.counts or {}).get("failed") else "done"
    if state in ("failed", "cancelled"):
        return state
    if cancelled:
        return "cancelled"  # its runner stops starting items; the ones under way finish
    return "running" if state == "running" else "queued"


# --------------------------------------------------------------------------------------------
# Threads for storage calls, shared by the ingress and the runners


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    # Storage calls are blocking (boto3); each replica gives them its own threads.
    return concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="vidgen-io")


async def _io(pool, fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))
