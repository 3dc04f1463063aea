"""Training benchmarks, each a ratio measured in one run on this machine.

    python bench/train.py                  # all three, about 6 minutes on 2 cores
    python bench/train.py --steps 8        # quicker, noisier
    python bench/train.py --only sharding  # one of: overhead, scaling, sharding

- overhead: clips/s of `vidgen train` (Ray Train + DeepSpeed, 1 worker, ZeRO-0) against a plain
  PyTorch loop in this process (same model, same batch, data already in memory, AdamW, the same
  TrainSteps). Target >= 0.9.
- scaling: `vidgen train` with 2 workers against 1 worker, 1 torch thread each, global clips/s.
  Target >= 1.6x.
- sharding: model-state bytes (parameters, gradients, optimizer state) each rank holds at ZeRO
  stages 0-3 with 2 workers, counted from the tensors it keeps alive (vidgen.train.sharding), with
  stage3_param_persistence_threshold 0, in fp32 and in bf16. Target at stage 3 <= 0.55x stage 0.
  In fp32 ZeRO-1/2/3 keep a separate fp32 master partition beside the (fp32) parameters, which
  stage 0 does not have, so fp32 stage 3 lands near (1/2 + 1/2 + 1 + 1/2) / 4 = 0.62x; in bf16
  (what the GPU configs use) every rank's master weights are partitioned too.

Rates are medians over the steps after the first `--warmup` ones. The `small` GAN and restore
presets are used for overhead and scaling, with the same thread settings on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch


from vidgen import models
from vidgen.data import synth
from vidgen.data.format import open_dataset
from vidgen.data.tensors import frames_to_video
from vidgen.train.config import validate
from vidgen.train.trainer import dataset_overrides, read_metrics, train

FAMILIES = {"gan": dict(), "restore": dict(degradations=["blur", "downscale", "noise"])}  # no H.264: no ffmpeg in the step


def make_data(root: str) -> str:
    uri = os.path.join(root, "shapes")
    synth.synthesize("shapes", 160, 16, 64, uri, seed=0, val_fraction=0.0, progress=False)
    return uri


def trainer_rate(data: str, root: str, family: str, workers: int, steps: int, warmup: int, micro: int, stage: int = 0) -> float:
    run = os.path.join(root, f"run-{family}-{workers}w-{time.time_ns()}")
    cfg = validate(dict(family=family, preset="small", data=data, run=run, workers=workers, zero_stage=stage,
                        micro_batch=micro, max_steps=steps, checkpoint_every=10**6, val_split="",
                        threads_per_worker=1, model=FAMILIES[family]))
    # a checkpoint at the last step is part of every run; the rate excludes that step
    train(cfg)
    rows = [r for r in read_metrics(run) if warmup < r["step"] < steps]
    return statistics.median(r["clips_per_s"] for r in rows)


def plain_rate(data: str, family: str, steps: int, warmup: int, micro: int) -> float:
    """The same TrainSteps with plain torch AdamW, one thread, clips already in memory."""
    torch.set_num_threads(1)
    ds = open_dataset(data)
    cfg = validate(dict(family=family, preset="small", data=data, run="unused", model=FAMILIES[family]))
    torch.manual_seed(0)
    model = models.build(family, "small", label_names=ds.labels if family == "gan" else None,
                         **dataset_overrides(cfg, ds.manifest))
    clips = [row for _, row in zip(range(micro * 4), ds.iter_clips("train"), strict=False)]
    batches = []
    for i in range(0, len(clips), micro):
        chunk = clips[i : i + micro]
        batches.append({"video": frames_to_video(torch.stack([torch.from_numpy(c["frames"].copy()) for c in chunk]).numpy()),
                        "label": torch.tensor([c["label"] for c in chunk])})
    opts = {p: torch.optim.AdamW(m.parameters(), **model.optimizer_settings(p)) for p, m in model.parts().items()}
    times = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        for ts in model.train_steps():
            others = [m for p, m in model.parts().items() if p != ts.part]
            for m in others:
                m.requires_grad_(False)
            loss, _ = ts.loss(batch, model.parts())
            opts[ts.part].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parts()[ts.part].parameters(), 1.0)
            opts[ts.part].step()
            for m in others:
                m.requires_grad_(True)
            model.after_step(ts.part)
        times.append(time.perf_counter() - t0)
    return micro / statistics.median(times[warmup:])


def sharding_probe(payload: dict) -> None:
    """Per worker: build engines at a ZeRO stage, train one micro-batch, then measure what this
    rank holds right after the next backward of each part (gradients alive, optimizer state made)."""
    import ray.train

    from vidgen.train.config import TrainConfig
    from vidgen.train.loop import build_model, train_micro_batch
    from vidgen.train.parallelize import build_engines
    from vidgen.train.sharding import held_bytes

    cfg = TrainConfig(**payload["config"])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg, payload)
    engines = build_engines(cfg, model)
    t, s = model.config.num_frames, model.config.frame_size
    batch = {"video": torch.rand(cfg.micro_batch, 3, t, s, s) * 2 - 1, "label": torch.randint(0, 3, (cfg.micro_batch,))}
    train_micro_batch(cfg, model, engines, batch)
    held = {"params": 0, "grads": 0, "optimizer": 0, "total": 0}
    for ts in model.train_steps():
        others = {p: e.module for p, e in engines.items() if p != ts.part}
        for m in others.values():
            m.requires_grad_(False)
        loss, _ = ts.loss(batch, {ts.part: engines[ts.part], **others})
        engines[ts.part].backward(loss)
        part_held = held_bytes({ts.part: engines[ts.part]})
        engines[ts.part].step()
        for m in others.values():
            m.requires_grad_(True)
        for k in held:
            held[k] += part_held[k]
    if ray.train.get_context().get_world_rank() == 0:
        with open(payload["out"], "w") as f:
            json.dump(held, f)
    ray.train.report({})


def sharding(data: str, root: str, precision: str) -> dict[int, dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vidgen.train.trainer import prepare

    out = {}
    for stage in (0, 1, 2, 3):
        name = f"shard-{precision}-{stage}"
        cfg = validate(dict(family="gan", preset="small", data=data, run=os.path.join(root, name), workers=2,
                            zero_stage=stage, precision=precision, micro_batch=2, stage3_param_persistence_threshold=0))
        payload = {**prepare(cfg), "out": os.path.join(root, f"held-{precision}-{stage}.json")}
        trainer = TorchTrainer(sharding_probe, train_loop_config=payload,
                               scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                               run_config=RunConfig(name=name, storage_path=root,
                                                    worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}))
        trainer.fit()
        with open(payload["out"]) as f:
            out[stage] = json.load(f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--only", choices=["overhead", "scaling", "sharding"])
    ap.add_argument("--precision", default="fp32,bf16",
                    help="sharding: precisions to measure (comma-separated). In fp32, ZeRO still keeps an fp32 "
                         "master partition beside the parameters; bf16 is what the GPU configs train with")
    ap.add_argument("--out-json")
    args = ap.parse_args()

    from vidgen.runtime import init_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    init_ray(num_cpus=os.cpu_count())
    figures: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                     "settings": {"steps": args.steps, "warmup": args.warmup, "micro_batch": args.micro_batch,
                                  "threads_per_worker": 1, "preset": "small"}}
    print(f"machine: {figures['machine']}; settings: {figures['settings']}")
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-train-") as root:
        data = make_data(root)
        if args.only in (None, "overhead", "scaling"):
            for family in FAMILIES:
                one = trainer_rate(data, root, family, 1, args.steps, args.warmup, args.micro_batch)
                if args.only in (None, "overhead"):
                    plain = plain_rate(data, family, args.steps, args.warmup, args.micro_batch)
                    figures[f"overhead_{family}"] = {"vidgen_1w_clips_s": one, "plain_clips_s": plain, "ratio": one / plain}
                    print(f"overhead  {family:8s} vidgen 1 worker ZeRO-0 {one:6.2f} clips/s | plain torch {plain:6.2f} clips/s"
                          f" | ratio {one / plain:.2f} (target >= 0.9)")
                if args.only in (None, "scaling"):
                    two = trainer_rate(data, root, family, 2, args.steps, args.warmup, args.micro_batch)
                    figures[f"scaling_{family}"] = {"1w_clips_s": one, "2w_clips_s": two, "ratio": two / one}
                    print(f"scaling   {family:8s} 2 workers {two:6.2f} clips/s | 1 worker {one:6.2f} clips/s"
                          f" | ratio {two / one:.2f}x (target >= 1.6x)")
        if args.only in (None, "sharding"):
            for precision in args.precision.split(","):
                held = sharding(data, root, precision)
                base = held[0]["total"]
                for stage, h in held.items():
                    print(f"sharding  gan small {precision} ZeRO-{stage}: params {h['params'] / 2**20:6.1f} MiB, "
                          f"grads {h['grads'] / 2**20:6.1f} MiB, optimizer {h['optimizer'] / 2**20:6.1f} MiB, "
                          f"total {h['total'] / 2**20:6.1f} MiB per rank = {h['total'] / base:.2f}x stage 0")
                key = "sharding_gan_small" + ("" if precision == "fp32" else f"_{precision}")
                figures[key] = {str(s): {**h, "ratio": h["total"] / base} for s, h in held.items()}
                print(f"sharding  {precision}: stage 3 / stage 0 = {held[3]['total'] / base:.2f} (target <= 0.55)")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
