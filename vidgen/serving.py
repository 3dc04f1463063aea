"""Rendering endpoints on Ray Serve: an HTTP API that renders batches of videos into object storage.

    vidgen serve --model g=s3://bucket/models/g --output-root s3://bucket/renders   # on 127.0.0.1:8000
    serve run serve/config.yaml                                                  # Ray's own CLI, the same app
    VIDGEN_API_TOKEN=... vidgen serve serve/config.yaml --host 0.0.0.0 --port 8000

    curl -H "Authorization: Bearer $VIDGEN_API_TOKEN" -H 'Content-Type: application/json' \\
         -d '{"name": "spring", "model": "g", "items": [{"id": "ad-01", "mode": "generate", "seed": 7}]}' \\
         http://127.0.0.1:8000/v1/renders                        # 202 {"id": ..., "status_url": ...}

One Serve application; every replica asks for a fraction of a CPU (the whole app fits 2 cores):

    HTTP ─► Ingress (FastAPI)        validates a request against the render spec and the service's
                                     limits, writes the job record and a queue marker, pokes a runner;
                                     answers status from object storage (any replica, at any time)
            JobRunner                claims queued jobs with a lease in storage (compare-and-swap,
                                     heartbeat), plans them with the render engine (records already
                                     there are kept), sends each item to its model, hands the frames to
                                     an encode task; takes over jobs whose runner died (stale heartbeat)
            ModelServer (per model)  one model load per replica (a GPU when the config asks);
                                     @serve.batch groups compatible items across jobs; frames go to the
                                     object store; autoscaled on ongoing requests
            encode tasks (Ray, CPU)  frames -> ffmpeg -> upload -> the item's record (engine.encode_item)

Job state lives in object storage under the output root ROOT, so any ingress replica answers for
any job and a restarted replica loses nothing:

    ROOT/<job>/...                   the render's outputs: <item>.mp4, <item>.jpg, items/<item>.json,
                                     then manifest.jsonl and index.html
    ROOT/_jobs/<job>.json            the job record: the validated batch, created, request id (written once)
    ROOT/_jobs/<job>/lease.json      the runner's lease: runner, heartbeat, state, attempt (compare-and-swap)
    ROOT/_jobs/<job>/cancel.json     DELETE's mark
    ROOT/_queue/<job>.json           the job is unfinished (written before the job record); its runner
                                     removes it at the end
    ROOT/_idempotency/<sha256>.json  an Idempotency-Key (hashed) -> the job it created

A job's status: `queued` (no runner yet), `running`, `done` (every item ok), `failed` (every item
finished and some failed, or the job itself could not run), `cancelled`.
"""

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import math
import json
import logging
import os
import re
import secrets
import signal
import time
import uuid
from dataclasses import dataclass
from collections import OrderedDict
from typing import Any

import botocore.exceptions
import yaml
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve

from vidgen import __version__, storage
from vidgen.errors import InputError
from vidgen.render.spec import (
    INPUT_MODES,
    MAX_FPS,
    MAX_ITEMS,
    MAX_SECONDS,
    MAX_SIDE,
    MODE_FAMILIES,
    Defaults,
    RenderBatch,
    RenderItem,
    ResolvedItem,
    SpecError,
    parse_batch,
)

logger = logging.getLogger("ray.serve")  # Serve adds the request id to each line logged in a request

TOKEN_ENV = "VIDGEN_API_TOKEN"
APP_NAME = "vidgen"
JOB_FORMAT = "vidgen-serve-job/1"
MODEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
JOB_ID = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"
MAX_BODY_BYTES = 2 * 1024 * 1024  # a request body; MAX_ITEMS items with long titles fit
TERMINAL = ("done", "failed", "cancelled")


# --------------------------------------------------------------------------------------------
# Settings: the application builder's args (serve/config.yaml), one home for each default


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Settings):
    """Serve's autoscaling_config of a deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ModelDeployment(_Settings):
    """How each model's deployment runs; `models` entries may override any of these per model."""

    num_cpus: float = Field(0.2, gt=0)
    num_gpus: float = Field(0.0, ge=0)  # > 0: the replica holds (a share of) a GPU and loads the model on it
    max_batch_size: int = Field(8, ge=1)  # items per @serve.batch call
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)  # >= max_batch_size: a batch fills while one runs
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)


class IngressDeployment(_Settings):
    num_cpus: float = Field(0.1, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=1)  # beyond ongoing + queued, Serve answers 503 at once
    autoscaling: Autoscaling = Field(default_factory=lambda: Autoscaling(target_ongoing_requests=16))


class RunnerDeployment(_Settings):
    num_replicas: int = Field(1, ge=1)
    max_replicas_per_node: int | None = Field(None, ge=1)  # 1: one runner per node, so losing a node leaves others
    num_cpus: float = Field(0.1, gt=0)
    max_jobs: int = Field(16, ge=1)  # jobs one replica runs at once (they mostly wait on models and encoders)
    max_items_in_flight: int = Field(16, ge=1)  # items one replica has at models and encoders at once
    item_attempts: int = Field(3, ge=1)  # tries per item when a model replica or an encoder dies
    job_attempts: int = Field(5, ge=1)  # runners that may take a job before it is failed
    heartbeat_s: float = Field(5.0, gt=0)
    stale_s: float = Field(30.0, gt=0)  # a lease unchanged this long (by the claimer's own clock) is taken over
    poll_s: float = Field(2.0, gt=0)  # how often an idle runner looks for queued or orphaned jobs
    encode_cpus: float = Field(0.5, gt=0)  # logical CPUs of one encode task

    @model_validator(mode="after")
    def _stale(self) -> "RunnerDeployment":
        if self.stale_s < 2 * self.heartbeat_s:
            raise ValueError(f"stale_s {self.stale_s} must be at least twice heartbeat_s {self.heartbeat_s}")
        return self


class Limits(_Settings):
    """Per request; a request beyond them is answered 422 naming the field."""

    max_items: int = Field(64, ge=1, le=MAX_ITEMS)
    max_seconds: float = Field(60.0, gt=0, le=MAX_SECONDS)  # per item (restore/stylize: checked on the input)
    max_fps: float = Field(60.0, gt=0, le=MAX_FPS)
    max_side: int = Field(1920, ge=16, le=MAX_SIDE)  # pixels a side of any output (and of an input)
    max_frames: int = Field(20_000, ge=1)  # frames over all outputs of a request
    max_pixels: int = Field(10_000_000_000, ge=1)  # frames x width x height over all outputs of a request
    max_input_bytes: int = Field(2 << 30, ge=1)  # an input video's size, checked before it is read
    max_queued_jobs: int = Field(100, ge=1)  # unfinished jobs; beyond it POST answers 429


