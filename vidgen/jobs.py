"""Cluster jobs and schedules: `vidgen submit` and `vidgen schedule`, over Ray's Jobs API.

    vidgen submit render jobs/batches/ads.yaml --address http://HEAD:8265 --wait
    vidgen submit train jobs/train/gan-gpu.yaml --set max_steps=1000 --follow
    vidgen submit render spec.yaml --dry-run                       # what would be submitted
    vidgen schedule jobs/schedules.yaml --address http://HEAD:8265  # submit due slots, forever
    vidgen schedule jobs/schedules.yaml --once --state s3://bucket/vidgen/schedule-state.json
    vidgen schedule jobs/schedules.yaml --emit-kuberay out/         # RayCronJob manifests instead
    python -m vidgen.jobs run render --out s3://...                 # a job's entrypoint (see run_job)

CPU-sized, on this machine: `ray start --head --dashboard-host=127.0.0.1` then
`vidgen submit render SPEC --address http://127.0.0.1:8265 --wait`.

What a submitted job carries (`build_submission`):
- the spec's content: the spec file (and an `items_from` CSV beside it) travels in the job's runtime
  environment as VIDGEN_JOB_SPEC (compressed), and the entrypoint `python -m vidgen.jobs run KIND`
  writes it to a temp folder and runs `vidgen KIND` on it; nothing assumes the spec is on the cluster.
- the code: the vidgen checkout as the job's `working_dir` (Ray puts it first on PYTHONPATH), or
  nothing with `--no-working-dir` when the cluster image has vidgen installed.
- settings, never secrets: the standard non-secret AWS variables (endpoint, region, retries) and
  VIDGEN_* settings. Credentials come from the cluster's own identity: the instance profile on EC2
  (cluster/aws.yaml), IRSA or EKS Pod Identity through the pods' service account on KubeRay, or,
  for a head started by hand, the environment of the shell that ran `ray start`.

A submission id is `vidgen-KIND-NAME-HASH`: the spec's name and a hash of its content and
arguments, so a retried submit attaches to the job it already started (the Jobs API refuses a
second job with the same id); `--submission-id` starts a new one. A schedule's slot has the id
`vidgen-sched-ENTRY-<slot time, UTC>`: every scheduler that sees the slot submits under that id, the
Jobs API accepts exactly one, and the others report it as already submitted.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import posixpath
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidgen import __version__, storage
from vidgen.errors import InputError

Kind = Literal["train", "render"]
KINDS = ("train", "render")

SPEC_ENV = "VIDGEN_JOB_SPEC"
# An environment string is at most 128 KiB on Linux; a spec (compressed) must fit well inside.
MAX_SPEC_BYTES = 96 * 1024

# Non-secret settings a job gets from the submitting shell. Credentials are never among them.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE", re.IGNORECASE)

# Kept out of the uploaded working_dir (gitignore syntax; a leading / anchors at the checkout's
# root, so `/data/` is the checkout's data folder, not vidgen/data). Ray also honours .gitignore.
WORKING_DIR_EXCLUDES = [".git/", "/.venv/", "/venv/", "/out/", "/data/", "/runs/", "/models/", "/renders/",
                        "/demo-out/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", "*.mp4", "*.webm",
                        "*.parquet", "*.safetensors"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(InputError):
    """A submission or schedule that cannot go ahead; the message names the value to fix."""


# --------------------------------------------------------------------------------------------
# The spec travels with the job


@dataclass(frozen=True)
class SpecBundle:
    """A spec file's content, plus the files beside it that it names (a render spec's items_from)."""

    kind: str
    name: str  # the spec's file name, e.g. ads.yaml
    files: dict[str, str]  # relative path -> text; files[name] is the spec itself
    read_there: dict[str, str] = field(default_factory=dict)  # s3:// files the job reads in place -> their sha256

    def encode(self) -> str:
        raw = json.dumps({"kind": self.kind, "name": self.name, "files": self.files, "read_there": self.read_there},
                         sort_keys=True).encode()
        return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> SpecBundle:
        data = json.loads(zlib.decompress(base64.b64decode(text)))
        return cls(kind=data["kind"], name=data["name"], files=dict(data["files"]),
                   read_there=dict(data.get("read_there") or {}))

    def write(self, folder: str) -> str:
        """Write the files under `folder`; returns the spec's path."""
        for rel, text in self.files.items():
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or not all(parts):
                raise JobsError(f"spec bundle: unsafe file name {rel!r}")
            path = os.path.join(folder, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return os.path.join(folder, self.name)


def read_spec(kind: str, uri: str, out: str | None = None, model: str | None = None,
              sets: Sequence[str] = ()) -> tuple[SpecBundle, str]:
    """Read and validate a spec (local or s3://) the way its job will; returns (bundle, spec name).

    A spec that is wrong as a whole fails here, before anything is submitted."""
    if kind not in KINDS:
        raise JobsError(f"job kind {kind!r}: expected one of {', '.join(KINDS)}")
    try:
        text = storage.read_text(uri)
    except storage.StorageError as e:
        raise JobsError(f"{kind} spec {e}") from None
    except UnicodeDecodeError:
        raise JobsError(f"{uri}: not a text file (expected a YAML or JSON {kind} spec)") from None
    spec_file = posixpath.basename(str(uri).rstrip("/").replace("\\", "/")) or f"{kind}.yaml"
    files = {spec_file: text}
    read_there: dict[str, str] = {}
    if kind == "render":
        from vidgen.render.spec import SpecError, load_batch

        try:
            batch = load_batch(uri, out=out, model=model)
        except SpecError as e:
            raise JobsError(str(e)) from None
        name = batch.name
        if batch.items_from is not None:
            ref = batch.items_from
            if storage.is_s3(ref):  # the cluster reads it there; its content still names the job
                read_there[ref] = hashlib.sha256(storage.read_bytes(ref)).hexdigest()
            elif "://" in ref or ref.startswith(("/", "~")) or ".." in ref.replace("\\", "/").split("/"):
                raise JobsError(f"{uri}: items_from {ref!r}: only a file beside the spec (or below it) or an "
                                "s3:// URI travels with a job")
            else:  # read from beside the spec, as load_batch did; it lands beside the spec's copy
                files[ref.replace("\\", "/")] = storage.read_text(
                    storage.join(storage.parent(storage.normalize(uri)), ref.replace("\\", "/")))
    else:
        if out is not None or model is not None:
            raise JobsError("--out and --model are render options; a training config names its run and data")
        from vidgen.train.config import ConfigError, load_config

        try:
            load_config(uri, {}, list(sets))
        except ConfigError as e:
            raise JobsError(str(e)) from None
        name = Path(spec_file).stem
    return SpecBundle(kind=kind, name=spec_file, files=files, read_there=read_there), name


# --------------------------------------------------------------------------------------------
# Building a submission


@dataclass
class Submission:
    """Everything `submit_job` is given. Holds no secret: safe to print (--dry-run)."""

    kind: str
    name: str
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]

    def describe(self) -> dict[str, Any]:
        env = dict(self.runtime_env)
        env["env_vars"] = {k: (f"<{len(v)} characters: the spec and its files>" if k == SPEC_ENV else v)
                           for k, v in env.get("env_vars", {}).items()}
        return {"submission_id": self.submission_id, "entrypoint": self.entrypoint, "runtime_env": env,
                "metadata": self.metadata}


