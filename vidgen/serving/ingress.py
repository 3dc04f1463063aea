"""The HTTP API: the request and response models, the guard (auth and body bound) and the ingress
deployment, which validates a request, writes the job and answers status from object storage."""

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Container
from typing import Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from vidgen import __version__, storage
from vidgen.manifest import ModelManifest
from vidgen.render.record import RenderRecord, VideoFacts
from vidgen.render.spec import MAX_ITEMS, Defaults, RenderBatch, RenderItem, SpecError, parse_batch
from vidgen.serving.settings import MAX_WAIT_S, MODEL_NAME, ServiceSettings, input_limits, readable
from vidgen.serving.store import (
    JOB_ID,
    TERMINAL,
    Conflict,
    Job,
    JobStore,
    Lease,
    _executor,
    _io,
    _now_iso,
    job_status,
    new_job_id,
    put_json,
)

logger = logging.getLogger("ray.serve")  # Serve adds the request id to each line logged in a request

TOKEN_ENV = "VIDGEN_API_TOKEN"
MAX_BODY_BYTES = 2 * 1024 * 1024  # a request body; MAX_ITEMS items with long titles fit
WAIT_POLL_S = 0.5  # how often a waiting status request reads the lease of a job no runner answered for


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


class ItemResult(VideoFacts):
    id: str
    status: str  # ok | error | pending
    mode: str
    url: str | None = None  # presigned (S3) or file:// (a local output root)
    poster_url: str | None = None
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
# The ingress deployment


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


PROBED_RECORDS = 8  # a job view reads up to this many item records' existence one by one, else lists them


class _Admissions:
    """Admits the jobs of one replica's requests together: the requests that arrive while a swap of
    the admission ledger is on its way wait for the next swap, which takes all their places at once
    (`JobStore.admit_many`). One swap at a time per replica; replicas still meet only in the
    ledger's conditional write. 16 concurrent POSTs each swapping the ledger themselves took 0.9 s
    (p50) to 2.7 s (p90) against moto, mostly in retries of conflicting writes."""

    def __init__(self, store: JobStore, pool, known: Container[str] = ()):
        self.store, self.pool = store, pool
        self.known = known  # jobs whose record this replica knows exists (it wrote or read them)
        self.waiting: list[tuple[str, asyncio.Future]] = []
        self.lock = asyncio.Lock()

    async def admit(self, job_id: str, limit: int) -> int | None:
        answer = asyncio.get_running_loop().create_future()
        self.waiting.append((job_id, answer))
        async with self.lock:
            if not answer.done():  # an earlier swap did not take this request: take everyone waiting now
                batch, self.waiting = self.waiting, []
                try:
                    ids = [j for j, _ in batch]
                    results = await _io(self.pool, self.store.admit_many, ids, limit, known=self.known)
                except Exception as e:  # noqa: BLE001 - every request of the swap fails with it
                    for _, future in batch:
                        future.set_exception(e)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        future.set_result(result)
        return await answer


