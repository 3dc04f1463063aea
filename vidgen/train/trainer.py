"""The driver of a training run: validate, prepare the run folder, start Ray Train, summarise.

    vidgen train --family gan --preset tiny --data data/shapes --run runs/gan --workers 2 --zero-stage 2 --max-steps 20
    vidgen train jobs/train/restore-cpu.yaml --max-steps 200
    vidgen train --family gan --preset tiny --data s3://b/ds --run s3://b/runs/g --workers 2 --zero-stage 3 \\
        --max-steps 20 --checkpoint-every 10        # run again with --max-steps 30: trains steps 21-30

A run lives under RUN: Ray Train's `storage_path` is RUN's parent and its run `name` RUN's last
segment, so checkpoints land in RUN/checkpoint-step-NNNNNN; vidgen writes RUN/config.yaml,
RUN/metrics.jsonl, RUN/tb/ (TensorBoard events: `tensorboard --logdir RUN`),
RUN/samples/step-NNNNNN.mp4 and RUN/loss.png beside them. Running again on an existing RUN resumes
from its newest committed checkpoint.

The console shows the driver's lines and, once each, rank 0's `[vidgen train]` lines: a progress
line per logged step (steps/s, ETA, losses), validation metrics, checkpoints. Ray, Ray Train, Ray
Data, DeepSpeed and torch show their warnings and errors only (see `_worker_env`, `train`, and
`vidgen.runtime.init_ray`); a failed run still raises with the worker's traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from vidgen import storage
from vidgen.train.config import ConfigError, TrainConfig, check_resume, to_yaml
from vidgen.train.loop import STOP_MARKER, read_metrics  # noqa: F401  (read_metrics: part of this module's surface)

if TYPE_CHECKING:
    from vidgen.data.format import DatasetManifest

logger = logging.getLogger("vidgen.train")


@dataclass
class TrainResult:
    run: str
    steps: int
    seconds: float
    last: dict
    checkpoint: str | None
    stopped_by: str | None = None  # "SIGTERM"/"SIGINT" when told to stop: checkpointed, not finished


def dataset_overrides(cfg: TrainConfig, manifest: DatasetManifest) -> dict:
    """Model config fields implied by the dataset (frame size, clip length, channels, classes).

    The user's own `model:` overrides win.
    """
    from vidgen import models

    t, h, w, c = manifest.clip_shape
    family = models.family_class(cfg.family)
    fields = {f for f in family.Config.__dataclass_fields__}
    implied = {"channels": c, "frame_size": h, "num_frames": t}
    if family.conditional:
        implied["num_classes"] = len(manifest.labels) if manifest.labels else 0
    if h != w:
        raise ConfigError(f"data {cfg.data}: frames are {w}x{h}; training needs square frames")
    return {k: v for k, v in implied.items() if k in fields} | cfg.model


def prepare(cfg: TrainConfig, data_version: str | None = None) -> dict:
    """Everything that can fail before Ray starts: dataset (at `data_version`, default the current
    one), model config, resume compatibility.

    Returns the payload each worker receives.
    """
    from vidgen.data.format import open_dataset

    ds = open_dataset(cfg.data, version=data_version)
    splits = ds.manifest.splits
    if not splits.get(cfg.split):
        raise ConfigError(f"data {cfg.data}: split {cfg.split!r} has no clips (splits: {splits})")
    per_step = cfg.micro_batch * cfg.workers
    if splits[cfg.split] < per_step:
        raise ConfigError(f"data {cfg.data}: split {cfg.split!r} has {splits[cfg.split]} clips, fewer than "
                          f"micro_batch x workers = {cfg.micro_batch} x {cfg.workers}: use a smaller --micro-batch "
                          f"or fewer --workers")
    if cfg.style_image is not None:
        from vidgen.train.loop import load_style_image

        try:
            load_style_image(cfg.style_image)
        except storage.StorageError as e:
            raise ConfigError(f"style_image: {e}") from None
        except ValueError as e:  # names the image already
            raise ConfigError(str(e)) from None
    overrides = dataset_overrides(cfg, ds.manifest)
    from vidgen import models

    family = models.family_class(cfg.family)
    try:
        family.Config.preset(cfg.preset, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    label_names = ds.labels if family.conditional and ds.labels else None
    life = ds.manifest.life
    return {
        "config": cfg.model_dump(),
        "family_class": family,  # workers register it: a family defined outside vidgen (a test's) trains too
        "model_overrides": overrides,
        "label_names": label_names,
        "has_val": bool(cfg.val_split and splits.get(cfg.val_split)),
        "fps": ds.manifest.fps,
        "life_cell": life["cell"] if life else None,
        "data_version": ds.manifest.version,
    }


DATASET_RECORD = "dataset.json"  # RUN/dataset.json: the dataset version a run started with


def run_data_version(cfg: TrainConfig) -> str | None:
    """The dataset version an existing run started with (a resume reads the same clips), or None."""
    try:
        return storage.read_json(storage.join(cfg.run, DATASET_RECORD))["version"]
    except storage.NotFoundError:
        return None


def check_existing_run(cfg: TrainConfig) -> bool:
    """True when RUN already has a config (a resume); refuses incompatible changes."""
    uri = storage.join(cfg.run, "config.yaml")
    if not storage.exists(uri):
        return False
    old = yaml.safe_load(storage.read_text(uri)) or {}
    check_resume(old, cfg)
    return True


def train(cfg: TrainConfig, address: str | None = None) -> TrainResult:
    """Run (or resume) training; blocks until Ray Train finishes."""
    from vidgen.data import format as data_format

    resuming = check_existing_run(cfg)
    payload = prepare(cfg, run_data_version(cfg) if resuming else None)
    version = payload["data_version"]
    # Pinned for the run's length: a re-ingest into the same URI keeps the shards every epoch reads.
    try:
        data_format.pin(cfg.data, version, holder=cfg.run)
    except storage.StorageError as e:  # e.g. read-only access to the data: train, but say what is at risk
        print(f"[vidgen train] could not pin {cfg.data} version {version} ({e}); a re-ingest into that URI "
              f"may remove the shards this run reads", flush=True)
    result = _fit(cfg, payload, resuming, address)  # an exception keeps the pin too: a rerun resumes
    if not result.stopped_by:  # finished; a stopped run keeps its version pinned for the rerun (TTL 7 days)
        with contextlib.suppress(storage.StorageError):
            data_format.unpin(cfg.data, holder=cfg.run)
    return result


def _fit(cfg: TrainConfig, payload: dict, resuming: bool, address: str | None) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vidgen.data.loader import loader_data_config, read_split
    from vidgen.runtime import init_ray
    from vidgen.train.loop import train_loop_per_worker

    version = payload["data_version"]
    storage.write_text(storage.join(cfg.run, "config.yaml"), to_yaml(cfg), "application/yaml")
    storage.write_json(storage.join(cfg.run, DATASET_RECORD), {"data": cfg.data, "version": version})
    # Ray Train's controller polls the worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default
    # 2 s): each state change (group started, training done) waits up to a poll. 0.5 s cuts seconds from
    # the start and the end of every run at no measurable cost to the steps (bench/startup.py).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray_started = time.perf_counter()
    init_ray(address)
    ray_seconds = time.perf_counter() - ray_started
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":  # init_ray started this Ray
        start_ray_data_actors()

    import ray
    import ray.data

    # Ray Data's per-operator progress bars would interleave with the step lines of every worker,
    # and each epoch's execution would print its plan. The datasets carry this context to the
    # actor that feeds the workers (which still prints one "execution finished" line per epoch).
    # Ray Data logs each read's plan ("Estimated parquet encoding ratio ...") at INFO in this process.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    cpus = worker_cpus(cfg, ray.cluster_resources().get("CPU", 0))
    datasets = {"train": read_split(cfg.data, cfg.split, version=version)}
    if payload["has_val"]:
        datasets["val"] = read_split(cfg.data, cfg.val_split, version=version)
    fs, parent_path = storage.pyarrow_filesystem(storage.parent(cfg.run))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.gpu else {})},
        ),
        run_config=RunConfig(
            name=storage.basename(cfg.run),
            storage_path=parent_path if storage.is_s3(cfg.run) else storage.parent(cfg.run),
            storage_filesystem=fs if storage.is_s3(cfg.run) else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env()},
            # Ray Train's INFO lines (worker group started, each rank's reports, each checkpoint)
            # stay in its log files, /tmp/ray/session_latest/logs/train/; warnings and errors show.
            # A failure that max_failures lets Ray Train retry is one of those INFO lines (with its
            # traceback, in ray-train-sys-controller-*.log); rank 0 then prints "resuming from the
            # checkpoint at step N". A failure that ends the run is raised here with its traceback.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=loader_data_config(),
    )
    print(f"[vidgen train] Ray ready in {ray_seconds:.1f} s; "
          f"{'resuming' if resuming else 'starting'} {cfg.family}/{cfg.preset} run {cfg.run} "
          f"on {cfg.workers} worker(s), ZeRO-{cfg.zero_stage}, {cfg.precision}", flush=True)
    started = time.perf_counter()
    with stop_on_signal(cfg.run) as stopped_by:
        result = trainer.fit()
    seconds = time.perf_counter() - started
    rows = read_metrics(cfg.run)
    plot_losses(cfg.run, rows)
    last = rows[-1] if rows else {}
    return TrainResult(cfg.run, int(last.get("step", 0)), seconds, last,
                       result.checkpoint.path if result.checkpoint else None, stopped_by.by)


def start_ray_data_actors() -> None:
    """Create now, on a local Ray, the two actors Ray Data makes the first time it runs there: its
    stats actor and its autoscaling coordinator (named, detached, one per Ray). Each is a new Python
    process (about 1.7 CPU-s on 2 cores), and Ray Train's controller and the first batch of data
    wait for them one after the other; created here, they start while the controller starts, and
    Ray Data finds them by name. To the first step of bench/startup.py's command: 30.1 s against
    31.9 s (3 pairs, interleaved). A Ray whose internals moved (another version) makes them itself,
    as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_autoscaling_coordinator()
        get_or_create_stats_actor()
    except (ImportError, AttributeError, TypeError) as e:
        logger.debug(f"Ray Data's actors are left to Ray Data: {type(e).__name__}: {e}")


