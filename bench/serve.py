"""The render API under load, end to end, on 127.0.0.1: throughput, latency, batching, overload.

    python bench/serve.py                                   # 2 cores, a few minutes: tiny GAN, 1 s at 8 fps, 64x64
    python bench/serve.py --preset small --levels 1,4,16 --jobs-per-level 32

Everything runs here: moto's S3 server and a local Ray (--cpus) on loopback, the application of
serve/config.yaml (its settings, with a model `g` and an S3 output root). Four parts, one run:
  offline      the same items (--jobs-per-level of them) as one `vidgen render` batch on the same Ray,
               before Serve starts, on the model worker its warm-up batch kept (as the endpoint's
               model replica is up before the first job): the renders/s the endpoint's saturation is
               compared with (target: the best end-to-end level >= 0.8 of it)
  end to end   at each concurrency C, C clients each POST a job of one generate item and wait for it
               with long polls (GET ?wait_s=--wait-s, answered when the job ends) until done, then
               POST the next; figures: completed renders/s (done, not 202s) and p50/p99 submit-to-done
               latency. Each level stops after --jobs-per-level jobs or --level-seconds, whichever
               comes first. The best level is run again with clients polling every --poll-s instead.
  model stage  the model deployment alone (its handle, no encoding): --model-requests concurrent
               one-item requests against a ModelServer with max_batch_size=--batch and one with
               max_batch_size=1 (one replica each), alternating --repeat times; items/s, the median
               and the best run (the one least disturbed by other load on a shared machine).
               Target: batched / unbatched >= 3 at saturation.
  overload     bursts of B concurrent POSTs (B rising); per burst the count of 202 / 429 / 503 and
               where 503 (Serve's queue bound: ingress max_ongoing + max_queued) and 429 (the job
               queue bound, limits.max_queued_jobs) start. Accepted burst jobs are cancelled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import threading
import time
import uuid

import requests
from harness import free_port, start_s3

from vidgen import models, serving, storage

TOKEN = "bench-" + uuid.uuid4().hex
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def job_body(args, i: int) -> dict:
    return {"name": "bench", "model": "g",
            "defaults": {"fps": args.fps, "seconds": args.seconds, "size": [args.size, args.size],
                         "preset": args.x264_preset},
            "items": [{"id": f"ad-{i:05d}", "mode": "generate", "seed": i}]}


def offline(args, model_uri: str, root: str) -> float:
    """Renders/s of the offline path (`render_batch` on the same Ray) for the same items as one
    batch of --jobs-per-level: what the endpoint's saturation is compared with."""
    from vidgen.render import parse_batch, render_batch

    items = [job_body(args, i)["items"][0] for i in range(args.jobs_per_level)]
    spec = {**job_body(args, 0), "model": model_uri, "items": items}
    # workers: render_batch's default (two encodes in flight per Ray CPU), as `vidgen render` runs it
    render_batch(parse_batch({**spec, "output": storage.join(root, "offline-warmup")}), progress=False)
    start = time.perf_counter()
    result = render_batch(parse_batch({**spec, "output": storage.join(root, "offline")}), progress=False)
    seconds = time.perf_counter() - start
    assert result.ok, result.summary()
    return len(items) / seconds


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


# --------------------------------------------------------------------------------------------
# End to end


def end_to_end(args, url: str, concurrency: int) -> dict:
    """C clients, each: submit, poll until done, repeat; bounded by count and time."""
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + args.level_seconds
    issued, latencies, failures, statuses = [0], [], [], {}

    def client() -> None:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        while True:
            with lock:
                if issued[0] >= args.jobs_per_level or time.perf_counter() > deadline:
                    return
                issued[0] += 1
                n = issued[0] + concurrency * 100_000
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/renders", json=job_body(args, n), timeout=60)
            if r.status_code != 202:
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                time.sleep(0.5)
                continue
            job_id = r.json()["id"]
            while time.perf_counter() < deadline + 120:
                if args.wait_s:  # a long poll: the answer comes when the job ends (or wait_s passes)
                    asked = time.perf_counter()
                    job = http.get(f"{url}/v1/renders/{job_id}", params={"wait_s": args.wait_s},
                                   timeout=args.wait_s + 60).json()
                    if job["status"] not in serving.TERMINAL and time.perf_counter() - asked < args.wait_s / 2:
                        time.sleep(args.poll_s)  # answered at once (the replica's waiting places were taken)
                else:
                    time.sleep(args.poll_s)
                    job = http.get(f"{url}/v1/renders/{job_id}", timeout=60).json()
                if job["status"] in serving.TERMINAL:
                    with lock:
                        (latencies if job["status"] == "done" else failures).append(time.perf_counter() - t0)
                    break

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "done": len(latencies), "failed": len(failures), "wall_s": wall,
            "renders_per_s": len(latencies) / wall,
            "p50_s": percentile(latencies, 0.5) if latencies else None,
            "p99_s": percentile(latencies, 0.99) if latencies else None, "rejected": statuses}


