"""End-to-end render throughput: the Ray batch pipeline against a naive sequential loop, same run.

    python bench/render.py                                   # 48 generate items, tiny GAN -> 128x128, 2 s at 24 fps
    python bench/render.py --items 48 --preset small --repeat 3

Everything goes into moto's S3 server on loopback, started here. Three figures, in videos/s:
  naive        load the model once; for each item: sample, encode (same scale, title and codec
               settings), upload the mp4 and its poster, one after the other
  ours         `vidgen.render.render_batch` on a local Ray with --cpus CPUs: model worker + encode /
               upload tasks, plus records, manifest.jsonl and index.html (Ray's start is not counted)
  encode-only  ffmpeg alone on the same frames (pre-generated), the same filter graph and codec
               settings, --cpus processes at a time, output to local files: the ceiling
The three take turns, --repeat rounds (each "ours" into a fresh prefix, so nothing is skipped); the
ratios are the medians of each round's ratios, so load from other processes that drifts over the
run hits both sides of a ratio alike. Targets: ours/naive >= 2 and ours/encode-only >= 0.8 on 2 cores.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vidgen import media, models, storage  # noqa: E402
from vidgen.data.tensors import video_to_frames  # noqa: E402

TITLE = "Spring sale -20%"
LABELS = ["circle", "square", "triangle"]


def start_s3() -> str:
    """moto's S3 server on a free loopback port, wired through the standard AWS variables."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
    storage.reset_clients()
    storage.s3_client().create_bucket(Bucket="bench")
    return "s3://bench"


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


def ours(args, model_uri: str, out: str) -> None:
    from vidgen.render import parse_batch, render_batch

    result = render_batch(parse_batch(spec(args, model_uri, out)), workers=args.cpus, progress=False)
    assert result.ok and len(result.rendered) == args.items, result.summary()


def encode_only(args, videos: list, tmp: str) -> float:
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

    def encode(i: int) -> None:
        cmd = [media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{native}x{native}", "-framerate", str(args.fps),
               "-i", "pipe:", "-vf", graph, "-c:v", "libx264", "-preset", args.x264_preset, "-crf", str(args.crf),
               "-movflags", "+faststart", os.path.join(tmp, f"{i}.mp4")]
        subprocess.run(cmd, input=videos[i].tobytes(), check=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.cpus) as pool:
        list(pool.map(encode, range(len(videos))))
    return time.perf_counter() - start


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
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs, encode workers, parallel ffmpeg")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out-json", help="also write the figures to this JSON file (bench/run_all.py)")
    args = parser.parse_args()

    import torch

    from vidgen.runtime import init_ray

    root = start_s3()
    torch.manual_seed(0)
    model_uri = storage.join(root, "models", f"gan-{args.preset}")
    model = models.build("gan", args.preset, num_classes=3, label_names=LABELS)
    models.save(model, model_uri)
    frames = round(args.fps * args.seconds)
    native = model.config.frame_size
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"ffmpeg {media.ffmpeg_binary()}")
    print(f"batch: {args.items} generate items, GAN {args.preset} ({native}x{native} native) -> "
          f"{args.size}x{args.size}, {frames} frames ({args.seconds:g} s at {args.fps:g} fps), h264 "
          f"{args.x264_preset} crf {args.crf}, {'title overlay' if args.title else 'no overlay'}; moto S3 on 127.0.0.1")

    start = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    print(f"ray.init ({args.cpus} CPUs): {time.perf_counter() - start:.1f} s (not counted)")
    ours(args, model_uri, storage.join(root, "warmup"))  # first run pays Ray's worker start-up
    videos = [video_to_frames(model.sample(1, frames, labels=[LABELS[i % 3]], seed=i)[0]) for i in range(args.items)]
    times: dict[str, list[float]] = {"naive": [], "ours": [], "encode_only": []}
    print(f"{'round':>5} {'naive s':>8} {'ours s':>8} {'encode-only s':>14} {'ours/naive':>11} {'ours/limit':>11} "
          f"{'load':>5}")
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-") as tmp:
        encode_only(args, videos[:2], tmp)  # warm-up
        for run in range(args.repeat):
            for name, fn in (("naive", naive), ("ours", ours)):
                start = time.perf_counter()
                fn(args, model_uri, storage.join(root, f"{name}-{uuid.uuid4().hex[:8]}"))
                times[name].append(time.perf_counter() - start)
            times["encode_only"].append(encode_only(args, videos, tmp))
            t = {k: v[-1] for k, v in times.items()}
            print(f"{run + 1:>5} {t['naive']:>8.2f} {t['ours']:>8.2f} {t['encode_only']:>14.2f} "
                  f"{t['naive'] / t['ours']:>11.2f} {t['encode_only'] / t['ours']:>11.2f} {os.getloadavg()[0]:>5.1f}")

    rate = {k: args.items / statistics.median(v) for k, v in times.items()}
    naive_rate, ours_rate, limit_rate = rate["naive"], rate["ours"], rate["encode_only"]
    vs_naive = statistics.median(n / o for n, o in zip(times["naive"], times["ours"], strict=True))
    vs_limit = statistics.median(e / o for e, o in zip(times["encode_only"], times["ours"], strict=True))
    print(f"videos/s (medians): naive {naive_rate:.2f}, ours {ours_rate:.2f}, encode-only {limit_rate:.2f} "
          f"(ffmpeg alone on the same frames, {args.cpus} at a time)")
    print(f"ours/naive {vs_naive:.2f} (target >= 2); ours/encode-only {vs_limit:.2f} (target >= 0.8)")
    if args.out_json:
        what = f"{args.items} generate items, {args.size}x{args.size}, {frames} frames, h264 {args.x264_preset}"
        with open(args.out_json, "w") as f:
            json.dump({
                "settings": vars(args) | {"frames": frames, "native": native},
                "videos_per_s": {"naive": naive_rate, "ours": ours_rate, "encode_only": limit_rate},
                "seconds": times,
                "ratios": {"ours_vs_naive": vs_naive, "ours_vs_encode_only": vs_limit},
                "summary_rows": [
                    [f"render: Ray pipeline vs sequential loop, {what} into S3 (target >= 2x)",
                     f"{vs_naive:.2f}x ({ours_rate:.1f} vs {naive_rate:.1f} videos/s)"],
                    [f"render: share of the encode-only limit, ffmpeg alone x{args.cpus} (target >= 0.8)",
                     f"{vs_limit:.2f} ({ours_rate:.1f} of {limit_rate:.1f} videos/s)"],
                ],
            }, f, indent=2)


if __name__ == "__main__":
    main()
