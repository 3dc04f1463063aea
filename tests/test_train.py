"""Training through Ray Train + DeepSpeed on CPU/gloo: every family, ZeRO-2/3 on S3, resume, faults, export."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vidgen import models, storage
from vidgen.data import synth
from vidgen.train.config import ConfigError, load_config, validate
from vidgen.train.export import export, probe_output
from vidgen.train.trainer import read_metrics, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    synth.synthesize("shapes", 40, 8, 32, str(d / "shapes"), seed=0, val_fraction=0.2, progress=False)
    synth.synthesize("life", 24, 8, 32, str(d / "life"), seed=0, val_fraction=0.2, progress=False)
    from PIL import Image

    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[:, ::4] = (255, 200, 0)
    Image.fromarray(stripes).save(d / "style.png")
    return d


def config(datasets, run: str, **over):
    base = {
        "family": "gan",
        "preset": "tiny",
        "data": str(datasets / "shapes"),
        "run": run,
        "workers": 1,
        "zero_stage": 0,
        "micro_batch": 4,
        "max_steps": 2,
        "checkpoint_every": 2,
        "eval_batches": 1,
    }
    return validate({**base, **over})


def assert_trained_two_steps(run: str, family: str, result=None) -> None:
    """What every family's 2-step run leaves: finite metrics for steps 1-2, a checkpoint, a sample
    video, its config and loss curve, and the validation figures its family reports."""
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and (result is None or result.steps == 2)
    assert all(np.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float))
    for name in ("checkpoint-step-000002/vidgen_state.json", "samples/step-000002.mp4", "config.yaml", "loss.png"):
        assert storage.exists(storage.join(run, name)), name
    if family in ("restore", "vae", "convlstm"):
        assert "val_psnr" in rows[-1] and "val_ssim" in rows[-1]
    if family == "convlstm":
        assert 0.0 <= rows[-1]["val_life_rule_accuracy"] <= 1.0


# gan and restore train through the trainer in test_two_workers_zero_stages_on_s3, with these checks
@pytest.mark.parametrize("family", ["vae", "convlstm", "style"])
def test_every_family_trains_through_the_trainer(family, datasets, tmp_path, ray_session):
    over = {"family": family}
    if family == "convlstm":
        over["data"] = str(datasets / "life")
    if family == "style":
        over["style_image"] = str(datasets / "style.png")
    run = str(tmp_path / "run")
    assert_trained_two_steps(run, family, train(config(datasets, run, **over)))
    # On a local Ray (one node, nothing to drain) Ray Train starts no PreemptionWatcher: an actor
    # of its own, a process whose start cost 2.5 CPU-seconds of every run's start on 2 cores
    from ray.util.state import list_actors

    assert not list_actors(filters=[("class_name", "=", "PreemptionWatcher")], raise_on_missing_output=False)


class _Payload:
    """What a hostile pickle can do on load: here, create a folder."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_export_unpickles_only_tensors_and_refuses_keys_leaving_its_folder(datasets, tmp_path, ray_session,
                                                                           monkeypatch):
    from vidgen.train import export as export_module
    from vidgen.train.export import ExportError

    run = str(tmp_path / "run")
    train(config(datasets, run))  # ZeRO-0: each part's module is one pickle, mp_rank_00_model_states.pt
    states = os.path.join(run, "checkpoint-step-000002", "generator", "ds", "mp_rank_00_model_states.pt")
    pwned = tmp_path / "pwned"
    torch.save({**torch.load(states, weights_only=True), "module": _Payload(str(pwned))}, states)
    with pytest.raises(ExportError, match="refusing to load it"):
        export(run, str(tmp_path / "model"))
    assert not pwned.exists()  # nothing in the run folder ran on the exporting host

    ckpt = "s3://runs/run/checkpoint-step-000002"  # keys an S3 server keeps as written
    monkeypatch.setattr(export_module.storage, "list_prefix",
                        lambda uri: [f"{ckpt}/vidgen_state.json", f"{ckpt}/generator/../../../../escape.txt"])
    fetched = []
    monkeypatch.setattr(export_module.storage, "download_file", lambda obj, path: fetched.append(path))
    with pytest.raises(ExportError, match="escape.txt: refusing a checkpoint key that leaves the checkpoint folder"):
        export_module._download(ckpt, str(tmp_path / "download"))
    assert fetched == []  # refused before anything was written


