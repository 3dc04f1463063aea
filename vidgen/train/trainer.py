"""The driver of a training run: validate, prepare the run folder, start Ray Train, summarise.

    vidgen train --family gan --preset tiny --data data/shapes --run runs/gan --workers 2 --zero-stage 2 --max-steps 20
    vidgen train jobs/train/restore-cpu.yaml --max-steps 200
    vidgen train --family gan --preset tiny --data s3://b/ds --run s3://b/runs/g --workers 2 --zero-stage 3 \\
        --max-steps 20 --checkpoint-every 10        # run again with --max-steps 30: trains steps 21-30

A run lives under RUN: Ray Train's `storage_path` is RUN's parent and its run `name` RUN's last
segment, so checkpoints land in RUN/checkpoint-step-NNNNNN; vidgen writes RUN/config.yaml,
RUN/metrics.jsonl, RUN/samples/step-NNNNNN.mp4 and RUN/loss.png beside them. Running again on an
existing RUN resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import yaml

from vidgen import storage
from vidgen.train.config import ConfigError, TrainConfig, check_resume, to_yaml


@dataclass
class TrainResult:
    run: str
    steps: int
    seconds: float
    last: dict
    checkpoint: str | None


def dataset_overrides(cfg: TrainConfig, manifest: dict) -> dict:
    """Model config fields implied by the dataset (frame size, clip length, channels, classes).

    The user's own `model:` overrides win.
    """
    from vidgen import models

    t, h, w, c = manifest["clip_shape"]
    fields = {f for f in models.FAMILIES[cfg.family].Config.__dataclass_fields__}
    implied = {"channels": c, "frame_size": h, "num_frames": t}
    if cfg.family == "gan":
        implied["num_classes"] = len(manifest["labels"]) if manifest.get("labels") else 0
    if h != w:
        raise ConfigError(f"data {cfg.data}: frames are {w}x{h}; training needs square frames")
    return {k: v for k, v in implied.items() if k in fields} | cfg.model


def prepare(cfg: TrainConfig) -> dict:
    """Everything that can fail before Ray starts: dataset, model config, resume compatibility.

    Returns the payload each worker receives.
    """
    from vidgen.data.format import open_dataset

    ds = open_dataset(cfg.data)
    splits = ds.manifest["splits"]
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

    try:
        models.FAMILIES[cfg.family].Config.preset(cfg.preset, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    label_names = ds.labels if cfg.family == "gan" and ds.labels else None
    life = ds.manifest.get("life")
    return {
        "config": cfg.model_dump(),
        "model_overrides": overrides,
        "label_names": label_names,
        "has_val": bool(cfg.val_split and splits.get(cfg.val_split)),
        "fps": ds.manifest["fps"],
        "life_cell": life["cell"] if life else None,
    }


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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vidgen.data.loader import loader_data_config, read_split
    from vidgen.runtime import init_ray
    from vidgen.train.loop import train_loop_per_worker

    payload = prepare(cfg)
    resuming = check_existing_run(cfg)
    storage.write_text(storage.join(cfg.run, "config.yaml"), to_yaml(cfg), "application/yaml")
    init_ray(address)

    import ray
    import ray.data

    # Ray Data's per-operator progress bars would interleave with the step lines of every worker.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = worker_cpus(cfg, ray.cluster_resources().get("CPU", 0))
    datasets = {"train": read_split(cfg.data, cfg.split)}
    if payload["has_val"]:
        datasets["val"] = read_split(cfg.data, cfg.val_split)
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
        ),
        datasets=datasets,
        dataset_config=loader_data_config(),
    )
    print(f"[vidgen train] {'resuming' if resuming else 'starting'} {cfg.family}/{cfg.preset} run {cfg.run} "
          f"on {cfg.workers} worker(s), ZeRO-{cfg.zero_stage}, {cfg.precision}", flush=True)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    rows = read_metrics(cfg.run)
    plot_losses(cfg.run, rows)
    last = rows[-1] if rows else {}
    return TrainResult(cfg.run, int(last.get("step", 0)), seconds, last, result.checkpoint.path if result.checkpoint else None)


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


def _worker_env() -> dict[str, str]:
    """Settings workers need that Ray does not carry: DeepSpeed's accelerator, test hooks."""
    keep = ("DS_ACCELERATOR", "VIDGEN_TEST_KILL_AT_STEP", "VIDGEN_TEST_KILL_SENTINEL", "VIDGEN_TEST_PROBE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def read_metrics(run: str) -> list[dict]:
    uri = storage.join(run, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


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
    return (f"trained {r.run} to step {r.steps} in {r.seconds:.1f} s\n"
            f"last: {metrics}\ncheckpoint: {r.checkpoint}")