def project_root() -> Path | None:
    """The vidgen checkout this code runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"vidgen"', text, re.MULTILINE) else None


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The submitting shell's non-secret S3 and vidgen settings (never credentials or tokens)."""
    environ = dict(os.environ if environ is None else environ)
    out = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    for k, v in environ.items():
        if k.startswith("VIDGEN_") and k != SPEC_ENV and not k.startswith("VIDGEN_TEST_") and not SECRET_NAME.search(k):
            out[k] = v
    return dict(sorted(out.items()))


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return s or "spec"


def spec_submission_id(kind: str, name: str, bundle: SpecBundle, args: Sequence[str]) -> str:
    """`vidgen-KIND-NAME-HASH`: the same spec content (an items_from CSV's too, beside the spec or on
    S3) and arguments give the same id; an edited CSV gives a new job, not the old finished one."""
    content = {"kind": kind, "spec": bundle.name, "files": bundle.files, "args": list(args)}
    if bundle.read_there:  # absent from ids made before it existed, so they stay the same
        content["read_there"] = bundle.read_there
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return f"vidgen-{kind}-{slug(name)}-{digest[:12]}"


def check_submission_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
        raise JobsError(f"--submission-id {value!r}: expected letters, digits, '.', '_', '-' (at most 128)")
    return value


def build_submission(
    kind: str,
    spec: str,
    *,
    out: str | None = None,
    model: str | None = None,
    workers: int | None = None,
    sets: Sequence[str] = (),
    working_dir: str | Path | None | Literal["auto"] = "auto",
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
    bundle: tuple[SpecBundle, str] | None = None,
) -> Submission:
    """The job for `vidgen submit KIND SPEC`; validates the spec first (JobsError names the problem).

    working_dir: "auto" ships the vidgen checkout this runs from; a path ships that folder;
    None ships no code (the cluster image has vidgen installed)."""
    bundle, name = bundle or read_spec(kind, spec, out=out, model=model, sets=sets)
    args: list[str] = []
    if out is not None:
        args += ["--out", out]
    if model is not None:
        args += ["--model", model]
    if workers is not None:
        if kind != "render":
            raise JobsError("--workers is a render option")
        args += ["--workers", str(workers)]
    for s in sets:
        if kind != "train":
            raise JobsError("--set is a training option (a render spec is changed in its file)")
        args += ["--set", s]
    encoded = bundle.encode()
    if len(encoded) > MAX_SPEC_BYTES:
        raise JobsError(f"{spec}: the spec and its items take {len(encoded) // 1024} KiB compressed, more than a job "
                        f"carries ({MAX_SPEC_BYTES // 1024} KiB): split the batch")
    runtime_env: dict[str, Any] = {"env_vars": {**forwarded_env(), SPEC_ENV: encoded}}
    if working_dir == "auto":
        working_dir = project_root()
        if working_dir is None:
            raise JobsError("no vidgen checkout to ship as the job's working_dir (vidgen is installed as a package): "
                            "give --working-dir DIR, or --no-working-dir when the cluster image has vidgen installed")
    if working_dir is not None:
        folder = Path(working_dir).expanduser().resolve()
        if not (folder / "vidgen" / "__init__.py").is_file():
            raise JobsError(f"--working-dir {working_dir}: not a vidgen checkout (no vidgen/__init__.py in it)")
        runtime_env["working_dir"] = str(folder)
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    sid = check_submission_id(submission_id) if submission_id else spec_submission_id(kind, name, bundle, args)
    meta = {"vidgen_kind": kind, "vidgen_spec": name, "vidgen_version": __version__,
            "vidgen_spec_sha256": hashlib.sha256(encoded.encode()).hexdigest(), **(metadata or {})}
    entrypoint = shlex.join(["python", "-m", "vidgen.jobs", "run", kind, *args])
    return Submission(kind=kind, name=name, submission_id=sid, entrypoint=entrypoint, runtime_env=runtime_env,
                      metadata=meta)