class ServiceSettings(_Settings):
    """The whole service. `models` maps the names clients use to model URIs (or to {uri, ...overrides
    of `model`}); outputs go under `output_root`; inputs are read only under `input_roots`."""

    models: dict[str, str | dict[str, Any]] = Field(default_factory=dict)
    output_root: str = "vidgen-renders"
    input_roots: list[str] = Field(default_factory=list)
    url_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600)  # presigned URLs (the S3 maximum is 7 days)
    limits: Limits = Field(default_factory=Limits)
    ingress: IngressDeployment = Field(default_factory=IngressDeployment)
    runner: RunnerDeployment = Field(default_factory=RunnerDeployment)
    model: ModelDeployment = Field(default_factory=ModelDeployment)

    @field_validator("models")
    @classmethod
    def _models(cls, models: dict) -> dict:
        out = {}
        for name, entry in models.items():
            if not re.fullmatch(MODEL_NAME, name):
                raise ValueError(f"model name {name!r}: expected lower-case letters, digits, '_' or '-'")
            if isinstance(entry, str):
                entry = {"uri": entry}
            entry = dict(entry)
            if not isinstance(entry.get("uri"), str):
                raise ValueError(f"models.{name}: expected a URI, or a mapping with uri and deployment overrides")
            entry["uri"] = _normalize(entry["uri"], f"models.{name}")
            ModelDeployment.model_validate({k: v for k, v in entry.items() if k != "uri"})  # names a bad key
            out[name] = entry
        return out

    @field_validator("output_root")
    @classmethod
    def _output_root(cls, v: str) -> str:
        return _normalize(v, "output_root").rstrip("/")

    @field_validator("input_roots")
    @classmethod
    def _input_roots(cls, roots: list[str]) -> list[str]:
        return [_normalize(r, "input_roots").rstrip("/") for r in roots]

    def model_uri(self, name: str) -> str:
        return self.models[name]["uri"]

    def deployment_of(self, name: str) -> ModelDeployment:
        """The model's deployment settings: `model`, with the model's own overrides."""
        overrides = {k: v for k, v in self.models[name].items() if k != "uri"}
        merged = self.model.model_dump()
        if "autoscaling" in overrides:
            merged["autoscaling"] = {**merged["autoscaling"], **overrides.pop("autoscaling")}
        return ModelDeployment.model_validate({**merged, **overrides})


def _normalize(uri: str, where: str) -> str:
    try:
        return storage.normalize(uri)
    except storage.StorageError as e:
        raise ValueError(f"{where}: {e}") from None


def input_limits(info, item, scale: int, lim: Limits) -> list[str]:
    """What an input video (`media.VideoInfo`) makes a restore or stylize item render, against the
    service's limits: one message per limit it passes. Its length (up to the item's `seconds`), its
    rate (unless the item sets `fps`) and the model's output size (the input's times `scale`)."""
    problems = []
    if item.seconds is None and info.seconds > lim.max_seconds:
        problems.append(f"{info.seconds:g} s long; this service renders at most {lim.max_seconds:g} s an item")
    if item.fps is None and info.fps > lim.max_fps:
        problems.append(f"{info.fps:g} fps; this service renders at most {lim.max_fps:g} fps")
    w, h = info.width * scale, info.height * scale
    if max(w, h) > lim.max_side:
        made = f" (x{scale}: {w}x{h})" if scale != 1 else ""
        problems.append(f"{info.width}x{info.height}{made}; this service renders at most {lim.max_side} pixels a side")
    return problems


def readable(uri: str, roots: list[str]) -> bool:
    """`uri` lies under one of `roots`, with no `.`/`..` segment (some S3-compatible servers fold
    them). Local paths are compared after resolving links on both sides, so a symlinked root works
    and a link out of a root does not."""
    if any(seg in (".", "..") for seg in re.split(r"[/\\]", uri.split("://", 1)[-1])):
        return False
    if storage.is_s3(uri):
        return any(storage.is_s3(root) and uri.startswith(root + "/") for root in roots)
    real = os.path.realpath(uri)
    return any(not storage.is_s3(root) and real.startswith(os.path.realpath(root) + os.sep) for root in roots)


