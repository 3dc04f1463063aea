"""Validation metrics and sample grids: plain torch, used by the trainer and `vidgen eval`.

    vidgen eval s3://bucket/models/restore s3://bucket/shapes --split val

Each family says what its metrics and previews are (`val_metrics`, `preview`: see
vidgen.models.contract.Family); this module averages the metrics over batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from vidgen.models.contract import EVAL_SEED  # noqa: F401  (part of this module's surface)


@torch.no_grad()
def evaluate(model, family: str, batches: Iterable[dict], life_cell: int | None = None) -> dict[str, float]:
    """Mean validation metrics of `model` (a `family` model) over `batches` ({"video": (B, C, T,
    H, W)}), prefixed `val_`."""
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(batches):
        video = batch["video"].to(next(model.parameters()).device)
        values = model.val_metrics(video, i, life_cell)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * video.shape[0]
        count += video.shape[0]
    return {f"val_{k}": round(v / count, 5) for k, v in sums.items()} if count else {}


@torch.no_grad()
def sample_grid(model, family: str, video: torch.Tensor | None, seed: int = 0, num_frames: int | None = None) -> np.ndarray:
    """A uint8 grid video (T, H, W, 3) showing what the model (a `family` model) does now: its
    `preview`. `video` is a validation batch (B, C, T, H, W), for the families that need input."""
    if video is None and model.preview_needs_input:
        raise ValueError(f"{family} samples need an input video batch")
    if video is not None:
        video = video[:4].to(next(model.parameters()).device)
    return model.preview(video, seed=seed, num_frames=num_frames)
