"""Quality reached per minute of training, through the real trainer, against baselines from the same run.

    python bench/quality.py                          # every family, about 45 minutes on 2 cores
    python bench/quality.py --only gan restore       # some of them
    python bench/quality.py --only convlstm --scale 0.3    # budgets x0.3: a quick look, not the figures
    python bench/quality.py --only gan --set gan.ema_decay=0.99 --out-json /tmp/q.json  # a recipe change

Each family is trained as a user would train it: `vidgen.train.trainer.train` (Ray Train, 2 workers,
DeepSpeed ZeRO-2, a local Ray on 127.0.0.1 shared by all families) on a generated dataset, for a
wall budget (`max_minutes` of the trainer, minus the run's measured start-up: the budget is the
whole `vidgen train`), then exported with `vidgen export` and scored on the dataset's held-out
`val` clips, which no run sees:

gan       conditional, shapes 32x32, 8 frames (384 train, 384 val clips), 6 min. A panel of 8
          ClipClassifiers (seeds 0-7), trained on 384 more real clips that neither the GAN nor the
          scoring sees, judges one sample per train clip, asked for that clip's label: the share
          recognised as the asked class, vs chance 1/3 and vs the same judges on the real held-out
          clips of all 6 draws (the row still says "val clips"; target >= 0.90). The Frechet
          distance of a judge's features, samples vs real val clips, over the distance real train
          vs real val, both from as many clips, and both the mean over
          6 draws (train and val, then 5 fresh pairs of real and held-out sets as large): the
          geometric mean over the judges, and their range (target <= 3x).
restore   blur + noise on shapes 64x64, 3 min: PSNR gain over the degraded input (target >= +3 dB).
denoise   noise only (sigma U(0, 0.1) on [-1, 1]), shapes + digits 64x64, 15 min: PSNR vs ffmpeg's hqdn3d
          and nlmeans, each at the strength that scores best on half of the val clips; all three are
          scored on the other half (target >= +1 dB over the best filter). The noisy clips and every
          output are rounded to 8 bits, as in a video file, and each PSNR is over all the scored
          clips at once (a mean of per-clip PSNRs is +inf once one clip comes back exact).
convlstm  Game of Life 64x64 (32x32 cells), 5 min: the share of cells right in the first predicted
          frame, on unseen boards, vs copy-last-frame (target >= 0.99).
vae       shapes 32x32, 3 min: reconstruction PSNR vs each clip's mean frame; sample Frechet ratio as
          for the GAN, by the same panel (report only).
style     shapes 64x64, 2 x 2 min (temporal weight 10 with style weight 15, and 0 with 5): flicker = mean |y_t - y_t-1| / mean
          |x_t - x_t-1| on val clips, at the style loss each reaches (target: lower flicker at a style
          loss within 25% of the run without the temporal term, and a content loss at most 25% above
          its: less flicker bought by losing the moving content is no win).

Results: bench/results/quality.json (figures) and the report on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


from vidgen import media, metrics, models, quality
from vidgen.data.format import open_dataset
from vidgen.data.tensors import frames_to_video
from vidgen.quality import Figure

from families import kept_families, run_families

# The recipes: what a user gets from the example configs jobs/train/*-cpu.yaml and from `vidgen demo`.
GAN_RECIPE = dict(micro_batch=8)
RESTORE_RECIPE = dict(micro_batch=8)
DENOISE_MODEL = dict(degradations=["noise"], window=5, width=32, num_blocks=4, levels=2, crop=32, crop_frames=4)
FILTERS = {
    "hqdn3d": ["hqdn3d=2:1.5:3:2.25", "hqdn3d", "hqdn3d=6:4.5:9:6.75", "hqdn3d=10:8:15:12", "hqdn3d=16:12:24:18",
               "hqdn3d=24:18:36:27"],  # each list goes past its best on the denoise clips (2026-12-01)
    "nlmeans": ["nlmeans=s=1", "nlmeans=s=2", "nlmeans=s=3", "nlmeans=s=4", "nlmeans=s=6", "nlmeans=s=8:p=5:r=9",
                "nlmeans=s=12:p=5:r=9"],
}


def clips(uri: str, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All clips of a split -> (videos (N, C, T, H, W) in [-1, 1], labels (N,) or None)."""
    rows = list(open_dataset(uri).iter_clips(split))
    video = frames_to_video(np.stack([r["frames"] for r in rows]))
    labels = [r["label"] for r in rows]
    return video, (torch.tensor(labels) if None not in labels else None)


