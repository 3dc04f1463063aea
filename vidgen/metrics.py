"""Quality metrics on videos (B, C, T, H, W) in [-1, 1], and a rule check for Game-of-Life grids.

    psnr(restored, clean)            # dB, mean over videos; data_range 2.0 for [-1, 1]
    ssim(restored, clean)            # per-frame, per-channel 2D SSIM, averaged
    life_rule_accuracy(grids[:-1], grids[1:])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11       # Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_videos(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 5:
        raise ValueError(f"expected two videos (B, C, T, H, W) of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none' (or 'pooled' for psnr), got {reduction!r}")


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), MSE over each whole video.

    Returns the mean over the batch (reduction="mean"), or one value per video ("none"), (B,).
    Identical videos give +inf, and so does a mean over a batch holding a pair of them.
    reduction="pooled": one value from the MSE over the whole batch, finite unless every pair is
    identical, and not carried by the few videos that come back near exact (for comparing methods
    whose outputs are rounded to 8 bits, such as ffmpeg's filters, on a set of clips).
    """
    _check_videos(a, b)
    if reduction == "pooled":
        return (10 * torch.log10(data_range**2 / (a.double() - b.double()).pow(2).mean())).float()
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)   # (B,)
    values = 10 * torch.log10(data_range**2 / mse)
    return _reduce(values.float(), reduction)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)                                    # (size, size), sums to 1


def ssim(a: Tensor, b: Tensor, data_range: float = 2.0, reduction: str = "mean") -> Tensor:
    """Structural similarity (Wang et al. 2004), 2D per frame and channel, averaged.

    Local statistics use an 11x11 gaussian window (sigma 1.5) over valid positions only (no
    padding), so frames must be at least 11x11. Returns the mean over the batch, or (B,) with
    reduction="none". Identical videos give 1.
    """
    _check_videos(a, b)
    B, C, T, H, W = a.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {H}x{W}")
    # float64: the variances below are differences of nearly equal moments (E[x^2] - E[x]^2)
    x = a.double().reshape(B * C * T, 1, H, W)
    y = b.double().reshape(B * C * T, 1, H, W)
    window = _gaussian_window().to(x).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)

    def local_mean(z: Tensor) -> Tensor:
        return F.conv2d(z, window)                              # (N, 1, H - 10, W - 10)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_video = ssim_map.view(B, -1).mean(1)                    # (B,): frames, channels, positions
    return _reduce(per_video.float(), reduction)


def life_step(grid) -> np.ndarray:
    """One Game-of-Life step of binary grids (..., H, W), with a DEAD boundary (outside cells are dead).

    A live cell with 2 or 3 live neighbours survives; a dead cell with exactly 3 becomes alive.
    Returns bool (..., H, W).
    """
    g = torch.as_tensor(np.asarray(grid)).bool()
    padded = F.pad(g.to(torch.int32), (1, 1, 1, 1))             # dead border
    H, W = g.shape[-2:]
    neighbours = sum(padded[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
    return ((neighbours == 3) | (g & (neighbours == 2))).numpy()


def life_rule_accuracy(frames_t, frames_t1) -> float:
    """Fraction of cells of `frames_t1` equal to Conway's rule applied to `frames_t` (dead boundary).

    Both are binary grids of the same shape (T, H, W) (or (H, W)), bool or 0/1 integers (numpy or
    torch); `frames_t1[i]` is the claimed successor of `frames_t[i]`. Threshold model outputs
    first (e.g. `video > 0`).
    """
    now, nxt = np.asarray(frames_t), np.asarray(frames_t1)
    if now.shape != nxt.shape or now.ndim < 2:
        raise ValueError(f"expected two grids (T, H, W) of the same shape, got {now.shape} and {nxt.shape}")
    for name, grid in (("frames_t", now), ("frames_t1", nxt)):
        if grid.dtype != bool and not np.isin(grid, (0, 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1)")
    return float((life_step(now) == nxt.astype(bool)).mean())


__all__ = ["life_rule_accuracy", "life_step", "psnr", "ssim"]
