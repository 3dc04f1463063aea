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

import html
import io
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vidgen import storage

GAN_DATA = dict(kind="shapes", clips=384, frames=8, size=32)
RESTORE_DATA = dict(kind="shapes", clips=192, frames=8, size=64)
RESTORE_MODEL = {"degradations": ["blur", "noise"], "width": 32, "num_blocks": 4, "window": 3}
# Seconds on 2 cores that are not training steps: the start and end of each training run (Ray Train
# workers, DeepSpeed, the last checkpoint and samples), and everything after training.
FIT_OVERHEAD_S = 20
AFTER_TRAINING_S = 50


@dataclass
class Demo:
    out: str
    minutes: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
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


def run_demo(out: str = "demo-out", minutes: float = 10.0) -> dict:
    """Run every stage; returns the summary (also written to OUT/summary.json)."""
    from vidgen.runtime import init_ray

    demo = Demo(storage.normalize(out), minutes)
    started = time.perf_counter()
    deadline = started + minutes * 60
    init_ray()

    def budget(share: float, fits_left: int) -> float:
        """Seconds of training steps the next run gets so the whole demo meets its deadline."""
        left = deadline - time.perf_counter() - AFTER_TRAINING_S - FIT_OVERHEAD_S * fits_left
        return max(10.0, share * left)

    with demo.stage("synthesize datasets (shapes, procedural)"):
        make_datasets(demo)
    seconds = budget(0.65, fits_left=2)
    with demo.stage(f"train a class-conditional small GAN, ZeRO-2 on 2 workers ({seconds / 60:.1f} min of steps)"):
        demo.summary["gan"] = train_model(demo, "gan", "small", "gan", {}, seconds)
    seconds = budget(1.0, fits_left=1)
    with demo.stage(f"train a restoration model, ZeRO-2 on 2 workers ({seconds / 60:.1f} min of steps)"):
        demo.summary["restore"] = train_model(demo, "restore", "tiny", "restore", RESTORE_MODEL, seconds)
    with demo.stage("export both models, measure them"):
        export_and_measure(demo)
    with demo.stage("make brand assets and degraded lecture clips"):
        make_assets(demo)
    with demo.stage("render the ad batch (generated clips, title, logo, watermark, audio)"):
        demo.summary["ads"] = render(demo, ad_batch(demo))
    with demo.stage("render the education batch (restored beside degraded)"):
        demo.summary["education"] = render(demo, education_batch(demo))
    with demo.stage("write the gallery"):
        demo.summary["seconds"] = round(time.perf_counter() - started, 1)
        demo.summary["stage_seconds"] = demo.stage_seconds
        write_gallery(demo)
    demo.summary["seconds"] = round(time.perf_counter() - started, 1)
    storage.write_json(demo.uri("summary.json"), demo.summary)
    print("\n" + format_summary(demo))
    return demo.summary


# --------------------------------------------------------------------------------------------
# Stages


def make_datasets(demo: Demo) -> None:
    from vidgen.data import synth

    synth.synthesize(**GAN_DATA, out=demo.uri("data", "shapes32"), seed=0, val_fraction=0.1)
    synth.synthesize(**RESTORE_DATA, out=demo.uri("data", "shapes64"), seed=1, val_fraction=0.15)


def train_model(demo: Demo, family: str, preset: str, name: str, model: dict, seconds: float) -> dict:
    from vidgen.train.config import validate
    from vidgen.train.trainer import read_metrics, train

    data = demo.uri("data", "shapes32" if family == "gan" else "shapes64")
    cfg = validate(dict(
        family=family, preset=preset, model=model, data=data, run=demo.uri("runs", name),
        workers=2, zero_stage=2, micro_batch=8, max_steps=100_000, checkpoint_every=100_000,
        max_minutes=seconds / 60, log_every=10, eval_batches=4,
        lr=1e-3 if family == "restore" else None,
    ))
    result = train(cfg)
    rows = read_metrics(cfg.run)
    rates = [r["clips_per_s"] for r in rows if "clips_per_s" in r][1:]
    last = {k: v for r in rows for k, v in r.items()}
    keep = ("d_loss", "g_loss", "loss", "val_psnr", "val_psnr_gain", "val_psnr_input")
    return {"steps": result.steps, "seconds": round(result.seconds, 1),
            "clips_per_s": round(float(np.median(rates)), 1) if rates else None,
            **{k: last[k] for k in keep if k in last}}


