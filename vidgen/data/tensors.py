"""uint8 frames <-> model tensors, and tiling videos into a grid a person can watch.

Models take and return float videos (B, C, T, H, W) in [-1, 1]; files and datasets hold uint8
frames (T, H, W, C). The conversion lives here, and only the data and render code call it.
"""

from __future__ import annotations

import numpy as np
import torch


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, C) -> float (1, C, T, H, W) in [-1, 1]; (B, T, H, W, C) -> (B, C, T, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if x.ndim == 4:
        x = x.unsqueeze(0)
    # Transpose the uint8 frames, then convert: `.float()` of the permuted view would keep its
    # strides and need a second, 4x larger copy in float to become contiguous.
    return x.permute(0, 4, 1, 2, 3).contiguous().float().div_(127.5).sub_(1.0)


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (C, T, H, W) in [-1, 1] -> uint8 (T, H, W, C), 3 channels (grey is repeated)."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"video_to_frames takes one video (C, T, H, W), got a batch {tuple(video.shape)}")
        video = video[0]
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = x.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, C)
    return np.repeat(frames, 3, -1) if frames.shape[-1] == 1 else frames[..., :3]


def tile(videos: list[np.ndarray], cols: int | None = None, gutter: int = 2, fill: int = 32) -> np.ndarray:
    """Videos uint8 (T, H, W, 3) of one size -> one grid video (T, H', W', 3) with gutters.

    Shorter videos hold their last frame, so clips of different lengths can sit side by side.
    """
    if not videos:
        raise ValueError("tile needs at least one video")
    t = max(v.shape[0] for v in videos)
    h, w = videos[0].shape[1:3]
    cols = cols or int(np.ceil(np.sqrt(len(videos))))
    rows = int(np.ceil(len(videos) / cols))
    grid = np.full((t, rows * (h + gutter) + gutter, cols * (w + gutter) + gutter, 3), fill, np.uint8)
    for i, v in enumerate(videos):
        if v.shape[1:3] != (h, w):
            raise ValueError(f"tile: video {i} is {v.shape[2]}x{v.shape[1]}, expected {w}x{h}")
        if v.shape[0] < t:
            v = np.concatenate([v, np.repeat(v[-1:], t - v.shape[0], 0)])
        r, c = divmod(i, cols)
        y, x = gutter + r * (h + gutter), gutter + c * (w + gutter)
        grid[:, y : y + h, x : x + w] = v
    return grid