def load_settings(args: dict[str, Any] | ServiceSettings | None) -> ServiceSettings:
    """ServiceSettings from the builder's args; a ValueError names the bad key."""
    if isinstance(args, ServiceSettings):
        return args
    try:
        return ServiceSettings.model_validate(args or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "args"
        msg = re.sub(r"^Value error, ", "", err["msg"])
        raise InputError(f"vidgen service settings: {where}: {msg}") from None


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
    """The storage layout of jobs under one output root (see the module docstring)."""

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

    @staticmethod
    def _ids(uris: list[str]) -> list[str]:
        names = (storage.basename(u) for u in uris)
        return sorted(n[:-5] for n in names if n.endswith(".json") and re.fullmatch(JOB_ID, n[:-5]))

    def create(self, job: dict) -> None:
        """The queue marker, then the job record (once). A runner finds jobs from their markers, so
        every record has one; a crash in between leaves a marker without a job, which runners drop
        once it has stayed so for `stale_s` (`drop_orphan_marker`), and an Idempotency-Key retry
        creates the job again."""
        marker = {"id": job["id"], "created": job["created"], "created_ts": job["created_ts"]}
        put_json(self.queue_uri(job["id"]), marker)
        put_json(self.job_uri(job["id"]), job, if_absent=True)
        if not storage.exists(self.queue_uri(job["id"])):  # a runner took it for an orphan while the record was slow
            put_json(self.queue_uri(job["id"]), marker)

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

    def read(self, job_id: str) -> dict | None:
        try:
            return storage.read_json(self.job_uri(job_id))
        except storage.NotFoundError:
            return None

    def queued(self) -> list[str]:
        """Unfinished jobs, oldest first."""
        return self._ids(storage.list_prefix(storage.join(self.root, "_queue"), recursive=False))

    def jobs(self) -> list[str]:
        """Every job, oldest first."""
        return self._ids(storage.list_prefix(storage.join(self.root, "_jobs"), recursive=False))

    def lease(self, job_id: str) -> tuple[dict | None, str | None]:
        return read_json_etag(self.lease_uri(job_id))

    def swap_lease(self, job_id: str, lease: dict, etag: str | None) -> str:
        """Write the lease if it is still at `etag` (None: if there is none yet); Conflict otherwise."""
        return put_json(self.lease_uri(job_id), lease, if_match=etag, if_absent=etag is None)

    def cancel(self, job_id: str) -> None:
        put_json(self.cancel_uri(job_id), {"cancelled": _now_iso()})

    def cancelled(self, job_id: str) -> bool:
        return storage.exists(self.cancel_uri(job_id))

    def finish(self, job_id: str) -> None:
        storage.delete(self.queue_uri(job_id))

    def record_uris(self, job_id: str) -> set[str]:
        return set(storage.list_prefix(storage.join(self.output(job_id), "items"), recursive=False))


def job_status(lease: dict | None, cancelled: bool) -> str:
    """A job's status from its lease and its cancel mark. The lease is the one source of truth for
    the end: a runner marks a job finished after every record, the manifest and the gallery."""
    state = (lease or {}).get("state")
    if state == "finished":
        return "failed" if (lease.get("counts") or {}).get("failed") else "done"
    if state in ("failed", "cancelled"):
        return state
    if cancelled:
        return "cancelled"  # its runner stops starting items; the ones under way finish
    return "running" if state == "running" else "queued"


# --------------------------------------------------------------------------------------------
# The request: a render batch in which clients choose no URIs to write and name models by name


class RequestItem(RenderItem):
    """An item as a client sends it: `model` is one of the service's model names."""

    model: str | None = Field(None, pattern=MODEL_NAME, description="a model name of this service")


class RenderRequest(BaseModel):
    """POST /v1/renders: a render batch without `output` (the service chooses where outputs go) and
    without `items_from`; `model` names one of the service's models; input, logo, audio and
    subtitles URIs must lie under the service's input roots."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [{
        "name": "spring-ads", "model": "g", "defaults": {"fps": 24, "seconds": 2, "size": [256, 256]},
        "items": [{"id": "ad-01", "mode": "generate", "seed": 7, "title": "Spring sale -20%"},
                  {"id": "ad-02", "mode": "generate", "seed": 8}]}]})

    name: str = Field("render", min_length=1, max_length=200)
    model: str | None = Field(None, pattern=MODEL_NAME, description="default model name of the items")
    defaults: Defaults = Field(default_factory=Defaults)
    items: list[RequestItem] = Field(min_length=1, max_length=MAX_ITEMS)

    @model_validator(mode="after")
    def _unique(self) -> "RenderRequest":
        ids = [item.id for item in self.items]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"items: ids must be unique; {', '.join(map(repr, dupes))} appear more than once")
        return self


class Accepted(BaseModel):
    id: str
    status: str
    status_url: str


class Output(BaseModel):
    name: str | None = None
    url: str
    poster_url: str | None
    uri: str
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None


class ItemResult(BaseModel):
    id: str
    status: str  # ok | error | pending
    mode: str
    url: str | None = None  # presigned (S3) or file:// (a local output root)
    poster_url: str | None = None
    uri: str | None = None
    bytes: int | None = None
    frames: int | None = None
    seconds: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    renditions: list[Output] = Field(default_factory=list)
    compare: Output | None = None
    error: str | None = None


class JobView(BaseModel):
    id: str
    name: str
    status: str  # queued | running | done | failed | cancelled
    created: str
    status_url: str
    counts: dict[str, int]
    error: str | None = None
    attempt: int | None = None  # how many runners have taken the job (> 1: it was resumed)
    heartbeat_age_s: float | None = None
    output: str | None = None
    gallery_url: str | None = None
    urls_expire_at: str | None = None
    items: list[ItemResult] | None = None


class JobList(BaseModel):
    jobs: list[JobView]


def _field(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's `detail` list (loc names the field) and a one-line `message`."""
    errors = []
    for err in exc.errors():
        err = dict(err)
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "extra_forbidden" and loc in (("body", "output"), ("body", "items_from")):
            err["msg"] = (f"{loc[1]}: not accepted; the service chooses where it writes and reads "
                          f"(its output root and input roots)")
        errors.append(err)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":  # loc: ("body", character offset)
        loc = ("body",)
    message = f"{_field(loc[1:] if loc[:1] == ('body',) else loc)}: {re.sub(r'^Value error, ', '', first['msg'])}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return JSONResponse({"detail": jsonable_encoder(errors, custom_encoder={Exception: str}), "message": message},
                        status_code=422)


def _invalid(loc: tuple, msg: str, value: Any = None) -> dict:
    return {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}


PUBLIC_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


