"""Fault drills on a multi-node cluster: what a node's death costs a render, a training run and a job.

    python bench/drills.py                    # all three, each once undisturbed and once with a node killed

The cluster is tests/conftest.MultiNode (a head with no CPU, a 2-CPU node and a 2-CPU node with a
logical GPU, all on 127.0.0.1) and moto's S3 on loopback; vidgen runs as separate processes joined
to it. Per drill it prints what was killed and when, what survived, and the seconds lost: the
disturbed run's wall time less the undisturbed one's (the replacement node joins 2 s after the kill,
as an autoscaler's would at best).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1 (read when ray is imported)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the multi-node cluster of the tests

from conftest import MultiNode  # noqa: E402
from harness import start_s3  # noqa: E402

from vidgen import models, storage  # noqa: E402
from vidgen.data import synth  # noqa: E402
from vidgen.train.trainer import read_metrics  # noqa: E402

LABELS = ["circle", "square", "triangle"]


def _run(command, env, until=None, then=None, timeout=400) -> tuple[float, str, float | None]:
    """Wall seconds of `command`; when `until()` becomes true, `then()` runs (the kill); its time."""
    start = time.monotonic()
    proc = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at = None
    try:
        while until is not None and proc.poll() is None and not until():
            time.sleep(0.1)
        if until is not None and proc.poll() is None:
            killed_at = time.monotonic() - start
            then()
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} exited {proc.returncode}:\n{output[-3000:]}")
    return time.monotonic() - start, output, killed_at


def render_drill(cluster: MultiNode, root: str, tmp: str) -> dict:
    model = f"{root}/models/g"
    models.save(models.build("gan", "tiny", num_classes=3, label_names=LABELS), model)
    times = {}
    for kind in ("undisturbed", "gpu node killed"):
        out = f"{root}/render-{uuid.uuid4().hex[:6]}"
        spec = {"name": "drill", "output": out, "model": model,
                "defaults": {"fps": 8, "seconds": 2, "size": [480, 480], "preset": "ultrafast", "crf": 0},
                "items": [{"id": f"gen-{i:02d}", "mode": "generate", "seed": i} for i in range(12)]}
        path = os.path.join(tmp, f"{uuid.uuid4().hex[:6]}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        kill = kind != "undisturbed"
        seconds, _, killed_at = _run([sys.executable, "-m", "vidgen.cli", "render", path, "--workers", "4"],
                                     cluster.env, until=(lambda o=out: storage.list_prefix(f"{o}/items")) if kill else None,
                                     then=lambda: cluster.replace("gpu"))
        ok = sum(storage.read_json(u)["status"] == "ok" for u in storage.list_prefix(f"{out}/items"))
        times[kind] = {"seconds": seconds, "killed_at_s": killed_at, "ok": ok}
    return {"drill": "render, 12 items over 2 nodes; the model worker's (GPU) node killed at the first record",
            **times, "lost_s": times["gpu node killed"]["seconds"] - times["undisturbed"]["seconds"]}


def train_drill(cluster: MultiNode, tmp: str) -> dict:
    data = os.path.join(tmp, "shapes")
    synth.synthesize("shapes", 40, 8, 32, data, seed=0, val_fraction=0.2, progress=False)
    times = {}
    for kind in ("undisturbed", "a worker's node killed"):
        run = os.path.join(tmp, f"run-{uuid.uuid4().hex[:6]}")
        command = [sys.executable, "-m", "vidgen.cli", "train", "--family", "gan", "--preset", "tiny", "--data", data,
                   "--run", run, "--workers", "2", "--threads-per-worker", "2", "--zero-stage", "2",
                   "--micro-batch", "4", "--max-steps", "16", "--checkpoint-every", "4", "--max-failures", "2",
                   "--val-split", ""]
        kill = kind != "undisturbed"
        steps_at_kill = []
        seconds, output, killed_at = _run(
            command, cluster.env, until=(lambda r=run: len(read_metrics(r)) >= 6) if kill else None,
            then=lambda r=run: (steps_at_kill.append(len(read_metrics(r))), cluster.replace("cpu")))
        resumed = [line.rsplit(" ", 1)[1] for line in output.splitlines() if "resuming from the checkpoint at step" in line]
        times[kind] = {"seconds": seconds, "killed_at_s": killed_at, "steps_at_kill": steps_at_kill,
                       "resumed_from_step": resumed, "steps_logged": [r["step"] for r in read_metrics(run)]}
    return {"drill": "train gan/tiny, 2 workers on 2 nodes, ZeRO-2, 16 steps, checkpoint every 4; a node killed after step 6",
            **times, "lost_s": times["a worker's node killed"]["seconds"] - times["undisturbed"]["seconds"]}


def endpoint_drill(cluster: MultiNode, root: str, tmp: str) -> dict:
    import requests

    from conftest import free_port

    models.save(models.build("gan", "tiny", num_classes=3, label_names=LABELS), f"{root}/models/e")
    port = free_port()
    config = {"http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "vidgen", "route_prefix": "/", "import_path": "vidgen.serving:app_builder",
                                "args": {"models": {"g": f"{root}/models/e"}, "output_root": f"{root}/renders",
                                         "runner": {"num_replicas": 2, "max_replicas_per_node": 1, "heartbeat_s": 0.5,
                                                    "stale_s": 3, "poll_s": 0.5, "max_items_in_flight": 2,
                                                    "encode_cpus": 0.4}}}]}
    path = os.path.join(tmp, "serve.json")
    with open(path, "w") as f:
        json.dump(config, f)
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "vidgen.cli", "serve", path], env=cluster.env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the endpoint did not start")
            time.sleep(0.5)
        for kind in ("undisturbed", "the job's runner's node killed"):
            job = {"name": "drill", "model": "g", "defaults": {"fps": 8, "seconds": 2, "size": [64, 64],
                                                             "preset": "ultrafast"},
                   "items": [{"id": f"ad-{i:02d}", "mode": "generate", "seed": i} for i in range(8)]}
            start = time.monotonic()
            job_id = requests.post(f"{url}/v1/renders", json=job, timeout=30).json()["id"]
            killed_at = None
            while True:
                status = requests.get(f"{url}/v1/renders/{job_id}", timeout=10).json()
                if status["status"] in ("done", "failed"):
                    break
                if kind != "undisturbed" and killed_at is None and storage.list_prefix(f"{root}/renders/{job_id}/items"):
                    holder = storage.read_json(f"{root}/renders/_jobs/{job_id}/lease.json")["node"]
                    killed_at = time.monotonic() - start
                    cluster.replace(next(n for n, node in cluster.nodes.items() if node.node_id == holder))
                time.sleep(0.2)
            times[kind] = {"seconds": time.monotonic() - start, "killed_at_s": killed_at, "status": status["status"],
                           "ok": status["counts"].get("ok"), "attempt": status.get("attempt")}
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"drill": "endpoint job of 8 items, 2 runners on 2 nodes (stale_s 3); the node of the job's runner killed "
                     "at its first record", **times,
            "lost_s": times["the job's runner's node killed"]["seconds"] - times["undisturbed"]["seconds"]}


def main() -> None:
    root = start_s3()
    out_json = os.path.join(HERE, "results", "drills.json")
    results = []
    cluster = MultiNode()
    try:
        with tempfile.TemporaryDirectory(prefix="vidgen-drills-") as tmp:
            for drill in (lambda: render_drill(cluster, root, tmp), lambda: train_drill(cluster, tmp),
                          lambda: endpoint_drill(cluster, root, tmp)):
                result = drill()
                results.append(result)
                print(json.dumps(result, indent=1, default=float), flush=True)
    finally:
        cluster.cluster.shutdown()
    with open(out_json, "w") as f:
        json.dump(results, f, indent=2, default=float)
    for r in results:
        print(f"{r['drill']}: {r['lost_s']:+.1f} s")


if __name__ == "__main__":
    main()
