"""The `base` presets on one GPU in bf16: steps/s, MFU and the quality figures of bench/quality.py.

    python bench/gpu.py                                  # every family, about 6 minutes on an H200
    python bench/gpu.py --only gan --seconds 60

Runs where a GPU is lent (CI never has one). It trains in-process, the way the trainer's loop does
(each family's own `train_steps`, AdamW with the family's settings, gradient clipping at 1.0, bf16
autocast) but without Ray Train and DeepSpeed, which the GPU machine's image does not carry: the
figures are the model's and the GPU's, not the trainer's overheads. MFU counts the FLOPs of one
training step with torch's FlopCounterMode (forward and backward of convs and matmuls) against
the H200's dense bf16 peak (989 TFLOP/s, datasheet) and the 790 TFLOP/s a matmul reached there.

gan       conditional shapes, base size (128x128, 16 frames): label accuracy and the Frechet
          ratio of a panel of 8 judges trained on clips of their own, over 6 draws, as in
          bench/quality.py. Once with the `base` preset, once with `base` plus `tiny`'s
          stabilisers (`--gan-recipe`).
restore   base (x2 super-resolution of blur + downscale + noise) on shapes 128x128: PSNR gain over
          the bicubic upscale of the degraded input.
convlstm  base (down 3) on Life 256x256 (8-pixel cells, so the recurrent grid is the cell grid):
          next-frame cell accuracy vs copy-last-frame.

Results: bench/results/gpu.json and the report on stdout.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np
import torch


from vidgen import models, quality
from vidgen.data.synth import synth_clip
from vidgen.data.tensors import frames_to_video
from vidgen.models.contract import optimizer_step
from vidgen.quality import Figure

from families import run_families

PEAK_BF16 = 989e12
MATMUL_BF16 = 790e12
GAN_STABILISERS = ("g_norm", "sprite", "two_stream", "spectral_norm", "aux_weight", "diffaugment", "train_frames",
                   "lr_d", "lr_g", "beta1", "beta2")


def dataset(kind: str, clips: int, frames: int, size: int, seed: int, device) -> dict:
    made = [synth_clip(kind, seed, i, frames, size, 0.2) for i in range(clips)]
    out = {}
    for split in ("train", "val"):
        part = [c for c in made if (c.split == "train") == (split == "train")]
        video = frames_to_video(np.stack([c.frames for c in part])).to(device)
        labels = [c.label for c in part]
        out[split] = (video, torch.tensor(labels, device=device) if None not in labels else None)
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(model, data, batch: int, seconds: float, device) -> dict:
    """Train in-process for `seconds`: the trainer's step (its loop without Ray and DeepSpeed)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    opts = {p: torch.optim.AdamW(m.parameters(), **model.optimizer_settings(p)) for p, m in model.parts().items()}
    x, y = data["train"]
    generator = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(len(x), (batch,), generator=generator).to(device)
        return optimizer_step(model, opts, {"video": x[idx]} | ({"label": y[idx]} if y is not None else {}),
                              autocast=device.type)

    for _ in range(3):  # warm-up: allocator, cuDNN autotuning
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    sync(device)
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        scalars = step()
        steps += 1
        if steps % 50 == 0:
            sync(device)
    sync(device)
    elapsed = time.perf_counter() - started
    rate = steps / elapsed
    print(f"  {steps} steps in {elapsed:.0f} s: {rate:.2f} steps/s, {flops / 1e9:.1f} GFLOP/step, "
          f"MFU {flops * rate / PEAK_BF16:.2%}; last {scalars}", flush=True)
    model.eval()
    return {"steps": steps, "seconds": round(elapsed, 1), "steps_per_s": round(rate, 2), "batch": batch,
            "gflop_per_step": round(flops / 1e9, 2), "tflops": round(flops * rate / 1e12, 1),
            "mfu": round(flops * rate / PEAK_BF16, 4), "of_matmul_peak": round(flops * rate / MATMUL_BF16, 4)}


def sample(model, labels: list[int], seed: int, chunk: int = 15) -> torch.Tensor:
    """The GAN's samples for `labels`, a chunk of clips at a time (16 frames at 128x128 are large)."""
    return torch.cat([model.sample(len(labels[i:i + chunk]), 16, labels[i:i + chunk], seed + i).float()
                      for i in range(0, len(labels), chunk)])