class _Guard:
    """ASGI middleware before any parsing: bearer-token auth on every path but PUBLIC_PATHS, and a
    bound on the body size."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path not in PUBLIC_PATHS:  # every other path needs the token, known routes or not
            ingress = serve.get_replica_context().servable_object
            problem = ingress.authorization_problem(headers.get(b"authorization"))
            if problem:
                response = JSONResponse({"detail": problem}, 401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, 413)
            return await response(scope, receive, send)
        received = 0

        async def bounded():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
            return message

        return await self.app(scope, bounded, send)


bearer = HTTPBearer(auto_error=False, description=f"Authorization: Bearer <{TOKEN_ENV}>")
api = FastAPI(
    title="vidgen render API",
    version=__version__,
    description="Render batches of generated or restored videos into object storage. "
                "Every route but /healthz and the docs (/docs, /redoc, /openapi.json) needs "
                "`Authorization: Bearer <token>`.",
)
api.add_middleware(_Guard)
api.add_exception_handler(RequestValidationError, _validation_error)


# --------------------------------------------------------------------------------------------
# Deployments


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    # Storage calls are blocking (boto3); each replica gives them its own threads.
    return concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="vidgen-io")


async def _io(pool, fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxies listen on, from the Serve controller (None if unknown)."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception:  # noqa: BLE001 - unknown: treated as reachable from outside
        return None


def _request_id(request: Request) -> str:
    try:
        return serve.context._get_serve_request_context().request_id or request.headers.get("x-request-id", "")
    except Exception:  # noqa: BLE001 - the id only labels logs and the job record
        return request.headers.get("x-request-id", "")


class _Ingress:
    """The HTTP API. Stateless: every answer comes from object storage."""

    def __init__(self, settings: ServiceSettings, token_sha256: str | None, runner):
        self.settings = settings
        self.store = JobStore(settings.output_root)
        self.token_sha256 = token_sha256
        self.runner = runner
        self.pool = _executor()
        self.admit = asyncio.Lock()  # admission (count + create) is one step per replica
        self.manifests: dict[str, tuple[float, dict | None]] = {}
        self.jobs: OrderedDict[str, dict] = OrderedDict()  # job records (written once)
        self.records: OrderedDict[tuple[str, str], dict] = OrderedDict()  # final item records
        self.background: set[asyncio.Task] = set()
        if token_sha256 is None:
            host = _proxy_host()
            if host is None or not _is_loopback(host):
                raise RuntimeError(f"refusing to serve on host {host or '(unknown)'} without a token: set {TOKEN_ENV} "
                                   f"(or bind to 127.0.0.1)")
            logger.warning(f"{TOKEN_ENV} is not set: the API takes requests without a token (loopback only)")

    # ---- auth (called by _Guard)

    def authorization_problem(self, header: bytes | None) -> str | None:
        if self.token_sha256 is None:
            return None
        if not header:
            return "missing bearer token (Authorization: Bearer <token>)"
        scheme, _, token = header.partition(b" ")
        presented = hashlib.sha256(token.strip()).hexdigest()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented, self.token_sha256):
            return "invalid bearer token"
        return None

    # ---- routes

    @api.get("/healthz", summary="liveness and the served model names (no auth)")
    async def healthz(self) -> dict:
        return {"status": "ok", "version": __version__, "models": sorted(self.settings.models)}

    @api.post("/v1/renders", status_code=202, response_model=Accepted, dependencies=[Depends(bearer)],
              summary="submit a render batch",
              responses={409: {"description": "Idempotency-Key reused with another request"},
                         422: {"description": "invalid request; `detail[].loc` names the field"},
                         429: {"description": "too many unfinished jobs; retry after Retry-After"},
                         503: {"description": "overloaded (Serve's queue bound)"}})
    async def submit(self, request: Request, body: RenderRequest,
                     idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=255)):
        rid = _request_id(request)
        manifests = await self._manifests({body.model, *(item.model for item in body.items)} - {None})
        errors = self._check(body, manifests)
        if not errors:  # inputs are probed only for an otherwise valid request
            errors = self._check(body, manifests, await _io(self.pool, self._input_facts, body))
        if errors:
            raise RequestValidationError(errors)
        batch = self._batch(body, new_job_id(), manifests)  # whole-spec rules (labels, crf), before any write
        request_sha = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        key_sha = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
        async with self.admit:
            found = await _io(self.pool, self._replay, key_sha, request_sha) if key_sha else None
            if found and found[1]:
                logger.info(f"POST /v1/renders: Idempotency-Key replay of job {found[0]} (request {rid})")
                return self._accepted(found[0], "replayed")
            queued = await _io(self.pool, self.store.queued)
            if len(queued) >= self.settings.limits.max_queued_jobs:
                return JSONResponse({"detail": f"{len(queued)} unfinished jobs; this service queues at most "
                                               f"{self.settings.limits.max_queued_jobs}"},
                                    429, headers={"Retry-After": str(max(1, round(self.settings.runner.poll_s)))})
            if found:  # the key's job never got its record (its ingress died in between): create it now
                batch = self._batch(body, found[0], manifests)
            job_id = storage.basename(batch.output)
            if key_sha and not found:
                try:
                    await _io(self.pool, put_json, self.store.key_uri(key_sha), {"job": job_id}, if_absent=True)
                except Conflict:  # another ingress replica took this key a moment ago
                    return await self._replayed_or_busy(key_sha, request_sha)
            job = {"format": JOB_FORMAT, "id": job_id, "name": body.name, "created": _now_iso(),
                   "created_ts": time.time(), "request_id": rid, "request_sha256": request_sha,
                   "idempotency_key_sha256": key_sha, "items": [item.id for item in body.items],
                   "batch": batch.model_dump(mode="json")}
            try:
                await _io(self.pool, self.store.create, job)
            except Conflict:  # the key's job was being created by another replica
                return await self._replayed_or_busy(key_sha, request_sha)
        logger.info(f"POST /v1/renders: job {job_id} queued, {len(body.items)} items (request {rid})")
        self._poke()
        return self._accepted(job_id, "queued")

    @api.get("/v1/renders", response_model=JobList, dependencies=[Depends(bearer)],
             summary="recent jobs, newest first")
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100)) -> dict:
        ids = (await _io(self.pool, self.store.jobs))[::-1][:limit]
        views = await asyncio.gather(*(self._view(job_id, detail=False) for job_id in ids))
        return {"jobs": [v for v in views if v is not None]}

    @api.get("/v1/renders/{job_id}", response_model=JobView, response_model_exclude_none=False,
             dependencies=[Depends(bearer)], summary="status and per-item results with URLs")
    async def get_job(self, job_id: str = Path(max_length=64)) -> dict:
        view = await self._view(job_id, detail=True)
        if view is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return view

    @api.delete("/v1/renders/{job_id}", status_code=202, response_model=Accepted, dependencies=[Depends(bearer)],
                summary="cancel a job (items already rendered stay)",
                responses={409: {"description": "the job has already finished"}})
    async def cancel(self, request: Request, job_id: str = Path(max_length=64)):
        view = await self._view(job_id, detail=False)
        if view is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if view["status"] in ("done", "failed"):
            return JSONResponse({"detail": f"job {job_id} has already finished ({view['status']})"}, 409)
        await _io(self.pool, self.store.cancel, job_id)
        await _io(self.pool, self._cancel_unclaimed, job_id)
        logger.info(f"DELETE /v1/renders/{job_id}: cancelled (request {_request_id(request)})")
        return self._accepted(job_id, "cancelled")

    # ---- helpers

    def _accepted(self, job_id: str, status: str) -> dict:
        return {"id": job_id, "status": status, "status_url": f"/v1/renders/{job_id}"}

    def _poke(self) -> None:
        """Wake a runner now (runners also poll): fire and forget."""
        async def poke():
            try:
                await asyncio.wait_for(self.runner.poke.remote(), timeout=30)
            except Exception as e:  # noqa: BLE001 - the runners' own polling covers it
                logger.warning(f"could not poke a runner ({type(e).__name__}); it will find the job by polling")

        task = asyncio.get_running_loop().create_task(poke())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _replay(self, key_sha: str, request_sha: str) -> tuple[str, bool] | None:
        """(job id, whether its record exists) of the job an Idempotency-Key made; None for a new key.
        A key used with another request body is a 409."""
        try:
            job_id = storage.read_json(self.store.key_uri(key_sha))["job"]
        except storage.NotFoundError:
            return None
        job = self.store.read(job_id)
        if job is not None and job.get("request_sha256") != request_sha:
            raise HTTPException(409, "Idempotency-Key was used with a different request")
        return job_id, job is not None

    async def _replayed_or_busy(self, key_sha: str | None, request_sha: str):
        found = await _io(self.pool, self._replay, key_sha, request_sha) if key_sha else None
        if found and found[1]:
            return self._accepted(found[0], "replayed")
        return JSONResponse({"detail": "a request with this Idempotency-Key is being created; retry"}, 409)

    def _cancel_unclaimed(self, job_id: str) -> None:
        """A queued job no runner holds: end it here (a runner that claims it first sees the mark)."""
        try:
            self.store.swap_lease(job_id, {"state": "cancelled", "runner": "ingress", "heartbeat": time.time(),
                                           "attempt": 0, "error": None, "counts": None}, None)
        except Conflict:
            return
        self.store.finish(job_id)

    def _batch(self, body: RenderRequest, job_id: str, manifests: dict[str, dict | None]) -> RenderBatch:
        """The render batch of a request: model names -> URIs, output under the root; resolved once
        against the models' manifests (labels by name, crf per codec), a SpecError becoming a 422."""
        items = []
        for item in body.items:
            data = item.model_dump(mode="json", exclude_unset=True)
            data["model"] = self.settings.model_uri(item.model or body.model)
            items.append(data)
        data = {"name": body.name, "output": self.store.output(job_id),
                "defaults": body.defaults.model_dump(mode="json", exclude_unset=True), "items": items}
        try:
            batch = parse_batch(data, source="request")
            batch.resolve({self.settings.model_uri(name): m for name, m in manifests.items()})
        except SpecError as e:
            message = str(e).removeprefix("request: ")
            m = re.match(r"^items\[(\d+)\] \([^)]*\)\.(\w+): (.*)$", message)
            loc, msg = ((("items", int(m[1]), m[2]), m[3]) if m else (("items",), message))
            raise RequestValidationError([_invalid(loc, msg)]) from None
        return batch

    async def _manifests(self, names: set[str]) -> dict[str, dict | None]:
        """model.json of each named model (None when unreadable), cached for 30 s."""
        from vidgen import models

        out = {}
        for name in names:
            if name not in self.settings.models:
                continue
            at, manifest = self.manifests.get(name, (0.0, None))
            if time.monotonic() - at > 30:
                try:
                    manifest = await _io(self.pool, models.read_manifest, self.settings.model_uri(name))
                except Exception as e:  # noqa: BLE001 - checked again when it renders
                    logger.warning(f"model {name}: cannot read its manifest ({e})")
                    manifest = None
                self.manifests[name] = (time.monotonic(), manifest)
            out[name] = manifest
        return out

    def _readable(self, uri: str) -> bool:
        return readable(uri, self.settings.input_roots)

    def _input_facts(self, body: RenderRequest) -> dict:
        """Each readable input video -> its probed facts, or why it cannot count (too large to read,
        not a video): what restore and stylize items render is the input's length, rate and size."""
        from vidgen import media

        limit = self.settings.limits.max_input_bytes
        def probe(uri: str):
            try:
                size = storage.size(uri)
                if size > limit:
                    return f"{size} bytes; this service reads inputs of at most {limit} bytes"
                return media.probe(uri)
            except (storage.StorageError, media.MediaError) as e:
                return str(e)

        uris = sorted({item.input for item in body.items if item.input and self._readable(item.input)})
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            return dict(zip(uris, pool.map(probe, uris), strict=True))

    def _check(self, body: RenderRequest, manifests: dict[str, dict | None],
               inputs: dict | None = None) -> list[dict]:
        """The service's rules beyond the spec's: model names, readable inputs, per-request limits
        (restore and stylize items counted from their inputs' probed facts, `inputs`)."""
        s, lim = self.settings, self.settings.limits
        errors: list[dict] = []
        served = ", ".join(sorted(s.models)) or "none (the service has no models configured)"
        if body.model is not None and body.model not in s.models:
            errors.append(_invalid(("model",), f"unknown model {body.model!r}; this service serves {served}",
                                   body.model))
        if len(body.items) > lim.max_items:
            errors.append(_invalid(("items",), f"{len(body.items)} items; this service renders at most "
                                               f"{lim.max_items} per request"))
        for field in ("logo", "audio"):
            value = getattr(body.defaults, field)
            if value is not None and not self._readable(value):
                errors.append(_invalid(("defaults", field), self._unreadable(value), value))
        frames_total = pixels_total = 0
        for i, item in enumerate(body.items):
            where = ("items", i)
            name = item.model or body.model
            if name is None:
                errors.append(_invalid((*where, "model"), "the item names no model and the request has no "
                                                          "default model"))
            elif item.model is not None and item.model not in s.models:
                errors.append(_invalid((*where, "model"), f"unknown model {item.model!r}; this service serves {served}",
                                       item.model))
            for field in ("input", "logo", "audio", "subtitles"):
                value = getattr(item, field)
                if value is not None and not self._readable(value):
                    errors.append(_invalid((*where, field), self._unreadable(value), value))
            manifest = manifests.get(name) if name else None
            if manifest and manifest.get("family") not in MODE_FAMILIES[item.mode]:
                need = " or ".join(MODE_FAMILIES[item.mode])
                errors.append(_invalid((*where, "mode"), f"model {name} is a {manifest.get('family')} model; mode "
                                                         f"{item.mode} needs a {need} model", item.mode))
            timed = item.mode in ("generate", "predict")
            seconds = item.seconds if item.seconds is not None else (body.defaults.seconds if timed else None)
            fps = item.fps if item.fps is not None else (body.defaults.fps if timed else None)
            input_size = None
            info = (inputs or {}).get(item.input)
            if isinstance(info, str):
                errors.append(_invalid((*where, "input"), info, item.input))
            elif info is not None and not timed:  # restore / stylize: what renders is the input's length, rate, size
                scale = int((manifest or {}).get("config", {}).get("scale", 1)) if item.mode == "restore" else 1
                errors += [_invalid((*where, "input"), p, item.input) for p in input_limits(info, item, scale, lim)]
                seconds = min(seconds, info.seconds) if seconds is not None else info.seconds
                fps = fps if fps is not None else info.fps
                input_size = (info.width * scale, info.height * scale)
            if seconds is not None and seconds > lim.max_seconds and (timed or item.seconds is not None):
                loc = (*where, "seconds") if item.seconds is not None else ("defaults", "seconds")
                errors.append(_invalid(loc, f"{seconds:g} s; this service renders at most {lim.max_seconds:g} s "
                                            f"an item", seconds))
            if fps is not None and fps > lim.max_fps and (timed or item.fps is not None):
                loc = (*where, "fps") if item.fps is not None else ("defaults", "fps")
                errors.append(_invalid(loc, f"{fps:g} fps; this service renders at most {lim.max_fps:g} fps", fps))
            size = item.size or body.defaults.size
            sizes = [((*where, "size") if item.size else ("defaults", "size"), size)]
            sizes += [((*where, "renditions", j, "size"), r.size) for j, r in enumerate(item.renditions)]
            for loc, wh in sizes:
                if wh is not None and max(wh) > lim.max_side:
                    errors.append(_invalid(loc, f"{wh[0]}x{wh[1]}; this service renders at most {lim.max_side} "
                                                f"pixels a side", list(wh)))
            if seconds is not None and fps is not None:
                frames = max(1, round(seconds * fps))
                native = (manifest or {}).get("config", {}).get("frame_size") if item.mode == "generate" else None
                main = size or input_size or ((native, native) if native else None)
                outputs = [main, *(r.size for r in item.renditions)]
                if item.compare and main:
                    outputs.append((2 * main[0], main[1]))
                frames_total += frames * len(outputs)
                pixels_total += frames * sum(w * h for w, h in (o for o in outputs if o))
        if frames_total > lim.max_frames:
            errors.append(_invalid(("items",), f"{frames_total} frames over all outputs; this service renders at "
                                               f"most {lim.max_frames} a request"))
        if pixels_total > lim.max_pixels:
            errors.append(_invalid(("items",), f"{pixels_total} pixels over all frames; this service renders at "
                                               f"most {lim.max_pixels} a request"))
        return errors

    def _unreadable(self, uri: str) -> str:
        if not self.settings.input_roots:
            return "this service reads no inputs (it has no input roots)"
        return f"not under this service's input roots ({', '.join(self.settings.input_roots)})"

    async def _view(self, job_id: str, detail: bool) -> dict | None:
        if not re.fullmatch(JOB_ID, job_id):
            return None
        job = self.jobs.get(job_id) or await _io(self.pool, self.store.read, job_id)
        if job is None:
            return None
        self.jobs[job_id] = job  # job records never change
        while len(self.jobs) > 10_000:
            self.jobs.popitem(last=False)
        (lease, _), cancelled, present = await asyncio.gather(
            _io(self.pool, self.store.lease, job_id), _io(self.pool, self.store.cancelled, job_id),
            _io(self.pool, self.store.record_uris, job_id))
        out = self.store.output(job_id)
        uris = {item_id: _record_uri(out, item_id) for item_id in job["items"]}
        finished = [i for i, u in uris.items() if u in present]
        beat = (lease or {}).get("heartbeat")
        view = {"id": job_id, "name": job["name"], "created": job["created"], "status_url": f"/v1/renders/{job_id}",
                "error": (lease or {}).get("error"), "attempt": (lease or {}).get("attempt"),
                "heartbeat_age_s": round(time.time() - beat, 1) if beat else None}
        status = job_status(lease, cancelled)
        if not detail:
            counts = (lease or {}).get("counts") or {"items": len(uris), "finished": len(finished)}
            return {**view, "status": status, "counts": counts}
        fetched = await asyncio.gather(*(self._record(job_id, uris[i], status in TERMINAL) for i in finished))
        records = dict(zip(finished, fetched, strict=True))
        failed = sum(1 for r in records.values() if r is None or r.get("status") != "ok")
        expiry = self.settings.url_expiry_s
        items = [self._item(item_id, job, records.get(item_id)) for item_id in job["items"]]
        finished_state = (lease or {}).get("state") == "finished"
        return {**view, "status": status, "output": out,
                "counts": {"items": len(uris), "ok": len(finished) - failed, "failed": failed,
                           "pending": len(uris) - len(finished)},
                "gallery_url": _url(storage.join(out, "index.html"), expiry) if finished_state else None,
                "urls_expire_at": (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expiry)).isoformat(
                    timespec="seconds") if storage.is_s3(out) else None,
                "items": items}

    async def _record(self, job_id: str, uri: str, final: bool) -> dict | None:
        key = (job_id, uri)
        if key in self.records:
            self.records.move_to_end(key)
            return self.records[key]
        try:
            record = await _io(self.pool, storage.read_json, uri)
        except storage.StorageError:
            return None
        if final or record.get("status") == "ok":  # an ok record is final; an error one until the job ends
            self.records[key] = record
            while len(self.records) > 20_000:
                self.records.popitem(last=False)
        return record

    def _item(self, item_id: str, job: dict, record: dict | None) -> dict:
        mode = next((it["mode"] for it in job["batch"]["items"] if it["id"] == item_id), "")
        if record is None:
            return {"id": item_id, "status": "pending", "mode": mode}
        expiry = self.settings.url_expiry_s
        if record.get("status") != "ok":
            return {"id": item_id, "status": "error", "mode": mode, "error": record.get("error")}

        def output(facts: dict, name: str | None = None) -> dict:
            return {"name": name, "url": _url(facts["uri"], expiry), "poster_url": _url(facts.get("poster"), expiry),
                    **{k: facts.get(k) for k in ("uri", "bytes", "width", "height", "sha256")}}

        main = output(record)
        return {"id": item_id, "status": "ok", "mode": mode, **{k: v for k, v in main.items() if k != "name"},
                **{k: record.get(k) for k in ("frames", "seconds", "fps")},
                "renditions": [output(r, r["name"]) for r in record.get("renditions") or []],
                "compare": output(record["compare"], "compare") if record.get("compare") else None, "error": None}


