"""Ray's Jobs API from the submitting side: build a job, submit it, follow its logs, wait for its state.

    vidgen submit render jobs/batches/ads.yaml --address http://HEAD:8265 --wait
    vidgen submit train jobs/train/gan-gpu.yaml --set max_steps=1000 --follow
    vidgen submit render spec.yaml --dry-run                       # what would be submitted

CPU-sized, on this machine: `ray start --head --dashboard-host=127.0.0.1` then
`vidgen submit render SPEC --address http://127.0.0.1:8265 --wait`.

What a submitted job carries (`build_submission`):
- the spec's content (`vidgen.jobs.bundle`), in the job's runtime environment as VIDGEN_JOB_SPEC;
  the entrypoint `python -m vidgen.jobs run KIND` (`vidgen.jobs.entry.run_job`) runs it.
- the code: the vidgen checkout as the job's `working_dir` (Ray puts it first on PYTHONPATH), or
  nothing with `--no-working-dir` when the cluster image has vidgen installed.
- settings, never secrets: the standard non-secret AWS variables (endpoint, region, retries) and
  VIDGEN_* settings. Credentials come from the cluster's own identity: the instance profile on EC2
  (cluster/aws.yaml), IRSA or EKS Pod Identity through the pods' service account on KubeRay, or,
  for a head started by hand, the environment of the shell that ran `ray start`.

A submission id is `vidgen-KIND-NAME-HASH`: the spec's name and a hash of its content and
arguments, so a retried submit attaches to the job it already started (the Jobs API refuses a
second job with the same id); `--submission-id` starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vidgen import __version__
from vidgen.jobs.bundle import MAX_SPEC_BYTES, SPEC_ENV, JobsError, SpecBundle, read_spec

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
    root = Path(__file__).resolve().parents[2]  # vidgen/jobs/submit.py -> the checkout
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
        if k.startswith("VIDGEN_") and k != SPEC_ENV and not SECRET_NAME.search(k):
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
