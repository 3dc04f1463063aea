"""Sizing a cluster for a stated load, from measured throughput: `vidgen plan`.

    vidgen plan --render-minutes 600 --size 1280x720 --fps 24 --hours 8              # shipped figures
    vidgen plan --render-minutes 600 --size 854x480 --model restore/tiny --mode restore --calibrate  # measured here
    vidgen plan --render-minutes 600 --train-clips-per-s 20 --train gan/small \\
        --cluster cluster/kuberay/raycluster.yaml --serve serve/config.yaml

The load: N minutes of video rendered a day (at a size, fps, codec and x264 preset, by a model
family in a mode), to be done within `hours` of the day; and M training clips/s of a family/preset.
The figures: CPU-seconds per output frame of the encode (x264/VP9 with one thread per encode, as
the render pipeline runs it) and of the model's inference, plus a fixed cost per video (poster,
uploads, record, Ray's own work), divided by the pipeline's measured share of the physical limit.
`--calibrate` measures encode and inference on this machine; otherwise the table below, measured
with `calibrate` on a 2-core AMD EPYC (2026-11-29), is used. Training: one
forward+backward of a batch of 2 clips per family/preset on 2 cores (bench/models.py) and the
trainer's 2-worker scaling (bench/train.py). The plan is then checked against the autoscaler's
bounds: the KubeRay worker groups' maxReplicas and cores (cluster/kuberay/raycluster.yaml) and the
Serve deployments' max_replicas (serve/config.yaml).
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field

import numpy as np
import yaml

from vidgen.errors import InputError

# CPU-seconds per megapixel of output frame, one encoder thread: `calibrate` at 1280x720 on a 2-core
# AMD EPYC, 2026-11-29 (at 854x480 within 10%: 8.9, 13.6, 20.1, 22.1, 31.6, 29.0 ms).
ENCODE_S_PER_MPIXEL = {("h264", "ultrafast"): 0.0091, ("h264", "veryfast"): 0.0123, ("h264", "medium"): 0.0204,
                       ("h264", "slow"): 0.0238, ("vp9", "ultrafast"): 0.0300, ("vp9", "medium"): 0.0275}
# CPU-seconds of inference on one CPU thread, same calibration: per output frame (generate, at the
# model's native size) or per megapixel of input frame (restore, stylize at 854x480).
INFER_S_PER_FRAME = {("gan", "tiny", "generate"): 0.00024, ("gan", "small", "generate"): 0.0128}
INFER_S_PER_MPIXEL = {("restore", "tiny", "restore"): 4.32, ("restore", "small", "restore"): 43.8,
                      ("style", "tiny", "stylize"): 1.07}
PER_VIDEO_S = 0.09  # poster, uploads and record (moto's CPU included) + Ray's per-item work (bench/render.py)
PIPELINE_SHARE = 0.5  # of the physical limit the Ray pipeline reaches (bench/render.py: 0.42 S3, 0.50 local)
# bench/models.py: seconds of one forward+backward of 2 clips on 2 cores; bench/train.py: 2 workers = 1.37x 1
TRAIN_STEP_S = {"gan/tiny": 0.074, "gan/small": 1.42, "vae/tiny": 0.078, "vae/small": 2.79,
                "convlstm/tiny": 0.039, "convlstm/small": 1.14, "restore/tiny": 0.024, "restore/small": 2.19,
                "style/tiny": 0.059, "style/small": 2.45}
TRAIN_SCALING = 1.37 / 2  # per-worker efficiency of data-parallel training on CPU


@dataclass
class Load:
    render_minutes: float = 0.0  # a day
    width: int = 1280
    height: int = 720
    fps: float = 24.0
    codec: str = "h264"
    preset: str = "medium"
    family: str = "gan"
    model_preset: str = "tiny"
    mode: str = "generate"
    video_seconds: float = 10.0  # the length of one video (fixed costs are per video)
    hours: float = 24.0  # the day's renders must be done within this many hours
    peak_factor: float = 3.0  # the endpoint's busiest hour against the day's average
    train_clips_per_s: float = 0.0
    train: str = "gan/small"


@dataclass
class Figures:
    encode_s_per_mpixel: float
    infer_s_per_frame: float
    per_video_s: float = PER_VIDEO_S
    measured: list[str] = field(default_factory=list)  # what --calibrate measured here


def shipped_figures(load: Load) -> Figures:
    encode = ENCODE_S_PER_MPIXEL.get((load.codec, load.preset))
    if encode is None:
        raise InputError(f"no encode figure for {load.codec} {load.preset}: use --calibrate "
                         f"(shipped: {', '.join(f'{c} {p}' for c, p in ENCODE_S_PER_MPIXEL)})")
    key = (load.family, load.model_preset, load.mode)
    if key in INFER_S_PER_FRAME:
        infer = INFER_S_PER_FRAME[key]
    elif key in INFER_S_PER_MPIXEL:
        infer = INFER_S_PER_MPIXEL[key] * load.width * load.height / 1e6
    else:
        raise InputError(f"no inference figure for {'/'.join(key)}: use --calibrate")
    return Figures(encode, infer)


def cpu_seconds() -> float:
    """CPU-seconds of this process (all its threads) and of its finished child processes (ffmpeg)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def calibrate(load: Load, frames: int = 48) -> Figures:
    """Measure here: the encode of `frames` frames at the load's size (one thread, the pipeline's
    setting), and the model's inference for them on CPU (a fresh model: cost does not depend on
    the weights)."""
    import torch

    from vidgen import media, models
    from vidgen.data.tensors import video_to_frames

    rng = np.random.default_rng(0)
    # smooth moving content, like rendered video (noise would overstate the encode's cost)
    base = rng.integers(0, 255, (1, load.height // 8 + 2, load.width // 8 + 2, 3), dtype=np.uint8)
    clip = np.stack([np.repeat(np.repeat(np.roll(base[0], t, axis=1), 8, 0), 8, 1)[:load.height, :load.width]
                     for t in range(frames)])
    media.encode(clip[:4], load.fps, load.codec, preset=load.preset, threads=1)  # warm-up
    start = cpu_seconds()
    media.encode(clip, load.fps, load.codec, preset=load.preset, threads=1)
    encode = (cpu_seconds() - start) / frames / (load.width * load.height / 1e6)

    from vidgen.manifest import MODE_FAMILIES

    try:
        modes = models.family_class(load.family).render_modes
    except ValueError as e:  # an unknown family
        raise InputError(f"--model {load.family}/{load.model_preset}: {e}") from None
    if load.mode not in modes:
        raise InputError(f"--model {load.family}/{load.model_preset}: a {load.family} model does not {load.mode} "
                         f"(that takes {' or '.join(sorted(MODE_FAMILIES.get(load.mode, ())))})")
    if load.mode == "predict":
        raise InputError("--mode predict: --calibrate measures generate, restore and stylize; predict is not built in")
    torch.set_num_threads(1)
    try:
        model = models.build(load.family, load.model_preset)
    except ValueError as e:
        raise InputError(f"--model {load.family}/{load.model_preset}: {e}") from None
    start = cpu_seconds()
    with torch.no_grad():
        if load.mode == "generate":
            video_to_frames(model.sample(1, frames, seed=0)[0])
            infer = (cpu_seconds() - start) / frames
        else:  # as the render engine runs it: frames -> the family's restore / stylize
            from vidgen.data.tensors import frames_to_video

            n = 8
            fn = model.restore if load.mode == "restore" else model.stylize
            frames = clip[:n] if load.mode == "restore" else clip[:n, :load.height // 4 * 4, :load.width // 4 * 4]
            video_to_frames(fn(frames_to_video(frames))[0])
            infer = (cpu_seconds() - start) / n
    return Figures(encode, infer, measured=[f"encode {load.codec} {load.preset} at {load.width}x{load.height}",
                                            f"inference {load.family}/{load.model_preset} {load.mode}"])


@dataclass
class Bounds:
    """What the autoscaler may reach: cores and GPUs of each KubeRay worker group at maxReplicas,
    and the Serve deployments' max_replicas."""

    groups: dict[str, dict] = field(default_factory=dict)  # name -> {max_replicas, cpus, gpus}
    serve_model_replicas: int | None = None

    @property
    def max_cpus(self) -> float:
        return sum(g["max_replicas"] * g["cpus"] for g in self.groups.values())

    @property
    def max_gpus(self) -> float:
        return sum(g["max_replicas"] * g["gpus"] for g in self.groups.values())


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def read_bounds(cluster: str | None, serve: str | None) -> Bounds:
    """The bounds of a KubeRay manifest and a Serve config; InputError naming a file that cannot be
    read as what it should be."""
    bounds = Bounds()
    for path, read, what in ((cluster, _read_cluster, "KubeRay manifest"), (serve, _read_serve, "Serve config")):
        if not path:
            continue
        try:
            read(path, bounds)
        except OSError as e:
            raise InputError(f"{path}: {e.strerror}") from None
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, yaml.YAMLError) as e:
            raise InputError(f"{path}: not a {what} ({type(e).__name__}: {e})") from None
    return bounds


SERVE_MAX_REPLICAS = 2  # serving.settings.Autoscaling's default max_replicas


def _read_cluster(path: str, bounds: Bounds) -> None:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        spec = doc.get("spec", {})
        spec = spec.get("rayClusterConfig", spec.get("rayClusterSpec", spec))  # RayCluster, RayJob, RayService
        for group in spec.get("workerGroupSpecs", []):
            container = group["template"]["spec"]["containers"][0]
            limits = container.get("resources", {}).get("limits", {})
            bounds.groups[group["groupName"]] = {"max_replicas": int(group.get("maxReplicas", 0)),
                                                 "cpus": _quantity(limits.get("cpu", 0)),
                                                 "gpus": _quantity(limits.get("nvidia.com/gpu", 0))}


def _read_serve(path: str, bounds: Bounds) -> None:
    with open(path) as f:
        config = yaml.safe_load(f)
    args = config["applications"][0].get("args") or {}
    default = int(((args.get("model") or {}).get("autoscaling") or {}).get("max_replicas", SERVE_MAX_REPLICAS))
    per_model = [int(((entry.get("autoscaling") or {}) if isinstance(entry, dict) else {}).get("max_replicas", default))
                 for entry in (args.get("models") or {}).values()]
    bounds.serve_model_replicas = max(per_model, default=default)  # the most one model may have


def plan(load: Load, figures: Figures, bounds: Bounds) -> list[tuple[str, str, str]]:
    """Rows (what, figure, verdict)."""
    rows = []
    if load.render_minutes > 0:
        frames = load.render_minutes * 60 * load.fps
        videos = load.render_minutes * 60 / load.video_seconds
        mpixels = load.width * load.height / 1e6
        cpu_s = frames * (figures.encode_s_per_mpixel * mpixels + figures.infer_s_per_frame) + videos * figures.per_video_s
        cores = cpu_s / (load.hours * 3600) / PIPELINE_SHARE
        rows.append(("render work a day", f"{cpu_s / 3600:.1f} CPU-hours for {load.render_minutes:g} min "
                     f"({videos:.0f} videos of {load.video_seconds:g} s, {load.width}x{load.height} {load.fps:g} fps "
                     f"{load.codec} {load.preset})", ""))
        rows.append(("cores to render it", f"{cores:.1f} within {load.hours:g} h "
                     f"(at {PIPELINE_SHARE:.0%} of the physical limit)", _fits(cores, bounds.max_cpus, "cores")))
        peak = frames / 86400 * load.peak_factor  # frames/s at the endpoint's busiest hour
        per_replica = 1 / figures.infer_s_per_frame if figures.infer_s_per_frame else math.inf
        replicas = math.ceil(peak / per_replica) if per_replica < math.inf else 1
        rows.append(("endpoint model replicas at peak", f"{replicas} ({peak:.1f} frames/s at {load.peak_factor:g}x the "
                     f"average; one CPU replica infers {per_replica:.0f} frames/s)",
                     _fits(replicas, bounds.serve_model_replicas, "max_replicas")))
    if load.train_clips_per_s > 0:
        if load.train not in TRAIN_STEP_S:
            raise InputError(f"no training figure for {load.train}: one of {', '.join(TRAIN_STEP_S)}")
        per_core = 2 / TRAIN_STEP_S[load.train] / 2 * TRAIN_SCALING  # clips/s a core adds to a data-parallel run
        cores = load.train_clips_per_s / per_core
        rows.append((f"cores to train {load.train} at {load.train_clips_per_s:g} clips/s",
                     f"{cores:.0f} ({per_core:.2f} clips/s a core, CPU)", _fits(cores, bounds.max_cpus, "cores")))
    return rows


def _fits(need: float, have: float | None, unit: str) -> str:
    if not have:
        return "no bound given"
    return f"fits ({need:.1f} of {have:g} {unit})" if need <= have else f"EXCEEDS the bound ({need:.1f} > {have:g} {unit})"


def format_plan(load: Load, figures: Figures, bounds: Bounds, rows) -> str:
    source = ("measured here: " + "; ".join(figures.measured)) if figures.measured else "the shipped table (2-core EPYC)"
    lines = [f"figures ({source}): encode {figures.encode_s_per_mpixel * 1000:.1f} ms CPU per megapixel-frame, "
             f"inference {figures.infer_s_per_frame * 1000:.2f} ms CPU per frame, {figures.per_video_s * 1000:.0f} ms "
             f"per video"]
    if bounds.groups:
        lines.append("autoscaler bounds: " + ", ".join(
            f"{name} {g['max_replicas']} x {g['cpus']:g} CPU" + (f" + {g['gpus']:g} GPU" if g["gpus"] else "")
            for name, g in bounds.groups.items()) + f" = {bounds.max_cpus:g} CPUs, {bounds.max_gpus:g} GPUs")
    width = max(len(r[0]) for r in rows) if rows else 0
    lines += [f"  {what:<{width}}  {figure}" + (f"  -> {verdict}" if verdict else "") for what, figure, verdict in rows]
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise InputError(f"--size {text!r}: expected even sides of at least 16")
    return w, h