class _Ingress:
    """The HTTP API. Stateless: every answer comes from object storage."""

    def __init__(self, settings: ServiceSettings, token_sha256: str | None, runner):
        self.settings = settings
        self.store = JobStore(settings.output_root)
        self.token_sha256 = token_sha256
        self.runner = runner
        self.pool = _executor()
        self.manifests: dict[str, tuple[float, ModelManifest | None]] = {}
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # job records (written once)
        self.admissions = _Admissions(self.store, self.pool, known=self.jobs)
        self.waiting_requests = 0  # status requests waiting for their job's end (`_wait_for_end`)
        self.records: OrderedDict[tuple[str, str], RenderRecord] = OrderedDict()  # final item records
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
        # No lock: replicas (and the requests within one) meet only in storage's conditional writes
        # (one replica's admissions share swaps of the ledger, `_Admissions`).
        found = await _io(self.pool, self._replay, key_sha, request_sha) if key_sha else None
        if found and found[1]:
            logger.info(f"POST /v1/renders: Idempotency-Key replay of job {found[0]} (request {rid})")
            return self._accepted(found[0], "replayed")
        if found:  # the key's job never got its record (refused, or its ingress died in between): create it now
            batch = self._batch(body, found[0], manifests)
        job_id = storage.basename(batch.output)
        if key_sha and not found:
            try:
                await _io(self.pool, put_json, self.store.key_uri(key_sha), {"job": job_id}, if_absent=True)
            except Conflict:  # another request with this key took it a moment ago
                return await self._replayed_or_busy(key_sha, request_sha)
        limit = self.settings.limits.max_queued_jobs
        filled = await self.admissions.admit(job_id, limit)
        if filled is not None:  # a retry with the same key gets the same job id, if there is room then
            return JSONResponse({"detail": f"{filled} unfinished jobs; this service queues at most {limit}"},
                                429, headers={"Retry-After": str(max(1, round(self.settings.runner.poll_s)))})
        job = Job(id=job_id, name=body.name, created=_now_iso(), created_ts=time.time(), request_id=rid,
                  request_sha256=request_sha, idempotency_key_sha256=key_sha,
                  items=[item.id for item in body.items], batch=batch.model_dump(mode="json"))
        try:
            await _io(self.pool, self.store.create, job, orphan_after_s=self.settings.runner.stale_s)
        except Conflict:  # the key's job was being created by another request
            return await self._replayed_or_busy(key_sha, request_sha)
        self._remember(job)  # its status polls that reach this replica need not read it back
        logger.info(f"POST /v1/renders: job {job_id} queued, {len(body.items)} items (request {rid})")
        self._poke(job)
        return self._accepted(job_id, "queued")

    @api.get("/v1/renders", response_model=JobList, dependencies=[Depends(bearer)],
             summary="recent jobs, newest first")
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100)) -> dict:
        ids = (await _io(self.pool, self.store.jobs))[::-1][:limit]
        views = await asyncio.gather(*(self._view(job_id, detail=False) for job_id in ids))
        return {"jobs": [v for v in views if v is not None]}

    @api.get("/v1/renders/{job_id}", response_model=JobView, response_model_exclude_none=False,
             dependencies=[Depends(bearer)], summary="status and per-item results with URLs")
    async def get_job(self, job_id: str = Path(max_length=64),
                      wait_s: float = Query(0, ge=0, le=MAX_WAIT_S, description=(
                          "wait up to this many seconds for the job to end before answering (a long "
                          "poll: one request where a client polling every second would send many)"))) -> dict:
        ended = await self._wait_for_end(job_id, wait_s) if wait_s > 0 and re.fullmatch(JOB_ID, job_id) else None
        view = await self._view(job_id, detail=True, ended=ended)
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

    async def _wait_for_end(self, job_id: str, wait_s: float) -> tuple[Lease, str | None] | None:
        """Return when the job has ended (its final lease and etag, which the view need not read
        again), is unknown, or `wait_s` has passed (None). The runner that runs
        it says when its run stops, from memory; the lease then says whether the job ended (a run
        also stops when it loses or releases its lease). A job no runner answers for (still queued,
        or run by another runner replica than the one this call reached) is watched through its
        lease, read every WAIT_POLL_S. At most half of the replica's max_ongoing_requests wait at
        once; past that, a request is answered at once, as without `wait_s`."""
        if self.waiting_requests >= max(1, self.settings.ingress.max_ongoing_requests // 2):
            return None
        self.waiting_requests += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while (left := deadline - loop.time()) > 0.01:
                try:
                    held = await asyncio.wait_for(self.runner.wait_ended.remote(job_id, left), timeout=left + 10)
                except Exception:  # noqa: BLE001 - no runner to ask (being replaced): the lease tells
                    held = None
                if held is False:  # still running at the deadline
                    return None
                lease, etag = await _io(self.pool, self.store.lease, job_id)
                if lease is not None and lease.ended:  # final: it never changes again
                    return lease, etag
                if lease is None and job_id not in self.jobs and await _io(self.pool, self.store.read, job_id) is None:
                    return None  # no such job: answered at once (404)
                if held is None:
                    await asyncio.sleep(min(WAIT_POLL_S, max(0.0, deadline - loop.time())))
            return None
        finally:
            self.waiting_requests -= 1

    def _poke(self, job: Job) -> None:
        """Wake a runner now to claim the job, handing it the record (runners also poll): fire and forget."""
        async def poke():
            try:
                await asyncio.wait_for(self.runner.poke.remote(job.id, job), timeout=30)
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
        if job is not None and job.request_sha256 != request_sha:
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
            self.store.swap_lease(job_id, Lease(runner="ingress", heartbeat=time.time(), state="cancelled"), None)
        except Conflict:
            return
        self.store.finish(job_id)

    def _batch(self, body: RenderRequest, job_id: str, manifests: dict[str, ModelManifest | None]) -> RenderBatch:
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

    async def _manifests(self, names: set[str]) -> dict[str, ModelManifest | None]:
        """model.json of each named model (None when unreadable), cached for 30 s."""
        from vidgen.render.batch import read_model_manifest

        out = {}
        for name in names:
            if name not in self.settings.models:
                continue
            at, manifest = self.manifests.get(name, (0.0, None))
            if time.monotonic() - at > 30:
                try:
                    manifest = await _io(self.pool, read_model_manifest, self.settings.model_uri(name))
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

    def _check(self, body: RenderRequest, manifests: dict[str, ModelManifest | None],
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
            problem = manifest.mode_problem(item.mode, name) if manifest else None
            if problem:
                errors.append(_invalid((*where, "mode"), problem, item.mode))
            timed = item.mode in ("generate", "predict")
            seconds = item.seconds if item.seconds is not None else (body.defaults.seconds if timed else None)
            fps = item.fps if item.fps is not None else (body.defaults.fps if timed else None)
            input_size = None
            info = (inputs or {}).get(item.input)
            if isinstance(info, str):
                errors.append(_invalid((*where, "input"), info, item.input))
            elif info is not None and not timed:  # restore / stylize: what renders is the input's length, rate, size
                scale = manifest.render.scale if manifest and item.mode == "restore" else 1
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
                native = manifest.render.frame_size if manifest and item.mode == "generate" else None
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

    async def _view(self, job_id: str, detail: bool, ended: tuple[Lease, str | None] | None = None) -> dict | None:
        """The job as the API shows it. `ended`: its final lease, when the caller has just read it."""
        if not re.fullmatch(JOB_ID, job_id):
            return None
        job = self.jobs.get(job_id) or await _io(self.pool, self.store.read, job_id)
        if job is None:
            return None
        self._remember(job)
        out = self.store.output(job_id)
        uris = {item_id: _record_uri(out, item_id) for item_id in job.items}
        (lease, _), cancelled, (present, read) = await asyncio.gather(
            _io(self.pool, self.store.lease, job_id) if ended is None else asyncio.sleep(0, ended),
            _io(self.pool, self.store.cancelled, job_id),
            _io(self.pool, self._present, job_id, uris))
        finished = [i for i, u in uris.items() if u in present]
        view = {"id": job_id, "name": job.name, "created": job.created, "status_url": f"/v1/renders/{job_id}",
                "error": lease.error if lease else None, "attempt": lease.attempt if lease else None,
                "heartbeat_age_s": round(time.time() - lease.heartbeat, 1) if lease else None}
        status = job_status(lease, cancelled)
        if not detail:
            counts = (lease.counts if lease else None) or {"items": len(uris), "finished": len(finished)}
            return {**view, "status": status, "counts": counts}
        fetched = await asyncio.gather(*(self._record(job_id, uris[i], status in TERMINAL, read.get(uris[i]))
                                         for i in finished))
        records = dict(zip(finished, fetched, strict=True))
        failed = sum(1 for r in records.values() if r is None or not r.is_ok)
        expiry = self.settings.url_expiry_s
        items = [self._item(item_id, job, records.get(item_id)) for item_id in job.items]
        finished_state = lease is not None and lease.state == "finished"
        return {**view, "status": status, "output": out,
                "counts": {"items": len(uris), "ok": len(finished) - failed, "failed": failed,
                           "pending": len(uris) - len(finished)},
                "gallery_url": _url(storage.join(out, "index.html"), expiry) if finished_state else None,
                "urls_expire_at": (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expiry)).isoformat(
                    timespec="seconds") if storage.is_s3(out) else None,
                "items": items}

    def _remember(self, job: Job) -> None:
        """Keep a job record (they never change) for the status view, the newest 10,000."""
        self.jobs[job.id] = job
        while len(self.jobs) > 10_000:
            self.jobs.popitem(last=False)

    def _present(self, job_id: str, uris: dict[str, str]) -> tuple[set[str], dict[str, Any]]:
        """Which of a job's item records exist, and the ones read to find out: the final ones held
        here are known, a few others are read one by one (one GET, where asking whether it exists
        and then reading it took two requests), and only a job with more left than that is listed
        (S3 prices a LIST as 12.5 GETs, and moto scans every key of the bucket for one)."""
        known = {u for u in uris.values() if (job_id, u) in self.records}
        left = [u for u in uris.values() if u not in known]
        if len(left) > PROBED_RECORDS:
            return self.store.record_uris(job_id), {}
        read = {}
        for uri in left:
            with contextlib.suppress(storage.NotFoundError):
                read[uri] = storage.read_json(uri)
        return known | read.keys(), read

    async def _record(self, job_id: str, uri: str, final: bool, data: Any = None) -> RenderRecord | None:
        """The item record at `uri` (`data`: as `_present` read it a moment ago)."""
        key = (job_id, uri)
        if key in self.records:
            self.records.move_to_end(key)
            return self.records[key]
        try:
            record = RenderRecord.parse(data if data is not None else await _io(self.pool, storage.read_json, uri))
        except storage.StorageError:
            return None
        if record is None:  # not a record (a hand edit): shown as pending
            return None
        # An ok record is final; an error one once the job has ended, if it was read after the lease
        # said so (`data` was read beside the lease: a resumed job may have rewritten it since)
        if record.is_ok or (final and data is None):
            self.records[key] = record
            while len(self.records) > 20_000:
                self.records.popitem(last=False)
        return record

    def _item(self, item_id: str, job: Job, record: RenderRecord | None) -> dict:
        mode = job.mode_of(item_id)
        if record is None:
            return {"id": item_id, "status": "pending", "mode": mode}
        expiry = self.settings.url_expiry_s
        if not record.is_ok:
            return {"id": item_id, "status": "error", "mode": mode, "error": record.error}

        def output(facts, name: str | None = None) -> dict:  # the record, a rendition's or the comparison's facts
            return {"name": name, "url": _url(facts.uri, expiry), "poster_url": _url(facts.poster, expiry),
                    **{k: getattr(facts, k) for k in ("uri", "bytes", "width", "height", "sha256")}}

        main = output(record)
        return {"id": item_id, "status": "ok", "mode": mode, **{k: v for k, v in main.items() if k != "name"},
                "frames": record.frames, "seconds": record.seconds, "fps": record.fps,
                "renditions": [output(r, r.name) for r in record.renditions],
                "compare": output(record.compare, "compare") if record.compare else None, "error": None}


# Named after the fact: Serve's wrapper class is shipped by value, its base (_Ingress) by reference,
# so the methods run against this module's globals.
Ingress = serve.ingress(api)(_Ingress)


def _record_uri(out: str, item_id: str) -> str:
    return storage.join(out, "items", f"{item_id}.json")  # engine.record_uri, without importing torch


def _url(uri: str | None, expiry: int) -> str | None:
    return None if uri is None else storage.presign(uri, expiry)