@pytest.mark.parametrize("family,stage,precision", [("gan", 2, "bf16"), ("gan", 3, "fp32"), ("restore", 3, "fp32")])
def test_two_workers_zero_stages_on_s3(family, stage, precision, datasets, s3_root, ray_session, tmp_path, capfd):
    """Two ranks under ZeRO-2/3 with the run in S3 (ZeRO-2 in fp32: the resume tests below); each run
    leaves what a run leaves, the GAN at stage 3 also resumes, and each exports.

    The GAN at stage 2 trains in bf16 (the GPU configs' precision): both engines' weights are bf16
    while data and noise come in float32; the EMA generator it exports stays float32.
    """
    run = storage.join(s3_root, "runs", f"{family}-z{stage}")
    probe = tmp_path / "live.safetensors"
    cfg = config(datasets, run, family=family, workers=2, zero_stage=stage, precision=precision, max_steps=2,
                 probe_out=str(probe))
    assert_trained_two_steps(run, family, train(cfg))
    names = {u.split("/")[-1] for u in storage.list_prefix(storage.join(run, "checkpoint-step-000002"))}
    if stage == 3:  # both ranks' partitions were merged into the one checkpoint
        assert any(n.startswith("zero_pp_rank_0") for n in names) and any(n.startswith("zero_pp_rank_1") for n in names)
    if family == "gan" and stage == 3:
        # A second run with a higher max_steps trains steps 3-4 only.
        train(config(datasets, run, family=family, workers=2, zero_stage=stage, max_steps=4, probe_out=str(probe)))
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    # The export of the newest checkpoint equals the live model captured inside the run.
    out = storage.join(s3_root, "models", f"{family}-z{stage}")
    capfd.readouterr()
    export(run, out)
    assert "checkpoint shards" not in capfd.readouterr().err  # DeepSpeed's consolidation bars stay off the console
    exported = models.load(out)
    assert torch.allclose(probe_output(exported), load_file(probe)["output"], atol=1e-5)
    if family == "gan":
        assert exported.label_names == ["circle", "square", "triangle"]


def test_a_reingest_while_a_run_trains_keeps_the_version_it_reads(tmp_path, ray_session, monkeypatch):
    """Each epoch reads the run's shards again: a re-ingest into the same URI mid-run must not delete
    them (the run pins its version), and the run records the version it started with."""
    import threading
    import time

    from vidgen.data import format as fmt

    data = str(tmp_path / "shapes")
    first = synth.synthesize("shapes", 40, 8, 32, data, seed=0, val_fraction=0.2, progress=False)
    monkeypatch.setenv(fmt.GRACE_ENV, "0")  # nothing but the pin keeps the run's version
    run = str(tmp_path / "run")
    reingested = []

    def reingest_once_the_run_has_started():
        deadline = time.monotonic() + 120
        while not read_metrics(run) and time.monotonic() < deadline:  # in its first epoch
            time.sleep(0.2)
        reingested.append(fmt.live_pins(data))
        for seed in (1, 2):  # two commits: the run's version is neither the current nor the previous one
            reingested.append(synth.synthesize("shapes", 40, 8, 32, data, seed=seed, val_fraction=0.2, progress=False))
        reingested.append(read_metrics(run))

    thread = threading.Thread(target=reingest_once_the_run_has_started)
    thread.start()
    try:  # 32 training clips, 4 a step: 8 steps an epoch, so steps 9-20 read the shards again
        train(config(tmp_path, run, data=data, max_steps=20, checkpoint_every=20, val_split=""))
    finally:
        thread.join()
    pins, *_, metrics_then = reingested
    assert [p["version"] for p in pins] == [first.version] and len(metrics_then) < 20  # while it ran
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 21))
    assert storage.read_json(storage.join(run, "dataset.json"))["version"] == first.version
    assert not fmt.live_pins(data)  # the run is over: its pin is gone
    third = synth.synthesize("shapes", 40, 8, 32, data, seed=3, val_fraction=0.2, progress=False)
    with pytest.raises(Exception, match=f"version {first.version} is gone"):  # a resume reads the same clips or none
        train(config(tmp_path, run, data=data, max_steps=22, checkpoint_every=22, val_split=""))
    assert third.version != first.version