def frechet_figure(name: str, ratio: float, spread: tuple[float, float], target: float | None = None) -> Figure:
    """The panel's geometric-mean Frechet ratio, with the lowest and highest judge's in its name."""
    judges = f"{quality.JUDGES} judges: {spread[0]:.1f}-{spread[1]:.1f}x"
    return Figure(f"{name}: Frechet distance / real-vs-real ({judges})", ratio, "real vs held-out", 1.0, unit="x",
                  target=target, higher_is_better=False)


def train_and_export(work: str, name: str, family: str, data: str, minutes: float, model: dict,
                     **settings) -> tuple[models.nn.Module, dict]:
    """Train through the real trainer for `minutes` of wall time in all, export, load the model."""
    from vidgen.train.config import validate
    from vidgen.train.export import export
    from vidgen.train.trainer import train

    run = os.path.join(work, "runs", name)
    cfg = validate(dict(family=family, preset="tiny", data=data, run=run, workers=2, zero_stage=2,
                        max_steps=1_000_000, checkpoint_every=1_000_000, log_every=25, eval_batches=2,
                        model=model, **{"max_minutes": minutes} | settings))
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    export(run, os.path.join(work, "models", name))
    loaded = models.load(os.path.join(work, "models", name)).eval()
    return loaded, {"steps": result.steps, "wall_minutes": round(seconds / 60, 2),
                    "steps_per_s": round(result.steps / max(result.seconds, 1e-9), 2)}


def value(text: str):
    """A --set value: JSON (0.99, true, 3) or else the text itself (translation,color)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def model_overrides(settings: list[str]) -> dict[str, dict]:
    """--set BENCH.KEY=VALUE ... -> {bench: {key: value}} for every bench (empty where none): a model
    config override for that bench's run (the style bench's per-frame baseline keeps temporal_weight 0)."""
    out: dict[str, dict] = {name: {} for name in BENCHES}
    for setting in settings:
        name, _, rest = setting.partition(".")
        key, eq, text = rest.partition("=")
        if name not in out or not key or not eq:
            raise SystemExit(f"--set {setting!r}: expected BENCH.KEY=VALUE with BENCH one of {sorted(out)}")
        out[name][key] = value(text)
    return out


def budget(minutes: float, args) -> float:
    """The trainer's `max_minutes` for a whole-command budget: less the start-up this bench measured."""
    return max(0.2, minutes * args.scale - args.startup_minutes)


def synth(work: str, kind: str, clips_: int, frames: int, size: int, seed: int, val: float = 0.15) -> str:
    from vidgen.data.synth import synthesize

    uri = os.path.join(work, "data", f"{kind}{size}-{seed}")
    synthesize(kind=kind, clips=clips_, frames=frames, size=size, out=uri, seed=seed, val_fraction=val,
               progress=False)
    return uri


def bench_gan(work: str, args) -> dict:
    # 384 train and 384 held-out clips: with 96 held-out clips (as before) the real-vs-real Frechet
    # distance, the ratio's denominator, ranged 0.6-2.4 by the draw of clips alone
    data = synth(work, "shapes", 768, 8, 32, seed=0, val=0.5)
    gan, run = train_and_export(work, "gan", "gan", data, budget(6, args), args.model["gan"], **GAN_RECIPE)
    frames = open_dataset(data).clip_shape[0]
    train, val = clips(data, "train"), clips(data, "val")
    judges, draws = quality.scoring_clips("shapes", len(train[0]), len(val[0]), frames, 32)
    scores = quality.score_conditional(lambda labels, seed: gan.sample(len(labels), frames, labels, seed),
                                       train, val, classes=3, judge_clips=judges, more_draws=draws)
    return {"run": run, "figures": [
        Figure("gan: label accuracy of samples", scores.label_accuracy, "chance", 1 / 3, target=0.90),
        Figure("gan: judges on real val clips (reference)", scores.judge_on_real, "chance", 1 / 3),
        frechet_figure("gan", scores.frechet_ratio, scores.frechet_range, target=3.0)]}