# Named after the fact: Serve's wrapper class is shipped by value, its base (_Ingress) by reference,
# so the methods run against this module's globals.
Ingress = serve.ingress(api)(_Ingress)


def _record_uri(out: str, item_id: str) -> str:
    return storage.join(out, "items", f"{item_id}.json")  # engine.record_uri, without importing torch


def _url(uri: str | None, expiry: int) -> str | None:
    return None if uri is None else storage.presign(uri, expiry)


@functools.cache
def _encode_task():
    import ray

    from vidgen.render.batch import encode_task

    return ray.remote(max_retries=0)(encode_task)  # the runner retries an item itself


@dataclass(frozen=True)
class Served:
    """Where an encode task reads a streamed item's messages: a model deployment's `stream`."""

    handle: object  # the model's DeploymentHandle
    digest: str  # the weights its job was planned with

    def open(self, item: ResolvedItem):
        return self.handle.options(stream=True).stream.remote(item, self.digest)


class ModelServer:
    """One model, loaded once per replica; `infer` is batched across requests (and jobs).

    A request is one item; the answer is {"meta": ..., "chunks": {stream: [ObjectRef, ...]}} (the
    frames stay in the object store for the encoder) or {"error": message} (the item's error).
    """

    def __init__(self, name: str, uri: str, settings: ModelDeployment):
        self.name, self.uri = name, uri
        self.use_gpu = settings.num_gpus > 0
        self.infer.set_max_batch_size(settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.model, self.sha256 = None, None
        self.stats = {"batches": 0, "items": 0, "busy_s": 0.0, "max_batch": 0}
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - the app starts without the model; requests say why
            logger.warning(f"model {name} ({uri}) is not available yet: {e}")

    def _load(self):
        import torch

        from vidgen import models
        from vidgen.render.engine import ModelInfo

        device = "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"
        self.model = models.load(self.uri, device)
        self.sha256 = ModelInfo.from_manifest(self.uri, self.model.manifest).sha256
        logger.info(f"model {self.name} loaded from {self.uri} on {device} (weights {self.sha256[:12]})")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def infer(self, requests: list[tuple[ResolvedItem, str]]) -> list[dict]:
        """Each request: (item, the weights digest its job planned with)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._infer, requests)

    async def stream(self, item: ResolvedItem, digest: str):
        """A streamed item (restore, stylize), read by its encode task through a streaming handle
        while the model makes it: the messages of `batch.stream_events`, or ("unavailable", why)
        when the model cannot be loaded with the weights the job planned with."""
        loop, done = asyncio.get_running_loop(), object()
        messages = self._stream(item, digest)
        while (message := await loop.run_in_executor(None, next, messages, done)) is not done:
            yield message

    def _stream(self, item: ResolvedItem, digest: str):
        from vidgen.render import engine
        from vidgen.render.batch import stream_events

        problem = self._ready({digest})
        if problem is None and digest != self.sha256:
            problem = self._changed()
        if problem is not None:
            yield "unavailable", problem
            return
        self.stats["streams"] = self.stats.get("streams", 0) + 1
        yield from stream_events(self.model, item, engine.CHUNK_FRAMES)

    def _ready(self, digests: set[str]) -> str | None:
        """Load the model if it is not yet, reload it if re-exported with weights asked for; the
        reason it cannot be used, or None."""
        if self.model is None:
            try:
                self._load()
            except Exception as e:  # noqa: BLE001 - every item asking for it records it
                return f"model {self.name} ({self.uri}) cannot be loaded: {e}"
        elif any(digest != self.sha256 for digest in digests):
            self._reload_if_reexported(digests)
        return None

    def _changed(self) -> str:
        return (f"model {self.name} ({self.uri}) changed after this job was planned: it holds weights "
                f"{self.sha256[:12]} now; submit the job again")

    def _infer(self, requests: list[tuple[ResolvedItem, str]]) -> list[dict]:
        import numpy as np
        import ray

        from vidgen.render import engine

        started = time.monotonic()
        problem = self._ready({digest for _, digest in requests})
        if problem is not None:
            return [{"error": problem, "model_trouble": True}] * len(requests)
        stale = {i for i, (_, digest) in enumerate(requests) if digest != self.sha256}
        items = [item for i, (item, _) in enumerate(requests) if i not in stale]
        if stale:
            logger.warning(f"model {self.name}: {len(stale)} item(s) planned with other weights than {self.uri} "
                           f"holds now ({self.sha256[:12]}): not rendered")
        results: dict[int, dict] = {}
        pending: dict[tuple[int, str], list] = {}

        def flush(i: int, stream: str) -> None:
            frames = pending.pop((i, stream), None)
            if frames:
                results[i]["chunks"].setdefault(stream, []).append(ray.put(np.concatenate(frames)))

        for event in engine.infer(self.model, items, engine.CHUNK_FRAMES):
            i = event.index
            if isinstance(event, engine.Begin):  # its meta comes again with Done
                continue
            if isinstance(event, engine.Chunk):
                results.setdefault(i, {"chunks": {}})
                buffer = pending.setdefault((i, event.stream), [])
                buffer.append(event.frames)
                if sum(len(f) for f in buffer) >= engine.CHUNK_FRAMES:  # small chunks of a batch, merged
                    flush(i, event.stream)
            elif isinstance(event, engine.Done):
                results.setdefault(i, {"chunks": {}})
                for stream in [s for j, s in list(pending) if j == i]:
                    flush(i, stream)
                results[i]["meta"] = event.meta
            else:
                for key in [k for k in pending if k[0] == i]:
                    pending.pop(key)
                results[i] = {"error": event.error}
        self.stats["batches"] += 1
        self.stats["items"] += len(items)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(items))
        self.stats["busy_s"] += time.monotonic() - started
        answers = iter([results.get(i) or {"error": "the model produced nothing for this item"}
                        for i in range(len(items))])
        changed = {"error": self._changed(), "model_trouble": True}
        return [changed if i in stale else next(answers) for i in range(len(requests))]

    def _reload_if_reexported(self, wanted: set[str]) -> None:
        """Reload when model.json names other weights than the ones held, and a request asks for
        them (a re-export to the same URI); a job planned before the re-export is not rendered with
        weights its records would not name. A failed reload keeps the model it holds."""
        from vidgen import models
        from vidgen.render.engine import ModelInfo

        try:
            current = ModelInfo.from_manifest(self.uri, models.read_manifest(self.uri)).sha256
            if current != self.sha256 and current in wanted:
                self._load()
        except Exception as e:  # noqa: BLE001 - a re-export in progress: the requests that need it fail
            logger.warning(f"model {self.name}: reloading {self.uri} failed, keeping weights {self.sha256[:12]}: {e}")

    def get_stats(self) -> dict:
        return dict(self.stats, replica=serve.get_replica_context().replica_tag, sha256=self.sha256)


class _Run:
    """A job this runner holds: its lease (and etag), and what the heartbeat has learnt."""

    def __init__(self, job_id: str, lease: dict, etag: str):
        self.job_id, self.lease, self.etag = job_id, lease, etag
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
        self.wake = asyncio.Event()
        self.loop_task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def poke(self) -> None:
        self.wake.set()

    def check_health(self) -> None:
        if self.loop_task.done():
            raise RuntimeError("the runner's polling loop ended")

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self._poll()
            except Exception as e:  # noqa: BLE001 - storage hiccups: try again next round
                logger.warning(f"runner {self.runner_id}: polling failed: {type(e).__name__}: {e}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.conf.poll_s)
            self.wake.clear()

    async def _poll(self) -> None:
        if len(self.running) >= self.conf.max_jobs:
            return
        queued = await _io(self.pool, self.store.queued)
        self.seen = {j: v for j, v in self.seen.items() if j in set(queued)}
        for job_id in queued:
            if len(self.running) >= self.conf.max_jobs:
                return
            changed = self.seen.get(job_id, (None, -math.inf))[1]
            if job_id in self.running or time.monotonic() - changed < self.conf.stale_s / 2:
                continue
            run = await _io(self.pool, self._claim, job_id)
            if run is not None:
                self.running[job_id] = asyncio.get_running_loop().create_task(self._run(run))
                self.running[job_id].add_done_callback(lambda _t, j=job_id: self.running.pop(j, None))

    def _stale(self, job_id: str, lease: dict, etag: str | None) -> bool:
        """Whether the lease has stayed the same for `stale_s` of this runner's own monotonic time.
        Every heartbeat rewrites the lease (a new `beat`, so a new version): no host's wall clock is
        compared with another's, so clock skew neither takes over a live job nor keeps a dead one."""
        version = etag or json.dumps(lease, sort_keys=True)
        seen = self.seen.get(job_id)
        if seen is None or seen[0] != version:  # first sight, or it changed since: its holder is alive
            self.seen[job_id] = (version, time.monotonic())
            return False
        return time.monotonic() - seen[1] >= self.conf.stale_s

    def _claim(self, job_id: str) -> _Run | None:
        """Take the job's lease when it has none, or a stale one; None when another runner holds it."""
        lease, etag = self.store.lease(job_id)
        now = time.time()
        if lease is None and self.store.read(job_id) is None:  # its record is being written, or never will be
            marker, marker_etag = read_json_etag(self.store.queue_uri(job_id))
            if marker is not None and self._stale(job_id, marker, marker_etag) and self.store.drop_orphan_marker(job_id):
                logger.warning(f"runner {self.runner_id}: dropped the queue marker of job {job_id}: no job record came")
            return None
        if lease is not None:
            if lease.get("state") in ("finished", "failed", "cancelled"):
                self.store.finish(job_id)  # its runner died between the lease and the marker
                return None
            if not lease.get("released") and not self._stale(job_id, lease, etag):
                return None
        attempt = int((lease or {}).get("attempt", 0)) + 1
        new = {"runner": self.runner_id, "node": self.node_id, "state": "running", "heartbeat": now, "started": now,
               "attempt": attempt,
               "error": None, "counts": None}
        if attempt > self.conf.job_attempts:
            new.update(state="failed", error=f"gave up after {self.conf.job_attempts} runners took the job and stopped")
        try:
            etag = self.store.swap_lease(job_id, new, etag)
        except Conflict:
            return None
        if new["state"] == "failed":
            self.store.finish(job_id)
            return None
        if lease is not None:
            why = "released" if lease.get("released") else f"its lease unchanged for {self.conf.stale_s:g} s"
            logger.warning(f"runner {self.runner_id}: took over job {job_id} from {lease.get('runner')} ({why}), "
                           f"attempt {attempt}")
        return _Run(job_id, new, etag)

    async def _write_lease(self, run: _Run, **changes) -> bool:
        async with run.lock:
            lease = {**run.lease, "heartbeat": time.time(), "beat": int(run.lease.get("beat", 0)) + 1, **changes}
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
            job = await _io(self.pool, self.store.read, job_id)
            run.cancelled = await _io(self.pool, self.store.cancelled, job_id)
            if job is None:
                state, error = "failed", "the job record is missing"
            elif run.cancelled:
                state = "cancelled"
            else:
                logger.info(f"runner {self.runner_id}: job {job_id} started (attempt {run.lease['attempt']}, "
                            f"request {job.get('request_id')})")
                records = await self._render(job, run)
                if run.cancelled:
                    state = "cancelled"
                elif not run.lost:
                    from vidgen.render.batch import write_index

                    await _io(self.pool, write_index, job["batch"]["output"], job["batch"]["name"], records)
                    failed = sum(r["status"] != "ok" or r["id"] in run.kept for r in records)
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

    async def _render(self, job: dict, run: _Run) -> list[dict]:
        """Plan the batch (items with an ok record are kept), render the rest; the records, in order."""
        from vidgen.render import engine
        from vidgen.render.batch import abort_killed_runs_uploads, plan_batch, unwritten_error

        batch = parse_batch(job["batch"], source=f"job {job['id']}")
        plan = await _io(self.pool, plan_batch, batch)
        out = batch.output
        records: dict[str, dict] = {}
        todo = []
        for entry in plan.entries:
            if entry.action == "skip":
                records[entry.item.id] = entry.previous
            elif entry.action == "adopt":
                record = engine.ok_record(entry.item, entry.model, entry.spec_hash, entry.adopted)
                records[entry.item.id] = await _io(self.pool, engine.write_record, out, record, entry.previous)
            elif entry.action == "fail":
                records[entry.item.id] = await self._error(out, entry, entry.error)
            elif entry.action == "keep":  # the model could not be read: its stored record stays what it was
                records[entry.item.id] = entry.previous or unwritten_error(entry)
                run.kept[entry.item.id] = entry.error
            else:
                todo.append(entry)

        await _io(self.pool, abort_killed_runs_uploads, plan)

        async def one(entry) -> None:
            async with self.slots:
                if run.cancelled or run.lost:
                    return
                records[entry.item.id] = await self._render_item(out, entry, run)

        await asyncio.gather(*(one(e) for e in todo))
        return [records[e.item.id] for e in plan.entries if e.item.id in records]

    async def _error(self, out: str, entry, error: str) -> dict:
        from vidgen.render import engine

        record = engine.error_record(entry.item, entry.item.model, entry.model and entry.model.sha256,
                                     entry.spec_hash, error)
        return await _io(self.pool, engine.write_record, out, record, entry.previous)

    async def _render_item(self, out: str, entry, run: _Run) -> dict:
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

    async def _model_trouble(self, out: str, entry, run: _Run, error: str) -> dict:
        """The model could not be loaded as planned: an ok record stays (the item fails this job)."""
        if (entry.previous or {}).get("status") == "ok":
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


# --------------------------------------------------------------------------------------------
# The application


def _autoscaling(a: Autoscaling) -> dict:
    return a.model_dump(exclude_none=True)


def build_app(settings: ServiceSettings, token: str | None = None):
    """The Serve application for `settings`. `token`: the API token (default: $VIDGEN_API_TOKEN);
    only its sha256 reaches the replicas."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    handles = {}
    for name in settings.models:
        d = settings.deployment_of(name)
        handles[name] = serve.deployment(ModelServer).options(
            name=f"model-{name}",
            ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
            max_ongoing_requests=max(d.max_ongoing_requests, d.max_batch_size),
            autoscaling_config=_autoscaling(d.autoscaling),
            health_check_period_s=5,
        ).bind(name, settings.model_uri(name), d)
    r = settings.runner
    runner = serve.deployment(JobRunner).options(
        name="runner", num_replicas=r.num_replicas, ray_actor_options={"num_cpus": r.num_cpus},
        max_replicas_per_node=r.max_replicas_per_node, max_ongoing_requests=64, health_check_period_s=5,
    ).bind(settings, handles)
    i = settings.ingress
    return serve.deployment(Ingress).options(
        name="ingress", ray_actor_options={"num_cpus": i.num_cpus},
        max_ongoing_requests=i.max_ongoing_requests, max_queued_requests=i.max_queued_requests,
        autoscaling_config=_autoscaling(i.autoscaling),
    ).bind(settings, hashlib.sha256(token.encode()).hexdigest() if token else None, runner)


def app_builder(args: dict[str, Any]):
    """`import_path: vidgen.serving:app_builder` in serve/config.yaml; `args` are ServiceSettings."""
    return build_app(load_settings(args))


# --------------------------------------------------------------------------------------------
# `vidgen serve`: the same application, started here


def read_config(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(builder args, http_options) of our application in a Serve config file (serve/config.yaml)."""
    if path is None:
        return {}, {}
    try:
        text = storage.read_text(path)
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    apps = [a for a in config.get("applications") or [] if str(a.get("import_path", "")).startswith("vidgen.serving:")]
    if not apps:
        raise InputError(f"{path}: no application with import_path vidgen.serving:app_builder")
    return dict(apps[0].get("args") or {}), dict(config.get("http_options") or {})


def serve_forever(settings: ServiceSettings, host: str, port: int, address: str | None = None) -> None:
    """Start (or join) Ray, run the application on host:port until Ctrl-C or SIGTERM."""
    import ray

    from vidgen.runtime import init_ray

    if not os.environ.get(TOKEN_ENV) and not _is_loopback(host):
        raise InputError(f"refusing to serve on {host} without a token: set {TOKEN_ENV} (or use --host 127.0.0.1)")
    def stop(signum, frame):  # a service manager's SIGTERM: shut down like Ctrl-C
        raise KeyboardInterrupt

    init_ray(address)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own (fatal) handler
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        models = ", ".join(f"{n}={settings.model_uri(n)}" for n in settings.models) or "none"
        print(f"vidgen serve: http://{host}:{port}  (docs /docs, health /healthz; models: {models}; "
              f"outputs under {settings.output_root}; auth: {'bearer token' if os.environ.get(TOKEN_ENV) else 'off'})",
              flush=True)
        while True:
            time.sleep(3600)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if not address and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