# --------------------------------------------------------------------------------------------
# Talking to the cluster


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise JobsError("no Ray cluster given: pass --address http://HEAD:8265 (the job server) or set RAY_ADDRESS")
    return address


def check_ray_versions(client_version: str, cluster_version: str | None, address: str) -> str | None:
    """Raise when the Jobs client and the cluster run different Ray minor versions (a job's runtime
    environment and the API are only promised to work between equal versions). Returns a warning
    for a patch-level difference, else None."""
    if not cluster_version:
        return None

    def minor(v: str) -> tuple[str, ...]:
        return tuple(v.split(".")[:2])

    if minor(client_version) != minor(cluster_version):
        raise JobsError(
            f"Ray version mismatch: this machine has ray {client_version}, the cluster at {address} runs ray "
            f"{cluster_version}; submit with the same Ray version as the cluster "
            f"(pip install 'ray[default]=={cluster_version}') or run a cluster image with ray {client_version}")
    if client_version != cluster_version:
        return f"note: ray {client_version} here, {cluster_version} on the cluster (same minor version)"
    return None


def connect(address: str | None):
    """A JobSubmissionClient for `address` (default RAY_ADDRESS), checked to run our Ray version."""
    import ray
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address; an explicit one wins here.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, OSError) as e:
        raise JobsError(f"cannot reach the Ray job server at {address} ({_one_line(e)}): is the cluster up, and is "
                        "this the dashboard's address (port 8265 by default)?") from None
    except Exception as e:  # noqa: BLE001 - a bad address fails in many ways (ValueError, RpcError, RuntimeError)
        raise JobsError(f"Ray job server at {address}: {type(e).__name__}: {_one_line(e)} (expected the dashboard's "
                        "address, http://HEAD:8265)") from None
    finally:
        os.environ.update(saved)
    warning = check_ray_versions(ray.__version__, getattr(client, "_server_ray_version", None), address)
    if warning:
        print(warning, file=sys.stderr)
    return client


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def submit(client, sub: Submission) -> bool:
    """Submit; True when a new job started, False when the id already had a job (attach to it)."""
    try:
        client.submit_job(entrypoint=sub.entrypoint, submission_id=sub.submission_id, runtime_env=sub.runtime_env,
                          metadata=sub.metadata)
        return True
    except RuntimeError as e:
        if "already exists" in str(e):
            return False
        raise JobsError(f"submitting {sub.submission_id}: {_one_line(e)}") from None
    except OSError as e:  # requests' connection errors: the job server went away (a dashboard restart)
        raise JobsError(f"submitting {sub.submission_id}: cannot reach the job server: {_one_line(e)}") from None


@dataclass
class Outcome:
    status: str
    exit_code: int  # the exit code `vidgen submit --wait` ends with
    message: str
    logs_tail: str = ""


def wait_for(client, job_id: str, follow: bool = False, poll_s: float = 1.0, out=None) -> Outcome:
    """Wait until the job ends (tailing its logs with follow=True); its final state as an exit code:
    0 succeeded, the entrypoint's own exit code when it failed with one (render: 1 some items failed,
    2 a wrong spec), 1 otherwise (stopped, or failed before the entrypoint ran)."""
    out = out or sys.stdout
    if follow:
        import asyncio

        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                out.write(lines)
                out.flush()

        asyncio.run(tail())
    status = None
    while True:
        info = client.get_job_info(job_id)
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.5, 2.0)
    code = info.driver_exit_code
    if status == "SUCCEEDED":
        exit_code = 0
    elif status == "FAILED" and isinstance(code, int) and 0 < code < 256:
        exit_code = code
    else:
        exit_code = 1
    tail_text = ""
    if status != "SUCCEEDED" and not follow:
        try:
            tail_text = "\n".join(client.get_job_logs(job_id).rstrip().splitlines()[-20:])
        except RuntimeError:
            tail_text = ""
    return Outcome(status=status, exit_code=exit_code, message=str(info.message or ""), logs_tail=tail_text)