def bench_restore(work: str, args) -> dict:
    data = synth(work, "shapes", 192, 8, 64, seed=1)
    model, run = train_and_export(work, "restore", "restore", data, budget(3, args), args.model["restore"],
                                  **RESTORE_RECIPE)
    clean, _ = clips(data, "val")
    degraded = torch.cat([model.degrade(clean[i:i + 1], seed=10_000 + i) for i in range(len(clean))])
    restored = torch.cat([model.restore(degraded[i:i + 4]) for i in range(0, len(clean), 4)])
    ours, before = metrics.psnr(restored, clean).item(), metrics.psnr(degraded, clean).item()
    return {"run": run, "psnr_db": {"ours": ours, "degraded": before}, "figures": [
        Figure("restore (blur+noise): PSNR gain", ours - before, "the degraded input", 0.0, unit=" dB", target=3.0)]}


def ffmpeg_filter(video: torch.Tensor, vf: str) -> torch.Tensor:
    """(C, T, H, W) in [-1, 1] -> the same frames through an ffmpeg video filter (`media.filter_frames`)."""
    frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return torch.from_numpy(media.filter_frames(frames, vf)).permute(3, 0, 1, 2).float() / 127.5 - 1


def eight_bit(video: torch.Tensor) -> torch.Tensor:
    """Videos in [-1, 1] rounded to the 256 levels a video file holds."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def tune_filter(degraded: torch.Tensor, clean: torch.Tensor, options: list[str]) -> tuple[str, dict[str, float]]:
    """The ffmpeg filter graph of `options` whose outputs of `degraded` (N, C, T, H, W) come closest
    to `clean`, and each option's PSNR over them all (pooled: a clip that comes back exact would make
    a mean of per-clip PSNRs +inf for every option that rounds it back, and max() take the first)."""
    scores = {vf: metrics.psnr(torch.stack([ffmpeg_filter(v, vf) for v in degraded]), clean, reduction="pooled").item()
              for vf in options}
    return max(scores, key=scores.get), scores


def bench_denoise(work: str, args) -> dict:
    from vidgen.data.format import write_dataset
    from vidgen.data.synth import synth_clip

    data = os.path.join(work, "data", "mixed64")
    mixed = [synth_clip(kind, 2, i, 16, 64, 0.15) for i in range(320) for kind in [("shapes", "digits")[i % 2]]]
    write_dataset(data, mixed, kind="synth:shapes+digits", labels=None, sources=["synth:shapes+digits:seed=2"])
    model, run = train_and_export(work, "denoise", "restore", data, budget(15, args),
                                  DENOISE_MODEL | args.model["denoise"], **RESTORE_RECIPE)
    clean, _ = clips(data, "val")
    # The noisy clips as a video holds them (8 bits), for the filters and the model alike; each
    # output rounded to 8 bits as well, and each figure the PSNR over all the scored clips at once
    degraded = eight_bit(torch.cat([model.degrade(clean[i:i + 1], seed=20_000 + i) for i in range(len(clean))]))
    half = len(clean) // 2
    tune, score = slice(0, half), slice(half, len(clean))
    results, chosen = {}, {}
    for name, options in FILTERS.items():  # strength chosen on the tuning half, scored on the other
        chosen[name], _ = tune_filter(degraded[tune], clean[tune], options)
        filtered = torch.stack([ffmpeg_filter(v, chosen[name]) for v in degraded[score]])
        results[name] = metrics.psnr(filtered, clean[score], reduction="pooled").item()
    with torch.no_grad():
        restored = eight_bit(torch.cat([model.restore(degraded[i:i + 4]) for i in range(half, len(clean), 4)]))
    results["ours"] = metrics.psnr(restored, clean[score], reduction="pooled").item()
    results["degraded"] = metrics.psnr(degraded[score], clean[score], reduction="pooled").item()
    best = max(FILTERS, key=results.get)
    return {"run": run, "psnr_db": results, "filters": chosen, "figures": [
        Figure("denoise: PSNR", results["ours"], f"best filter ({chosen[best]})", results[best], unit=" dB",
               target=results[best] + 1.0, target_text=">= best filter + 1 dB"),
        Figure("denoise: PSNR gain", results["ours"] - results["degraded"], "the noisy input", 0.0, unit=" dB")]}


def bench_convlstm(work: str, args) -> dict:
    from vidgen.models.convlstm import life_grid

    data = synth(work, "life", 600, 4, 64, seed=4)
    model, run = train_and_export(work, "convlstm", "convlstm", data, budget(5, args), args.model["convlstm"],
                                  micro_batch=8)
    video, _ = clips(data, "val")
    cell = open_dataset(data).manifest.life["cell"]
    k = model.config.context_frames
    predicted = torch.cat([model.predict(video[i:i + 8, :, :k], 1) for i in range(0, len(video), 8)])
    truth = life_grid(video[:, :, k:k + 1], cell)
    ours = float((life_grid(predicted, cell) == truth).mean())
    copy = float((life_grid(video[:, :, k - 1:k], cell) == truth).mean())
    return {"run": run, "figures": [
        Figure("convlstm (life): next-frame cell accuracy", ours, "copy-last-frame", copy, target=0.99)]}


def bench_vae(work: str, args) -> dict:
    data = synth(work, "shapes", 384, 8, 32, seed=0, val=0.25)
    x, y = clips(data, "train")
    xv, _ = clips(data, "val")
    model, run = train_and_export(work, "vae", "vae", data, budget(3, args), args.model["vae"], micro_batch=8)
    recon = torch.cat([model.reconstruct(xv[i:i + 8]) for i in range(0, len(xv), 8)])
    mean_frame = xv.mean(2, keepdim=True).expand_as(xv)
    judges, draws = quality.scoring_clips("shapes", len(x), len(xv), x.shape[2], x.shape[-1])
    panel = quality.JudgePanel(*judges, classes=3)
    reals, held_outs = [x, *(r for (r, _), _ in draws)], [xv, *(h for _, (h, _) in draws)]
    # as many samples as real clips: both distances from as many clips (see quality.score_conditional)
    samples = [model.sample(len(r), num_frames=x.shape[2], seed=123 + k) for k, r in enumerate(reals)]
    ratios = panel.frechet_ratios(samples, reals, held_outs)
    return {"run": run, "figures": [
        Figure("vae: reconstruction PSNR", metrics.psnr(recon, xv).item(), "each clip's mean frame",
               metrics.psnr(mean_frame, xv).item(), unit=" dB"),
        frechet_figure("vae: sample", quality.geometric_mean(ratios), (min(ratios), max(ratios)))]}


def flicker(output: torch.Tensor, source: torch.Tensor) -> float:
    """Mean frame-to-frame change of the output relative to the input's: 1 = as much as the input."""
    return float((output[:, :, 1:] - output[:, :, :-1]).abs().mean() / (source[:, :, 1:] - source[:, :, :-1]).abs().mean())