def export_and_measure(demo: Demo) -> None:
    from vidgen.train.export import evaluate_model, export

    for name in ("gan", "restore"):
        export(demo.uri("runs", name), demo.uri("models", name))
    values = evaluate_model(demo.uri("models", "restore"), demo.uri("data", "shapes64"), split="val", batches=6)
    demo.summary["restore"].update({k: v for k, v in values.items() if k.startswith("val_")})
    demo.summary["gan"]["label_accuracy"] = gan_label_accuracy(demo)


class ShapeClassifier(torch.nn.Module):
    """A small frame classifier (circle / square / triangle), logits averaged over frames."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, classes),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, classes)
        b, c, t, h, w = video.shape
        logits = self.net(video.transpose(1, 2).reshape(b * t, c, h, w))
        return logits.view(b, t, -1).mean(1)


def gan_label_accuracy(demo: Demo, samples_per_class: int = 20) -> dict:
    """Train a classifier on the real clips; score the GAN's samples against the asked labels."""
    from vidgen import models
    from vidgen.data.format import open_dataset
    from vidgen.data.tensors import frames_to_video

    ds = open_dataset(demo.uri("data", "shapes32"))
    rows = list(ds.iter_clips())
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] != "train"] or train_rows[-32:]
    x = frames_to_video(np.stack([r["frames"] for r in train_rows]))
    y = torch.tensor([r["label"] for r in train_rows])
    torch.manual_seed(0)
    clf = ShapeClassifier()
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for step in range(150):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        xv = frames_to_video(np.stack([r["frames"] for r in val_rows]))
        real_acc = (clf(xv).argmax(1) == torch.tensor([r["label"] for r in val_rows])).float().mean().item()
        gan = models.load(demo.uri("models", "gan"))
        labels = [i % 3 for i in range(3 * samples_per_class)]
        samples = gan.sample(len(labels), num_frames=8, labels=labels, seed=123)
        acc = (clf(samples).argmax(1) == torch.tensor(labels)).float().mean().item()
    return {"samples": round(acc, 3), "real_val_clips": round(real_acc, 3), "chance": round(1 / 3, 3)}


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


def render(demo: Demo, spec: dict) -> dict:
    from vidgen.render import parse_batch, render_batch

    result = render_batch(parse_batch(spec, source="demo"))
    print(result.summary())
    ok = [r for r in result.records if r["status"] == "ok"]
    return {"items": len(result.records), "ok": len(ok), "failed": list(result.failed),
            "videos": sum(1 + len(r.get("renditions") or []) + bool(r.get("compare")) for r in ok),
            "seconds": round(result.seconds, 1),
            "gallery": storage.join(spec["output"], "index.html")}


# --------------------------------------------------------------------------------------------
# Gallery and summary


