"""Validation metrics and sample grids per family: plain torch, used by the trainer and `vidgen eval`.

    vidgen eval s3://bucket/models/restore s3://bucket/shapes --split val

Metrics (all on (B, C, T, H, W) in [-1, 1]):
- restore: PSNR/SSIM of the restored clip against the clean one, and of the degraded input
  (nearest-upscaled when the model upscales) so the gain is visible;
- vae: PSNR/SSIM of reconstructions;
- convlstm: PSNR/SSIM of the predicted frames after `context_frames`, and on Game-of-Life data the
  rule accuracy of the first predicted frame given the last context frame;
- gan, style: no reference-based metric (samples are for looking at).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from vidgen import metrics
from vidgen.errors import InputError
from vidgen.data.tensors import tile, video_to_frames

EVAL_SEED = 1234  # degradations at evaluation are the same at every checkpoint


def _upscale_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) -> (B, C, T, H, W) of `like` by nearest upscaling (for side-by-side views)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    b, c, t, h, w = x.shape
    y = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), size=like.shape[-2:], mode="nearest")
    return y.reshape(b, t, c, *like.shape[-2:]).transpose(1, 2)


def life_grid(video: torch.Tensor, cell: int) -> np.ndarray:
    """(B, C, T, H, W) in [-1, 1] -> bool cell grids (B, T, H / cell, W / cell) from cell centres."""
    centre = cell // 2
    return (video[:, 0, :, centre::cell, centre::cell] > 0).cpu().numpy()


@torch.no_grad()
def evaluate(model, family: str, batches: Iterable[dict], life_cell: int | None = None) -> dict[str, float]:
    """Mean validation metrics over `batches` ({"video": (B, C, T, H, W)}), prefixed `val_`."""
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(batches):
        video = batch["video"].to(next(model.parameters()).device)
        values = _batch_metrics(model, family, video, i, life_cell)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * video.shape[0]
        count += video.shape[0]
    return {f"val_{k}": round(v / count, 5) for k, v in sums.items()} if count else {}


def _batch_metrics(model, family: str, video: torch.Tensor, index: int, life_cell: int | None) -> dict[str, float]:
    if family == "restore":
        degraded = model.degrade(video, seed=EVAL_SEED + index)
        restored = model.restore(degraded)
        baseline = _upscale_to(degraded, video)
        return {
            "psnr": metrics.psnr(restored, video).item(),
            "ssim": metrics.ssim(restored, video).item(),
            "psnr_input": metrics.psnr(baseline, video).item(),
            "psnr_gain": (metrics.psnr(restored, video) - metrics.psnr(baseline, video)).item(),
        }
    if family == "vae":
        recon = model.reconstruct(video)
        return {"psnr": metrics.psnr(recon, video).item(), "ssim": metrics.ssim(recon, video).item()}
    if family == "convlstm":
        k = model.config.context_frames
        if video.shape[2] <= k:
            raise InputError(f"convlstm evaluation needs clips longer than context_frames={k}")
        pred = model.predict(video[:, :, :k], video.shape[2] - k)
        out = {"psnr": metrics.psnr(pred, video[:, :, k:]).item(), "ssim": metrics.ssim(pred, video[:, :, k:]).item()}
        if life_cell:
            last, first_pred = life_grid(video[:, :, k - 1 : k], life_cell), life_grid(pred[:, :, :1], life_cell)
            out["life_rule_accuracy"] = metrics.life_rule_accuracy(last, first_pred)
        return out
    return {}


@torch.no_grad()
def sample_grid(model, family: str, video: torch.Tensor | None, seed: int = 0, num_frames: int | None = None) -> np.ndarray:
    """A uint8 grid video (T, H, W, 3) showing what the model does now.

    gan/vae: samples (the GAN one row per class); vae also real | reconstruction; convlstm:
    truth | prediction after the context; restore: degraded | restored | clean; style: content |
    stylized. `video` is a validation batch (B, C, T, H, W) for the families that need input.
    """
    frames = lambda x: [video_to_frames(v) for v in x]  # noqa: E731 - (B, C, T, H, W) -> list of uint8
    if family == "gan":
        classes = model.config.num_classes
        n = max(4, min(12, 4 * max(classes, 1)))
        labels = [i % classes for i in range(n)] if classes else None
        cols = (n // classes) if classes else 4
        samples = model.sample(n, num_frames=num_frames, labels=labels, seed=seed)
        order = sorted(range(n), key=lambda i: (labels[i] if labels else 0, i))
        return tile([frames(samples)[i] for i in order], cols=cols)
    if video is None:
        raise ValueError(f"{family} samples need an input video batch")
    video = video[:4].to(next(model.parameters()).device)
    if family == "vae":
        prior = model.sample(video.shape[0], num_frames=video.shape[2], seed=seed)
        return tile(frames(video) + frames(model.reconstruct(video)) + frames(prior), cols=video.shape[0])
    if family == "convlstm":
        k = model.config.context_frames
        pred = torch.cat([video[:, :, :k], model.predict(video[:, :, :k], video.shape[2] - k)], 2)
        return tile(frames(video) + frames(pred), cols=video.shape[0])
    if family == "restore":
        degraded = model.degrade(video, seed=EVAL_SEED)
        restored = model.restore(degraded)
        views = [frames(_upscale_to(degraded, video)), frames(restored), frames(video)]
        return tile([v for triple in zip(*views, strict=True) for v in triple], cols=3)
    if family == "style":
        return tile([v for pair in zip(frames(video), frames(model.stylize(video)), strict=True) for v in pair], cols=2)
    raise ValueError(f"unknown family {family!r}")