def bench_style(work: str, args) -> dict:
    from PIL import Image

    data = synth(work, "shapes", 96, 8, 64, seed=5)
    style = os.path.join(work, "style.png")
    yy, xx = np.mgrid[0:96, 0:96]
    stripes = np.stack([(np.sin(xx / 3) > 0) * 230, (np.sin((xx + yy) / 5) > 0) * 160, (np.cos(yy / 4) > 0) * 90], -1)
    Image.fromarray(stripes.astype(np.uint8)).save(style)
    video, _ = clips(data, "val")
    out = {}
    # The temporal term pulls against the style term: at the same style weight the temporal run ends
    # with a larger style loss (0.10 vs 0.06), and less flicker would be bought with less style. It
    # weights style 3x (a sweep: weight 15 reaches the per-frame run's style loss), so the two are
    # compared at equal style loss; the run checks that they are within 25%. Flicker also falls when
    # the output loses the moving content, so the temporal run's content loss may not be more than
    # 25% above the per-frame run's either. Both losses are over all the val clips flicker is.
    # Weights: the bench's, which --set may change; fixed: what makes the run the per-frame baseline.
    for name, weights, fixed in (("temporal", {"temporal_weight": 10.0, "style_weight": 15.0}, {}),
                                 ("per-frame", {}, {"temporal_weight": 0.0})):
        model, run = train_and_export(work, f"style-{name}", "style", data, budget(2, args),
                                      weights | args.model["style"] | fixed, micro_batch=4, style_image=style)
        styled = torch.cat([model.stylize(video[i:i + 4]) for i in range(0, len(video), 4)])
        with torch.no_grad():
            terms = model.losses(video, styled)
        out[name] = {"run": run, "flicker": flicker(styled, video), "style_loss": terms["style"].item(),
                     "content_loss": terms["content"].item()}
    a, b = out["temporal"], out["per-frame"]
    close = (abs(a["style_loss"] - b["style_loss"]) <= 0.25 * b["style_loss"]
             and a["content_loss"] <= 1.25 * b["content_loss"])
    equal = "like for like" if close else "NOT like for like: no verdict"
    losses = (f"style loss {a['style_loss']:.3f} vs {b['style_loss']:.3f}, "
              f"content loss {a['content_loss']:.3f} vs {b['content_loss']:.3f}")
    return {"runs": out, "equal_style": close, "figures": [
        Figure(f"style: flicker ({losses}, {equal})", a["flicker"],
               "per-frame stylisation", b["flicker"], higher_is_better=False,
               target=b["flicker"] if close else None, target_text="below per-frame stylisation")]}


