"""The per-worker training function: plain PyTorch with marked Ray and DeepSpeed touchpoints.

Ray Train runs `train_loop_per_worker(config)` on every worker (rank). The loop is the family's
training contract (vidgen/models/__init__.py) driven through one DeepSpeed engine per trainable
part (built in vidgen/train/parallelize.py); set-up lives in the named functions below it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings

import torch

from vidgen import models, storage
from vidgen.train import checkpoint
from vidgen.train.config import TrainConfig
from vidgen.train.parallelize import build_engines, gathered, lr_of

logger = logging.getLogger("vidgen.train")


def train_loop_per_worker(payload: dict) -> None:
    import ray.train

    from vidgen.data.loader import iter_epoch  # Ray Data: imported where it runs, not by readers of metrics

    models.register(payload["family_class"], replace=True)  # the family the driver validated against
    cfg = TrainConfig(**payload["config"])
    clock = PhaseClock()
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.gpu else "cpu")

    # [1] prepare data: this worker's disjoint shard of the training split
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if payload["has_val"] else None

    # [2] prepare model: the family module, one DeepSpeed engine per trainable part
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, payload)
    model.to(device)
    clock.mark("model")
    engines = build_engines(cfg, model)
    clock.mark("DeepSpeed")
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # distinct noise per rank

    # [3] resume: newest committed checkpoint (after a restart, a failure, or a second `vidgen train`)
    state = {"step": 0, "epoch": 0, "position": 0}
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = checkpoint.restore(d, engines, model, rank)
        clock.mark("checkpoint read")
    log = MetricsLog(cfg.run, rank, resume_step=state["step"])

    step, epoch, position = state["step"], state["epoch"], state["position"]
    if step >= cfg.max_steps:
        log.say(f"run already at step {step} >= max_steps {cfg.max_steps}: nothing to train")
    elif resumed:  # a second `vidgen train`, or Ray Train restarting the workers after a failure
        log.say(f"resuming from the checkpoint at step {step}")
    clips_per_step = cfg.micro_batch * cfg.grad_accum * world
    started = t0 = time.perf_counter()
    stop_check = StopCheck(cfg, rank, device)
    scalars_acc, last, drained = {}, False, False
    while step < cfg.max_steps and not last:
        seen = 0
        for batch in iter_epoch(train_shard, cfg.micro_batch, cfg.seed, epoch, skip_batches=position):
            seen += 1
            clock.mark("first batch", once=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            for name, value in train_micro_batch(cfg, model, engines, batch).items():
                scalars_acc[name] = scalars_acc.get(name, 0.0) + value / cfg.grad_accum
            position += 1
            if position % cfg.grad_accum:
                continue
            step += 1
            step_time = time.perf_counter() - t0
            if clock.mark("first step", once=True):
                log.say(f"set-up in this worker: {clock.summary()}")
            stop = stop_check()
            last = step == cfg.max_steps or stop is not None
            if step % cfg.log_every == 0 or last:
                log.step(step, epoch, scalars_acc, step_time, clips_per_step / step_time, lr_of(engines))
                elapsed = time.perf_counter() - started
                log.say(progress_line(step, cfg.max_steps, step - state["step"], elapsed, cfg.max_minutes, scalars_acc))
            scalars_acc = {}
            at_checkpoint = step % cfg.checkpoint_every == 0 or last
            draining = (not at_checkpoint and not drained and step % PREEMPTION_CHECK_STEPS == 0
                        and _node_draining(log, step))
            if draining:
                at_checkpoint = drained = True  # a just-in-time checkpoint; Ray Train restarts from it
            if last:
                clock.restart()  # from here: the fixed cost of the end of a run
            if stop == STOP_REQUESTED or draining:  # preempted: within the notice, only the checkpoint counts
                if stop == STOP_REQUESTED:
                    log.say(f"stop requested at step {step}: saving a checkpoint; `vidgen train` again resumes here")
            elif at_checkpoint or (cfg.sample_every and step % cfg.sample_every == 0):
                log.extra(step, sample_and_evaluate(cfg, model, engines, val_shard, step, rank, payload, log))
                clock.mark("samples and validation")
            if at_checkpoint:
                position_state = {"step": step, "epoch": epoch, "position": position}
                save_and_report(cfg, engines, model, position_state, rank, world, log, payload)
                clock.mark("checkpoint")
            t0 = time.perf_counter()
            if last:
                log.say(f"after the last step: {clock.summary()}")
                break
        else:  # the epoch ran out: the next one starts from its first batch
            if seen == 0 and position == 0:
                raise RuntimeError(
                    f"split {cfg.split!r} of {cfg.data} gives worker {rank} no batch of {cfg.micro_batch} clips: "
                    f"use a smaller --micro-batch or fewer --workers"
                )
            epoch, position = epoch + 1, 0
    write_probe(cfg, model, engines, rank)
    log.close()


# --------------------------------------------------------------------------------------------
# One micro-batch: the family's steps in order, through the DeepSpeed engines


def train_micro_batch(cfg: TrainConfig, model, engines: dict, batch: dict) -> dict[str, float]:
    """Run every TrainStep once. The part being stepped is called through its engine; the others
    are called as plain modules with their parameters frozen (the GAN step shape ZeRO-2/3 accept).
    """
    scalars: dict[str, float] = {}
    for train_step in model.train_steps():
        stepped = engines[train_step.part]
        others = {p: e.module for p, e in engines.items() if p != train_step.part}
        for m in others.values():
            m.requires_grad_(False)
        loss, values = train_step.loss(batch, {train_step.part: stepped, **others})
        boundary = stepped.is_gradient_accumulation_boundary()  # this step() applies the optimizer
        stepped.backward(loss)
        stepped.step()
        for m in others.values():
            m.requires_grad_(True)
        if boundary and train_step.part in model.after_step_gathers:  # the hook reads the part's weights
            with gathered(engines, [train_step.part]):
                model.after_step(train_step.part)
        elif boundary:
            model.after_step(train_step.part)
        scalars.update(values)
    return scalars


STOP_MARKER = "_stop_requested"  # RUN/_stop_requested: the driver was told to stop (SIGTERM, Ctrl-C)
STOP_REQUESTED, TIME_BUDGET = "stop requested", "time budget"
STOP_CHECK_S = 0.5  # rank 0 looks for the marker at most this often (a HEAD request on S3)


PREEMPTION_CHECK_STEPS = 5  # every rank asks Ray Train whether a node is draining (a barrier) this often


def _node_draining(log, step: int) -> bool:
    """Whether Ray Train sees a node of this run draining (a spot reclaim, a scale-down). Every rank
    must call it at the same steps: Ray Train agrees on one answer across them."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return False
    deadline = f", reclaimed in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s" if info.deadline_ms else ""
    log.say(f"node(s) {', '.join(n[:12] for n in info.preempted_node_to_ranks)} draining{deadline}: "
            f"a checkpoint at step {step}, then on; the run restarts from it when the node goes")
    return True