# --------------------------------------------------------------------------------------------
# Model stage


def model_stage(args, model_uri: str) -> dict:
    """Items/s of the model deployment alone, batched against max_batch_size=1, alternating."""
    from ray import serve

    from vidgen.render import parse_batch
    from vidgen.render.engine import ModelInfo

    spec = {"name": "stage", "output": "s3://bench/unused", "model": model_uri,
            "defaults": {"fps": args.fps, "seconds": args.seconds, "size": [args.size, args.size]},
            "items": [{"id": f"m-{i}", "mode": "generate", "seed": i} for i in range(args.model_requests)]}
    items = parse_batch(spec).resolve()
    digest = ModelInfo.from_manifest(model_uri, models.read_manifest(model_uri)).sha256  # the weights planned with
    handles = {}
    for batch in (args.batch, 1):
        # The replica takes every request at once: one that finds it full waits in Serve's router, which
        # retries it about once a second (64 requests at max_ongoing_requests=16 took 0.6-8.7 s a run).
        settings = serving.ModelDeployment(max_batch_size=batch,
                                           max_ongoing_requests=max(args.model_requests, 2 * batch),
                                           num_gpus=args.num_gpus, autoscaling={"min_replicas": 1, "max_replicas": 1})
        app = serve.deployment(serving.ModelServer).options(
            name=f"model-b{batch}", ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": args.num_gpus},
            max_ongoing_requests=settings.max_ongoing_requests, num_replicas=1).bind("g", model_uri, settings)
        handles[batch] = serve.run(app, name=f"bench-b{batch}", route_prefix=None)

    def run(batch: int) -> float:
        start = time.perf_counter()
        responses = [handles[batch].infer.remote((item, digest)) for item in items]
        results = [r.result() for r in responses]
        assert all("meta" in r for r in results), [r for r in results if "meta" not in r][:1]
        del results  # frees the frames in the object store
        return time.perf_counter() - start

    for batch in handles:  # warm-up: first calls pay routing and torch start-up
        run(batch)
    times: dict[int, list[float]] = {b: [] for b in handles}
    for _ in range(args.repeat):
        for batch in handles:
            times[batch].append(run(batch))
    rates = {b: args.model_requests / statistics.median(t) for b, t in times.items()}
    best = {b: args.model_requests / min(t) for b, t in times.items()}  # least disturbed by other load
    stats = {b: handles[b].get_stats.remote().result() for b in handles}
    for batch in handles:
        serve.delete(f"bench-b{batch}")
    return {"items_per_s": rates, "best_items_per_s": best, "seconds": times, "ratio": rates[args.batch] / rates[1],
            "best_ratio": best[args.batch] / best[1],
            "mean_batch": {b: s["items"] / max(1, s["batches"]) for b, s in stats.items()},
            "compute_ms_per_item": {b: 1000 * s["busy_s"] / max(1, s["items"]) for b, s in stats.items()}}


# --------------------------------------------------------------------------------------------
# Overload