@contextlib.contextmanager
def stop_on_signal(run: str):
    """While inside: SIGTERM (a spot node's notice, a stopped job) or Ctrl-C asks the workers to save
    a checkpoint after their current step and stop (RUN/_stop_requested, which rank 0 polls)."""
    from vidgen.runtime import stop_on_signal as on_signal

    marker = storage.join(run, STOP_MARKER)
    storage.delete(marker)  # left by a driver killed while stopping: it must not stop this run

    def ask_the_workers() -> None:
        storage.write_json(marker, {"at": time.time()})

    try:
        with on_signal("saving a checkpoint after the current step, then stopping", ask_the_workers) as stop:
            yield stop
    finally:
        storage.delete(marker)


def worker_cpus(cfg: TrainConfig, cluster_cpus: float) -> float:
    """Logical CPUs each worker reserves: its threads, but always leaving one CPU for Ray Data.

    On a laptop (2 CPUs, 2 workers) reserving everything would starve the data pipeline that
    feeds the workers, and training would wait forever; there each worker reserves less.
    """
    want = float(cfg.threads_per_worker)
    if cfg.workers * want + 1 <= cluster_cpus:
        return want
    fitted = max(cluster_cpus - 1, 0.5) / cfg.workers
    print(f"[vidgen train] {cluster_cpus:g} CPUs for {cfg.workers} workers: each reserves {fitted:.2f} CPU "
          f"so Ray Data keeps one to read clips", flush=True)
    return fitted


