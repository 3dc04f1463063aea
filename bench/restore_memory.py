"""Restore at bounded memory: long 854x480 inputs streamed through restore (issue 14, item 4).

    python bench/restore_memory.py                   # 30 s, 60 s and 120 s inputs at 24 fps
    python bench/restore_memory.py --seconds 30 120

Each input (ffmpeg's testsrc2 with noise, 854x480 at 24 fps) is restored (a narrow restorer, see
MODEL_WIDTH: depth costs time, not stream memory) by `render_batch` on a
local Ray with 2 CPUs into a local folder: the model worker streams the item's frames to its
encode task while it makes them (a Ray streaming generator with backpressure), the encoder feeds
ffmpeg as they come. A sampler adds up, every 0.25 s, the proportional set size (PSS: shared pages
such as Ray's object store in /dev/shm are counted once, split among the processes that map them)
of every process of this run: this driver, Ray's daemons and workers, their ffmpeg children; and
reads the object store's use from Ray once a second. Printed per input: the peaks, the growth over
the idle footprint before the render, and what holding the restored video whole would take
(frames x 854 x 480 x 3 bytes: what the path before streaming kept in the object store).
Verdict: bounded when the peak for the longest input is within 25% (or 150 MiB) of the shortest's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import threading
import time


from vidgen import media, models

MIB = 1 << 20
# The restorer's `tiny` preset takes 1.4 s a 854x480 frame on 2 cores (120 s of video: 67 minutes).
# What this bench measures, the memory of the stream, depends on frame size and chunking, not on
# the network's depth: a narrow one (80 ms a frame) keeps the run to minutes.
MODEL_WIDTH, MODEL_BLOCKS = 8, 1
WIDTH, HEIGHT = 854, 480


class Sampler:
    """Peak PSS of this process and its descendants, and peak object store use, while running."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.pss, self.store = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_store = 0.0
        while not self._stop.wait(self.interval):
            self.pss = max(self.pss, tree_pss())
            if time.monotonic() - last_store >= 1.0:
                last_store = time.monotonic()
                self.store = max(self.store, object_store_bytes())


def tree_pss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def object_store_bytes() -> int:
    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(stats_only=True)
    except Exception:  # noqa: BLE001 - a sample missed, not the run
        return 0
    match = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", text)
    return int(float(match.group(1)) * MIB) if match else 0


def make_input(path: str, seconds: int, fps: int) -> None:
    subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", f"testsrc2=s={WIDTH}x{HEIGHT}:r={fps}", "-t", str(seconds),
                    "-vf", "noise=alls=12:allf=t", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18",
                    "-pix_fmt", "yuv420p", path], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, nargs="+", default=[30, 60, 120])
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--preset", default="veryfast", help="x264 preset of the restored video")
    parser.add_argument("--out-json", help="also write the figures to this JSON file (bench/run_all.py)")
    args = parser.parse_args()

    import torch

    from vidgen.render import parse_batch, render_batch
    from vidgen.runtime import init_ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="vidgen-restore-mem-") as tmp:
        torch.manual_seed(0)
        model_uri = os.path.join(tmp, "models", "restore")
        models.save(models.build("restore", "tiny", width=MODEL_WIDTH, num_blocks=MODEL_BLOCKS), model_uri)
        init_ray(num_cpus=2)
        time.sleep(2.0)  # Ray's daemons settle
        for seconds in args.seconds:
            source = os.path.join(tmp, f"lecture-{seconds}s.mp4")
            make_input(source, seconds, args.fps)
            out = os.path.join(tmp, f"out-{seconds}")
            spec = {"name": "restore-memory", "output": out, "model": model_uri,
                    "defaults": {"preset": args.preset, "crf": 23},
                    "items": [{"id": "lecture", "mode": "restore", "input": source}]}
            idle = tree_pss()
            started = time.perf_counter()
            with Sampler() as sampler:
                result = render_batch(parse_batch(spec), workers=2, progress=False)
            wall = time.perf_counter() - started
            assert result.ok, result.summary()
            frames = media.probe(os.path.join(out, "lecture.mp4")).frames
            whole = frames * WIDTH * HEIGHT * 3
            rows.append({"seconds": seconds, "frames": frames, "wall_s": round(wall, 1),
                         "frames_per_s": round(frames / wall, 1), "idle_pss_mib": round(idle / MIB),
                         "peak_pss_mib": round(sampler.pss / MIB), "growth_mib": round((sampler.pss - idle) / MIB),
                         "peak_object_store_mib": round(sampler.store / MIB), "video_whole_mib": round(whole / MIB)})
            r = rows[-1]
            print(f"{seconds:>4} s input ({frames} frames): {r['wall_s']} s, {r['frames_per_s']} frames/s; peak PSS "
                  f"{r['peak_pss_mib']} MiB (idle {r['idle_pss_mib']}, +{r['growth_mib']}); object store peak "
                  f"{r['peak_object_store_mib']} MiB; the restored video whole: {r['video_whole_mib']} MiB",
                  flush=True)
    short, long = rows[0], rows[-1]
    bounded = long["peak_pss_mib"] <= max(1.25 * short["peak_pss_mib"], short["peak_pss_mib"] + 150)
    print(f"\n{'input':>6} {'frames':>7} {'peak PSS MiB':>13} {'growth MiB':>11} {'object store MiB':>17} "
          f"{'video whole MiB':>16} {'frames/s':>9}")
    for r in rows:
        print(f"{r['seconds']:>5}s {r['frames']:>7} {r['peak_pss_mib']:>13} {r['growth_mib']:>11} "
              f"{r['peak_object_store_mib']:>17} {r['video_whole_mib']:>16} {r['frames_per_s']:>9}")
    verdict = (f"bounded: the {long['seconds']} s input peaks at {long['peak_pss_mib']} MiB against "
               f"{short['peak_pss_mib']} MiB for {short['seconds']} s" if bounded else
               f"GROWS with the input: {long['peak_pss_mib']} MiB for {long['seconds']} s against "
               f"{short['peak_pss_mib']} MiB for {short['seconds']} s")
    print(verdict)
    if args.out_json:
        with open(args.out_json, "w") as fh:
            json.dump({"settings": vars(args), "inputs": rows, "bounded": bounded, "summary_rows": [
                [f"restore memory: peak PSS of every process, {short['seconds']} s vs {long['seconds']} s "
                 f"854x480 input (must not grow)",
                 f"{short['peak_pss_mib']} vs {long['peak_pss_mib']} MiB ({'bounded' if bounded else 'GROWS'}); "
                 f"video whole {long['video_whole_mib']} MiB"]]}, fh, indent=2)


if __name__ == "__main__":
    main()