class StopCheck:
    """Whether to stop after this step: the `max_minutes` budget is spent, or the driver was told to
    stop (its marker in RUN). Rank 0 decides and every rank follows, so all ranks stop at the same
    step and save one checkpoint together (a broadcast of one number per step)."""

    def __init__(self, cfg: TrainConfig, rank: int, device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.started = time.perf_counter()
        self.checked_at, self.requested = -math.inf, False

    def __call__(self) -> str | None:
        import torch.distributed as dist

        code = 0.0
        if self.rank == 0:
            now = time.perf_counter()
            if not self.requested and now - self.checked_at >= STOP_CHECK_S:
                self.checked_at = now
                try:
                    self.requested = storage.exists(storage.join(self.cfg.run, STOP_MARKER))
                except storage.StorageError as e:  # a throttled or failed request: look again next time
                    logger.warning(f"could not look for a stop request: {e}")
            if self.requested:
                code = 2.0
            elif self.cfg.max_minutes is not None and now - self.started > self.cfg.max_minutes * 60:
                code = 1.0
        flag = torch.tensor([code], device=self.device)
        if dist.is_initialized():
            dist.broadcast(flag, src=0)
        return {0: None, 1: TIME_BUDGET, 2: STOP_REQUESTED}[int(flag.item())]


class PhaseClock:
    """Seconds spent in named phases since the last mark: where a run's fixed costs go."""

    def __init__(self):
        self.t = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, name: str, once: bool = False) -> bool:
        """Close the phase `name` now; with once=True only the first time. True if it was recorded."""
        if once and name in self.phases:
            return False
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now
        return True

    def restart(self) -> None:
        self.t, self.phases = time.perf_counter(), {}

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())