def run_submit(sub: Submission, address: str | None, wait: bool = False, follow: bool = False) -> int:
    """`vidgen submit`: submit (or attach), then optionally wait; returns the command's exit code."""
    client = connect(address)
    started = submit(client, sub)
    url = client.get_address() if hasattr(client, "get_address") else resolve_address(address)
    if started:
        print(f"submitted {sub.submission_id} ({sub.kind} {sub.name}) to {url}", flush=True)
    else:
        status = client.get_job_status(sub.submission_id)
        status = str(getattr(status, "value", status))
        print(f"{sub.submission_id} was already submitted ({status}): attaching to it, not starting another "
              f"(--submission-id starts a new one)", flush=True)
        wait = wait or status in TERMINAL  # its result is known: report it
    if not (wait or follow):
        print(f"  logs: ray job logs -f {sub.submission_id} --address {url}   (or submit again with --follow)")
        return 0
    try:
        outcome = wait_for(client, sub.submission_id, follow=follow)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; {sub.submission_id} keeps running (ray job stop {sub.submission_id} ends it)",
              file=sys.stderr)
        raise
    if outcome.exit_code == 0:
        print(f"{sub.submission_id} SUCCEEDED")
    else:
        print(f"vidgen: job {sub.submission_id} {outcome.status} (exit code {outcome.exit_code}): "
              f"{_one_line(Exception(outcome.message.split(', last available logs')[0])) or 'no message'}",
              file=sys.stderr)
        if outcome.logs_tail:
            print("last lines of its log:\n" + outcome.logs_tail, file=sys.stderr)
    return outcome.exit_code


# --------------------------------------------------------------------------------------------
# Schedules


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
TEMPLATE_FIELDS = ("date", "time")


class KubeRaySettings(BaseModel):
    """What `--emit-kuberay` puts into the manifests (the image and the pods' identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = "ghcr.io/my-org/vidgen:0.1.0"
    service_account: str = "vidgen"  # bound to an IAM role (IRSA / Pod Identity) with S3 access
    namespace: str | None = None
    ray_version: str = "2.60.0"
    max_cpu_workers: int = Field(4, ge=0)
    max_gpu_workers: int = Field(2, ge=0)


class ScheduleEntry(BaseModel):
    """One scheduled batch: a cron expression in a time zone, a render spec, an output template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=DNS_LABEL, max_length=40)
    cron: str
    timezone: str = "UTC"
    batch: str  # a render spec: a path relative to the schedule file, or s3://
    output: str  # e.g. s3://bucket/renders/ads/{date}; {date} is the slot's date in `timezone`
    model: str | None = None  # overrides the batch's default model
    workers: int | None = Field(None, ge=0)
    lookback_hours: float | None = Field(None, gt=0, le=24 * 31)  # None: the file's
    suspend: bool = False

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        check_timezone(v)
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        names = set(re.findall(r"{([^{}]*)}", v))
        unknown = names - set(TEMPLATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}: the template takes {{date}} (the slot's "
                             "date) and {time} (its HHMM)")
        if "date" not in names:
            raise ValueError("the template needs {date}, so that each slot renders into its own folder")
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class ScheduleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lookback_hours: float = Field(48.0, gt=0, le=24 * 31)  # missed slots older than this are skipped
    kuberay: KubeRaySettings = Field(default_factory=KubeRaySettings)
    entries: list[ScheduleEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ScheduleFile:
        names = [e.name for e in self.entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"entries: name {dup[0]!r} appears more than once; names must be unique")
        return self

    def lookback(self, entry: ScheduleEntry) -> dt.timedelta:
        return dt.timedelta(hours=entry.lookback_hours if entry.lookback_hours is not None else self.lookback_hours)


def check_cron(expr: str) -> str:
    """A standard 5-field cron expression (or @daily, @weekly, ...), as Kubernetes also takes it."""
    from croniter import croniter

    expr = " ".join(str(expr).split())
    fields = expr.split(" ")
    if not (len(fields) == 5 or (len(fields) == 1 and expr.startswith("@"))):
        raise ValueError(f"{expr!r} is not a cron expression: expected 5 fields (minute hour day-of-month month "
                         "day-of-week, e.g. '0 6 * * *') or @hourly/@daily/@weekly/@monthly/@yearly")
    try:
        croniter(expr)
    except Exception as e:  # noqa: BLE001 - croniter's errors are several classes
        raise ValueError(f"{expr!r} is not a valid cron expression ({_one_line(e)})") from None
    return expr


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"unknown time zone {name!r}: expected an IANA name such as Europe/Berlin, "
                         "America/New_York or UTC") from None


