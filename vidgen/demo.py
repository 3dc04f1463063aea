"""The one-command demo: every capability of vidgen, end to end, on this machine.

    vidgen demo                          # about 10 minutes on 2 CPU cores, into ./demo-out
    vidgen demo --minutes 2 --out /tmp/d # a reduced but complete run
    vidgen demo --out s3://bucket/demo   # the same into S3 (AWS_ENDPOINT_URL_S3 for MinIO/moto)

Stages: synthesize datasets -> train a class-conditional `small` GAN with ZeRO-2 on 2 workers and a
restoration model -> export both -> render an ad batch (generated clips with title, logo, watermark
and audio) and an education batch (restored clips beside their degraded input) -> a gallery page
with the loss curves -> a summary. Training steps are scaled to the time given (`--max-minutes` of
the trainer). The summary measures the results: restoration PSNR gain over the degraded input, and
how often a small classifier trained on real clips recognises the class each GAN sample was
generated for (chance is 1/3).
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from vidgen import storage
from vidgen.quality import Figure, table

GAN_DATA = dict(kind="shapes", clips=384, frames=8, size=32)
HELD_OUT_CLIPS, HELD_OUT_SEED = 384, 10_000  # the GAN is scored on these (see measure_gan)
RESTORE_DATA = dict(kind="shapes", clips=192, frames=8, size=64)
RESTORE_MODEL: dict = {}  # the tiny preset: blur + noise, trained on patches
GAN_SHARE = 0.7           # of the training time left after the fixed costs
# Seconds on 2 cores that are not training steps: the start and end of each training run (Ray Train
# workers, DeepSpeed, the last checkpoint and samples), and everything after training.
# bench/startup.py on a running Ray (its first-step figure less Python and Ray's start): 17-25 s to
# the first step and 8 s from the last to exit, on the two 2-core machines measured
FIT_OVERHEAD_S = 35
AFTER_TRAINING_S = 90  # export and measure (8 judges, 6 draws of clips: 45-51 s on 2 AMD cores), render, gallery


class RunFigures(BaseModel):
    """One training run of the demo: steps and speed, then (extra keys) its last scalars and the
    held-out scores `export_and_measure` adds (d_loss, val_psnr_gain, label_accuracy, ...)."""

    model_config = ConfigDict(extra="allow")

    steps: int = 0
    seconds: float = 0.0
    clips_per_s: float | None = None  # median over the run, the first logged step left out


class BatchFigures(BaseModel):
    """One rendered batch of the demo."""

    items: int = 0
    ok: int = 0
    failed: list[str] = []
    videos: int = 0           # each ok item's main video, renditions and comparison
    seconds: float = 0.0
    gallery: str | None = None


class DemoSummary(BaseModel):
    """OUT/summary.json: what the demo measured and printed. A stage that did not run keeps its
    defaults."""

    gan: RunFigures = Field(default_factory=RunFigures)
    restore: RunFigures = Field(default_factory=RunFigures)
    ads: BatchFigures = Field(default_factory=BatchFigures)
    education: BatchFigures = Field(default_factory=BatchFigures)
    figures: list[dict[str, Any]] = []       # `quality.Figure.row()` of each held-out figure
    seconds: float = 0.0
    stage_seconds: dict[str, float] = {}

    @property
    def failed(self) -> list[str]:
        """The ids of the items that failed to render, in both batches."""
        return self.ads.failed + self.education.failed


@dataclass
class Demo:
    out: str
    minutes: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    summary: DemoSummary = field(default_factory=DemoSummary)
    stages: int = 8
    current: int = 0

    def uri(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def stage(self, name: str):
        demo = self

        class _Stage:
            def __enter__(self):
                demo.current += 1
                self.t0 = time.perf_counter()
                print(f"\n[demo {demo.current}/{demo.stages}] {name}", flush=True)

            def __exit__(self, *exc):
                demo.stage_seconds[name] = round(time.perf_counter() - self.t0, 1)
                if exc[0] is None:
                    print(f"[demo {demo.current}/{demo.stages}] {name}: done in {demo.stage_seconds[name]:.0f} s", flush=True)
                return False

        return _Stage()


def run_demo(out: str = "demo-out", minutes: float = 10.0) -> DemoSummary:
    """Run every stage; returns the summary (also written to OUT/summary.json).

    The console shows vidgen's lines; everything (and Ray's own logs) goes to OUT/logs/.
    """
    demo = Demo(storage.normalize(out), minutes)
    with tempfile.TemporaryDirectory(prefix="vidgen-demo-log-") as logs, _tee(os.path.join(logs, "console.log")):
        try:
            return _run_stages(demo)
        finally:
            try:
                save_logs(demo, logs)
            except Exception as e:  # never hide the demo's own outcome behind a failed log upload
                print(f"[demo] could not save the logs under {demo.uri('logs')}: {e}", flush=True)


def _run_stages(demo: Demo) -> DemoSummary:
    from vidgen.runtime import init_ray

    started = time.perf_counter()
    deadline = started + demo.minutes * 60
    init_ray()

    def budget(share: float, fits_left: int) -> float:
        """Seconds of training steps the next run gets so the whole demo meets its deadline."""
        left = deadline - time.perf_counter() - AFTER_TRAINING_S - FIT_OVERHEAD_S * fits_left
        return max(10.0, share * left)

    with demo.stage("synthesize datasets (shapes, procedural)"):
        make_datasets(demo)
    seconds = budget(GAN_SHARE, fits_left=2)
    with demo.stage(f"train a class-conditional GAN, ZeRO-2 on 2 workers ({seconds / 60:.1f} min of steps)"):
        demo.summary.gan = train_model(demo, "gan", "tiny", "gan", {}, seconds)
    seconds = budget(1.0, fits_left=1)
    with demo.stage(f"train a restoration model, ZeRO-2 on 2 workers ({seconds / 60:.1f} min of steps)"):
        demo.summary.restore = train_model(demo, "restore", "tiny", "restore", RESTORE_MODEL, seconds)
    with demo.stage("export both models, measure them on held-out clips"):
        export_and_measure(demo)
    with demo.stage("make brand assets and degraded lecture clips"):
        make_assets(demo)
    with demo.stage("render the ad batch (generated clips, title, logo, watermark, audio)"):
        demo.summary.ads = render(demo, ad_batch(demo))
    with demo.stage("render the education batch (restored beside degraded)"):
        demo.summary.education = render(demo, education_batch(demo))
    with demo.stage("write the gallery"):
        demo.summary.seconds = round(time.perf_counter() - started, 1)
        demo.summary.stage_seconds = demo.stage_seconds
        write_gallery(demo)
    demo.summary.seconds = round(time.perf_counter() - started, 1)
    storage.write_json(demo.uri("summary.json"), demo.summary.model_dump(mode="json"))
    print("\n" + format_summary(demo), flush=True)
    return demo.summary


class _Tee(io.TextIOBase):
    """A text stream that writes to the console stream and a log file."""

    def __init__(self, console, log):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return self.console.encoding

    def fileno(self) -> int:
        return self.console.fileno()


@contextlib.contextmanager
def _tee(path: str):
    """stdout and stderr (vidgen's lines, and the worker lines Ray forwards) also go to `path`."""
    with open(path, "w", buffering=1) as log:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


def save_logs(demo: Demo, local: str, max_bytes: int = 20 * 2**20) -> None:
    """OUT/logs/console.log, and the Ray session's log files (workers, DeepSpeed, Ray Train,
    Ray Data) under OUT/logs/ray/: what the console leaves out, for when something went wrong."""
    storage.upload_file(os.path.join(local, "console.log"), demo.uri("logs", "console.log"))
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path() if ray.is_initialized() else None
    except AttributeError:  # a Ray without this private accessor: the console log is still kept
        session = None
    if not session:
        return
    root = os.path.join(session, "logs")
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith((".log", ".out", ".err")) and 0 < os.path.getsize(path) <= max_bytes:
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                storage.upload_file(path, demo.uri("logs", "ray", *rel.split("/")))


# --------------------------------------------------------------------------------------------
# Stages


def make_datasets(demo: Demo) -> None:
    from vidgen.data import synth

    synth.synthesize(**GAN_DATA, out=demo.uri("data", "shapes32"), seed=0, val_fraction=0.1)
    synth.synthesize(**RESTORE_DATA, out=demo.uri("data", "shapes64"), seed=1, val_fraction=0.15)


def train_model(demo: Demo, family: str, preset: str, name: str, model: dict, seconds: float) -> RunFigures:
    from vidgen.train.config import validate
    from vidgen.train.trainer import read_metrics, train

    data = demo.uri("data", "shapes32" if family == "gan" else "shapes64")
    cfg = validate(dict(
        family=family, preset=preset, model=model, data=data, run=demo.uri("runs", name),
        workers=2, zero_stage=2, micro_batch=8, max_steps=100_000, checkpoint_every=100_000,
        max_minutes=seconds / 60, log_every=10, eval_batches=4,
    ))
    result = train(cfg)
    if result.stopped_by:  # Ctrl-C / SIGTERM: the checkpoint is saved; the demo stops here
        raise KeyboardInterrupt(f"{result.stopped_by} while training {family}")
    rows = read_metrics(cfg.run)
    rates = [r["clips_per_s"] for r in rows if "clips_per_s" in r][1:]
    last = {k: v for r in rows for k, v in r.items()}
    keep = ("d_loss", "g_loss", "loss", "val_psnr", "val_psnr_gain", "val_psnr_input")
    return RunFigures(steps=result.steps, seconds=round(result.seconds, 1),
                      clips_per_s=round(float(np.median(rates)), 1) if rates else None,
                      **{k: last[k] for k in keep if k in last})


def export_and_measure(demo: Demo) -> None:
    """Export both runs, then score them on held-out clips, each figure beside its baseline."""
    from vidgen.train.export import evaluate_model, export

    for name in ("gan", "restore"):
        export(demo.uri("runs", name), demo.uri("models", name))
    values = evaluate_model(demo.uri("models", "restore"), demo.uri("data", "shapes64"), split="val", batches=6)
    for k, v in values.items():
        if k.startswith("val_"):
            setattr(demo.summary.restore, k, v)
    gan = measure_gan(demo)
    for k, v in gan.pop("summary").items():
        setattr(demo.summary.gan, k, v)
    demo.summary.figures = [f.row() for f in gan["figures"]] + [
        Figure("education: restored PSNR gain on held-out clips", values["val_psnr_gain"], "the degraded input", 0.0,
               unit=" dB", target=3.0).row()]


def measure_gan(demo: Demo) -> dict:
    """A panel of judges trained on fresh real clips scores the GAN's samples; also writes the
    per-class sample grid (OUT/samples-per-class.png and .mp4)."""
    from vidgen import models, quality
    from vidgen.data.format import open_dataset
    from vidgen.data.tensors import frames_to_video

    ds = open_dataset(demo.uri("data", "shapes32"))
    train_rows = [r for r in ds.iter_clips() if r["split"] == "train"]
    train = frames_to_video(np.stack([r["frames"] for r in train_rows])), torch.tensor([r["label"] for r in train_rows])
    kind, frames, size = GAN_DATA["kind"], GAN_DATA["frames"], GAN_DATA["size"]
    # The held-out clips: fresh draws of the same generator (another seed), for scoring only. The
    # dataset's own val split (~40 clips) is too few for a Frechet distance: from n clips it is biased
    # up by about tr(cov) / n, which swamps the real-vs-real baseline and pulls the ratio towards 1.
    # More draws of fresh real and held-out clips, so that neither distance rests on one draw of clips;
    # and the judges train on a set of their own, so that the real train clips, like the samples, are
    # clips no judge has seen (see quality.score_conditional).
    judge_clips, more_draws = quality.scoring_clips(kind, len(train_rows), HELD_OUT_CLIPS, frames, size,
                                                    judges=HELD_OUT_CLIPS, draw_seed=HELD_OUT_SEED + 1)
    gan = models.load(demo.uri("models", "gan"))
    scores = quality.score_conditional(lambda labels, seed: gan.sample(len(labels), frames, labels, seed), train,
                                       quality.fresh_clips(kind, HELD_OUT_SEED, HELD_OUT_CLIPS, frames, size),
                                       len(ds.labels), judge_clips=judge_clips, more_draws=more_draws)
    write_class_grid(demo, gan, ds.labels)
    chance = 1 / len(ds.labels)
    low, high = scores.frechet_range
    return {
        "summary": {"label_accuracy": {"samples": round(scores.label_accuracy, 3),
                                       "real_held_out_clips": round(scores.judge_on_real, 3),
                                       "chance": round(chance, 3)},
                    "frechet_ratio": round(scores.frechet_ratio, 2),
                    "frechet_ratio_range": [round(r, 2) for r in scores.frechet_range]},
        "figures": [
            Figure("ads: GAN samples showing the asked shape", scores.label_accuracy, "chance", chance, target=0.9),
            Figure("ads: the same judges on real held-out clips", scores.judge_on_real, "chance", chance),
            # the geometric mean of the judges' ratios, their range in the name
            Figure(f"ads: sample Frechet ratio ({quality.JUDGES} judges: {low:.1f}-{high:.1f}x)", scores.frechet_ratio,
                   "real vs held-out", 1.0, unit="x", target=3.0, higher_is_better=False),
        ],
    }


def write_class_grid(demo: Demo, gan, labels: list[str], per_class: int = 6, scale: int = 4) -> None:
    """OUT/samples-per-class.png (one row per class: each sample's first, middle and last frame)
    and OUT/samples-per-class.mp4 (the same samples moving, one row per class)."""
    from PIL import Image, ImageDraw, ImageFont

    from vidgen import media
    from vidgen.data.tensors import tile, video_to_frames

    asked = [c for c in range(len(labels)) for _ in range(per_class)]
    videos = [video_to_frames(v) for v in gan.sample(len(asked), labels=asked, seed=7)]
    grid = tile(videos, cols=per_class)
    grid = grid.repeat(scale, 1).repeat(scale, 2)
    storage.write_bytes(demo.uri("samples-per-class.mp4"), media.encode(grid, fps=8, crf=18, preset="veryfast"))
    t = videos[0].shape[0]
    strips = [np.concatenate([v[i] for i in (0, t // 2, t - 1)], 1) for v in videos]  # (H, 3W, 3) each
    sheet = tile([s[None] for s in strips], cols=per_class, gutter=4)[0]
    sheet = sheet.repeat(scale, 0).repeat(scale, 1)
    font = ImageFont.truetype(media.font_path(), 28)  # readable beside rows `scale` times the samples' size
    label_w = 20 + max(int(font.getlength(name)) for name in labels)
    image = Image.new("RGB", (sheet.shape[1] + label_w, sheet.shape[0]), (17, 17, 17))
    image.paste(Image.fromarray(sheet), (label_w, 0))
    draw = ImageDraw.Draw(image)
    row_h = sheet.shape[0] / len(labels)
    for i, name in enumerate(labels):
        draw.text((10, int(row_h * (i + 0.5))), name, fill=(230, 230, 230), font=font, anchor="lm")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(demo.uri("samples-per-class.png"), buf.getvalue(), "image/png")


def make_assets(demo: Demo) -> None:
    """A logo (PNG with alpha), a jingle (AAC), subtitles, and degraded 'lecture' clips to restore."""
    from PIL import Image, ImageDraw

    from vidgen import media, models
    from vidgen.data.format import open_dataset
    from vidgen.data.tensors import frames_to_video, video_to_frames

    logo = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    draw = ImageDraw.Draw(logo)
    draw.ellipse((4, 4, 92, 92), fill=(255, 196, 0, 230))
    draw.polygon([(28, 30), (48, 70), (68, 30)], fill=(30, 30, 30, 255))
    buf = io.BytesIO()
    logo.save(buf, format="PNG")
    storage.write_bytes(demo.uri("assets", "logo.png"), buf.getvalue(), "image/png")

    with tempfile.TemporaryDirectory() as d:
        jingle = os.path.join(d, "jingle.m4a")
        subprocess.run(
            [media.ffmpeg_binary(), "-v", "error", "-y", "-f", "lavfi", "-i",
             "sine=frequency=523:duration=8,volume=0.3", "-f", "lavfi", "-i", "sine=frequency=659:duration=8,volume=0.2",
             "-filter_complex", "amix=inputs=2", "-c:a", "aac", jingle],
            check=True, timeout=60,
        )
        storage.upload_file(jingle, demo.uri("assets", "jingle.m4a"))
    storage.write_text(demo.uri("assets", "lecture.vtt"),
                       "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nBefore: blur and noise\n\n"
                       "00:00:01.500 --> 00:00:03.000\nAfter: restored by vidgen\n")

    restorer = models.load(demo.uri("models", "restore"))
    rows = [r for r in open_dataset(demo.uri("data", "shapes64")).iter_clips("val")][:3]
    for i, row in enumerate(rows):
        clip = np.concatenate([row["frames"]] * 3)  # 24 frames: 3 s at 8 fps
        degraded = restorer.degrade(frames_to_video(clip), seed=100 + i)
        data = media.encode(video_to_frames(degraded), fps=8, crf=12, preset="veryfast")
        storage.write_bytes(demo.uri("inputs", f"lecture-{i + 1:02d}.mp4"), data)


def ad_batch(demo: Demo) -> dict:
    titles = {"circle": "Spring sale -20% on circles!", "square": "Squares: 2 for 1 (50% off)",
              "triangle": "Triangles \"limited\" edition: 100%"}
    items = [
        {"id": f"ad-{name}", "mode": "generate", "label": name, "seed": 7 + i, "title": titles[name],
         "logo": demo.uri("assets", "logo.png"), "watermark": "vidgen demo", "audio": demo.uri("assets", "jingle.m4a")}
        for i, name in enumerate(("circle", "square", "triangle"))
    ]
    items[0]["renditions"] = [{"name": "16x9", "size": [384, 216]}, {"name": "9x16", "size": [216, 384]}]
    return {
        "name": "demo-ads",
        "output": demo.uri("renders", "ads"),
        "model": demo.uri("models", "gan"),
        "defaults": {"fps": 8, "seconds": 3, "size": [256, 256], "codec": "h264", "crf": 20},
        "items": items,
    }


def education_batch(demo: Demo) -> dict:
    items = [
        {"id": f"lecture-{i:02d}", "mode": "restore", "input": demo.uri("inputs", f"lecture-{i:02d}.mp4"),
         "compare": True, "size": [256, 256]}
        for i in (1, 2, 3)
    ]
    items[0]["subtitles"] = demo.uri("assets", "lecture.vtt")
    return {"name": "demo-education", "output": demo.uri("renders", "education"),
            "model": demo.uri("models", "restore"), "defaults": {"codec": "h264", "crf": 20}, "items": items}


def render(demo: Demo, spec: dict) -> BatchFigures:
    from vidgen.render import parse_batch, render_batch

    result = render_batch(parse_batch(spec, source="demo"))
    print(result.summary())
    if result.stopped_by:
        raise KeyboardInterrupt(f"{result.stopped_by} while rendering {spec['name']}")
    ok = [r for r in result.records if r.is_ok]
    return BatchFigures(items=len(result.records), ok=len(ok), failed=list(result.failed),
                        videos=sum(1 + len(r.renditions) + bool(r.compare) for r in ok),
                        seconds=round(result.seconds, 1), gallery=storage.join(spec["output"], "index.html"))


# --------------------------------------------------------------------------------------------
# Gallery and summary


def write_gallery(demo: Demo) -> None:
    """OUT/index.html: the figures with their baselines and verdicts, the per-class samples, the
    two render batches, the loss curves and the stage times."""
    s = demo.summary

    def posters(batch: str) -> str:
        from vidgen.render.record import RenderRecord

        records = []
        manifest = demo.uri("renders", batch, "manifest.jsonl")
        if storage.exists(manifest):
            lines = storage.read_text(manifest).splitlines()
            records = [RenderRecord.model_validate_json(line) for line in lines if line.strip()]
        cells = []
        for r in records:
            if not r.is_ok:
                continue
            name = f"{r.id}--compare" if r.compare else r.id  # restore: input | output
            width = 512 if r.compare else 256
            cells.append(f'<figure><video controls preload="none" poster="renders/{batch}/{html.escape(name)}.jpg" '
                         f'src="renders/{batch}/{html.escape(name)}.mp4" width="{width}"></video>'
                         f'<figcaption>{html.escape(r.id)}</figcaption></figure>')
        return "".join(cells)

    verdict_colour = {True: "#6c6", False: "#f66", None: "#ccc"}  # met, missed, no target
    figure_rows = "".join(
        f"<tr><td>{html.escape(f['figure'])}</td><td>{f['value']:.3f}{html.escape(f['unit'])}</td>"
        f"<td>{html.escape(f['baseline'])} {f['baseline_value']:.3f}{html.escape(f['unit'])}</td>"
        f"<td style='color:{verdict_colour[f['met']]}'>{html.escape(f['verdict'])}</td></tr>" for f in s.figures)
    training_rows = "".join(f"<tr><td>{name}</td><td>{t.steps}</td><td>{t.seconds}</td><td>{t.clips_per_s}</td></tr>"
                            for name, t in (("gan", s.gan), ("restore", s.restore)))
    stage_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f}</td></tr>" for k, v in demo.stage_seconds.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vidgen demo</title>
<style>body{{font-family:sans-serif;margin:2em;background:#111;color:#eee}}a{{color:#8cf}}
table{{border-collapse:collapse;margin-bottom:1em}}th,td{{border:1px solid #444;padding:4px 8px;text-align:left}}
figure{{display:inline-block;margin:8px}}img.plot{{background:#fff;max-width:48%;margin:4px}}</style></head><body>
<h1>vidgen demo</h1><p>{html.escape(demo.out)} &mdash; {s.seconds:.0f} s on this machine</p>
<h2>What the models learned (held-out clips)</h2>
<table><tr><th>figure</th><th>value</th><th>baseline</th><th>verdict</th></tr>{figure_rows}</table>
<h2>GAN samples, one row per asked class</h2>
<p><img src="samples-per-class.png" alt="GAN samples per class" style="max-width:100%"></p>
<p><video controls loop preload="none" src="samples-per-class.mp4" poster="samples-per-class.png" width="600"></video></p>
<h2>Ad batch (generated by the GAN)</h2><p><a href="renders/ads/index.html">full gallery</a></p>{posters("ads")}
<h2>Education batch (degraded input | restored)</h2><p><a href="renders/education/index.html">full gallery</a></p>{posters("education")}
<h2>Training</h2><table><tr><th>run</th><th>steps</th><th>seconds</th><th>clips/s</th></tr>{training_rows}</table>
<img class="plot" src="runs/gan/loss.png" alt="GAN losses"><img class="plot" src="runs/restore/loss.png" alt="restore loss">
<p>Samples during training: <a href="runs/gan/samples/">runs/gan/samples</a>, <a href="runs/restore/samples/">runs/restore/samples</a>;
curves: <code>tensorboard --logdir {html.escape(demo.uri('runs'))}</code></p>
<h2>Stage times (s)</h2><table>{stage_rows}</table></body></html>"""
    storage.write_text(demo.uri("index.html"), page, "text/html; charset=utf-8")


def format_summary(demo: Demo) -> str:
    s = demo.summary
    gan, res, ads, edu = s.gan, s.restore, s.ads, s.education
    width = max(map(len, ["stage", *demo.stage_seconds]))  # names are whole: they carry the minutes given
    lines = [
        "vidgen demo summary",
        "",
        "What the models learned, on held-out clips:",
        table(s.figures),
        "",
        f"  {'stage':{width}s} {'seconds':>8s}",
        *(f"  {name:{width}s} {sec:8.0f}" for name, sec in demo.stage_seconds.items()),
        f"  {'total':{width}s} {s.seconds:8.0f}",
        "",
        f"  GAN: {gan.steps} steps at {gan.clips_per_s} clips/s; restore: {res.steps} steps "
        f"at {res.clips_per_s} clips/s (2 workers, ZeRO-2 each)",
        f"  rendered: ads {ads.ok}/{ads.items} items ({ads.videos} videos), "
        f"education {edu.ok}/{edu.items} items ({edu.videos} videos)",
        "",
        f"  open      {demo.uri('index.html')}   (figures, samples per class, both batches, curves)",
        f"  samples   {demo.uri('samples-per-class.png')}",
        f"  renders   {demo.uri('renders')}  (ads/, education/: videos, posters, manifest.jsonl, index.html)",
        f"  runs      {demo.uri('runs')}  (checkpoints, metrics.jsonl, tb/, samples/, loss.png)",
        f"  models    {demo.uri('models')}",
        f"  logs      {demo.uri('logs')}  (this console, and Ray's, DeepSpeed's and the workers' full logs)",
        f"  summary   {demo.uri('summary.json')}",
    ]
    return "\n".join(lines)
