"""End-to-end render throughput: the Ray batch pipeline against a naive sequential loop, same run.

    python bench/render.py                                   # 48 generate items, tiny GAN -> 128x128, 2 s at 24 fps
    python bench/render.py --items 48 --preset small --repeat 3

Everything goes into moto's S3 server on loopback, started here. Five figures, in videos/s:
  naive        load the model once; for each item: sample, encode (same scale, title and codec
               settings), upload the mp4 and its poster, one after the other
  ours         `vidgen.render.render_batch` on a local Ray with --cpus CPUs, with its default count of
               encodes in flight (two per CPU; --workers to set it): model worker + encode / upload
               tasks, plus records, manifest.jsonl and index.html (Ray's start is not counted);
               its model worker is the one the batch before kept warm (as for a process that renders
               batch after batch: a service, a notebook; checked, and VIDGEN_RENDER_KEEP_WARM_S is
               3600 here so that no gap between two batches ends it)
  cold         the same with no worker kept: a one-shot `vidgen render` (the worker's start counts);
               it runs just before `ours` and leaves it the worker
  Ray Data     the same `render_batch` with its Ray stage run by Ray Data's streaming executor instead
               (an actor pool of one model worker, map_batches of 8 items, then a map of encodes):
               the design issue 14 asks to compare
  encode-only  ffmpeg alone on the same frames (pre-generated), the same filter graph and codec
               settings, --cpus processes at a time, output to local files: the ceiling
They take turns, --repeat rounds (each "ours" into a fresh prefix, so nothing is skipped), once
with the outputs going to moto's S3 and once to a local folder; the ratios are the medians of each
round's ratios, so load from other processes that drifts over the run hits both sides alike.

Where the cores go (issue 14, item 2): each part of the work is run once more in this process, one
item after another, and its CPU-seconds are counted (this process, which also runs moto's S3 server,
plus its ffmpeg children): infer, encode (with the threads `ours` gives each encode), poster, upload
(video and poster, with the S3 server's own CPU), record; for each output (S3, a local folder) into
that output, as the rounds write there. The physical limit on N cores is the sum divided by N; the machine's CPU-seconds during `ours` (/proc/stat) less that sum is what Ray itself
costs: the model worker's start, scheduling, object transfers, its daemons.
Targets on 2 cores: ours/naive >= 1.5 and ours/limit >= 0.8.

Steady state (--steady-items, default 240; 0 skips it): naive and ours once more on a batch that
many items long, into S3. The marginal rate between the two sizes, (240 - 48) items over the
difference of their times, is what each path does per item once its fixed costs (the model
worker's start, the index at the end) are paid: a large batch's throughput. Both figures are
printed; the targets above are judged on the --items batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from harness import start_s3

from vidgen import media, models, storage
from vidgen.capacity import cpu_seconds
from vidgen.data.tensors import video_to_frames
from vidgen.runtime import KEEP_WARM_ENV

TITLE = "Spring sale -20%"
LABELS = ["circle", "square", "triangle"]


def spec(args, model_uri: str, out: str) -> dict:
    items = [{"id": f"ad-{i:03d}", "mode": "generate", "seed": i, "label": LABELS[i % 3]} for i in range(args.items)]
    if args.title:
        for item in items:
            item["title"] = TITLE
    return {"name": "bench", "output": out, "model": model_uri, "items": items,
            "defaults": {"fps": args.fps, "seconds": args.seconds, "size": [args.size, args.size],
                         "crf": args.crf, "preset": args.x264_preset}}


def naive(args, model_uri: str, out: str) -> None:
    """The loop a person writes first: one item after another, each stage waiting for the last."""
    model = models.load(model_uri)
    frames = round(args.fps * args.seconds)
    overlays = media.Overlays(title=TITLE) if args.title else None
    for i in range(args.items):
        video = video_to_frames(model.sample(1, frames, labels=[LABELS[i % 3]], seed=i)[0])
        data = media.encode(video, args.fps, crf=args.crf, preset=args.x264_preset, overlays=overlays,
                            size=(args.size, args.size))
        storage.write_bytes(storage.join(out, f"ad-{i:03d}.mp4"), data)
        storage.write_bytes(storage.join(out, f"ad-{i:03d}.jpg"), media.poster_jpeg(data))


def ours(args, model_uri: str, out: str, kept: bool = True) -> None:
    """`render_batch`; `kept`: on the model worker the batch before kept (checked)."""
    from vidgen.render import batch, parse_batch, render_batch

    taken = batch.WARM.taken
    result = render_batch(parse_batch(spec(args, model_uri, out)), workers=args.workers, progress=False)
    assert result.ok and len(result.rendered) == args.items, result.summary()
    assert (batch.WARM.taken > taken) == kept, f"kept worker {'not ' if kept else ''}used"


def ours_cold(args, model_uri: str, out: str) -> None:
    """`ours` with no model worker kept warm by an earlier batch: what a one-shot `vidgen render`
    pays (a model worker's start comes before any frame); ending the kept one is not timed."""
    ours(args, model_uri, out, kept=False)


def end_kept_workers() -> None:
    from vidgen.render import batch

    batch.WARM.end_all_but()


def ours_ray_data(args, model_uri: str, out: str) -> None:
    """`render_batch` with its Ray stage swapped for Ray Data's streaming executor (issue 14, item 3):
    the same plan, records, manifest and index, and the same engine stages (model load, infer,
    encode and upload), run as an actor pool for the model and a map for the encodes."""
    from unittest import mock

    from vidgen.render import batch, parse_batch, render_batch

    with mock.patch.object(batch, "_render_on_ray", render_on_ray_data):
        result = render_batch(parse_batch(spec(args, model_uri, out)), workers=args.workers, progress=False)
    assert result.ok and len(result.rendered) == args.items, result.summary()


def render_on_ray_data(todo, out, workers, address, chunk_frames, max_batch, finish, stop=None, grace=0.0):
    """The Ray stage of a batch as a Ray Data pipeline: from_items -> map_batches(an actor pool of
    one model worker, `max_batch` items a call) -> map(encode, `workers` at a time) -> records."""
    import numpy as np
    import ray

    from vidgen.render import batch, engine
    from vidgen.render.record import RenderRecord

    entries = {e.item.id: e for e in todo}
    uri, sha256 = todo[0].item.model, todo[0].model.sha256
    assert all(e.item.model == uri for e in todo), "the bench's contender handles one model"

    class Infer:
        def __init__(self):
            self.model = batch._load_planned(uri, sha256)

        def __call__(self, rows: dict) -> dict:
            items = [entries[i].item for i in rows["id"]]
            frames: dict[int, list] = {}
            meta: dict[int, dict] = {}
            for event in engine.infer(self.model, items, chunk_frames):
                if isinstance(event, engine.Chunk):
                    frames.setdefault(event.index, []).append(event.frames)
                elif isinstance(event, engine.Done):
                    meta[event.index] = event.meta
                else:
                    raise RuntimeError(event.error)
            return {"id": rows["id"], "meta": np.array([json.dumps(meta[i]) for i in range(len(items))]),
                    "frames": np.stack([np.concatenate(frames[i]) for i in range(len(items))])}

    def encode(row: dict) -> dict:
        entry = entries[row["id"]]
        record = engine.encode_item(entry.item, out, json.loads(row["meta"]), [("video", row["frames"])],
                                    entry.model, entry.spec_hash, entry.previous, entry.resume,
                                    max(1, int(ray.cluster_resources().get("CPU", 1)) // workers))
        return {"id": row["id"], "record": json.dumps(record.to_json())}  # a RenderRecord, as a row's column

    workers = workers or batch.default_workers(ray.cluster_resources().get("CPU", 1))  # as `ours` resolves it
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = (ray.data.from_items([{"id": i} for i in entries], override_num_blocks=max(1, len(entries) // max_batch))
          .map_batches(Infer, batch_size=max_batch, compute=ray.data.ActorPoolStrategy(size=1),
                       num_cpus=batch.ACTOR_CPUS)
          .map(encode, num_cpus=batch.ENCODE_CPUS, compute=ray.data.TaskPoolStrategy(size=workers)))
    for row in ds.iter_rows():
        finish(entries[row["id"]], RenderRecord.parse(json.loads(row["record"])), "rendered")


def encode_only(args, videos: list, tmp: str, threads: int | None) -> float:
    """Seconds for ffmpeg alone to encode every video, --cpus processes at a time."""
    native = videos[0].shape[2]
    title = os.path.join(tmp, "title.txt")
    with open(title, "w") as f:
        f.write(TITLE)
    size = max(12, args.size // 12)
    graph = f"scale={args.size}:{args.size}:flags=lanczos,setsar=1"
    if args.title:
        graph += (f",drawtext=textfile={title}:fontfile={media.font_path()}:expansion=none:fontsize={size}:"
                  f"fontcolor=white:x=(w-text_w)/2:y={max(2, args.size // 25)}:box=1:boxcolor=black@0.55:"
                  f"boxborderw={max(2, size // 4)}")
    graph += ",scale=out_color_matrix=bt709:out_range=tv,format=yuv420p"
    threading = ["-threads", str(threads)] if threads else []

    def encode(i: int) -> None:
        cmd = [media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{native}x{native}", "-framerate", str(args.fps),
               "-i", "pipe:", "-vf", graph, "-c:v", "libx264", "-preset", args.x264_preset, "-crf", str(args.crf),
               *threading, "-movflags", "+faststart", os.path.join(tmp, f"{i}.mp4")]
        subprocess.run(cmd, input=videos[i].tobytes(), check=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.cpus) as pool:
        list(pool.map(encode, range(len(videos))))
    return time.perf_counter() - start


def machine_cpu() -> float:
    """CPU-seconds the whole machine has spent (every process), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def cost_breakdown(args, model, root: str, threads: int) -> dict[str, float]:
    """CPU-seconds of each part of the batch's work, run here one item after another."""
    from vidgen.render import engine

    frames = round(args.fps * args.seconds)
    overlays = media.Overlays(title=TITLE) if args.title else None
    out = storage.join(root, f"parts-{uuid.uuid4().hex[:8]}")
    parts = dict.fromkeys(("infer", "encode", "poster", "upload", "record"), 0.0)

    def part(name, fn):
        start = cpu_seconds()
        result = fn()
        parts[name] += cpu_seconds() - start
        return result

    with tempfile.TemporaryDirectory(prefix="vidgen-bench-") as tmp:
        for i in range(args.items):
            video = part("infer", lambda i=i: video_to_frames(model.sample(1, frames, labels=[LABELS[i % 3]], seed=i)[0]))
            path = os.path.join(tmp, f"{i}.mp4")
            part("encode", lambda: media.encode_to(path, video, args.fps, "h264", args.crf, args.x264_preset, None,
                                                   overlays, size=(args.size, args.size), threads=threads))
            poster = part("poster", lambda: media.poster_jpeg(path))
            part("upload", lambda i=i: (storage.upload_file(path, storage.join(out, f"ad-{i:03d}.mp4"), "video/mp4"),
                                        storage.write_bytes(storage.join(out, f"ad-{i:03d}.jpg"), poster, "image/jpeg")))
            record = {"id": f"ad-{i:03d}", "status": "ok", "uri": storage.join(out, f"ad-{i:03d}.mp4"),
                      "spec_hash": uuid.uuid4().hex, "rendered_at": "2026-11-29T00:00:00+00:00"}
            part("record", lambda r=record: storage.write_bytes(engine.record_uri(out, r["id"]),
                                                                json.dumps(r).encode(), "application/json"))
    return parts


def model_worker_start(model_uri: str) -> float:
    """Seconds for a fresh model worker actor to come up (a new process: torch, vidgen, the model)."""
    import ray

    from vidgen.render.batch import ACTOR_CPUS, _remote
    from vidgen.storage import read_bytes

    sha = json.loads(read_bytes(storage.join(model_uri, "model.json")))["weights_sha256"]
    start = time.perf_counter()
    actor = _remote()[0].options(num_cpus=ACTOR_CPUS).remote(model_uri, sha)
    ray.get(actor.__ray_ready__.remote())
    seconds = time.perf_counter() - start
    ray.kill(actor)
    return seconds


def run_rounds(args, model_uri: str, root: str, videos: list, threads: int) -> dict:
    """--repeat rounds of naive / ours / encode-only into `root`; figures of that output."""
    times: dict[str, list[float]] = {"naive": [], "ours": [], "ours_cold": [], "ray_data": [], "encode_only": []}
    machine = []
    print(f"{'round':>5} {'naive s':>8} {'ours s':>8} {'cold s':>7} {'ray-data s':>10} {'encode-only s':>14} "
          f"{'ours/naive':>11} {'cold/naive':>11} {'ours/enc':>9} {'load':>5}")
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-") as tmp:
        encode_only(args, videos[:2], tmp, threads)  # warm-up
        for run in range(args.repeat):
            for name, fn in (("naive", naive), ("ours_cold", ours_cold), ("ours", ours), ("ray_data", ours_ray_data)):
                if name in ("ours_cold", "ray_data"):  # Ray Data starts its own worker: the cores are all its
                    end_kept_workers()
                start, cpu = time.perf_counter(), machine_cpu()
                fn(args, model_uri, storage.join(root, f"{name}-{uuid.uuid4().hex[:8]}"))
                times[name].append(time.perf_counter() - start)
                if name == "ours":
                    machine.append(machine_cpu() - cpu)
            times["encode_only"].append(encode_only(args, videos, tmp, threads))
            t = {k: v[-1] for k, v in times.items()}
            print(f"{run + 1:>5} {t['naive']:>8.2f} {t['ours']:>8.2f} {t['ours_cold']:>7.2f} {t['ray_data']:>10.2f} "
                  f"{t['encode_only']:>14.2f} {t['naive'] / t['ours']:>11.2f} {t['naive'] / t['ours_cold']:>11.2f} "
                  f"{t['encode_only'] / t['ours']:>9.2f} {os.getloadavg()[0]:>5.1f}")
    return {"seconds": times, "ours_machine_cpu_s": statistics.median(machine),
            "videos_per_s": {k: args.items / statistics.median(v) for k, v in times.items()},
            "ours_vs_naive": statistics.median(n / o for n, o in zip(times["naive"], times["ours"], strict=True)),
            "cold_vs_naive": statistics.median(
                n / o for n, o in zip(times["naive"], times["ours_cold"], strict=True)),
            "ray_data_vs_naive": statistics.median(
                n / o for n, o in zip(times["naive"], times["ray_data"], strict=True)),
            "ours_vs_encode_only": statistics.median(
                e / o for e, o in zip(times["encode_only"], times["ours"], strict=True))}


def steady_state(args, model_uri: str, root: str, short: dict, limit_rate: float) -> dict:
    """naive and ours on a --steady-items batch (S3), --repeat rounds; their marginal rates against
    the --items batch of `short`: what each does per item once its fixed costs are paid."""
    long_args = argparse.Namespace(**{**vars(args), "items": args.steady_items})
    times: dict[str, list[float]] = {"naive": [], "ours": []}
    print(f"\nsteady state: {args.steady_items} items into S3 ({args.repeat} rounds)")
    ours(argparse.Namespace(**{**vars(args), "items": 2}), model_uri, storage.join(root, "steady-warmup"),
         kept=False)  # a worker to keep, as the --items batches had
    for _ in range(args.repeat):
        for name, fn in (("naive", naive), ("ours", ours)):
            start = time.perf_counter()
            fn(long_args, model_uri, storage.join(root, f"steady-{name}-{uuid.uuid4().hex[:8]}"))
            times[name].append(time.perf_counter() - start)
        print(f"  naive {times['naive'][-1]:.2f} s, ours {times['ours'][-1]:.2f} s", flush=True)
    extra = args.steady_items - args.items
    rate = {k: extra / (statistics.median(times[k]) - statistics.median(short["seconds"][k])) for k in times}
    figures = {"seconds": times, "videos_per_s": rate, "ours_vs_naive": rate["ours"] / rate["naive"],
               "ours_vs_limit": rate["ours"] / limit_rate,
               "whole_batch_ours_vs_naive": statistics.median(times["naive"]) / statistics.median(times["ours"])}
    print(f"per item past fixed costs ({args.items} -> {args.steady_items} items): naive {rate['naive']:.2f}, ours "
          f"{rate['ours']:.2f} videos/s: ours/naive {figures['ours_vs_naive']:.2f} (target >= 1.5), ours/limit "
          f"{figures['ours_vs_limit']:.2f} (target >= 0.8); the whole {args.steady_items}-item batch: ours/naive "
          f"{figures['whole_batch_ours_vs_naive']:.2f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--preset", default="tiny", help="GAN preset: tiny (32x32 native) or small (64x64)")
    parser.add_argument("--size", type=int, default=128, help="output side (square)")
    parser.add_argument("--fps", type=float, default=24)
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--crf", type=int, default=23)
    parser.add_argument("--x264-preset", default="medium")
    parser.add_argument("--no-title", dest="title", action="store_false", help="no title overlay")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs, parallel ffmpeg (encode-only)")
    parser.add_argument("--workers", type=int, default=None,
                        help="render_batch's encodes in flight (default: its own, two per Ray CPU)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steady-items", type=int, default=240,
                        help="a second, longer batch (S3 only) for the per-item rate past fixed costs; 0: skip")
    parser.add_argument("--out-json", help="also write the figures to this JSON file (bench/run_all.py)")
    args = parser.parse_args()

    import torch

    from vidgen.runtime import init_ray

    root = start_s3()
    # A kept worker (and a local Ray's idle processes) outlast any gap between two `ours` batches here
    os.environ.setdefault(KEEP_WARM_ENV, "3600")
    torch.manual_seed(0)
    model_uri = storage.join(root, "models", f"gan-{args.preset}")
    model = models.build("gan", args.preset, num_classes=3, label_names=LABELS)
    models.save(model, model_uri)
    frames = round(args.fps * args.seconds)
    native = model.config.frame_size
    from vidgen.render.batch import default_workers

    threads = max(1, args.cpus // (args.workers or default_workers(args.cpus)))  # what `ours` gives an encode
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"ffmpeg {media.ffmpeg_binary()}")
    print(f"batch: {args.items} generate items, GAN {args.preset} ({native}x{native} native) -> "
          f"{args.size}x{args.size}, {frames} frames ({args.seconds:g} s at {args.fps:g} fps), h264 "
          f"{args.x264_preset} crf {args.crf}, {'title overlay' if args.title else 'no overlay'}")

    start = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    print(f"ray.init ({args.cpus} CPUs): {time.perf_counter() - start:.1f} s (not counted)")
    ours(args, model_uri, storage.join(root, "warmup"), kept=False)  # first run pays Ray's worker start-up
    ours_ray_data(args, model_uri, storage.join(root, "warmup-ray-data"))
    start_s = statistics.median(model_worker_start(model_uri) for _ in range(2))
    videos = [video_to_frames(model.sample(1, frames, labels=[LABELS[i % 3]], seed=i)[0]) for i in range(args.items)]

    print(f"\nfixed: a model worker's start (new process, torch, model) {start_s:.2f} s")

    figures, parts, limits = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-out-") as local:
        for where, out_root in (("s3", root), ("local", local)):
            print(f"\noutput to {'moto S3 on 127.0.0.1' if where == 's3' else 'a local folder'}:")
            parts[where] = costs = cost_breakdown(args, model, out_root, threads)
            work = sum(costs.values())
            limits[where] = limit_rate = args.items / (work / args.cpus)
            print(f"where the cores go: CPU-seconds of the work, {args.items} items, one after another here"
                  + (" (upload and record include moto's own CPU)" if where == "s3" else ""))
            for name, cpu in costs.items():
                print(f"  {name:<7} {cpu:6.2f} s  {cpu / args.items * 1000:6.1f} ms/item  {cpu / work:5.1%}")
            print(f"  {'total':<7} {work:6.2f} s  -> limit on {args.cpus} cores: {limit_rate:.1f} videos/s")
            figures[where] = f = run_rounds(args, model_uri, out_root, videos, threads)
            rate = f["videos_per_s"]
            ray_cpu = f["ours_machine_cpu_s"] - work
            print(f"videos/s (medians): naive {rate['naive']:.2f}, ours {rate['ours']:.2f}, Ray Data "
                  f"{rate['ray_data']:.2f}, encode-only {rate['encode_only']:.2f}; limit {limit_rate:.2f}")
            print(f"Ray Data/naive {f['ray_data_vs_naive']:.2f}; ours/Ray Data {rate['ours'] / rate['ray_data']:.2f}; "
                  f"cold (no kept model worker: a one-shot `vidgen render`)/naive {f['cold_vs_naive']:.2f} "
                  f"({rate['ours_cold']:.2f} videos/s)")
            print(f"ours/naive {f['ours_vs_naive']:.2f} (target >= 1.5); ours/limit {rate['ours'] / limit_rate:.2f} "
                  f"(target >= 0.8); ours/encode-only {f['ours_vs_encode_only']:.2f}")
            print(f"machine CPU during ours: {f['ours_machine_cpu_s']:.1f} s, of which the work {work:.1f} s and "
                  f"Ray and the rest {ray_cpu:.1f} s ({ray_cpu / args.items * 1000:.0f} ms/item)")
    steady = steady_state(args, model_uri, root, figures["s3"], limits["s3"]) if args.steady_items > args.items else None
    if args.out_json:
        what = f"{args.items} generate items, {args.size}x{args.size}, {frames} frames, h264 {args.x264_preset}"
        rows = []
        for where, f in figures.items():
            rate = f["videos_per_s"]
            rows += [
                [f"render into {where}: Ray pipeline (model worker kept from the batch before) vs sequential loop, "
                 f"{what} (target >= 1.5x)",
                 f"{f['ours_vs_naive']:.2f}x ({rate['ours']:.1f} vs {rate['naive']:.1f} videos/s)"],
                [f"render into {where}: share of the physical limit, {limits[where]:.1f} videos/s on {args.cpus} "
                 f"cores (target >= 0.8)", f"{rate['ours'] / limits[where]:.2f}"],
            ]
            rows.append([f"render into {where}: cold, no model worker kept from an earlier batch (a one-shot "
                         f"`vidgen render`) vs sequential loop", f"{f['cold_vs_naive']:.2f}x ({rate['ours_cold']:.1f} "
                         f"videos/s)"])
            rows.append([f"render into {where}: Ray Data's streaming executor (same stages) vs sequential loop",
                         f"{f['ray_data_vs_naive']:.2f}x ({rate['ray_data']:.1f} videos/s)"])
        if steady:
            rows.append([f"render into s3, steady state ({args.items} -> {args.steady_items} items, the rate past "
                         f"fixed costs): Ray pipeline vs sequential loop",
                         f"{steady['ours_vs_naive']:.2f}x ({steady['videos_per_s']['ours']:.1f} vs "
                         f"{steady['videos_per_s']['naive']:.1f} videos/s); {steady['ours_vs_limit']:.2f} of the limit"])
        rows.append([f"render: fixed cost of a model worker's start", f"{start_s:.2f} s"])
        with open(args.out_json, "w") as fh:
            json.dump({"settings": vars(args) | {"frames": frames, "native": native, "threads": threads},
                       "cpu_seconds": {w: c | {"total": sum(c.values())} for w, c in parts.items()},
                       "limit_videos_per_s": limits,
                       "model_worker_start_s": start_s, "outputs": figures, "steady_state": steady,
                       "summary_rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