# Worker settings with their defaults; a value in the driver's environment wins.
WORKER_ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    # Ray Train 2.60 replaces print() in workers with a call to the root logger, whose console
    # handler writes the line to stderr; it also tees the line to stdout whenever sys.stdout is
    # not sys.__stdout__, which in a Ray worker is always (Ray rebinds sys.stdout to an unbuffered
    # writer). Both streams reach the driver, so every line showed twice. Off, print() is print().
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def _worker_env() -> dict[str, str]:
    """Settings workers need that Ray does not carry: DeepSpeed's accelerator, Ray Train's print
    patch off."""
    return {k: os.environ.get(k, default) for k, default in WORKER_ENV_DEFAULTS.items()}


def plot_losses(run: str, rows: list[dict]) -> str | None:
    """RUN/loss.png: every loss-like scalar against the step."""
    keys = sorted({k for r in rows for k in r if k.startswith("loss") or k.endswith("_loss")})
    if not rows or not keys:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(storage.basename(run))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    uri = storage.join(run, "loss.png")
    storage.write_bytes(uri, buf.getvalue(), "image/png")
    return uri


def format_result(r: TrainResult) -> str:
    metrics = " ".join(f"{k}={v}" for k, v in r.last.items() if k not in ("step", "epoch"))
    if r.stopped_by:
        return (f"stopped by {r.stopped_by} at step {r.steps} after {r.seconds:.1f} s; checkpoint: {r.checkpoint}\n"
                f"the same `vidgen train` command resumes from it")
    return (f"trained {r.run} to step {r.steps} in {r.seconds:.1f} s\n"
            f"last: {metrics}\ncheckpoint: {r.checkpoint}\n"
            f"curves: tensorboard --logdir {r.run}")
