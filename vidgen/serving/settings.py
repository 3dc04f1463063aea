"""The service's settings: the application builder's args (serve/config.yaml), one home for each
default; and the checks on inputs that follow from them (`input_limits`, `readable`)."""

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidgen import storage
from vidgen.errors import InputError
from vidgen.render.spec import MAX_FPS, MAX_ITEMS, MAX_SECONDS, MAX_SIDE

MODEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_WAIT_S = 30.0  # the longest a status request waits for its job's end (`GET /v1/renders/{id}?wait_s=`)
RUNNER_MAX_ONGOING = 1024  # a runner's concurrent calls: pokes, and each waiting status request holds one


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
    # >= max_batch_size, so a batch fills while one runs; and >= what the runners send at once (their
    # max_items_in_flight): a request that finds every replica full waits in Serve's router, which
    # retries it about once a second (64 requests at a replica taking 16: 0.6-8.7 s; taking 64: 0.4 s)
    max_ongoing_requests: int = Field(64, ge=1)
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