@functools.cache
def gan_sets(device) -> tuple[dict, tuple, list]:
    """The GAN's data and its scoring clips on `device`, made once for both GAN runs: scored as
    bench/quality.py scores, judges trained on clips of their own and 6 draws of real clips
    (about 3,000 clips of 16 x 128 x 128 in all, 9 GB as float32)."""
    data = dataset("shapes", 480, 16, 128, 0, device)
    judges, draws = quality.scoring_clips("shapes", len(data["train"][0]), len(data["val"][0]), 16, 128)

    def on(pair):
        return tuple(t.to(device) for t in pair)

    return data, on(judges), [(on(real), on(held)) for real, held in draws]


def bench_gan(args, device, recipe: bool) -> dict:
    data, judges, draws = gan_sets(device)
    tiny = models.GAN.Config.preset("tiny")
    extra = {k: getattr(tiny, k) for k in GAN_STABILISERS} if recipe else {}
    model = models.build("gan", "base", num_classes=3, label_names=["circle", "square", "triangle"], **extra)
    run = train(model, data, args.gan_batch, args.seconds, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        scores = quality.score_conditional(lambda labels, seed: sample(model, labels, seed), data["train"],
                                           data["val"], classes=3, judge_clips=judges, more_draws=draws)
    name = "gan base" + (" + tiny's stabilisers" if recipe else "")
    low, high = scores.frechet_range
    return {"run": run, "figures": [
        Figure(f"{name}: label accuracy", scores.label_accuracy, "chance", 1 / 3, target=0.90),
        Figure(f"{name}: Frechet / real-vs-real ({quality.JUDGES} judges: {low:.1f}-{high:.1f}x)",
               scores.frechet_ratio, "real vs held-out", 1.0, unit="x", target=3.0, higher_is_better=False)]}


def bench_restore(args, device) -> dict:
    from vidgen.train.evaluate import evaluate

    data = dataset("shapes", 256, 8, 128, 1, device)
    model = models.build("restore", "base", degradations=["blur", "downscale", "noise"])
    run = train(model, data, args.restore_batch, args.seconds, device)
    val = data["val"][0]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        m = evaluate(model, "restore", ({"video": val[i:i + 8].float()} for i in range(0, len(val), 8)))
    return {"run": run, "figures": [
        Figure("restore base (x2, blur+noise): PSNR gain", m["val_psnr_gain"], "bicubic upscale of the input", 0.0,
               unit=" dB", target=3.0)]}


def bench_convlstm(args, device) -> dict:
    from vidgen.models.convlstm import life_grid

    data = dataset("life", 600, 6, 256, 4, device)
    model = models.build("convlstm", "base")
    run = train(model, data, args.convlstm_batch, args.seconds, device)
    video = data["val"][0]
    k = model.config.context_frames
    with torch.autocast(device.type, dtype=torch.bfloat16):
        predicted = torch.cat([model.predict(video[i:i + 16, :, :k], 1).float() for i in range(0, len(video), 16)])
    truth = life_grid(video[:, :, k:k + 1], 8)
    ours = float((life_grid(predicted, 8) == truth).mean())
    copy = float((life_grid(video[:, :, k - 1:k], 8) == truth).mean())
    return {"run": run, "figures": [
        Figure("convlstm base (life 256): next-frame cell accuracy", ours, "copy-last-frame", copy, target=0.99)]}


BENCHES = {"gan": lambda a, d: bench_gan(a, d, False), "gan-recipe": lambda a, d: bench_gan(a, d, True),
           "restore": bench_restore, "convlstm": bench_convlstm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES))
    ap.add_argument("--seconds", type=float, default=75, help="training time per family")
    ap.add_argument("--gan-batch", type=int, default=32)
    ap.add_argument("--restore-batch", type=int, default=16)
    ap.add_argument("--convlstm-batch", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, not figures")
    ap.add_argument("--out-json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (--device cpu runs a smoke test)")
    torch.backends.cudnn.benchmark = True
    report = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "seconds": args.seconds, "families": {}}

    def run(name: str) -> dict:
        started = time.perf_counter()
        result = BENCHES[name](args, device)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return result

    run_families(args.only or BENCHES, run, report, args.out_json)
    print(f"\n{report['gpu']}, torch {report['torch']}, bf16, in-process, {args.seconds:.0f} s of training each")
    for name, r in report["families"].items():
        run = r["run"]
        print(f"{name}: {run['steps']} steps, {run['steps_per_s']} steps/s (batch {run['batch']}), "
              f"{run['tflops']} TFLOP/s, MFU {run['mfu']:.1%}")
        print(quality.table(r["figures"]))


if __name__ == "__main__":
    main()
