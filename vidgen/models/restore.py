"""Video restoration: denoise, deblur, deblock and optionally 2x upscale, from a window of frames.

Each output frame t is computed from the degraded frames t-r..t+r (r = window // 2, the clip's
ends repeated): the window is stacked on channels, passed through an EDSR-like residual CNN (no
batch norm), and added to the (bilinearly upscaled) degraded frame t. The last conv starts at zero,
so an untrained model returns its input: training only has to learn the correction.

Training data are clean clips degraded on the fly by `degrade`, defined here so that training
and evaluation use the same degradations. Degradations, always applied in this order:

    blur       gaussian blur, sigma ~ U(0.3, blur_sigma) px per clip
    downscale  2x bicubic (antialiased) downscaling; exactly when config.scale == 2
    noise      additive gaussian noise, std ~ U(0, noise_sigma) per clip (pixels in [-1, 1])
    h264       H.264 round trip through vidgen.media at crf ~ U{crf_min..crf_max} (needs ffmpeg)

then 8-bit quantisation. Everything random comes from `torch.Generator().manual_seed(seed)` on
the CPU, so a seed gives the same degraded clip on any device (x264 itself is deterministic).

    model = Restorer(Restorer.Config.preset("tiny"))
    degraded = model.degrade(clean, seed=0)         # (B, C, T, H / s, W / s)
    restored = model.restore(degraded)              # (B, C, T, H, W)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import EVAL_SEED, Batch, OnePartConfig, OnePartFamily, require

DEGRADATIONS = ("blur", "downscale", "noise", "h264")  # the order they are applied in


@dataclass
class RestoreConfig(OnePartConfig):
    channels: int = 3
    scale: int = 1                   # 1: same size; 2: 2x upscaling
    window: int = 5                  # frames seen per output frame (odd)
    width: int = 64
    num_blocks: int = 8
    levels: int = 0                  # > 0: a U-Net: the blocks run after this many 2x downsamplings (widths
                                     # double), so flat regions are averaged over a wide area at little cost
    degradations: tuple[str, ...] = ("blur", "noise", "h264")  # used in training; see DEGRADATIONS
    noise_sigma: float = 0.1         # max noise std on [-1, 1] pixels (0.1 = 12.75 / 255)
    blur_sigma: float = 1.5          # max blur sigma in pixels
    crf_min: int = 30                # H.264 quality range: higher crf = lower bitrate, more blocking
    crf_max: int = 40
    crop: int = 0                    # training patches: crop x crop pixels of each clip (0 = whole frames)
    crop_frames: int = 0             # training patches: this many consecutive frames (0 = the whole clip)
    beta2: float = 0.99

    def __post_init__(self):
        require(self.scale in (1, 2), f"RestoreConfig.scale must be 1 or 2, got {self.scale}")
        require(self.window >= 1 and self.window % 2 == 1, f"RestoreConfig.window must be odd, got {self.window}")
        unknown = [k for k in self.degradations if k not in DEGRADATIONS]
        require(not unknown, f"RestoreConfig.degradations: unknown {unknown}; expected some of {list(DEGRADATIONS)}")
        require(("downscale" in self.degradations) == (self.scale == 2),
                f"RestoreConfig.degradations must include 'downscale' exactly when scale == 2 "
                f"(scale={self.scale}, degradations={list(self.degradations)})")
        require(self.levels >= 0, f"RestoreConfig.levels must be >= 0, got {self.levels}")
        require(self.crop >= 0 and self.crop % (2 * self.scale) == 0,
                f"RestoreConfig.crop must be 0 or a multiple of {2 * self.scale}, got {self.crop}")
        require(self.crop_frames >= 0, f"RestoreConfig.crop_frames must be >= 0, got {self.crop_frames}")
        require(0 <= self.crf_min <= self.crf_max <= 51,
                f"RestoreConfig needs 0 <= crf_min <= crf_max <= 51, got {self.crf_min}, {self.crf_max}")


PRESETS = {
    # CPU: a one-level U-Net trained on 4 x 32 x 32 patches at lr 1e-3: +7.8 dB over blur + noise on
    # held-out 64x64 shapes after 150 s on 2 cores (the whole-frame EDSR stack it replaced: +0.04 dB in 200 s).
    "tiny": dict(window=3, width=32, num_blocks=4, levels=1, degradations=("blur", "noise"), crop=32, crop_frames=4,
                 lr=1e-3),
    "small": dict(scale=2, window=5, width=64, num_blocks=16, degradations=("blur", "downscale", "noise", "h264")),
    "base": dict(scale=2, window=5, width=192, num_blocks=24, degradations=("blur", "downscale", "noise", "h264")),
}


# --- degradations --------------------------------------------------------------------------------

def degrade(clean: Tensor, kinds: Sequence[str], seed: int, *, noise_sigma: float = 0.1, blur_sigma: float = 1.5,
            crf: tuple[int, int] = (30, 40), fps: float = 25.0) -> Tensor:
    """clean (B, C, T, H, W) in [-1, 1] -> degraded (B, C, T, H', W') in [-1, 1], the same for a seed.

    H' = H / 2 with "downscale", else H. `crf` is the (min, max) H.264 crf range.
    """
    unknown = [k for k in kinds if k not in DEGRADATIONS]
    if unknown:
        raise ValueError(f"unknown degradation(s) {unknown}; expected some of {list(DEGRADATIONS)}")
    if clean.dim() != 5:
        raise ValueError(f"degrade takes videos (B, C, T, H, W), got shape {tuple(clean.shape)}")
    with torch.autocast(clean.device.type, enabled=False):  # data preparation: in float32 under any autocast
        return _degrade(clean, kinds, seed, noise_sigma, blur_sigma, crf, fps)


def _degrade(clean: Tensor, kinds: Sequence[str], seed: int, noise_sigma: float, blur_sigma: float,
             crf: tuple[int, int], fps: float) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    B, C, T, H, W = clean.shape
    x = clean.float()
    if "blur" in kinds:
        sigmas = 0.3 + torch.rand(B, generator=g) * max(blur_sigma - 0.3, 0.0)
        x = torch.stack([_gaussian_blur(x[b], float(s)) for b, s in enumerate(sigmas)])
    if "downscale" in kinds:
        if H % 2 or W % 2:
            raise ValueError(f"downscale needs even H and W, got {H}x{W}")
        frames = x.transpose(1, 2).flatten(0, 1)                  # (B*T, C, H, W)
        frames = F.interpolate(frames, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
        x = frames.unflatten(0, (B, T)).transpose(1, 2)          # (B, C, T, H/2, W/2)
    if "noise" in kinds:
        sigmas = torch.rand(B, generator=g) * noise_sigma
        noise = torch.randn(x.shape, generator=g) * sigmas.view(B, 1, 1, 1, 1)
        x = x + noise.to(x.device)
    x = x.clamp(-1, 1)
    if "h264" in kinds:
        crfs = torch.randint(crf[0], crf[1] + 1, (B,), generator=g)
        x = torch.stack([_h264_round_trip(x[b], int(q), fps) for b, q in enumerate(crfs)])
    return (((x + 1) * 127.5).round() / 127.5 - 1).to(clean.dtype)  # 8-bit levels, as in a real video


def _gaussian_blur(video: Tensor, sigma: float) -> Tensor:
    """video (C, T, H, W) -> blurred, separable gaussian with reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=video.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    C, T, H, W = video.shape
    x = video.reshape(C * T, 1, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.view(C, T, H, W)


def _h264_round_trip(video: Tensor, crf: int, fps: float) -> Tensor:
    """video (C, T, H, W) in [-1, 1] -> the same after H.264 encode + decode (yuv420p needs even H, W)."""
    from vidgen import media  # imported here: only this degradation needs ffmpeg

    C, T, H, W = video.shape
    if C not in (1, 3) or H % 2 or W % 2:
        raise ValueError(f"h264 degradation needs 1 or 3 channels and even H, W; got C={C}, {H}x{W}")
    rgb = video.expand(3, -1, -1, -1) if C == 1 else video
    frames = ((rgb.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    decoded = media.decode(media.encode(frames, fps, codec="h264", crf=crf, preset="veryfast"))  # (T, H, W, 3)
    out = torch.from_numpy(decoded).to(video.device).permute(3, 0, 1, 2).float() / 127.5 - 1
    return out.mean(0, keepdim=True) if C == 1 else out


# --- the network ---------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * self.body(x)  # residual scaling keeps deep stacks stable without norm layers


class UNetBody(nn.Module):
    """features (N, w, h, w') -> features of the same shape: `levels` stride-2 convs (widths double),
    the residual blocks at the coarsest scale, then back up with pixel shuffles and additive skips.
    H and W must be multiples of 2**levels."""

    def __init__(self, width: int, levels: int, num_blocks: int):
        super().__init__()
        widths = [width * 2**i for i in range(levels + 1)]
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU())
                                   for a, b in zip(widths[:-1], widths[1:]))
        self.blocks = nn.Sequential(*[ResBlock(widths[-1]) for _ in range(num_blocks)])
        self.ups = nn.ModuleList(nn.Sequential(nn.Conv2d(b, 4 * a, 3, padding=1), nn.PixelShuffle(2), nn.ReLU())
                                 for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        x = self.blocks(x)
        for up, skip in zip(reversed(self.ups), reversed(skips)):
            x = up(x) + skip
        return x


INFER_PIXELS = 1 << 20  # pixels (frames x height x width) a forward pass of restore(): ~0.5 GB at width 32


class RestoreNet(nn.Module):
    """degraded video (B, C, T, h, w) -> restored (B, C, T, h * scale, w * scale). The "model" part."""

    def __init__(self, cfg: RestoreConfig):
        super().__init__()
        self.cfg = cfg
        self.head = nn.Conv2d(cfg.channels * cfg.window, cfg.width, 3, padding=1)
        self.body = (UNetBody(cfg.width, cfg.levels, cfg.num_blocks) if cfg.levels else
                     nn.Sequential(*[ResBlock(cfg.width) for _ in range(cfg.num_blocks)]))
        self.tail = nn.Sequential(nn.Conv2d(cfg.width, cfg.channels * cfg.scale**2, 3, padding=1),
                                  nn.PixelShuffle(cfg.scale))
        nn.init.zeros_(self.tail[0].weight)
        nn.init.zeros_(self.tail[0].bias)

    def forward(self, video: Tensor, padded: bool = False) -> Tensor:
        """`padded`: the video already has window // 2 frames of context at each end (not restored)."""
        r = self.cfg.window // 2
        if not padded:
            video = torch.cat([video[:, :, :1]] * r + [video] + [video[:, :, -1:]] * r, 2)  # (B, C, T + 2r, h, w)
        B, C, _, h, w = video.shape
        T = video.shape[2] - 2 * r
        windows = video.unfold(2, self.cfg.window, 1)            # (B, C, T, h, w, window)
        windows = windows.permute(0, 2, 1, 5, 3, 4).reshape(B * T, C * self.cfg.window, h, w)
        center = video[:, :, r:r + T].transpose(1, 2).reshape(B * T, C, h, w)  # (B*T, C, h, w)
        if self.cfg.scale > 1:
            center = F.interpolate(center, scale_factor=self.cfg.scale, mode="bilinear", align_corners=False)
        features = self.head(windows)
        out = center + self.tail(features + self._body(features))  # (B*T, C, h*s, w*s)
        return out.unflatten(0, (B, T)).transpose(1, 2)          # (B, C, T, h*s, w*s)

    def _body(self, x: Tensor) -> Tensor:
        """The body on a frame padded (edge pixels repeated) to a multiple of the U-Net's 2**levels, cropped back."""
        factor = 2**self.cfg.levels
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % factor, -w % factor
        if not pad_h and not pad_w:
            return self.body(x)
        return self.body(F.pad(x, (0, pad_w, 0, pad_h), mode="replicate"))[..., :h, :w]


class Restorer(OnePartFamily):
    """Video restoration: clean clips are degraded on the fly (the config's degradations) and
    `net` learns to undo it, on random patches of a few frames."""

    Config = RestoreConfig
    Net = RestoreNet

    name = "restore"
    render_modes = ("restore",)

    def _loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        """L1 of the restored patch against the clean one."""
        clean = self.patches(batch["video"])                     # (B, C, T', H', W')
        seed = int(torch.randint(2**31 - 1, ()).item())          # from the global RNG
        degraded = self.degrade(clean, seed)                     # (B, C, T, H / s, W / s)
        restored = modules["model"](degraded).float()
        loss = F.l1_loss(restored, clean.float())
        mse = F.mse_loss(restored.detach().clamp(-1, 1), clean.float())
        return loss, {"loss": loss.item(), "psnr": (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).item()}

    def patches(self, video: Tensor) -> Tensor:
        """Random training patches (B, C, crop_frames, crop, crop), one place per clip, from the global
        RNG: the standard restoration recipe (EDSR, BasicVSR) that makes a step cheap and the batch varied."""
        cfg = self.config
        B, C, T, H, W = video.shape
        t = min(cfg.crop_frames or T, T)
        h, w = min(cfg.crop or H, H), min(cfg.crop or W, W)
        if (t, h, w) == (T, H, W):
            return video
        starts = [torch.randint(n - c + 1, (B,)).tolist() for n, c in ((T, t), (H, h), (W, w))]
        return torch.stack([video[b, :, t0:t0 + t, y0:y0 + h, x0:x0 + w]
                            for b, (t0, y0, x0) in enumerate(zip(*starts, strict=True))])

    # --- inference ---------------------------------------------------------------------------

    def degrade(self, clean: Tensor, seed: int) -> Tensor:
        """clean (B, C, T, H, W) -> degraded (B, C, T, H / scale, W / scale) with this config's settings."""
        cfg = self.config
        return degrade(clean, cfg.degradations, seed, noise_sigma=cfg.noise_sigma, blur_sigma=cfg.blur_sigma,
                       crf=(cfg.crf_min, cfg.crf_max))

    @torch.no_grad()
    def restore(self, video: Tensor) -> Tensor:
        """degraded video (B, C, T, H, W) in [-1, 1] -> restored (B, C, T, H * scale, W * scale) in [-1, 1].

        Frames go through the network a few at a time (INFER_PIXELS a pass, with their window's
        context), so memory stays bounded at any resolution; the result is the same as one pass."""
        if video.dim() != 5 or video.shape[1] != self.config.channels:
            raise ValueError(f"restore takes (B, {self.config.channels}, T, H, W), got {tuple(video.shape)}")
        B, _, T, h, w = video.shape
        step = max(1, INFER_PIXELS // (B * h * w))
        if T <= step:
            return self.net(video).clamp(-1, 1)
        r = self.config.window // 2
        padded = torch.cat([video[:, :, :1]] * r + [video] + [video[:, :, -1:]] * r, 2)
        return torch.cat([self.net(padded[:, :, t:t + step + 2 * r], padded=True).clamp(-1, 1)
                          for t in range(0, T, step)], 2)

    # --- what the rest of vidgen asks (vidgen.models.contract.Family) ------------------------

    @property
    def render_scale(self) -> int:
        return self.config.scale

    @property
    def render_radius(self) -> int:
        return self.config.window // 2

    @property
    def input_multiple(self) -> int:
        return 1

    def transform(self, video: Tensor) -> Tensor:
        return self.restore(video)

    @torch.no_grad()
    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]:
        """PSNR/SSIM of the restored clip against the clean one, and the PSNR of the degraded input
        (nearest-upscaled when the model upscales), so the gain is visible."""
        from vidgen import metrics

        degraded = self.degrade(video, seed=EVAL_SEED + index)
        restored = self.restore(degraded)
        baseline = upscale_to(degraded, video)
        return {
            "psnr": metrics.psnr(restored, video).item(),
            "ssim": metrics.ssim(restored, video).item(),
            "psnr_input": metrics.psnr(baseline, video).item(),
            "psnr_gain": (metrics.psnr(restored, video) - metrics.psnr(baseline, video)).item(),
        }

    @torch.no_grad()
    def preview(self, video: Tensor | None, seed: int = 0, num_frames: int | None = None):
        """Columns: degraded, restored, clean."""
        from vidgen.data.tensors import tile, video_to_frames

        frames = lambda x: [video_to_frames(v) for v in x]  # noqa: E731 - (B, C, T, H, W) -> list of uint8
        degraded = self.degrade(video, seed=EVAL_SEED)
        restored = self.restore(degraded)
        views = [frames(upscale_to(degraded, video)), frames(restored), frames(video)]
        return tile([v for triple in zip(*views, strict=True) for v in triple], cols=3)

    def probe(self, x: Tensor) -> Tensor:
        return self.restore(x)


def upscale_to(x: Tensor, like: Tensor) -> Tensor:
    """(B, C, T, h, w) -> (B, C, T, H, W) of `like` by nearest upscaling (for side-by-side views)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    b, c, t, h, w = x.shape
    y = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), size=like.shape[-2:], mode="nearest")
    return y.reshape(b, t, c, *like.shape[-2:]).transpose(1, 2)
