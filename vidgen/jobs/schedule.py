"""Scheduled batches: `vidgen schedule`, cron entries in time zones submitted as Ray jobs, each slot once.

    vidgen schedule jobs/schedules.yaml --address http://HEAD:8265  # submit due slots, forever
    vidgen schedule jobs/schedules.yaml --once --state s3://bucket/vidgen/schedule-state.json
    vidgen schedule jobs/schedules.yaml --status --state s3://bucket/vidgen/schedule-state.json
    vidgen schedule jobs/schedules.yaml --dry-run --now 2026-11-23T06:30:00+01:00   # CPU-sized: no cluster

A schedule's slot has the id `vidgen-sched-ENTRY-<slot time, UTC>`: every scheduler that sees the
slot submits under that id, the Jobs API accepts exactly one, and the others report it as already
submitted. `--state` (a `ScheduleState`, JSON in object storage or a file) keeps each entry's last
slot and recent runs. The same schedules as KubeRay RayCronJobs: `vidgen.jobs.kuberay`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidgen import storage
from vidgen.jobs.bundle import JobsError, read_spec
from vidgen.jobs.submit import _one_line, build_submission, connect, submit

# --------------------------------------------------------------------------------------------
# The schedule file


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
TEMPLATE_FIELDS = ("date", "time")
# A Kubernetes quantity: 8, 0.5, 500m, 16Gi, 1e3 (kubernetes.io: common-definitions/quantity)
QUANTITY = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?")


class PodSize(BaseModel):
    """A Ray pod's resources, its requests and limits alike: CPU and memory as Kubernetes quantities."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    cpu: str  # e.g. "8" or "500m"
    memory: str  # e.g. "16Gi"
    gpus: int = Field(0, ge=0)  # the nvidia.com/gpu limit; 0: none

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not QUANTITY.fullmatch(v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity: expected e.g. 8, 500m or 16Gi")
        return v


class KubeRaySettings(BaseModel):
    """What `--emit-kuberay` puts into the manifests (the image, the pods' identity and sizes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = "ghcr.io/my-org/vidgen:0.1.0"
    service_account: str = "vidgen"  # bound to an IAM role (IRSA / Pod Identity) with S3 access
    namespace: str | None = None
    ray_version: str = "2.60.0"
    max_cpu_workers: int = Field(4, ge=0)
    max_gpu_workers: int = Field(2, ge=0)
    head: PodSize = PodSize(cpu="2", memory="8Gi")  # runs no tasks (num-cpus 0): the job's driver
    cpu_worker: PodSize = PodSize(cpu="8", memory="16Gi")  # the "cpu" worker group
    gpu_worker: PodSize = PodSize(cpu="8", memory="32Gi", gpus=1)  # the "gpu" worker group


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


# --------------------------------------------------------------------------------------------
# What a scheduler keeps between passes (--state)


MAX_RUNS_KEPT = 50


def _iso_time(value: Any, where: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not an ISO time") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, not {type(value).__name__}")
    return value


@dataclass
class ScheduleRun:
    """One slot of an entry as the state keeps it: submitted (or found already submitted), or skipped."""

    slot: dt.datetime | None = None  # UTC
    outcome: str | None = None  # "submitted", "exists" or "skipped"
    submission_id: str | None = None
    output: str | None = None
    detail: str | None = None  # skipped: how many slots, the first and the last
    at: dt.datetime | None = None  # when it was submitted

    @classmethod
    def from_dict(cls, data: Any, where: str = "run") -> ScheduleRun:
        data = _mapping(data, where)
        return cls(slot=_iso_time(data.get("slot"), f"{where}.slot"), outcome=data.get("outcome"),
                   submission_id=data.get("submission_id"), output=data.get("output"), detail=data.get("detail"),
                   at=_iso_time(data.get("at"), f"{where}.at"))

    def to_dict(self) -> dict[str, Any]:
        """Only the fields this run has: a skipped slot has no submission_id, output or at."""
        data = {"slot": self.slot.isoformat() if self.slot else None, "outcome": self.outcome,
                "submission_id": self.submission_id, "output": self.output, "detail": self.detail,
                "at": self.at.isoformat(timespec="seconds") if self.at else None}
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class EntryState:
    """An entry's last slot handled (submitted, found submitted, or skipped) and its newest runs."""

    last_slot: dt.datetime | None = None  # UTC; None: no slot handled yet
    runs: list[ScheduleRun] = field(default_factory=list)  # oldest first, at most MAX_RUNS_KEPT

    def remember(self, run: ScheduleRun) -> None:
        """`run`'s slot is handled: it becomes the last slot, and the newest run."""
        self.last_slot = run.slot
        self.runs = [*self.runs, run][-MAX_RUNS_KEPT:]

    @classmethod
    def from_dict(cls, data: Any, where: str = "entry") -> EntryState:
        data = _mapping(data, where)
        runs = data.get("runs") or []
        if not isinstance(runs, list):
            raise ValueError(f"{where}.runs: expected a list, not {type(runs).__name__}")
        return cls(last_slot=_iso_time(data.get("last_slot"), f"{where}.last_slot"),
                   runs=[ScheduleRun.from_dict(r, f"{where}.runs[{i}]") for i, r in enumerate(runs)])

    def to_dict(self) -> dict[str, Any]:
        return {"last_slot": self.last_slot.isoformat() if self.last_slot else None,
                "runs": [r.to_dict() for r in self.runs]}


@dataclass
class ScheduleState:
    """What `--state` keeps between passes: each entry's last slot and recent runs, by entry name.

    As JSON: {"format": 1, "entries": {NAME: {"last_slot": ISO time or null, "runs": [{"slot", "outcome",
    "submission_id", "output", "at"} or {"slot", "outcome": "skipped", "detail"}, ...]}}}"""

    FORMAT: ClassVar[int] = 1

    entries: dict[str, EntryState] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> ScheduleState:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError("not a vidgen schedule state file")
        entries = _mapping(data.get("entries") or {}, "entries")
        return cls({name: EntryState.from_dict(e, f"entries.{name}") for name, e in entries.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "entries": {name: e.to_dict() for name, e in self.entries.items()}}


def load_state(uri: str | None) -> ScheduleState:
    """The state at `uri`; an empty one without a URI or when nothing is there yet."""
    if not uri:
        return ScheduleState()
    try:
        data = storage.read_json(uri)
    except storage.NotFoundError:
        return ScheduleState()
    try:
        return ScheduleState.from_dict(data)
    except ValueError as e:
        raise JobsError(f"--state {uri}: {e}") from None


# --------------------------------------------------------------------------------------------
# Passes over the schedule


SKIP_COUNT_LIMIT = 10_000


@dataclass
class SlotResult:
    entry: str
    slot: dt.datetime | None
    outcome: Literal["submitted", "exists", "failed", "planned", "skipped"]
    submission_id: str = ""
    output: str = ""
    detail: str = ""
    skipped: int = 0  # for "skipped": how many slots (the first and last are in detail)


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
        record = state.entries.setdefault(entry.name, EntryState())
        last = record.last_slot
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
                    record.remember(ScheduleRun(slot=missed[-1].astimezone(dt.UTC), outcome="skipped", detail=detail))
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
            record.remember(ScheduleRun(slot=slot.astimezone(dt.UTC), outcome=outcome, submission_id=sid, output=out,
                                        at=dt.datetime.now(dt.UTC)))
    if state_uri and not dry_run:
        storage.write_json(state_uri, state.to_dict())
    return results


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
        history = list(state.entries[e.name].runs) if e.name in state.entries else []
        if not history and jobs:
            mine = sorted(((sid, j.metadata.get("vidgen_slot")) for sid, j in jobs.items()
                           if (j.metadata or {}).get("vidgen_schedule") == e.name), key=lambda p: p[1] or "")
            history = [ScheduleRun(slot=_iso_time(slot, f"job {sid}: metadata vidgen_slot"), outcome="submitted",
                                   submission_id=sid) for sid, slot in mine]
        if not history:
            lines.append("  no runs yet")
        for r in history[-runs:]:
            when = show_time(r.slot, e.zone) if r.slot else "?"
            if r.outcome == "skipped":
                lines.append(f"  {when}  skipped: {r.detail or ''}")
                continue
            job = jobs.get(r.submission_id or "")
            status = str(getattr(job.status, "value", job.status)) if job else ("not on the cluster" if jobs else "?")
            lines.append(f"  {when}  {r.submission_id or ''}  {status}")
    return "\n".join(lines)
