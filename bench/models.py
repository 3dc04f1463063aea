"""Model sizes and speed per preset, and restoration quality against ffmpeg's own denoisers.

    python bench/models.py                          # both parts, about 8 minutes on 2 cores
    python bench/models.py --only sizes             # parameter counts + forward/backward time
    python bench/models.py --only restore --train-seconds 60 --eval-clips 8    # CPU-quick check

sizes    for every family and preset (tiny, small, base): trainable parameters, and the median
         seconds of one training step's forward + backward (every TrainStep of the family, the
         family's own loss) on a batch of 2 clips of the preset's shape, with all CPU threads.
restore  a restoration model (scale 1: a denoiser, 5-frame window) trained in this process for
         --train-seconds on 8 x 32 x 32 patches of synthetic `shapes` + `digits` clips (64x64, 16
         frames) with the family's own on-the-fly degradation (gaussian noise, sigma uniform in
         0-0.1 of the [-1, 1] range, i.e. up to 12.75 levels of 255), then evaluated on held-out
         whole clips degraded with fixed seeds. Denoising is what hqdn3d and nlmeans are made for;
         with H.264 at crf 30-40 after the noise (the `small` preset's training mix) the encoder
         already removes most of the noise and no method gains much (measured: degraded 28.6 dB,
         nlmeans 29.0, this model 29.2 after 300 s). PSNR of:
           degraded  the degraded clip itself (the no-op baseline)
           hqdn3d    ffmpeg's hqdn3d over the degraded frames, the best of a few strengths
           nlmeans   ffmpeg's nlmeans, the best of a few strengths
           ours      the trained model
         The filters' strengths are tuned on the evaluation clips themselves (an oracle choice,
         generous to the baselines); each filter runs on the raw degraded frames piped to ffmpeg.
         Targets: ours - degraded >= 3 dB, ours - best filter >= 1 dB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch


from vidgen import media, metrics, models
from vidgen.data.synth import synth_clip
from vidgen.data.tensors import frames_to_video

PRESETS = ("tiny", "small", "base")
SHAPES = {"tiny": (8, 32), "small": (16, 64), "base": (16, 128)}  # (T, S) where the config does not fix them
FILTERS = {
    "hqdn3d": ["hqdn3d", "hqdn3d=6:4.5:9:6.75", "hqdn3d=10:8:15:12", "hqdn3d=16:12:24:18"],
    "nlmeans": ["nlmeans=s=2", "nlmeans=s=4", "nlmeans=s=6", "nlmeans=s=8:p=5:r=9"],
}
RESTORE = dict(scale=1, window=5, width=32, num_blocks=4, degradations=("noise",), noise_sigma=0.1, lr=1e-3)
CROP = (8, 32, 32)  # training patches (T, H, W) cut from the 16 x 64 x 64 clips; evaluation uses whole clips


def clips_of(kinds: list[str], seed: int, n: int, frames: int, size: int) -> torch.Tensor:
    """n synthetic clips, alternating kinds -> (n, 3, T, S, S) float in [-1, 1]."""
    videos = [synth_clip(kinds[i % len(kinds)], seed, i, frames, size, 0.0).frames for i in range(n)]
    return torch.cat([frames_to_video(v) for v in videos])


def model_and_batch(family: str, preset: str) -> tuple[torch.nn.Module, dict]:
    extra = {"num_classes": 3} if family == "gan" else {}
    model = models.build(family, preset, label_names=["a", "b", "c"] if extra else None, **extra)
    t, s = SHAPES[preset]
    t, s = getattr(model.config, "num_frames", t), getattr(model.config, "frame_size", s)
    if family == "style":
        model.set_style_image(torch.rand(3, 2 * s, 2 * s) * 2 - 1)
    batch = {"video": torch.rand(2, 3, t, s, s) * 2 - 1, "label": torch.randint(0, 3, (2,))}
    return model, batch


def step_seconds(model, batch: dict, repeat: int) -> float:
    parts = model.parts()
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        for ts in model.train_steps():
            others = [m for p, m in parts.items() if p != ts.part]
            for m in others:
                m.requires_grad_(False)
            loss, _ = ts.loss(batch, parts)
            loss.backward()
            for m in others:
                m.requires_grad_(True)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])  # the first pays one-off allocations


def sizes(repeat: int) -> dict:
    out = {}
    print(f"{'family':<9} {'preset':<6} {'params':>10} {'input (B,C,T,H,W)':>22} {'fwd+bwd s':>10}")
    for family in models.FAMILIES:
        for preset in PRESETS:
            torch.manual_seed(0)
            model, batch = model_and_batch(family, preset)
            params = sum(p.numel() for part in model.parts().values() for p in part.parameters())
            seconds = step_seconds(model, batch, repeat if preset != "base" else 1)
            shape = tuple(batch["video"].shape)
            print(f"{family:<9} {preset:<6} {params / 1e6:>9.2f}M {str(shape):>22} {seconds:>10.3f}", flush=True)
            out[f"{family}/{preset}"] = {"params": params, "input": list(shape), "fwd_bwd_s": seconds}
    return out


def ffmpeg_filter(video: torch.Tensor, vf: str) -> torch.Tensor:
    """(C, T, H, W) in [-1, 1] -> the same frames through an ffmpeg video filter (`media.filter_frames`)."""
    frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return torch.from_numpy(media.filter_frames(frames, vf)).permute(3, 0, 1, 2).float() / 127.5 - 1


def restore(train_seconds: float, eval_clips: int, batch_size: int) -> dict:
    kinds = ["shapes", "digits"]
    train = clips_of(kinds, 0, 256, 16, 64)
    clean = clips_of(kinds, 1, eval_clips, 16, 64)
    torch.manual_seed(0)
    model = models.build("restore", "small", **RESTORE)
    params = sum(p.numel() for p in model.net.parameters())
    step = model.train_steps()[0]
    opt = torch.optim.AdamW(model.net.parameters(), lr=model.config.lr)
    print(f"restore: training {params / 1e6:.2f}M parameters for {train_seconds:.0f} s on patches {CROP} of "
          f"{len(train)} clips (batch {batch_size}, degradations {list(model.config.degradations)})", flush=True)
    start, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < train_seconds:
        idx = torch.randint(len(train), (batch_size,))
        t0, y0, x0 = (int(torch.randint(n - c + 1, ())) for n, c in zip(train.shape[2:], CROP, strict=True))
        crops = train[idx, :, t0:t0 + CROP[0], y0:y0 + CROP[1], x0:x0 + CROP[2]]  # (B, C, 8, 32, 32) patches
        loss, _ = step.loss({"video": crops}, model.parts())
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        losses.append(loss.item())
        if steps % 25 == 0:
            print(f"  step {steps:5d}  l1 {statistics.mean(losses[-25:]):.4f}  {time.perf_counter() - start:5.0f} s",
                  flush=True)

    degraded = torch.cat([model.degrade(clean[i:i + 1], seed=10_000 + i) for i in range(len(clean))])
    model.eval()
    with torch.no_grad():
        ours = torch.cat([model.restore(degraded[i:i + 1]) for i in range(len(clean))])
    results = {"degraded": metrics.psnr(degraded, clean).item(), "ours": metrics.psnr(ours, clean).item()}
    tuned = {}
    for name, options in FILTERS.items():
        scores = {}
        for vf in options:
            filtered = torch.stack([ffmpeg_filter(degraded[i], vf) for i in range(len(clean))])
            scores[vf] = metrics.psnr(filtered, clean).item()
        best = max(scores, key=scores.get)
        results[name], tuned[name] = scores[best], {"best": best, "scores": scores}
    best_filter = max(FILTERS, key=results.get)
    figures = {"params": params, "train_steps": steps, "train_seconds": train_seconds, "batch": batch_size,
               "eval_clips": eval_clips, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in RESTORE.items()},
               "psnr_db": results, "filters": tuned, "gain_vs_degraded_db": results["ours"] - results["degraded"],
               "best_filter": best_filter, "gain_vs_best_filter_db": results["ours"] - results[best_filter]}
    print(f"restore: PSNR on {eval_clips} held-out clips (dB): degraded {results['degraded']:.2f}, "
          f"hqdn3d {results['hqdn3d']:.2f} ({tuned['hqdn3d']['best']}), nlmeans {results['nlmeans']:.2f} "
          f"({tuned['nlmeans']['best']}), ours {results['ours']:.2f} after {steps} steps")
    print(f"restore: ours - degraded {figures['gain_vs_degraded_db']:+.2f} dB (target >= 3); ours - {best_filter} "
          f"{figures['gain_vs_best_filter_db']:+.2f} dB (target >= 1)")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["sizes", "restore"])
    ap.add_argument("--repeat", type=int, default=3, help="sizes: timed steps per preset (base: 1)")
    ap.add_argument("--train-seconds", type=float, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-clips", type=int, default=16)
    ap.add_argument("--out-json")
    args = ap.parse_args()
    figures: dict = {"settings": vars(args) | {"threads": torch.get_num_threads()}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "sizes"):
        figures["sizes"] = sizes(args.repeat)
    if args.only in (None, "restore"):
        figures["restore"] = restore(args.train_seconds, args.eval_clips, args.batch)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