def load_schedules(uri: str) -> ScheduleFile:
    try:
        data = yaml.safe_load(storage.read_text(uri))
    except storage.StorageError as e:
        raise JobsError(f"schedule file {e}") from None
    except yaml.YAMLError as e:
        raise JobsError(f"{uri}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise JobsError(f"{uri}: expected a mapping with lookback_hours and entries")
    try:
        return ScheduleFile(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "entries" and isinstance(loc[1], int):
            entries = data.get("entries") or []
            entry_name = entries[loc[1]].get("name") if isinstance(entries[loc[1]], dict) else None
            where = f"entries[{loc[1]}]" + (f" ({entry_name})" if entry_name else "")
            loc = loc[2:]
        path = ".".join(p for p in [where, ".".join(str(x) for x in loc)] if p) or "schedule"
        msg = re.sub(r"^Value error, ", "", err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        raise JobsError(f"{uri}: {path}: {msg}") from None


def batch_uri(schedule_uri: str, entry: ScheduleEntry) -> str:
    """An entry's batch path: absolute and s3:// as written, relative ones beside the schedule file."""
    ref = entry.batch
    if storage.is_s3(ref) or "://" in ref or os.path.isabs(ref):
        return storage.normalize(ref)
    return storage.join(storage.parent(storage.normalize(schedule_uri)), ref)


def slots(entry: ScheduleEntry, after: dt.datetime, until: dt.datetime, limit: int | None = None) -> Iterator[dt.datetime]:
    """The entry's slots in (after, until], as aware datetimes in the entry's time zone."""
    from croniter import croniter

    it = croniter(entry.cron, after.astimezone(entry.zone))
    n = 0
    while limit is None or n < limit:
        slot = it.get_next(dt.datetime)
        if slot > until:
            return
        n += 1
        yield slot


def next_slot(entry: ScheduleEntry, now: dt.datetime) -> dt.datetime:
    from croniter import croniter

    return croniter(entry.cron, now.astimezone(entry.zone)).get_next(dt.datetime)


def slot_id(entry: ScheduleEntry, slot: dt.datetime) -> str:
    return f"vidgen-sched-{entry.name}-{slot.astimezone(dt.UTC):%Y%m%dt%H%Mz}"


def slot_output(entry: ScheduleEntry, slot: dt.datetime) -> str:
    local = slot.astimezone(entry.zone)
    return entry.output.format(date=f"{local:%Y-%m-%d}", time=f"{local:%H%M}")


def show_time(t: dt.datetime, zone: ZoneInfo) -> str:
    return f"{t.astimezone(zone):%Y-%m-%d %H:%M %Z}"


@dataclass
class SlotResult:
    entry: str
    slot: dt.datetime | None
    outcome: Literal["submitted", "exists", "failed", "planned", "skipped"]
    submission_id: str = ""
    output: str = ""
    detail: str = ""
    skipped: int = 0  # for "skipped": how many slots (the first and last are in detail)


MAX_RUNS_KEPT = 50
SKIP_COUNT_LIMIT = 10_000


def load_state(uri: str | None) -> dict[str, Any]:
    if not uri:
        return {"format": 1, "entries": {}}
    try:
        state = storage.read_json(uri)
    except storage.NotFoundError:
        return {"format": 1, "entries": {}}
    if not isinstance(state, dict) or state.get("format") != 1:
        raise JobsError(f"--state {uri}: not a vidgen schedule state file")
    state.setdefault("entries", {})
    return state


def run_pass(schedule_uri: str, schedules: ScheduleFile, now: dt.datetime, client=None, state_uri: str | None = None,
             dry_run: bool = False) -> list[SlotResult]:
    """Submit every due slot once. Due: after the entry's last recorded slot (from --state) and
    inside the look-back window; older missed slots are skipped (and reported). Without a client
    (dry_run) slots are only planned. The state is written after the pass."""
    state = load_state(state_uri)
    results: list[SlotResult] = []
    for entry in schedules.entries:
        if entry.suspend:
            continue
        record = state["entries"].setdefault(entry.name, {"last_slot": None, "runs": []})
        last = dt.datetime.fromisoformat(record["last_slot"]) if record.get("last_slot") else None
        window_start = now - schedules.lookback(entry)
        after = window_start - dt.timedelta(microseconds=1)  # a slot exactly at the window's start is in it
        if last is not None and last < after:
            missed = list(slots(entry, last, after, limit=SKIP_COUNT_LIMIT))
            if missed:
                more = "+" if len(missed) == SKIP_COUNT_LIMIT else ""
                detail = (f"{len(missed)}{more} slot(s) older than the {schedules.lookback(entry).total_seconds() / 3600:g} h "
                          f"look-back: {show_time(missed[0], entry.zone)} .. {show_time(missed[-1], entry.zone)}")
                results.append(SlotResult(entry.name, missed[-1], "skipped", detail=detail, skipped=len(missed)))
                if not dry_run:
                    record["last_slot"] = missed[-1].astimezone(dt.UTC).isoformat()
                    _remember(record, {"slot": missed[-1].astimezone(dt.UTC).isoformat(), "outcome": "skipped",
                                       "detail": detail})
        start = max(last, after) if last is not None else after
        due = list(slots(entry, start, now))
        if not due:
            continue
        base = None
        for slot in due:
            sid, out = slot_id(entry, slot), slot_output(entry, slot)
            if base is None:
                try:
                    bundle = read_spec("render", batch_uri(schedule_uri, entry), out=out, model=entry.model)
                except JobsError as e:
                    results.append(SlotResult(entry.name, slot, "failed", sid, out, f"batch: {e}"))
                    break
                base = bundle
            if dry_run or client is None:
                results.append(SlotResult(entry.name, slot, "planned", sid, out))
                continue
            sub = build_submission("render", batch_uri(schedule_uri, entry), out=out, model=entry.model,
                                   workers=entry.workers, submission_id=sid, bundle=base,
                                   metadata={"vidgen_schedule": entry.name,
                                             "vidgen_slot": slot.astimezone(dt.UTC).isoformat()})
            try:
                started = submit(client, sub)
            except JobsError as e:
                results.append(SlotResult(entry.name, slot, "failed", sid, out, str(e)))
                break  # later slots wait for the next pass: the state stays at the last good one
            outcome = "submitted" if started else "exists"
            results.append(SlotResult(entry.name, slot, outcome, sid, out))
            record["last_slot"] = slot.astimezone(dt.UTC).isoformat()
            _remember(record, {"slot": record["last_slot"], "outcome": outcome, "submission_id": sid, "output": out,
                               "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    if state_uri and not dry_run:
        storage.write_json(state_uri, state)
    return results


def _remember(record: dict, run: dict) -> None:
    record["runs"] = [*record.get("runs", []), run][-MAX_RUNS_KEPT:]


def format_results(schedules: ScheduleFile, results: list[SlotResult], now: dt.datetime) -> str:
    zones = {e.name: e.zone for e in schedules.entries}
    width = max(len(e.name) for e in schedules.entries)
    words = {"submitted": "submitted", "exists": "already submitted", "failed": "FAILED", "planned": "would submit"}
    lines = []
    for r in results:
        if r.outcome == "skipped":
            lines.append(f"{r.entry:<{width}}  skipped {r.detail}")
            continue
        line = f"{r.entry:<{width}}  {show_time(r.slot, zones[r.entry])}  {words[r.outcome]:<17}  {r.submission_id}"
        if r.output:
            line += f" -> {r.output}"
        if r.detail:
            line += f": {r.detail}"
        lines.append(line)
    for e in schedules.entries:
        if not any(r.entry == e.name and r.outcome != "skipped" for r in results):
            state = "suspended" if e.suspend else f"nothing due; next {show_time(next_slot(e, now), e.zone)}"
            lines.append(f"{e.name:<{width}}  {state}")
    return "\n".join(lines)


def run_schedule(schedule_uri: str, address: str | None, *, once: bool = False, now: dt.datetime | None = None,
                 state_uri: str | None = None, dry_run: bool = False, out=None) -> int:
    """`vidgen schedule`: one pass (--once or --now), or passes at each next slot until Ctrl-C.
    Exit code of a single pass: 0, or 1 when a submission failed. As a daemon it never exits on a
    cluster, storage or schedule-file fault: `ScheduleDaemon.step` says what it does instead."""
    out = out or sys.stdout
    if once or now is not None or dry_run:
        schedules = load_schedules(schedule_uri)
        client = None if dry_run else connect(address)
        moment = now or dt.datetime.now(dt.UTC)
        results = run_pass(schedule_uri, schedules, moment, client=client, state_uri=state_uri, dry_run=dry_run)
        print(format_results(schedules, results, moment), file=out, flush=True)
        return 1 if any(r.outcome == "failed" for r in results) else 0
    daemon = ScheduleDaemon(schedule_uri, address, state_uri, out)
    while True:
        time.sleep(daemon.step())


class ScheduleDaemon:
    """The `vidgen schedule` loop, one pass per `step`. A job server that cannot be reached (a
    dashboard restart), state that cannot be read or written, or an invalid edit of the schedule
    file never ends it: it logs the fault once per pass, keeps the last valid schedule, and tries
    again after a back-off (1 s doubling to 5 min). Slots missed meanwhile are caught up by the next
    good pass inside each entry's look-back, exactly once: slot ids are fixed per slot, so the Jobs
    API refuses a second submission of a slot, whichever scheduler or clock makes it."""

    MAX_BACKOFF_S = 300.0

    def __init__(self, schedule_uri: str, address: str | None, state_uri: str | None, out=None):
        self.schedule_uri, self.address, self.state_uri = schedule_uri, address, state_uri
        self.out = out or sys.stdout
        self.schedules = load_schedules(schedule_uri)  # the first must be valid: a typo fails at once
        self.client = None
        self.backoff = 1.0

    def say(self, text: str) -> None:
        print(f"vidgen schedule: {text}", file=self.out, flush=True)

    def step(self, now: dt.datetime | None = None) -> float:
        """One pass at `now` (default: the clock); the seconds to wait before the next."""
        try:
            self.schedules = load_schedules(self.schedule_uri)
        except JobsError as e:
            self.say(f"keeping the last valid schedule: {e}")
        moment = now or dt.datetime.now(dt.UTC)
        try:
            if self.client is None:
                self.client = connect(self.address)
            results = run_pass(self.schedule_uri, self.schedules, moment, client=self.client, state_uri=self.state_uri)
        except (JobsError, storage.StorageError, OSError) as e:
            self.client = None  # reconnect next time: the job server may have moved or restarted
            return self._retry(f"pass failed: {e}")
        print(format_results(self.schedules, results, moment), file=self.out, flush=True)
        if any(r.outcome == "failed" for r in results):
            self.client = None
            return self._retry("some slots were not submitted")
        self.backoff = 1.0
        live = [e for e in self.schedules.entries if not e.suspend]
        upcoming = min(next_slot(e, moment) for e in live) if live else moment + dt.timedelta(hours=1)
        # Wake at the next slot (re-checking at least every 5 minutes: clocks jump, files change).
        return min(max((upcoming - dt.datetime.now(dt.UTC)).total_seconds() + 1, 1), self.MAX_BACKOFF_S)

    def _retry(self, why: str) -> float:
        wait, self.backoff = self.backoff, min(self.backoff * 2, self.MAX_BACKOFF_S)
        self.say(f"{why}; trying again in {wait:g} s (missed slots are caught up inside the look-back)")
        return wait


def schedule_status(schedule_uri: str, address: str | None, state_uri: str | None, now: dt.datetime | None = None,
                    runs: int = 5) -> str:
    """`vidgen schedule --status`: each entry's next slot and its recent runs with their job states
    (from the cluster when one is given; runs come from --state, else from the cluster's job list)."""
    schedules = load_schedules(schedule_uri)
    now = now or dt.datetime.now(dt.UTC)
    state = load_state(state_uri)
    jobs: dict[str, Any] = {}
    cluster_note = ""
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            client = connect(address)
            jobs = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
        except JobsError as e:
            cluster_note = f"(job states unknown: {e})"
    else:
        cluster_note = "(job states unknown: no --address or RAY_ADDRESS)"
    lines = [cluster_note] if cluster_note else []
    for e in schedules.entries:
        nxt = "suspended" if e.suspend else f"next {show_time(next_slot(e, now), e.zone)}"
        lines.append(f"{e.name}: '{e.cron}' ({e.timezone}), {nxt}; {e.batch} -> {e.output}")
        history = [r for r in state["entries"].get(e.name, {}).get("runs", [])]
        if not history and jobs:
            history = sorted(({"slot": j.metadata.get("vidgen_slot"), "submission_id": sid, "outcome": "submitted"}
                              for sid, j in jobs.items() if (j.metadata or {}).get("vidgen_schedule") == e.name),
                             key=lambda r: r["slot"] or "")
        if not history:
            lines.append("  no runs yet")
        for r in history[-runs:]:
            when = show_time(dt.datetime.fromisoformat(r["slot"]), e.zone) if r.get("slot") else "?"
            if r.get("outcome") == "skipped":
                lines.append(f"  {when}  skipped: {r.get('detail', '')}")
                continue
            job = jobs.get(r.get("submission_id", ""))
            status = str(getattr(job.status, "value", job.status)) if job else ("not on the cluster" if jobs else "?")
            lines.append(f"  {when}  {r.get('submission_id', '')}  {status}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# KubeRay: the same schedules as RayCronJob manifests


BATCH_MOUNT = "/etc/vidgen/batch"


def _pod(container: str, image: str, settings: KubeRaySettings, cpu: str, memory: str, gpus: int = 0,
         mounts: list[dict] | None = None, volumes: list[dict] | None = None) -> dict:
    resources: dict[str, dict[str, str]] = {"requests": {"cpu": cpu, "memory": memory},
                                            "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    c: dict[str, Any] = {"name": container, "image": image, "resources": resources}
    if mounts:
        c["volumeMounts"] = mounts
    spec: dict[str, Any] = {"serviceAccountName": settings.service_account, "containers": [c]}
    if volumes:
        spec["volumes"] = volumes
    return {"spec": spec}


def kuberay_manifests(schedule_uri: str, schedules: ScheduleFile | None = None) -> dict[str, list[dict]]:
    """File name -> the documents of one entry: a ConfigMap holding the batch spec (its content at
    emission time) and a RayCronJob whose job renders it into the slot's dated output."""
    schedules = schedules or load_schedules(schedule_uri)
    k = schedules.kuberay
    files: dict[str, list[dict]] = {}
    for entry in schedules.entries:
        bundle, _ = read_spec("render", batch_uri(schedule_uri, entry), model=entry.model,
                              out=slot_output(entry, dt.datetime.now(dt.UTC)))
        keys = {rel: re.sub(r"[^-._a-zA-Z0-9]", "_", rel) for rel in bundle.files}
        labels = {"app.kubernetes.io/name": "vidgen", "app.kubernetes.io/component": "scheduled-batch",
                  "vidgen/schedule": entry.name}
        meta = {"labels": labels, **({"namespace": k.namespace} if k.namespace else {})}
        configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": f"vidgen-batch-{entry.name}", **meta},
                     "data": {keys[rel]: text for rel, text in bundle.files.items()}}
        args = ["python", "-m", "vidgen.jobs", "run", "render", "--spec", f"{BATCH_MOUNT}/{bundle.name}",
                "--out-template", entry.output, "--timezone", entry.timezone, "--cron", entry.cron]
        if entry.model:
            args += ["--model", entry.model]
        if entry.workers is not None:
            args += ["--workers", str(entry.workers)]
        volume = {"name": "batch", "configMap": {"name": f"vidgen-batch-{entry.name}",
                                                 "items": [{"key": keys[rel], "path": rel} for rel in bundle.files]}}
        head = _pod("ray-head", k.image, k, "2", "8Gi", mounts=[{"name": "batch", "mountPath": BATCH_MOUNT,
                                                                 "readOnly": True}], volumes=[volume])
        workers = [
            {"groupName": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": k.max_cpu_workers,
             "rayStartParams": {}, "template": _pod("ray-worker", k.image, k, "8", "16Gi")},
            {"groupName": "gpu", "replicas": 0, "minReplicas": 0, "maxReplicas": k.max_gpu_workers,
             "rayStartParams": {}, "template": _pod("ray-worker", k.image, k, "8", "32Gi", gpus=1)},
        ]
        cronjob = {
            "apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": f"vidgen-{entry.name}", **meta},
            "spec": {
                "schedule": entry.cron,
                "timeZone": entry.timezone,
                "suspend": entry.suspend,
                "jobTemplate": {
                    "entrypoint": shlex.join(args),
                    "shutdownAfterJobFinishes": True,
                    "ttlSecondsAfterFinished": 3600,
                    "activeDeadlineSeconds": 6 * 3600,
                    "backoffLimit": 1,
                    "metadata": {"vidgen_schedule": entry.name},
                    "rayClusterSpec": {
                        "rayVersion": k.ray_version,
                        "enableInTreeAutoscaling": True,
                        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
                        "workerGroupSpecs": workers,
                    },
                },
            },
        }
        files[f"raycronjob-{entry.name}.yaml"] = [configmap, cronjob]
    return files


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (a spec in a ConfigMap, an embedded Serve config) as readable `|` blocks."""


def _str_block(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_block)


def dump_manifest(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_ManifestDumper, sort_keys=False, width=120, allow_unicode=True)


def emit_kuberay(schedule_uri: str, out_dir: str) -> list[str]:
    """Write one manifest file per entry into out_dir (local or s3://); returns their URIs."""
    written = []
    for name, docs in kuberay_manifests(schedule_uri).items():
        header = (f"# Generated by `vidgen schedule {schedule_uri} --emit-kuberay ...` (vidgen {__version__}).\n"
                  "# The ConfigMap holds the batch spec as it was then; re-emit after changing it.\n"
                  "# Apply with kubectl apply -f; the KubeRay operator (v1.6 or later) needs its RayCronJob feature gate on.\n")
        text = header + "---\n".join(dump_manifest(d) for d in docs)
        uri = storage.join(storage.normalize(out_dir), name)
        storage.write_text(uri, text)
        written.append(uri)
    return written


# --------------------------------------------------------------------------------------------
# The job's entrypoint on the cluster


def job_output(template: str, timezone: str, cron: str | None, now: dt.datetime) -> str:
    """The output of a job started at `now` from a template with {date} (and {time}) in `timezone`.

    With `cron`, the slot is the schedule's newest one at or before `now`, so a job that starts late
    (past midnight, say) still renders into its slot's date; without, the slot is `now`.
    """
    slot = now.astimezone(check_timezone(timezone))
    if cron:
        from croniter import croniter

        slot = croniter(cron, slot + dt.timedelta(seconds=1)).get_prev(dt.datetime)
    return template.format(date=f"{slot:%Y-%m-%d}", time=f"{slot:%H%M}")


def run_job(argv: Sequence[str]) -> int:
    """`python -m vidgen.jobs run KIND [--spec PATH] [--out-template T --timezone Z] [ARGS...]`

    Runs `vidgen KIND SPEC ARGS...` on the cluster. The spec is the one that travelled with the job
    (VIDGEN_JOB_SPEC), or --spec PATH (a KubeRay ConfigMap mounted into the head pod).
    --out-template renders into `T` with {date} = today in time zone Z, or with `--cron EXPR` the date
    of EXPR's newest slot at or before now (a RayCronJob's slot, even when the job starts late)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m vidgen.jobs run")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--spec", default=None)
    p.add_argument("--out-template", default=None)
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--cron", default=None, help="the schedule that started this job: {date} is its newest slot")
    ns, rest = p.parse_known_args(list(argv))
    spec = ns.spec
    folder = None
    if spec is None:
        encoded = os.environ.get(SPEC_ENV)
        if not encoded:
            print(f"vidgen: error: no spec: give --spec PATH, or submit with `vidgen submit` (it sets {SPEC_ENV})",
                  file=sys.stderr)
            return 2
        bundle = SpecBundle.decode(encoded)
        folder = tempfile.mkdtemp(prefix="vidgen-job-")
        spec = bundle.write(folder)
    args = [ns.kind, spec, *rest]
    if ns.out_template is not None:
        args += ["--out", job_output(ns.out_template, ns.timezone, ns.cron, dt.datetime.now(dt.UTC))]
    print(f"vidgen job: vidgen {shlex.join(args)}", flush=True)
    try:
        return _run_cli(args)
    finally:
        if folder:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def _run_cli(args: list[str]) -> int:
    """`vidgen ARGS` in a child process, its exit code. The CLI sits above this module, so it is run,
    not imported; SIGTERM and SIGINT are passed on, so a job that is stopped or preempted stops the
    command as it would stop `vidgen` itself."""
    child = subprocess.Popen([sys.executable, "-m", "vidgen.cli", *args])

    def forward(signum, _frame) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run":
        print("usage: python -m vidgen.jobs run {train,render} [--spec PATH] [ARGS...]", file=sys.stderr)
        return 2
    return run_job(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
