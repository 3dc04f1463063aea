"""The schedules as KubeRay RayCronJobs: `vidgen schedule SCHEDULES --emit-kuberay DIR`.

    vidgen schedule jobs/schedules.yaml --emit-kuberay out/kuberay   # no cluster needed: files only
    kubectl apply -f out/kuberay/                                    # KubeRay >= 1.6, RayCronJob gate on

Each entry becomes a ConfigMap holding its batch spec and a RayCronJob whose RayJob brings up a
cluster (a head and a "cpu" and a "gpu" worker group), renders into the slot's dated output, and
goes away. The image, the service account and the pods' sizes come from the schedule file's
`kuberay:` section (`KubeRaySettings`, `PodSize`).
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from typing import Any

import yaml

from vidgen import __version__, storage
from vidgen.jobs.bundle import read_spec
from vidgen.jobs.schedule import KubeRaySettings, PodSize, ScheduleFile, batch_uri, load_schedules, slot_output

BATCH_MOUNT = "/etc/vidgen/batch"


def _pod(container: str, settings: KubeRaySettings, size: PodSize, mounts: list[dict] | None = None,
         volumes: list[dict] | None = None) -> dict:
    resources: dict[str, dict[str, str]] = {"requests": {"cpu": size.cpu, "memory": size.memory},
                                            "limits": {"cpu": size.cpu, "memory": size.memory}}
    if size.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(size.gpus)
    c: dict[str, Any] = {"name": container, "image": settings.image, "resources": resources}
    if mounts:
        c["volumeMounts"] = mounts
    spec: dict[str, Any] = {"serviceAccountName": settings.service_account, "containers": [c]}
    if volumes:
        spec["volumes"] = volumes
    return {"spec": spec}


def kuberay_manifests(schedule_uri: str, schedules: ScheduleFile | None = None) -> dict[str, list[dict]]:
    """File name -> the documents of one entry: a ConfigMap holding the batch spec (its content at
    emission time) and a RayCronJob whose job renders it into the slot's dated output."""
    schedules = schedules or load_schedules(schedule_uri)
    k = schedules.kuberay
    files: dict[str, list[dict]] = {}
    for entry in schedules.entries:
        bundle, _ = read_spec("render", batch_uri(schedule_uri, entry), model=entry.model,
                              out=slot_output(entry, dt.datetime.now(dt.UTC)))
        keys = {rel: re.sub(r"[^-._a-zA-Z0-9]", "_", rel) for rel in bundle.files}
        labels = {"app.kubernetes.io/name": "vidgen", "app.kubernetes.io/component": "scheduled-batch",
                  "vidgen/schedule": entry.name}
        meta = {"labels": labels, **({"namespace": k.namespace} if k.namespace else {})}
        configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": f"vidgen-batch-{entry.name}", **meta},
                     "data": {keys[rel]: text for rel, text in bundle.files.items()}}
        args = ["python", "-m", "vidgen.jobs", "run", "render", "--spec", f"{BATCH_MOUNT}/{bundle.name}",
                "--out-template", entry.output, "--timezone", entry.timezone, "--cron", entry.cron]
        if entry.model:
            args += ["--model", entry.model]
        if entry.workers is not None:
            args += ["--workers", str(entry.workers)]
        volume = {"name": "batch", "configMap": {"name": f"vidgen-batch-{entry.name}",
                                                 "items": [{"key": keys[rel], "path": rel} for rel in bundle.files]}}
        head = _pod("ray-head", k, k.head, mounts=[{"name": "batch", "mountPath": BATCH_MOUNT, "readOnly": True}],
                    volumes=[volume])
        workers = [
            {"groupName": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": k.max_cpu_workers,
             "rayStartParams": {}, "template": _pod("ray-worker", k, k.cpu_worker)},
            {"groupName": "gpu", "replicas": 0, "minReplicas": 0, "maxReplicas": k.max_gpu_workers,
             "rayStartParams": {}, "template": _pod("ray-worker", k, k.gpu_worker)},
        ]
        cronjob = {
            "apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": f"vidgen-{entry.name}", **meta},
            "spec": {
                "schedule": entry.cron,
                "timeZone": entry.timezone,
                "suspend": entry.suspend,
                "jobTemplate": {
                    "entrypoint": shlex.join(args),
                    "shutdownAfterJobFinishes": True,
                    "ttlSecondsAfterFinished": 3600,
                    "activeDeadlineSeconds": 6 * 3600,
                    "backoffLimit": 1,
                    "metadata": {"vidgen_schedule": entry.name},
                    "rayClusterSpec": {
                        "rayVersion": k.ray_version,
                        "enableInTreeAutoscaling": True,
                        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
                        "workerGroupSpecs": workers,
                    },
                },
            },
        }
        files[f"raycronjob-{entry.name}.yaml"] = [configmap, cronjob]
    return files


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (a spec in a ConfigMap, an embedded Serve config) as readable `|` blocks."""


def _str_block(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_block)


def dump_manifest(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_ManifestDumper, sort_keys=False, width=120, allow_unicode=True)


def emit_kuberay(schedule_uri: str, out_dir: str) -> list[str]:
    """Write one manifest file per entry into out_dir (local or s3://); returns their URIs."""
    written = []
    for name, docs in kuberay_manifests(schedule_uri).items():
        header = (f"# Generated by `vidgen schedule {schedule_uri} --emit-kuberay ...` (vidgen {__version__}).\n"
                  "# The ConfigMap holds the batch spec as it was then; re-emit after changing it.\n"
                  "# Apply with kubectl apply -f; the KubeRay operator (v1.6 or later) needs its RayCronJob feature gate on.\n")
        text = header + "---\n".join(dump_manifest(d) for d in docs)
        uri = storage.join(storage.normalize(out_dir), name)
        storage.write_text(uri, text)
        written.append(uri)
    return written