def progress_line(
    step: int, max_steps: int, steps_done: int, elapsed_s: float, max_minutes: float | None, scalars: dict[str, float]
) -> str:
    """`step 120/400 (30%) 3.2 steps/s ETA 1m27s d_loss=0.6931 g_loss=0.7012`: one line per logged
    step (Ray forwards worker output line by line, so a carriage-return bar would arrive garbled).

    The rate is this session's average, `steps_done` in `elapsed_s` with checkpoints and samples
    included, so the ETA counts them too. The ETA is to `max_steps` or to the end of the
    `max_minutes` budget, whichever comes first; when the budget ends the run, `(time budget)`
    says so and the share done is of the budget: `step 40/100000 (12% of 5m24s) ... (time budget)`.
    """
    rate = steps_done / elapsed_s if elapsed_s > 0 else 0.0
    eta = (max_steps - step) / rate if rate > 0 else math.inf
    budget, done = "", f"{100 * step // max_steps}%"
    if max_minutes is not None and max_minutes * 60 - elapsed_s < eta:
        eta, budget = max(0.0, max_minutes * 60 - elapsed_s), " (time budget)"
        done = f"{min(100, int(100 * elapsed_s / (max_minutes * 60)))}% of {format_duration(max_minutes * 60)}"
    head = f"step {step}/{max_steps} ({done}) {rate:.3g} steps/s ETA {format_duration(eta)}{budget}"
    return f"{head} {format_scalars(scalars)}".rstrip()


