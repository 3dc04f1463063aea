"""The conditional GAN's held-out figures along one training, in-process: a quick look at a recipe.

    python bench/gan_curve.py                                   # the tiny preset, 2,400 steps, ~4 min
    python bench/gan_curve.py --set ema_decay=0.99 --set rgb_modulation=false --steps 1600

Trains GAN `tiny` in this process through its own training contract (`optimizer_step`: AdamW with
the family's settings, clipping at 1.0, the after-step EMA; no Ray, no DeepSpeed) on the data and
batch of `bench/quality.py`'s gan run (shapes 32x32, 8 frames, 384 train and 384 val clips; 2
workers x 8), and every `--every` steps scores the EMA generator as it does: label accuracy of one
sample per train clip by its panel of judges trained on 384 other real clips (chance 1/3), and the
Frechet distance of a judge's features, samples vs real val clips, over real train vs real val
clips, each the mean over 6 draws of real clips: the judges' geometric mean, and their range. The
judges are trained once, so a run's checks differ only by the generator. The Frechet ratio swings
from one check to the next (the shipped preset at 2,000 and 2,400 steps, by one judge trained on the
train clips, as the figures below were scored up to 2026-12-01: 10.3x and 12.8x with seed 0, 9.4x
and 9.4x with seed 1): read the curve, not its last point. `--out PNG` writes the last samples (12
rows) over 6 real clips.

`--batch N` trains on N clips a step instead of quality.py's 16; compare at equal time, not steps (2
threads here: 143 ms a step at 16, 211 at 32, 423 at 64). Batch 32 for 1,600 steps (seed 0,
2026-12-03) read 12.3x, the shipped batch's 2,400 steps in the same time 12.0x.

`--decay-from STEP` lets both learning rates fall linearly to 0 at --steps, to see whether the
samples settle late in a run. From 1,200 of 2,400 steps (2026-12-01) it froze what the GAN drew
when the rates got small (scored then by one judge over one draw): seed 0 ended at 8.9x (its
constant-rate run: 12.8x), seed 1 at 102.6x with its sprites stuck at the frame's edges (constant:
9.4x).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from quality import GAN_RECIPE, clips, synth, value  # bench/quality.py: its gan run's data and batch
from vidgen import models, quality
from vidgen.models.contract import optimizer_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--every", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="the model's init and batch draws (the data stays)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a GANConfig override")
    ap.add_argument("--batch", type=int, default=2 * GAN_RECIPE["micro_batch"],
                    help="clips a step (default: quality.py's, 2 workers x its micro batch)")
    ap.add_argument("--decay-from", type=int, default=0, metavar="STEP",
                    help="> 0: both learning rates fall linearly from this step to 0 at --steps")
    ap.add_argument("--out", help="a PNG of the last samples over real clips")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    overrides = {k: value(v) for k, v in (s.split("=", 1) for s in args.set)}
    torch.set_num_threads(2)
    batch = args.batch

    with tempfile.TemporaryDirectory(prefix="vidgen-gan-curve-") as work:
        data = synth(work, "shapes", 768, 8, 32, seed=0, val=0.5)
        (x, y), (xv, yv) = clips(data, "train"), clips(data, "val")
    judges, draws = quality.scoring_clips("shapes", len(x), len(xv), 8, 32)
    panel = quality.JudgePanel(*judges, classes=3)
    reals, held_outs = [x, *(r for (r, _), _ in draws)], [xv, *(h for _, (h, _) in draws)]
    asked = [y, *(ry for (_, ry), _ in draws)]  # one sample per real clip, with its label
    held_out_labels = [yv, *(hy for _, (_, hy) in draws)]
    torch.manual_seed(args.seed)
    model = models.build("gan", "tiny", num_classes=3, label_names=["circle", "square", "triangle"], **overrides)
    optimizers = {p: torch.optim.AdamW(m.parameters(), **model.optimizer_settings(p)) for p, m in model.parts().items()}
    def factor(step: int) -> float:  # the learning rates' share at a step (--decay-from)
        if not args.decay_from or step < args.decay_from:
            return 1.0
        return max(0.0, (args.steps - step) / max(1, args.steps - args.decay_from))

    schedules = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers.values()]
    print(f"gan tiny {overrides or ''} seed {args.seed}, batch {batch}; {quality.JUDGES} judges")
    print(" step      s  label accuracy  Frechet ratio (judges' range)")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (batch,))
        model.train()
        optimizer_step(model, optimizers, {"video": x[idx], "label": y[idx]})
        for schedule in schedules:
            schedule.step()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                samples = [model.sample(len(a), 8, a.tolist(), seed=123 + k) for k, a in enumerate(asked)]
                scores = panel.score(samples, reals, held_outs, asked, held_out_labels)
            low, high = scores.frechet_range
            print(f"{step:5d} {time.perf_counter() - started:6.0f}  {scores.label_accuracy:14.2f}  "
                  f"{scores.frechet_ratio:12.2f}x ({low:.1f}-{high:.1f})", flush=True)
    if args.out:
        from PIL import Image

        with torch.no_grad():
            shown = torch.cat([model.sample(12, 8, [0, 1, 2] * 4, seed=7), x[:6]])
        frames = ((shown.clamp(-1, 1) + 1) * 127.5).byte().permute(0, 2, 3, 4, 1).numpy()  # (n, t, h, w, c)
        grid = np.concatenate([np.concatenate(list(v), 1) for v in frames], 0)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.out)
        print(f"samples (12 rows, circle/square/triangle) over 6 real clips: {args.out}")


if __name__ == "__main__":
    main()
