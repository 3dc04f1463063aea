"""Export a run's newest committed checkpoint as a model, and evaluate exported models.

    vidgen export runs/gan models/gan
    vidgen export s3://b/runs/g s3://b/models/g
    vidgen eval s3://b/models/restore s3://b/shapes --split val

`export` consolidates any ZeRO stage (stage-3 partitions too) into MODEL/model.safetensors +
MODEL/model.json (config, label names, data, steps, final metrics), loadable by
`vidgen.models.load`. Only checkpoints Ray Train committed count: the newest one it recorded in
the run's checkpoint-manager snapshot.
"""

from __future__ import annotations

import json
import os
import pickle

import torch

from vidgen import models, storage
from vidgen.errors import InputError
from vidgen.train import checkpoint
from vidgen.train.loop import probe_output  # noqa: F401  (callers compare a live model with its export)


class ExportError(InputError):
    """The run has nothing to export, or its checkpoint does not fit its config."""


def newest_checkpoint(run: str) -> str:
    """The URI of RUN's newest committed checkpoint (per Ray Train's own records)."""
    from ray.train import Result

    fs, path = storage.pyarrow_filesystem(run)
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except RuntimeError as e:
        raise ExportError(f"{run}: not a training run with checkpoints ({e})") from None
    if result.checkpoint is None:
        raise ExportError(f"{run}: the run has no committed checkpoint yet")
    name = os.path.basename(result.checkpoint.path.rstrip("/"))
    return storage.join(run, name)


def _download(uri: str, local: str) -> None:
    """Every object under `uri` into the folder `local`; a key that would land outside it (a `..`
    or `.` segment, an absolute part) is refused, before anything is downloaded."""
    prefix = uri.rstrip("/")
    files = []
    for obj in storage.list_prefix(uri):
        parts = obj[len(prefix) + 1 :].replace("\\", "/").split("/")
        if any(p in ("", ".", "..") for p in parts) or os.path.isabs(os.path.join(*parts)):
            raise ExportError(f"{obj}: refusing a checkpoint key that leaves the checkpoint folder")
        files.append((obj, os.path.join(local, *parts)))
    for obj, path in files:
        storage.download_file(obj, path)


def export(run: str, out: str) -> ModelManifest:
    """Consolidate RUN's newest checkpoint into the model at OUT; returns its manifest (model.json)."""
    import tempfile

    run, out = storage.normalize(run), storage.normalize(out)
    ckpt = newest_checkpoint(run)
    try:
        with tempfile.TemporaryDirectory(prefix="vidgen-export-") as d:
            if storage.is_s3(ckpt):
                _download(ckpt, d)
                local = d
            else:
                local = ckpt
            with open(os.path.join(local, checkpoint.STATE)) as f:
                state = json.load(f)
            cfg = state["config"]
            model = build_from_state(state)
            full = checkpoint.consolidated_state_dict(local, model, state["zero_stage"])
        model.load_state_dict(full)
    except ExportError:
        raise
    except FileNotFoundError as e:
        raise ExportError(f"{ckpt}: not a complete vidgen checkpoint ({e.filename or e} is missing)") from None
    except pickle.UnpicklingError as e:  # weights_only_loads refused an object: not a checkpoint vidgen wrote
        raise ExportError(f"{ckpt}: refusing to load it: it holds objects other than tensors and DeepSpeed's "
                          f"records ({str(e).splitlines()[-1][:200] if str(e) else e})") from None
    except (KeyError, ValueError, RuntimeError) as e:  # a config or state dict that no longer fits
        raise ExportError(f"{ckpt}: the checkpoint does not fit its recorded config: {e}".splitlines()[0]) from None
    from vidgen.train.loop import read_metrics

    rows = read_metrics(run)
    final = {k: v for r in rows if r["step"] <= state["step"] for k, v in r.items()}
    provenance = {
        "run": run,
        "checkpoint": ckpt,
        "data": cfg["data"],
        "steps": state["step"],
        "zero_stage": state["zero_stage"],
        "world_size": state["world_size"],
        "seed": cfg["seed"],
    }
    return models.save(model, out, provenance=provenance, metrics=final)


def build_from_state(state: dict):
    """The family module a checkpoint was trained with (config from its vidgen_state.json)."""
    from vidgen.train.config import TrainConfig
    from vidgen.train.trainer import prepare

    cfg = TrainConfig(**state["config"])
    payload = state.get("payload") or prepare(cfg)
    return models.build(cfg.family, cfg.preset, label_names=payload["label_names"], **payload["model_overrides"])


@torch.no_grad()
def evaluate_model(model_uri: str, data: str, split: str = "val", batches: int = 8, batch_size: int = 4) -> dict:
    """Validation metrics of an exported model on a dataset split (read in-process, no Ray)."""
    import itertools

    import numpy as np

    from vidgen.data.format import open_dataset
    from vidgen.data.tensors import frames_to_video
    from vidgen.train.evaluate import evaluate

    model = models.load(model_uri)
    family = models.family_of(model)
    ds = open_dataset(data)
    if not ds.manifest.splits.get(split):
        raise ExportError(f"{data}: split {split!r} has no clips (splits: {ds.manifest.splits})")
    clips = (row["frames"] for row in ds.iter_clips(split))

    def batched():
        while chunk := list(itertools.islice(clips, batch_size)):
            yield {"video": frames_to_video(np.stack(chunk))}

    life = ds.manifest.life
    try:
        values = evaluate(model, family, itertools.islice(batched(), batches), life_cell=life["cell"] if life else None)
    except ValueError as e:  # the model and the data do not fit each other (frame size, clip length, channels)
        raise ExportError(f"{model_uri} on {data}: {e}") from None
    return {"model": model_uri, "family": family, "data": data, "split": split, **values}