def format_duration(seconds: float) -> str:
    """42 -> `42s`, 87 -> `1m27s`, 7380 -> `2h03m`; an unknown (infinite) duration -> `?`."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_scalars(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def quiet_worker_logs() -> None:
    """Keep a worker's console to vidgen's lines and to the warnings and errors of its libraries.

    Ray Train gives each worker's root logger level INFO and a console handler, so any library's
    INFO record (torch.distributed's "Completed store-based barrier" per new group, for one) would
    be forwarded to the driver. DeepSpeed logs its whole engine config at INFO on rank 0 (the
    `[INFO] [config.py:...]` lines) whenever its logger is at INFO: the logger is pinned to WARNING
    whatever the version's default. Python warnings raised inside torch.distributed and DeepSpeed
    concern their own internals and come from every rank; a warning attributed to vidgen's code (a
    model, a loss) still shows.
    """
    logging.getLogger().setLevel(logging.WARNING)
    import deepspeed.utils

    deepspeed.utils.set_log_level_from_string("warning")
    warnings.filterwarnings("ignore", module=r"(torch\.distributed|deepspeed)(\.|$)")


# --------------------------------------------------------------------------------------------
# Set-up


def build_model(cfg: TrainConfig, payload: dict):
    model = models.build(cfg.family, cfg.preset, label_names=payload["label_names"], **payload["model_overrides"])
    if model.needs_style_image:
        model.set_style_image(load_style_image(cfg.style_image))
    return model


def load_style_image(uri: str) -> torch.Tensor:
    """A PNG/JPEG at `uri` -> (3, H, W) float in [-1, 1]."""
    import io

    import numpy as np
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
    except OSError as e:
        raise ValueError(f"style_image {uri}: not an image ({e})") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


# --------------------------------------------------------------------------------------------
# Checkpoints, samples, metrics


def save_and_report(cfg: TrainConfig, engines: dict, model, state: dict, rank: int, world: int, log, payload: dict) -> None:
    """All ranks save their DeepSpeed files; Ray merges them into RUN/checkpoint-step-NNNNNN."""
    import ray.train

    state = {
        **state,
        "world_size": world,
        "zero_stage": cfg.zero_stage,
        "family": cfg.family,
        "config": cfg.model_dump(),
        "payload": {k: payload[k] for k in ("model_overrides", "label_names")},
    }
    log.flush()  # metrics up to this step land before the checkpoint that vouches for them
    with tempfile.TemporaryDirectory(prefix="vidgen-ckpt-") as d:
        checkpoint.save(d, engines, model, state, rank)
        metrics = {"step": state["step"], **log.last}
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint-step-{state['step']:06d}",
        )
    log.say(f"checkpoint at step {state['step']}")


def sample_and_evaluate(
    cfg: TrainConfig, model, engines: dict, val_shard, step: int, rank: int, payload: dict, log: MetricsLog
) -> dict:
    """Rank 0 writes RUN/samples/step-NNNNNN.mp4 (its middle frame to TensorBoard) and computes
    validation metrics.

    Every rank enters `gathered` (a collective under ZeRO-3); only rank 0 computes.
    """
    from vidgen.data.loader import iter_epoch
    from vidgen.train.evaluate import evaluate, sample_grid

    val_batches = []
    if val_shard is not None and rank == 0 and cfg.eval_batches:
        import itertools

        val_batches = list(itertools.islice(iter_epoch(val_shard, cfg.micro_batch, 0, 0, shuffle=False, drop_last=False), cfg.eval_batches))
    out: dict = {}
    with gathered(engines):
        if rank == 0:
            model.eval()
            try:
                video = val_batches[0]["video"] if val_batches else None
                if video is not None or not model.preview_needs_input:
                    grid = upscaled(sample_grid(model, cfg.family, video, seed=cfg.seed))
                    write_sample(cfg.run, step, grid, payload["fps"])
                    log.image("samples", step, grid[grid.shape[0] // 2])
                if val_batches:
                    out = evaluate(model, cfg.family, val_batches, life_cell=payload.get("life_cell"))
            finally:
                model.train()
    return out


def upscaled(grid):
    """(T, H, W, 3) uint8 -> the same, pixels repeated up to about 512 px so a person can see them."""
    scale = max(1, 512 // max(grid.shape[1:3]))
    return grid.repeat(scale, 1).repeat(scale, 2)


def write_sample(run: str, step: int, grid, fps: float) -> None:
    from vidgen import media

    data = media.encode(grid, fps=fps, crf=20, preset="veryfast", metadata={"title": f"vidgen sample step {step}"})
    storage.write_bytes(storage.join(run, "samples", f"step-{step:06d}.mp4"), data)


def read_metrics(run: str) -> list[dict]:
    uri = storage.join(run, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def probe_output(model) -> torch.Tensor:
    """The model's output on a fixed input (its `probe`): compares a live model with its export."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    size, frames = getattr(cfg, "frame_size", 32), max(getattr(cfg, "num_frames", 8), 6)
    x = torch.rand(1, cfg.channels, frames, size, size, generator=g) * 2 - 1
    x = x.to(next(model.parameters()).device)
    return model.probe(x).cpu()