def test_stopped_runs_resume_where_they_stopped_and_match_an_uninterrupted_one(datasets, tmp_path, ray_address):
    """A spot node's notice: SIGTERM to `vidgen train` mid-run. It checkpoints after the current step
    and exits with 143 well within the notice; the same command resumes and reproduces the losses.
    And a run that ended at its max_steps, run again with a higher one, trains on from its last
    checkpoint with the same losses. One uninterrupted run is the reference for both."""
    import signal
    import time

    import yaml

    common = dict(family="gan", workers=2, zero_stage=2, micro_batch=4, checkpoint_every=1000, val_split="",
                  eval_batches=1)
    preempted = str(tmp_path / "preempted")
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({"preset": "tiny", "data": str(datasets / "shapes"), "run": preempted,
                                    "max_steps": 1000, **common}))
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.Popen([sys.executable, "-m", "vidgen.cli", "train", str(spec)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(preempted)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        told = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    seconds = time.monotonic() - told
    stopped_at = read_metrics(preempted)[-1]["step"]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert f"stopped by SIGTERM at step {stopped_at}" in output and seconds < 30, (seconds, output[-2000:])
    assert 3 <= stopped_at < 1000 and os.path.isdir(os.path.join(preempted, f"checkpoint-step-{stopped_at:06d}"))
    assert not os.path.exists(os.path.join(preempted, "_stop_requested"))
    from vidgen.data import format as fmt

    def pinned_by_the_run() -> list[dict]:
        return [p for p in fmt.live_pins(str(datasets / "shapes")) if p.get("holder") == preempted]

    assert pinned_by_the_run()  # a stopped run keeps its data version pinned for the rerun

    total = stopped_at + 3
    train(config(datasets, preempted, **{**common, "max_steps": total}))  # the same run, resumed
    assert not pinned_by_the_run()  # finished: unpinned
    extended = str(tmp_path / "extended")
    train(config(datasets, extended, **{**common, "max_steps": 2}))
    train(config(datasets, extended, **{**common, "max_steps": 4}))  # steps 3-4, from the step-2 checkpoint
    whole = str(tmp_path / "whole")
    train(config(datasets, whole, **{**common, "max_steps": total}))
    a = read_metrics(whole)
    for run, steps in ((preempted, total), (extended, 4)):
        b = read_metrics(run)
        assert [r["step"] for r in b] == list(range(1, steps + 1)), run  # each step once
        for ra, rb in zip(a[:steps], b, strict=True):
            for key in ("d_loss", "g_loss"):
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), (run, ra["step"], key)


def _train_workers(alive: bool = False) -> dict[str, int]:
    """Ray Train's worker actors on this Ray (those alive now, or all that ever lived): id -> pid."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive else [])
    return {a.actor_id: a.pid for a in list_actors(filters=filters, limit=10_000)}


def test_worker_killed_mid_run_recovers_from_checkpoint(datasets, tmp_path, ray_session):
    """A worker SIGKILLed from outside after the step-5 checkpoint: Ray Train starts a new group,
    which resumes from a checkpoint, and the metrics show each step once."""
    import signal
    import threading
    import time

    run = str(tmp_path / "run")
    before = _train_workers()
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(read_metrics(run)) < 5:  # flushed with the step-5 checkpoint
            time.sleep(0.05)
        alive = [pid for actor, pid in _train_workers(alive=True).items() if actor not in before]
        if alive:
            os.kill(alive[-1], signal.SIGKILL)
            killed.append(alive[-1])

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    train(config(datasets, run, family="restore", workers=2, zero_stage=2, max_steps=60, checkpoint_every=5,
                 max_failures=1, val_split=""))
    killer.join(timeout=60)
    assert killed, "no live worker to kill"
    assert len(set(_train_workers()) - set(before)) >= 4  # the first group of 2, then the restarted one
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 61))  # each step once after the restart


def test_resume_refuses_a_changed_model(datasets, tmp_path, ray_session):
    run = str(tmp_path / "run")
    train(config(datasets, run, family="vae", max_steps=1, checkpoint_every=1))
    with pytest.raises(ConfigError, match="preset"):
        train(config(datasets, run, family="vae", preset="small", max_steps=2))
    with pytest.raises(ConfigError, match="model"):
        train(config(datasets, run, family="vae", model={"width": 16}, max_steps=2))
    with pytest.raises(ConfigError, match="workers"):
        train(config(datasets, run, family="vae", workers=2, max_steps=2))
    with pytest.raises(ConfigError, match="zero_stage"):
        train(config(datasets, run, family="vae", zero_stage=2, max_steps=2))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--zero-stage", "5"], "--zero-stage"),
        (["--set", "zero_stag=2"], "zero_stag"),
        (["--set", "model.g_widht=8"], "g_widht"),
        (["--micro-batch", "0"], "micro_batch"),
        (["--set", "model.g_width=wide"], "g_width"),
        (["--micro-batch", "64"], "fewer than micro_batch x workers = 64 x 2"),  # the split has 32 clips
        (["--family", "style", "--set", "style_image=no-such-style.png"], "no-such-style.png"),
    ],
)
def test_bad_config_fails_before_ray_starts(args, needle, datasets, tmp_path):
    cmd = [sys.executable, "-m", "vidgen.cli", "train", "--family", "gan", "--data", str(datasets / "shapes"),
           "--run", str(tmp_path / "run"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "run").exists()


def test_config_file_flags_and_set_layer(datasets, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"family": "gan", "data": str(datasets / "shapes"), "run": "r", "max_steps": 5}))
    cfg = load_config(str(path), {"max_steps": 7, "lr": None}, ["model.g_width=8", "seed=3"])
    assert (cfg.max_steps, cfg.seed, cfg.model, cfg.run) == (7, 3, {"g_width": 8}, os.path.abspath("r"))
    path.write_text("family: gan\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(str(path), {}, [])


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "jobs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_example_train_configs_validate(path):
    sets = ["style_image=style.png"] if "style" in path.name else []
    cfg = load_config(str(path), {}, sets)
    assert cfg.max_steps >= cfg.checkpoint_every


def test_time_budget_stops_every_rank_with_a_checkpoint(datasets, tmp_path, ray_session):
    run = str(tmp_path / "run")
    result = train(config(datasets, run, workers=2, zero_stage=2, max_steps=10_000, checkpoint_every=10_000,
                          max_minutes=0.05, val_split=""))
    assert 1 <= result.steps < 10_000
    assert storage.exists(os.path.join(run, f"checkpoint-step-{result.steps:06d}", "vidgen_state.json"))