BENCHES = {"gan": bench_gan, "restore": bench_restore, "convlstm": bench_convlstm, "vae": bench_vae,
           "style": bench_style, "denoise": bench_denoise}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every budget (a quick look below 1)")
    ap.add_argument("--startup-minutes", type=float, default=0.6,
                    help="the part of each budget a run spends before its first step and after its last")
    ap.add_argument("--set", action="append", default=[], metavar="BENCH.KEY=VALUE",
                    help="a model config override for one bench's run, e.g. gan.ema_decay=0.99 (repeatable; "
                         "the family's result and README row name it)")
    ap.add_argument("--out-json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                        "quality.json"))
    args = ap.parse_args()
    args.model = model_overrides(args.set)
    from vidgen.runtime import init_ray

    init_ray()
    report: dict = {"settings": {"scale": args.scale, "startup_minutes": args.startup_minutes}, "families": {}}
    if os.path.exists(args.out_json) and args.only:  # keep the other families' last figures
        report["families"] = kept_families(args.out_json)
    def describe(name: str, result: dict) -> str:
        run = result.get("run") or {}
        return f"{name}: {run.get('wall_minutes')} min, {run.get('steps')} steps, {run.get('steps_per_s')} steps/s"

    with tempfile.TemporaryDirectory(prefix="vidgen-quality-") as work:
        def run(name: str) -> dict:  # a family run with --set overrides says so in its result (and table row)
            return BENCHES[name](work, args) | ({"set": args.model[name]} if args.model[name] else {})

        run_families(args.only or BENCHES, run, report, args.out_json, describe)
    print("\nquality after training through vidgen train (2 workers, ZeRO-2) on held-out clips")
    for name, result in report["families"].items():
        run = result.get("run") or {}
        if run:
            print(f"{name}: {run['wall_minutes']} min, {run['steps']} steps, {run['steps_per_s']} steps/s")
        print(quality.table(result["figures"]))


if __name__ == "__main__":
    main()
