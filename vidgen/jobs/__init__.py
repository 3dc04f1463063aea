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

The modules, each importing only those above it:
- `bundle`    what travels with a job: the spec's content (`SpecBundle`, `read_spec`), `JobsError`
- `submit`    the Jobs API client: build a submission, submit it, follow its logs, wait for its state
- `schedule`  the schedule file, passes over it (each slot once) and the state kept between them
- `kuberay`   the schedules as KubeRay RayCronJob manifests, sized by the schedule file
- `entry`     what a job runs: `vidgen train` / `vidgen render` (also for the CLI and jobs/*.py)
              and `python -m vidgen.jobs run KIND`, a submitted job's entrypoint

Nothing here imports the CLI, which sits above this package and calls into it.
"""

from vidgen.jobs.bundle import KINDS, SPEC_ENV, JobsError, SpecBundle, read_spec
from vidgen.jobs.entry import job_output, run_command, run_job
from vidgen.jobs.kuberay import dump_manifest, emit_kuberay, kuberay_manifests
from vidgen.jobs.schedule import (
    KubeRaySettings,
    PodSize,
    ScheduleDaemon,
    ScheduleEntry,
    ScheduleFile,
    ScheduleState,
    SlotResult,
    batch_uri,
    load_schedules,
    load_state,
    run_pass,
    run_schedule,
    schedule_status,
)
from vidgen.jobs.submit import (
    TERMINAL,
    WORKING_DIR_EXCLUDES,
    Outcome,
    Submission,
    build_submission,
    check_ray_versions,
    connect,
    run_submit,
    spec_submission_id,
    submit,
    wait_for,
)

__all__ = [
    "KINDS", "SPEC_ENV", "TERMINAL", "WORKING_DIR_EXCLUDES", "JobsError", "KubeRaySettings", "Outcome", "PodSize",
    "ScheduleDaemon", "ScheduleEntry", "ScheduleFile", "ScheduleState", "SlotResult", "SpecBundle", "Submission",
    "batch_uri", "build_submission", "check_ray_versions", "connect", "dump_manifest", "emit_kuberay", "job_output",
    "kuberay_manifests", "load_schedules", "load_state", "read_spec", "run_command", "run_job", "run_pass",
    "run_schedule", "run_submit", "schedule_status", "spec_submission_id", "submit", "wait_for",
]