def write_gallery(demo: Demo) -> None:
    """OUT/index.html: the summary, the loss curves, and the two render galleries' posters."""
    s = demo.summary

    def rows(d: dict) -> str:
        return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in d.items())

    def posters(batch: str) -> str:
        records = []
        manifest = demo.uri("renders", batch, "manifest.jsonl")
        if storage.exists(manifest):
            records = [json.loads(line) for line in storage.read_text(manifest).splitlines() if line.strip()]
        cells = []
        for r in records:
            if r.get("status") != "ok":
                continue
            name = f"{r['id']}--compare" if r.get("compare") else r["id"]  # restore: input | output
            width = 512 if r.get("compare") else 256
            cells.append(f'<figure><video controls preload="none" poster="renders/{batch}/{html.escape(name)}.jpg" '
                         f'src="renders/{batch}/{html.escape(name)}.mp4" width="{width}"></video>'
                         f'<figcaption>{html.escape(r["id"])}</figcaption></figure>')
        return "".join(cells)

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vidgen demo</title>
<style>body{{font-family:sans-serif;margin:2em;background:#111;color:#eee}}a{{color:#8cf}}
table{{border-collapse:collapse}}th,td{{border:1px solid #444;padding:4px 8px;text-align:left}}
figure{{display:inline-block;margin:8px}}img.plot{{background:#fff;max-width:48%;margin:4px}}</style></head><body>
<h1>vidgen demo</h1><p>{html.escape(demo.out)} &mdash; {s.get('seconds', 0):.0f} s on this machine</p>
<h2>Ad batch (generated by the GAN)</h2><p><a href="renders/ads/index.html">full gallery</a></p>{posters("ads")}
<h2>Education batch (degraded input | restored)</h2><p><a href="renders/education/index.html">full gallery</a></p>{posters("education")}
<h2>Training</h2><img class="plot" src="runs/gan/loss.png" alt="GAN losses"><img class="plot" src="runs/restore/loss.png" alt="restore loss">
<p>Samples during training: <a href="runs/gan/samples/">runs/gan/samples</a>, <a href="runs/restore/samples/">runs/restore/samples</a></p>
<h2>Summary</h2><table>{rows({k: v for k, v in s.items() if k != 'stage_seconds'})}</table>
<h2>Stage times (s)</h2><table>{rows(s.get('stage_seconds', {}))}</table></body></html>"""
    storage.write_text(demo.uri("index.html"), page, "text/html; charset=utf-8")


def format_summary(demo: Demo) -> str:
    s = demo.summary
    gan, res = s.get("gan", {}), s.get("restore", {})
    acc = gan.get("label_accuracy", {})
    lines = [
        "vidgen demo summary",
        f"  {'stage':52s} {'seconds':>8s}",
        *(f"  {name[:52]:52s} {sec:8.0f}" for name, sec in demo.stage_seconds.items()),
        f"  {'total':52s} {s.get('seconds', 0):8.0f}",
        "",
        f"  GAN (small, ZeRO-2, 2 workers): {gan.get('steps')} steps, {gan.get('clips_per_s')} clips/s, "
        f"d_loss {gan.get('d_loss')}, g_loss {gan.get('g_loss')}",
        f"    label accuracy of its samples by a classifier trained on real clips: {acc.get('samples')} "
        f"(chance {acc.get('chance')}; the classifier scores {acc.get('real_val_clips')} on real clips)",
        f"  restore (ZeRO-2, 2 workers): {res.get('steps')} steps, {res.get('clips_per_s')} clips/s, loss {res.get('loss')}",
        f"    PSNR {res.get('val_psnr')} dB vs degraded input {res.get('val_psnr_input')} dB: gain {res.get('val_psnr_gain')} dB",
        f"  rendered: ads {s.get('ads', {}).get('ok')}/{s.get('ads', {}).get('items')} items "
        f"({s.get('ads', {}).get('videos')} videos), education {s.get('education', {}).get('ok')}/"
        f"{s.get('education', {}).get('items')} items ({s.get('education', {}).get('videos')} videos)",
        "",
        f"  data      {demo.uri('data')}",
        f"  runs      {demo.uri('runs')}  (checkpoints, metrics.jsonl, samples/, loss.png)",
        f"  models    {demo.uri('models')}",
        f"  renders   {demo.uri('renders')}  (ads/, education/: videos, posters, manifest.jsonl, index.html)",
        f"  summary   {demo.uri('summary.json')}",
        f"  open      {demo.uri('index.html')}",
    ]
    return "\n".join(lines)