class MetricsLog:
    """Rank 0's record of a run: RUN/metrics.jsonl and TensorBoard events in RUN/tb/.

        tensorboard --logdir RUN            (s3:// too: TensorBoard reads S3 with boto3)

    metrics.jsonl has each step once: rank 0 keeps the lines and rewrites the file on flush. On
    resume, lines after the checkpoint's step (written before a crash) are dropped, so the steps
    that are trained again appear once.

    TensorBoard gets every number of a step's line as `train/<name>`, validation metrics as
    `val/<name>` and sample frames. Object storage cannot append, so the events go to a local file
    that each flush uploads whole to RUN/tb/<its name>. Every start of the loop writes a new file
    (TensorBoard merges the files of a folder) that begins with `purge_step`: TensorBoard then hides
    the older files' events from the first retrained step on, as metrics.jsonl drops those lines.
    """

    def __init__(self, run: str, rank: int, resume_step: int):
        self.run = run
        self.uri = storage.join(run, "metrics.jsonl")
        self.rank = rank
        self.lines: list[dict] = []
        self.last: dict = {}
        self.dirty = 0
        if rank != 0:
            return
        if storage.exists(self.uri):
            for line in storage.read_text(self.uri).splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("step", 0) <= resume_step:
                        self.lines.append(row)
        from torch.utils.tensorboard import SummaryWriter

        self.tb_dir = tempfile.mkdtemp(prefix="vidgen-tb-")
        self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)

    def step(self, step: int, epoch: int, scalars: dict, step_time: float, clips_per_s: float, lr: float) -> None:
        if self.rank != 0:
            return
        row = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in scalars.items()}}
        row.update(step_time_s=round(step_time, 4), clips_per_s=round(clips_per_s, 2), lr=lr, rss_peak_mb=_rss_peak_mb())
        if torch.cuda.is_available():
            row["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.lines.append(row)
        self.last = {k: v for k, v in row.items() if isinstance(v, int | float)}
        for name, value in self.last.items():
            if name != "step":
                self.tb.add_scalar(f"train/{name}", value, step)
        self.dirty += 1
        if self.dirty >= 10:
            self.flush()

    def extra(self, step: int, values: dict) -> None:
        """Merge values (validation metrics, `val_<name>`) into the line of `step`; print them once."""
        if self.rank != 0 or not values:
            return
        for row in reversed(self.lines):
            if row["step"] == step:
                row.update(values)
                break
        else:
            self.lines.append({"step": step, **values})
        self.last.update(values)
        for name, value in values.items():
            self.tb.add_scalar(f"val/{name.removeprefix('val_')}", value, step)
        self.say(f"step {step} {format_scalars(values)}")
        self.dirty += 1

    def image(self, tag: str, step: int, frame) -> None:
        """A (H, W, 3) uint8 frame as a TensorBoard image; uploaded with the next flush."""
        if self.rank == 0:
            self.tb.add_image(tag, frame, step, dataformats="HWC")

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[vidgen train] {text}", flush=True)

    def flush(self) -> None:
        if self.rank != 0:
            return
        if self.lines:
            body = "".join(json.dumps(r) + "\n" for r in sorted(self.lines, key=lambda r: r["step"]))
            storage.write_text(self.uri, body, "application/x-ndjson")
        self.tb.flush()  # no-op once closed
        for name in sorted(os.listdir(self.tb_dir)):
            storage.upload_file(os.path.join(self.tb_dir, name), storage.join(self.run, "tb", name))
        self.dirty = 0

    def close(self) -> None:
        if self.rank != 0:
            return
        self.tb.close()  # its last events are on disk before the final upload
        self.flush()
        shutil.rmtree(self.tb_dir, ignore_errors=True)


def _rss_peak_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_probe(cfg: TrainConfig, model, engines: dict, rank: int) -> None:
    """--probe-out URI: rank 0 writes the live model's output on its fixed probe input (whole
    parameters, gathered under ZeRO-3), the reference its export is checked against."""
    if not cfg.probe_out:
        return
    from safetensors.torch import save

    with gathered(engines):
        if rank == 0:
            model.eval()
            storage.write_bytes(cfg.probe_out, save({"output": probe_output(model).contiguous()}))