def overload(args, url: str) -> list[dict]:
    """Bursts of concurrent POSTs; what each got. Accepted jobs are cancelled afterwards."""
    rows = []
    for size in args.bursts:
        barrier = threading.Barrier(size)

        def post(i: int, size=size, barrier=barrier) -> tuple[int, str | None, float]:
            barrier.wait()  # all at once
            t0 = time.perf_counter()
            try:
                r = requests.post(f"{url}/v1/renders", json=job_body(args, 900_000 + i), timeout=60,
                                  headers={"Authorization": f"Bearer {TOKEN}"})
                return r.status_code, r.json().get("id") if r.status_code == 202 else None, time.perf_counter() - t0
            except requests.RequestException:
                return -1, None, time.perf_counter() - t0

        with concurrent.futures.ThreadPoolExecutor(size) as pool:
            answers = list(pool.map(post, range(size)))
        codes = [c for c, _, _ in answers]
        rejected = [t for c, _, t in answers if c in (429, 503)]
        rows.append({"burst": size, **{str(c): codes.count(c) for c in sorted(set(codes))},
                     "slowest_rejection_s": max(rejected) if rejected else None})
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        for _, job_id, _ in answers:
            if job_id:
                http.delete(f"{url}/v1/renders/{job_id}", timeout=60)
        drain = time.perf_counter() + 120
        while serving.JobStore(args.output_root).queued() and time.perf_counter() < drain:
            time.sleep(0.5)
    return rows


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="GAN preset: tiny (32x32 native) or small (64x64)")
    parser.add_argument("--size", type=int, default=64, help="output side (square)")
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--seconds", type=float, default=1)
    parser.add_argument("--x264-preset", default="ultrafast")
    parser.add_argument("--levels", default="1,2,4,8,16", help="client concurrencies, end to end")
    parser.add_argument("--jobs-per-level", type=int, default=24)
    parser.add_argument("--level-seconds", type=float, default=60)
    parser.add_argument("--wait-s", type=float, default=10,
                        help="clients wait for their job's end with GET ?wait_s= (a long poll); 0: they poll")
    parser.add_argument("--poll-s", type=float, default=0.5,
                        help="how often a polling client asks (--wait-s 0, and the polling row at the best level)")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched model stage")
    parser.add_argument("--model-requests", type=int, default=64, help="concurrent requests per model-stage run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bursts", default="16,32,64,96,128,192", help="overload burst sizes")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica (0: CPU)")
    parser.add_argument("--out-json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.bursts = [int(x) for x in args.bursts.split(",")]

    import torch
    from ray import serve

    from vidgen.runtime import init_ray

    root = start_s3(own_process=True)
    torch.manual_seed(0)
    model_uri = storage.join(root, "models", f"gan-{args.preset}")
    models.save(models.build("gan", args.preset), model_uri)
    config_args, _ = serving.read_config(os.path.join(REPO, "serve", "config.yaml"))
    config_args["model"] = {**config_args.get("model", {}), "num_gpus": args.num_gpus}
    settings = serving.load_settings({**config_args, "models": {"g": model_uri},
                                      "output_root": storage.join(root, "renders")})
    args.output_root = settings.output_root
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"item: generate, GAN {args.preset} -> {args.size}x{args.size}, {round(args.fps * args.seconds)} frames, "
          f"h264 {args.x264_preset}; settings of serve/config.yaml (model max_batch_size "
          f"{settings.model.max_batch_size}, runner max_jobs {settings.runner.max_jobs}, ingress "
          f"max_ongoing {settings.ingress.max_ongoing_requests} + max_queued {settings.ingress.max_queued_requests}, "
          f"max_queued_jobs {settings.limits.max_queued_jobs}); moto S3 + Ray ({args.cpus} CPUs) on 127.0.0.1")

    start = time.perf_counter()
    init_ray(num_cpus=args.cpus)  # GPUs: Ray finds them
    offline_rate = offline(args, model_uri, root)
    print(f"offline path (vidgen render, one batch of the same {args.jobs_per_level} items): "
          f"{offline_rate:.2f} renders/s")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build_app(settings, token=TOKEN), name=serving.APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print(f"ray.init + serve.run: {time.perf_counter() - start:.1f} s (not counted)")
    end_to_end(argparse.Namespace(**{**vars(args), "jobs_per_level": 4}), url, 2)  # warm-up: workers, routers

    how = f"clients wait with GET ?wait_s={args.wait_s:g}" if args.wait_s else f"clients poll every {args.poll_s:g} s"
    print(f"\nend to end (submit -> done, one item per job; {how})")
    print(f"{'clients':>8} {'done':>5} {'failed':>6} {'renders/s':>10} {'p50 s':>7} {'p99 s':>7}  rejected")
    levels = []
    for c in args.levels:
        row = end_to_end(args, url, c)
        levels.append(row)
        p50 = f"{row['p50_s']:.2f}" if row["p50_s"] is not None else "-"
        p99 = f"{row['p99_s']:.2f}" if row["p99_s"] is not None else "-"
        print(f"{c:>8} {row['done']:>5} {row['failed']:>6} {row['renders_per_s']:>10.2f} {p50:>7} {p99:>7}  "
              f"{row['rejected'] or '-'}", flush=True)

    saturation = max(levels, key=lambda r: r["renders_per_s"])
    print(f"saturation: {saturation['renders_per_s']:.2f} renders/s at {saturation['concurrency']} clients = "
          f"{saturation['renders_per_s'] / offline_rate:.2f} of the offline path (target >= 0.8)")
    polling = None
    if args.wait_s:  # the same level with clients that poll instead (every --poll-s): what long polls save
        polling = end_to_end(argparse.Namespace(**{**vars(args), "wait_s": 0}), url, saturation["concurrency"])
        print(f"the same {saturation['concurrency']} clients polling every {args.poll_s:g} s instead: "
              f"{polling['renders_per_s']:.2f} renders/s (p50 {polling['p50_s']:.2f} s, p99 {polling['p99_s']:.2f} s) "
              f"= {polling['renders_per_s'] / offline_rate:.2f} of the offline path")

    print(f"\nmodel stage ({args.model_requests} concurrent one-item requests, one replica, {args.repeat} runs "
          f"each, alternating)")
    stage = model_stage(args, model_uri)
    for b, rate in stage["items_per_s"].items():
        print(f"  max_batch_size={b:<3} median {rate:6.1f} items/s, best {stage['best_items_per_s'][b]:6.1f}  "
              f"(mean batch {stage['mean_batch'][b]:.1f}; in the batch handler {stage['compute_ms_per_item'][b]:.1f} "
              f"ms/item)")
    print(f"  batched / unbatched: {stage['ratio']:.2f}x median, {stage['best_ratio']:.2f}x best (target >= 3)")

    print("\noverload (bursts of concurrent POSTs; accepted jobs cancelled after each burst)")
    bursts = overload(args, url)
    for row in bursts:
        counts = ", ".join(f"{k}: {v}" for k, v in row.items() if k not in ("burst", "slowest_rejection_s"))
        slow = f"; slowest rejection {row['slowest_rejection_s']:.2f} s" if row["slowest_rejection_s"] else ""
        print(f"  burst {row['burst']:>4}: {counts}{slow}")
    first_503 = next((r["burst"] for r in bursts if r.get("503")), None)
    first_429 = next((r["burst"] for r in bursts if r.get("429")), None)
    print(f"  503s start at a burst of {first_503 or f'> {args.bursts[-1]}'}, 429s at "
          f"{first_429 or f'> {args.bursts[-1]}'} (ingress bound {settings.ingress.max_ongoing_requests} + "
          f"{settings.ingress.max_queued_requests} requests, job queue {settings.limits.max_queued_jobs})")
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    serve.shutdown()
    if args.out_json:
        best = max(levels, key=lambda r: r["renders_per_s"])
        with open(args.out_json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items()}, "end_to_end": levels,
                       "offline_renders_per_s": offline_rate, "polling_at_best_level": polling,
                       "model_stage": stage, "overload": bursts,
                       "summary_rows": [
                           [f"serve: model-stage throughput, max_batch_size={args.batch} vs 1 (target >= 3x)",
                            f"{stage['ratio']:.2f}x ({stage['items_per_s'][args.batch]:.1f} vs "
                            f"{stage['items_per_s'][1]:.1f} items/s)"],
                           ["serve: end to end, best level", f"{best['renders_per_s']:.2f} renders/s at "
                            f"{best['concurrency']} clients (p50 {best['p50_s']:.2f} s, p99 {best['p99_s']:.2f} s)"],
                           ["serve: saturation vs the offline path on the same items (target >= 0.8)",
                            f"{best['renders_per_s'] / offline_rate:.2f} ({best['renders_per_s']:.2f} vs "
                            f"{offline_rate:.2f} renders/s; {how})"],
                           *([[f"serve: the same level, clients polling every {args.poll_s:g} s instead",
                               f"{polling['renders_per_s'] / offline_rate:.2f} ({polling['renders_per_s']:.2f} "
                               f"renders/s, p50 {polling['p50_s']:.2f} s)"]] if polling else []),
                           ["serve: 503 onset (burst size)", str(first_503 or f"> {args.bursts[-1]}")],
                       ]}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
