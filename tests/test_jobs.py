"""Cluster jobs and schedules against a real Ray head: `ray start --head` on 127.0.0.1 with its job
server on a free port, moto's S3, the real ffmpeg.

The head gets the dummy S3 credentials the way a cluster node gets an instance profile: from its
own environment (the `ray start` process inherits the test's). Jobs get only non-secret settings.
The head is this module's own (its own temp dir, ports and process group), stopped by the fixture
without touching any other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from vidgen import cli, jobs, models, storage

REPO = Path(__file__).resolve().parent.parent
HEAD_MARK = "VIDGEN_TEST_RAY_HEAD"  # in the environment of every process the head starts: how teardown finds them


def _head_processes(mark: str) -> list[int]:
    """Pids whose environment carries this head's mark (all started by the fixture's `ray start`)."""
    needle = f"{HEAD_MARK}={mark}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(d))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A Ray head on 127.0.0.1 with the dashboard/job server; yields its http:// address."""
    temp = tempfile.mkdtemp(prefix="vgj-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    mark = uuid.uuid4().hex
    dashboard = free_port()
    env = {
        **os.environ,
        HEAD_MARK: mark,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep Ray on 127.0.0.1 (vidgen.runtime._loopback_only)
        "RAY_AUTH_MODE": "disabled",  # no token shared through ~/.ray between this head and other Rays
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this venv
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    ports = {"port": free_port(), "dashboard-port": dashboard, "ray-client-server-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "runtime-env-agent-port": free_port(), "metrics-export-port": free_port(),
             "node-manager-port": free_port(), "object-manager-port": free_port()}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",
           "--object-store-memory=400000000", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(os.path.join(temp, "ray-start.log"), "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}: {open(log.name).read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job server at {address} did not come up: {open(log.name).read()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        with contextlib.suppress(Exception):  # end running jobs first: their drivers live in their own sessions
            client = jobs.connect(address)
            for job in client.list_jobs():
                if job.status.value not in jobs.TERMINAL:
                    client.stop_job(job.submission_id)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _head_processes(mark)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if pids:
                time.sleep(2)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def gan_model(s3_bucket):
    import torch

    torch.manual_seed(0)
    uri = f"s3://{s3_bucket}/jobs-{uuid.uuid4().hex[:8]}/models/gan"
    models.save(models.build("gan", "tiny", num_classes=2, label_names=["a", "b"]), uri)
    return uri


def tiny_batch(path: Path, out: str, model: str, name: str = "tiny-ads") -> Path:
    spec = {"name": name, "output": out, "model": model,
            "defaults": {"fps": 8, "seconds": 0.5, "preset": "ultrafast"},
            "items_from": "items.csv"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    (path.parent / "items.csv").write_text("id,mode,seed,label\nad-1,generate,1,a\nad-2,generate,2,b\n")
    return path


def submitted_ids(stdout: str, word: str = "submitted") -> list[str]:
    """Submission ids of a schedule pass's lines `ENTRY  DATE TIME TZ  OUTCOME  ID -> OUT`."""
    ids = []
    for line in stdout.splitlines():
        head, sep, _ = line.partition(" -> ")
        parts = re.split(r"\s{2,}", head)
        if sep and len(parts) >= 4 and parts[-2].strip() == word:
            ids.append(parts[-1].strip())
    return ids


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("csv_on_s3", [False, True])
def test_an_edited_items_csv_gives_a_new_submission_id(gan_model, s3_root, tmp_path, csv_on_s3):
    spec = tiny_batch(tmp_path / "spec" / "tiny.yaml", f"{s3_root}/out", gan_model)
    if csv_on_s3:  # the job reads it in place: its content must still name the job
        csv = f"{s3_root}/rows/items.csv"
        storage.write_text(csv, (spec.parent / "items.csv").read_text())
        spec.write_text(spec.read_text().replace("items_from: items.csv", f"items_from: {csv}"))

    def submission_id() -> str:
        bundle, name = jobs.read_spec("render", str(spec))
        return jobs.spec_submission_id("render", name, bundle, [])

    first = submission_id()
    assert submission_id() == first  # the same content: the same job
    edited = "id,mode,seed,label\nad-1,generate,1,a\nad-2,generate,7,b\n"
    if csv_on_s3:
        storage.write_text(csv, edited)
    else:
        (spec.parent / "items.csv").write_text(edited)
    assert submission_id() != first


def test_submit_render_waits_and_outputs_land_in_s3(ray_head, gan_model, s3_root, tmp_path):
    out = f"{s3_root}/out"
    spec = tiny_batch(tmp_path / "spec" / "tiny.yaml", out, gan_model)
    start = time.monotonic()
    code, stdout, stderr = run_cli("submit", "render", str(spec), "--address", ray_head, "--wait")
    took = time.monotonic() - start
    assert code == 0, stdout + stderr
    print(f"submit-to-finish of the tiny batch on the local head: {took:.1f} s")
    for name in ("ad-1.mp4", "ad-1.jpg", "ad-2.mp4", "items/ad-2.json", "manifest.jsonl", "index.html"):
        assert storage.exists(f"{out}/{name}"), name
    records = [json.loads(line) for line in storage.read_text(f"{out}/manifest.jsonl").splitlines()]
    assert {r["status"] for r in records} == {"ok"}

    # The job got the spec's content and non-secret settings only; credentials came from the node.
    client = jobs.connect(ray_head)
    sid = stdout.split("submitted ")[1].split()[0]
    info = client.get_job_info(sid)
    env = info.runtime_env["env_vars"]
    assert env["AWS_ENDPOINT_URL_S3"] == os.environ["AWS_ENDPOINT_URL_S3"]
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(info.runtime_env) + info.entrypoint
    assert info.metadata["vidgen_kind"] == "render"

    # The same spec again: the same id, no second job.
    code, stdout2, _ = run_cli("submit", "render", str(spec), "--address", ray_head, "--wait")
    assert code == 0
    assert "already submitted (SUCCEEDED)" in stdout2
    same = [j for j in client.list_jobs() if j.metadata.get("vidgen_spec_sha256") == info.metadata["vidgen_spec_sha256"]]
    assert [j.submission_id for j in same] == [sid]

    # Another --out is another job's content: another id (dry run: nothing submitted).
    code, dry, _ = run_cli("submit", "render", str(spec), "--out", f"{s3_root}/other", "--dry-run")
    assert code == 0 and json.loads(dry)["submission_id"] != sid


def test_failing_job_exits_nonzero_with_its_error(ray_head, s3_root, tmp_path):
    missing = f"{s3_root}/no-such-model"
    spec = tiny_batch(tmp_path / "bad.yaml", f"{s3_root}/bad-out", missing, name="broken")
    code, stdout, stderr = run_cli("submit", "render", str(spec), "--address", ray_head, "--follow")
    assert code != 0, stdout + stderr
    assert "FAILED" in stderr
    assert "no-such-model" in stdout  # --follow printed the job's own log, which names the missing model


def test_failing_job_reports_the_error_without_follow(ray_head, s3_root, tmp_path):
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({"family": "gan", "preset": "tiny", "data": f"{s3_root}/no-such-dataset",
                                    "run": f"{s3_root}/run", "workers": 1, "max_steps": 1}))
    code, stdout, stderr = run_cli("submit", "train", str(spec), "--address", ray_head, "--wait")
    assert code == 2, stdout + stderr  # the job's own exit code: its config names a dataset that is not there
    assert "FAILED (exit code 2)" in stderr
    assert "no-such-dataset" in stderr  # the job's error, from the tail of its log


def test_ray_job_submit_runs_the_jobs_entry_points(ray_head, gan_model, s3_root, tmp_path):
    """`ray job submit --working-dir . -- python jobs/render.py SPEC` (the spec inside the working dir)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    spec = tiny_batch(tmp_path / "s.yaml", f"{s3_root}/raw", gan_model, name="raw")
    entry = f"python jobs/render.py {spec}"  # an absolute spec path: this head shares the machine
    sid = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO),
                                                          "excludes": jobs.WORKING_DIR_EXCLUDES})
    outcome = jobs.wait_for(client, sid)
    assert outcome.status == "SUCCEEDED", outcome.message + outcome.logs_tail
    assert storage.exists(f"{s3_root}/raw/manifest.jsonl")


def schedule_file(tmp_path: Path, spec: Path, out_root: str, lookback_hours: float = 12, cron: str = "0 6 * * *",
                  timezone: str = "Europe/Berlin") -> Path:
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump({
        "lookback_hours": lookback_hours,
        "entries": [{"name": "ads-daily", "cron": cron, "timezone": timezone,
                     "batch": os.path.relpath(spec, tmp_path), "output": out_root + "/{date}"}],
    }))
    return path


def test_schedule_submits_each_slot_once(ray_head, gan_model, s3_root, tmp_path):
    spec = tiny_batch(tmp_path / "batches" / "ads.yaml", f"{s3_root}/unused", gan_model)
    sched = schedule_file(tmp_path, spec, f"{s3_root}/ads")
    state = f"{s3_root}/state.json"
    client = jobs.connect(ray_head)
    submitted = []
    try:
        for day in (20, 21, 22):  # 06:30 in Berlin, three days: one slot each
            code, stdout, stderr = run_cli("schedule", str(sched), "--address", ray_head, "--state", state,
                                           "--now", f"2026-11-{day}T06:30:00+01:00")
            assert code == 0, stdout + stderr
            submitted += submitted_ids(stdout)
        assert submitted == [f"vidgen-sched-ads-daily-202611{d}t0500z" for d in (20, 21, 22)]
        info = client.get_job_info(submitted[0])
        assert "--out" in info.entrypoint and f"{s3_root}/ads/2026-11-20" in info.entrypoint  # {date}: Berlin's
        assert info.metadata["vidgen_schedule"] == "ads-daily"

        # A second scheduler at the same time (its own, empty state): the Jobs API refuses the
        # duplicate id, so it submits nothing.
        code, stdout, stderr = run_cli("schedule", str(sched), "--address", ray_head, "--once", "--state",
                                       f"{s3_root}/other-state.json", "--now", "2026-11-22T06:30:00+01:00")
        assert code == 0, stdout + stderr
        assert submitted_ids(stdout) == []
        assert submitted_ids(stdout, "already submitted") == ["vidgen-sched-ads-daily-20261122t0500z"]

        # Two schedulers at once on the next slot, sharing the state: exactly one submission.
        now = dt.datetime.fromisoformat("2026-11-23T06:30:00+01:00")
        schedules = jobs.load_schedules(str(sched))
        results: list = []
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            for r in pool.map(lambda _: jobs.run_pass(str(sched), schedules, now, client=jobs.connect(ray_head),
                                                      state_uri=state), range(2)):
                results += r
        assert [r.outcome for r in results].count("submitted") == 1
        assert {r.outcome for r in results} <= {"submitted", "exists"}

        # Downtime: three days missed, a 12 h look-back: the older two are skipped, the last submitted.
        code, stdout, stderr = run_cli("schedule", str(sched), "--address", ray_head, "--state", state,
                                       "--now", "2026-11-26T06:30:00+01:00")
        assert code == 0, stdout + stderr
        assert "skipped 2 slot(s) older than the 12 h look-back: 2026-11-24 06:00 CET .. 2026-11-25 06:00 CET" in stdout
        assert submitted_ids(stdout) == ["vidgen-sched-ads-daily-20261126t0500z"]

        code, stdout, stderr = run_cli("schedule", str(sched), "--address", ray_head, "--state", state, "--status",
                                       "--now", "2026-11-26T07:00:00+01:00")
        assert code == 0, stdout + stderr
        assert "next 2026-11-27 06:00 CET" in stdout
        assert "vidgen-sched-ads-daily-20261126t0500z" in stdout and "skipped" in stdout
    finally:
        for job in client.list_jobs():  # the rendering itself is tested above; spare the 2 cores
            if (job.metadata or {}).get("vidgen_schedule") and job.status.value not in jobs.TERMINAL:
                client.stop_job(job.submission_id)


def test_the_schedule_daemon_rides_out_faults_and_submits_each_slot_once(ray_head, gan_model, s3_root, tmp_path):
    spec = tiny_batch(tmp_path / "batches" / "ads.yaml", f"{s3_root}/unused", gan_model)
    sched = schedule_file(tmp_path, spec, f"{s3_root}/daemon")
    bucket = f"vidgen-state-{uuid.uuid4().hex[:8]}"  # not there yet: the state cannot be written
    log = io.StringIO()
    daemon = jobs.ScheduleDaemon(str(sched), f"http://127.0.0.1:{free_port()}", f"s3://{bucket}/state.json", log)
    other = jobs.ScheduleDaemon(str(sched), ray_head, None, io.StringIO())  # a second scheduler, no state
    client = jobs.connect(ray_head)

    def at(berlin: str) -> dt.datetime:
        return dt.datetime.fromisoformat(f"2026-12-01T{berlin}:00+01:00")

    def slot_jobs() -> list:
        return [j for j in client.list_jobs() if (j.metadata or {}).get("vidgen_slot") == "2026-12-01T05:00:00+00:00"]

    try:
        assert daemon.step(at("06:00")) == 1  # the job server is down at the slot: back off, do not exit
        assert "cannot reach the Ray job server" in log.getvalue() and not slot_jobs()
        daemon.address = ray_head  # it is back; the state's bucket is still missing
        assert daemon.step(at("06:05")) == 2 and "pass failed" in log.getvalue()
        storage.s3_client().create_bucket(Bucket=bucket)
        sched.write_text("entries: [{name: ads-daily, cron: every day}]\n")  # an invalid edit, picked up at reload
        assert daemon.step(at("06:10")) >= 1
        assert "keeping the last valid schedule" in log.getvalue()
        assert storage.read_json(f"s3://{bucket}/state.json")["entries"]["ads-daily"]["last_slot"].startswith(
            "2026-12-01T05:00")
        daemon.step(at("05:10"))  # the clock jumps back an hour
        other.step(at("06:20"))
        assert len(slot_jobs()) == 1  # the slot was submitted once over every pass of both
    finally:
        for job in client.list_jobs():
            if (job.metadata or {}).get("vidgen_schedule") and job.status.value not in jobs.TERMINAL:
                client.stop_job(job.submission_id)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("cron", "0 25 * * *", "'0 25 * * *' is not a valid cron expression"),
    ("cron", "every day", "is not a cron expression: expected 5 fields"),
    ("timezone", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
    ("output", "s3://bucket/ads", "the template needs {date}"),
])
def test_schedule_rejects_bad_entries(tmp_path, field, value, message):
    spec = tmp_path / "ads.yaml"
    spec.write_text("name: x\n")
    entry = {"name": "ads-daily", "cron": "0 6 * * *", "timezone": "UTC", "batch": "ads.yaml",
             "output": "s3://bucket/ads/{date}", field: value}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"entries": [entry]}))
    code, stdout, stderr = run_cli("schedule", str(path), "--once", "--address", "http://127.0.0.1:9")
    assert code == 2
    assert stderr.startswith(f"vidgen: error: {path}: entries[0] (ads-daily).{field}: ")
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_schedule_dry_run_plans_slots_in_the_entry_time_zone(tmp_path, gan_model, s3_root):
    spec = tiny_batch(tmp_path / "ads.yaml", f"{s3_root}/unused", gan_model)
    # 23:30 in New York is already the next day in UTC: {date} is New York's.
    sched = schedule_file(tmp_path, spec, "s3://bucket/ads", cron="30 23 * * *", timezone="America/New_York")
    code, stdout, stderr = run_cli("schedule", str(sched), "--dry-run", "--now", "2026-11-21T05:00:00Z")
    assert code == 0, stderr
    assert "2026-11-20 23:30 EST" in stdout
    assert submitted_ids(stdout, "would submit") == ["vidgen-sched-ads-daily-20261121t0430z"]
    assert stdout.splitlines()[0].endswith(" -> s3://bucket/ads/2026-11-20")


def test_dry_run_prints_the_job_without_secrets(tmp_path, gan_model, s3_root, monkeypatch):
    monkeypatch.setenv("VIDGEN_API_TOKEN", "api-token-value")
    monkeypatch.setenv("VIDGEN_S3_SSE", "AES256")
    spec = tiny_batch(tmp_path / "tiny.yaml", f"{s3_root}/out", gan_model)
    code, stdout, _ = run_cli("submit", "render", str(spec), "--dry-run", "--workers", "2")
    assert code == 0
    job = json.loads(stdout)
    assert job["entrypoint"] == "python -m vidgen.jobs run render --workers 2"
    assert job["submission_id"].startswith("vidgen-render-tiny-ads-")
    env = job["runtime_env"]["env_vars"]
    assert env["VIDGEN_S3_SSE"] == "AES256" and "VIDGEN_API_TOKEN" not in env
    assert "api-token-value" not in stdout and os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(env)
    assert job["runtime_env"]["working_dir"] == str(REPO)
    # The same content gives the same id; an edited spec another.
    assert json.loads(run_cli("submit", "render", str(spec), "--dry-run", "--workers", "2")[1])["submission_id"] == \
        job["submission_id"]
    (tmp_path / "items.csv").write_text("id,mode,seed,label\nad-1,generate,3,a\n")
    assert json.loads(run_cli("submit", "render", str(spec), "--dry-run", "--workers", "2")[1])["submission_id"] != \
        job["submission_id"]


def test_the_job_entrypoint_runs_the_spec_that_travelled(tmp_path, monkeypatch):
    """`python -m vidgen.jobs run` on the cluster: the spec comes from the job's environment."""
    spec = tmp_path / "train.yaml"
    spec.write_text("family: gan\npreset: tiny\ndata: /nonexistent/data\nrun: /nonexistent/run\n")
    sub = jobs.build_submission("train", str(spec), working_dir=None)
    monkeypatch.setenv(jobs.SPEC_ENV, sub.runtime_env["env_vars"][jobs.SPEC_ENV])
    monkeypatch.chdir(tmp_path)
    spec.unlink()  # not on "the cluster": only the travelled copy exists
    code = subprocess.run([sys.executable, "-m", "vidgen.jobs", "run", "train", "--max-steps", "1"],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert code.returncode == 2, code.stdout + code.stderr
    assert "/nonexistent/data" in code.stderr  # it read the spec: train rejected its dataset


def test_version_mismatch_is_reported_clearly():
    with pytest.raises(jobs.JobsError, match=r"Ray version mismatch: this machine has ray 2\.60\.0, the cluster at "
                                             r"http://h:8265 runs ray 2\.59\.1"):
        jobs.check_ray_versions("2.60.0", "2.59.1", "http://h:8265")
    assert "same minor version" in jobs.check_ray_versions("2.60.0", "2.60.1", "http://h:8265")
    assert jobs.check_ray_versions("2.60.0", "2.60.0", "http://h:8265") is None


def test_submit_without_a_cluster_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tmp_path / "train.yaml"
    spec.write_text("family: gan\npreset: tiny\ndata: /d\nrun: /r\n")
    code, _, stderr = run_cli("submit", "train", str(spec))
    assert code == 2 and "no Ray cluster given" in stderr
    code, _, stderr = run_cli("submit", "train", str(spec), "--address", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach the Ray job server" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_late_cron_job_renders_into_its_slots_date():
    """A RayCronJob's {date} is its slot's date in the entry's zone, also when the pod starts late."""
    template = "s3://b/ads/{date}/{time}"
    at = dt.datetime(2026, 11, 23, 5, 0, 3, tzinfo=dt.UTC)  # 06:00:03 in Berlin: on time
    assert jobs.job_output(template, "Europe/Berlin", "0 6 * * *", at) == "s3://b/ads/2026-11-23/0600"
    late = dt.datetime(2026, 11, 23, 23, 30, tzinfo=dt.UTC)  # 00:30 on the 24th in Berlin, the 23rd's slot
    assert jobs.job_output(template, "Europe/Berlin", "0 23 * * *", late) == "s3://b/ads/2026-11-23/2300"
    assert jobs.job_output(template, "Europe/Berlin", None, late) == "s3://b/ads/2026-11-24/0030"
