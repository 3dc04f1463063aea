"""A video VAE: 3D-conv encoder to a Gaussian latent video, 3D-conv decoder back to pixels.

The latent is itself a small video, (B, L, T / 2**temporal_down, H / 2**spatial_down, W / ...),
so the model is fully convolutional: `sample` from the N(0, I) prior rolls out any number of frames
(ceil(T / 2**temporal_down) latent steps, decoded and cropped to T).

Loss per pixel: mse(recon, video) + kl_weight * KL(q(z|x) || N(0, I)) / (C*T*H*W). This is the
negative ELBO of a Gaussian decoder with variance kl_weight / 2, scaled by kl_weight: a smaller
kl_weight means sharper reconstructions and a latent that matches the prior less well (worse samples).

    model = VAE(VAE.Config.preset("tiny"))
    recon = model.reconstruct(video)                 # (B, C, T, H, W) -> same shape
    video = model.sample(2, num_frames=16, seed=0)   # (2, 3, 16, 32, 32)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Batch, OnePartConfig, OnePartFamily, require


@dataclass
class VAEConfig(OnePartConfig):
    frame_size: int = 64        # H = W that `sample` generates; training frames may be any multiple of 2**spatial_down
    channels: int = 3
    num_frames: int = 16        # clip length that `sample` rolls out by default
    width: int = 32             # channels of the first stage; doubles per downsampling stage
    max_width: int = 256
    spatial_down: int = 2       # number of 2x spatial downsamplings
    temporal_down: int = 1      # number of 2x temporal downsamplings (<= spatial_down)
    latent_channels: int = 8
    blocks_per_stage: int = 1   # residual blocks per stage
    kl_weight: float = 0.01
    norm_channels: int = 1      # channels per GroupNorm group (at most 32 groups). The CPU presets use 4; the
                                # default, one channel a group, is what every VAE saved before this field had,
                                # so those models load unchanged

    def __post_init__(self):
        require(0 <= self.temporal_down <= self.spatial_down,
                f"VAEConfig.temporal_down must be in [0, spatial_down={self.spatial_down}], got {self.temporal_down}")
        require(self.frame_size % 2**self.spatial_down == 0,
                f"VAEConfig.frame_size={self.frame_size} must be a multiple of 2**spatial_down={2**self.spatial_down}")
        require(self.kl_weight >= 0, f"VAEConfig.kl_weight must be >= 0, got {self.kl_weight}")
        require(self.norm_channels >= 1, f"VAEConfig.norm_channels must be >= 1, got {self.norm_channels}")


PRESETS = {
    # CPU: groups of 4 channels in every norm and lr 2e-3 (AdamW's 2e-4 before). On bench/quality.py's
    # vae data in-process, 600 steps of batch 16: reconstruction PSNR 19.4 dB -> 23.6 dB (each clip's mean
    # frame: 19.0 dB); one channel a group at lr 1e-3 reached 21.0, groups of 4 at 1e-3 23.4.
    "tiny": dict(frame_size=32, num_frames=8, width=8, max_width=32, latent_channels=4, norm_channels=4, lr=2e-3),
    # small: groups of 4 as well; measured on 32x32 8-frame shapes (not its 64x64 x 16), 500 steps of batch 4
    # at its lr 2e-4: 21.1 -> 22.1 dB (each clip's mean frame 18.7)
    "small": dict(frame_size=64, num_frames=16, width=32, max_width=128, latent_channels=8, blocks_per_stage=1,
                  norm_channels=4),
    "base": dict(frame_size=128, num_frames=16, width=64, max_width=256, spatial_down=3, temporal_down=2,
                 latent_channels=16, blocks_per_stage=2),
}


WINDOW_MARGIN = 8  # latent steps of context on each side of a window in `VAE.sample_chunks`


def _norm(channels: int, per_group: int = 1) -> nn.GroupNorm:
    """GroupNorm with `per_group` channels a group, at most 32 groups (a divisor of `channels`)."""
    return nn.GroupNorm(math.gcd(channels, min(32, max(1, channels // per_group))), channels)


class ResBlock3d(nn.Module):
    def __init__(self, c_in: int, c_out: int, per_group: int = 1):
        super().__init__()
        self.body = nn.Sequential(_norm(c_in, per_group), nn.SiLU(), nn.Conv3d(c_in, c_out, 3, padding=1),
                                  _norm(c_out, per_group), nn.SiLU(), nn.Conv3d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class VAENet(nn.Module):
    """video -> (recon, mu, logvar). The trainer's "model" part."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = [min(cfg.width * 2**i, cfg.max_width) for i in range(cfg.spatial_down + 1)]
        strides = [(2 if i < cfg.temporal_down else 1, 2, 2) for i in range(cfg.spatial_down)]

        g = cfg.norm_channels
        enc = [nn.Conv3d(cfg.channels, widths[0], 3, padding=1)]
        for i, stride in enumerate(strides):
            enc += [ResBlock3d(widths[i], widths[i], g) for _ in range(cfg.blocks_per_stage)]
            enc.append(nn.Conv3d(widths[i], widths[i + 1], 3, stride=stride, padding=1))  # T, H, W -> ceil(/ stride)
        enc += [ResBlock3d(widths[-1], widths[-1], g), _norm(widths[-1], g), nn.SiLU(),
                nn.Conv3d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec = [nn.Conv3d(cfg.latent_channels, widths[-1], 3, padding=1), ResBlock3d(widths[-1], widths[-1], g)]
        for i, stride in reversed(list(enumerate(strides))):
            dec += [nn.Upsample(scale_factor=stride, mode="nearest"),
                    nn.Conv3d(widths[i + 1], widths[i], 3, padding=1)]
            dec += [ResBlock3d(widths[i], widths[i], g) for _ in range(cfg.blocks_per_stage)]
        dec += [_norm(widths[0], g), nn.SiLU(), nn.Conv3d(widths[0], cfg.channels, 3, padding=1), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)

    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video (B, C, T, H, W) -> mu, logvar, each (B, L, T', H / 2**s, W / 2**s)."""
        factor = 2**self.cfg.spatial_down
        if video.shape[-1] % factor or video.shape[-2] % factor:
            raise ValueError(f"VAE frames must be multiples of {factor} in H and W, got {tuple(video.shape[-2:])}")
        mu, logvar = self.encoder(video).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, num_frames: int) -> Tensor:
        """latent (B, L, T', h, w) -> video (B, C, num_frames, h * 2**s, w * 2**s), num_frames <= T' * 2**t."""
        return self.decoder(z)[:, :, :num_frames]

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(video)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation, global RNG
        return self.decode(z, video.shape[2]), mu, logvar


class VAE(OnePartFamily):
    """A video VAE: `net` encodes a clip to a latent grid and decodes it back; the generate mode
    decodes latents drawn from the prior."""

    Config = VAEConfig
    Net = VAENet

    name = "vae"
    render_modes = ("generate",)

    def _loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction MSE plus kl_weight x the KL to the prior, both per pixel."""
        video = batch["video"]                                   # (B, C, T, H, W)
        recon, mu, logvar = (t.float() for t in modules["model"](video))  # losses in float32
        mse = F.mse_loss(recon, video.float())
        pixels = video[0].numel()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum() / (video.shape[0] * pixels)
        loss = mse + self.config.kl_weight * kl
        return loss, {"loss": loss.item(), "mse": mse.item(), "kl": kl.item()}

    # --- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> its reconstruction from the posterior mean, same shape, in [-1, 1]."""
        mu, _ = self.net.encode(video)
        return self.net.decode(mu, video.shape[2]).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, num_frames: int | None = None, labels=None, seed: int | None = None) -> Tensor:
        """n videos (n, C, num_frames, frame_size, frame_size) from the prior. Same seed -> same samples."""
        if labels is not None:
            raise ValueError("the VAE is unconditional: labels must be None")
        cfg = self.config
        num_frames = cfg.num_frames if num_frames is None else num_frames
        if n < 1 or num_frames < 1:
            raise ValueError(f"sample needs n >= 1 and num_frames >= 1, got n={n}, num_frames={num_frames}")
        steps = -(-num_frames // 2**cfg.temporal_down)           # ceil
        side = cfg.frame_size // 2**cfg.spatial_down
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, cfg.latent_channels, steps, side, side, generator=generator)
        device = next(self.net.parameters()).device
        return self.net.decode(z.to(device), num_frames).clamp(-1, 1)

    @torch.no_grad()
    def sample_chunks(self, seeds: list[int], num_frames: int | None = None, labels=None,
                      chunk_frames: int = 64) -> Iterator[Tensor]:
        """len(seeds) videos, one per seed, as chunks (n, C, <= chunk_frames, H, W) in [-1, 1].

        Video i's latent is `sample(1, num_frames, seed=seeds[i])`'s. A video of at most chunk_frames
        frames equals that sample exactly; a longer one is decoded in windows of the latent with
        WINDOW_MARGIN latent steps of overlap on each side (dropped), so memory stays bounded for any
        length; the decoder's group norms then see windows, not the whole clip (no visible seams).
        """
        if labels is not None and any(label is not None for label in labels):
            raise ValueError("the VAE is unconditional: labels must be None")
        cfg = self.config
        num_frames = cfg.num_frames if num_frames is None else num_frames
        if not seeds or num_frames < 1 or chunk_frames < 1:
            raise ValueError(f"sample_chunks needs >= 1 seed, num_frames >= 1 and chunk_frames >= 1, got "
                             f"{len(seeds)}, {num_frames}, {chunk_frames}")
        stride = 2**cfg.temporal_down
        steps = -(-num_frames // stride)
        side = cfg.frame_size // 2**cfg.spatial_down
        z = torch.cat([torch.randn(1, cfg.latent_channels, steps, side, side,
                                   generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
        device = next(self.net.parameters()).device
        window = max(1, chunk_frames // stride)
        if steps <= window:
            yield self.net.decode(z.to(device), num_frames).clamp(-1, 1)
            return
        for a in range(0, steps, window):
            b = min(steps, a + window)
            lo, hi = max(0, a - WINDOW_MARGIN), min(steps, b + WINDOW_MARGIN)
            video = self.net.decoder(z[:, :, lo:hi].to(device))  # (n, C, (hi - lo) * stride, H, W)
            start = (a - lo) * stride
            count = min(b * stride, num_frames) - a * stride
            yield video[:, :, start:start + count].clamp(-1, 1)

    # --- what the rest of vidgen asks (vidgen.models.contract.Family) ------------------------

    @property
    def num_classes(self) -> int:
        return 0  # unconditional: a generate item may not ask for a label

    @torch.no_grad()
    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]:
        """PSNR/SSIM of reconstructions."""
        from vidgen import metrics

        recon = self.reconstruct(video)
        return {"psnr": metrics.psnr(recon, video).item(), "ssim": metrics.ssim(recon, video).item()}

    @torch.no_grad()
    def preview(self, video: Tensor | None, seed: int = 0, num_frames: int | None = None):
        """Rows: real, reconstruction, prior samples."""
        from vidgen.data.tensors import tile, video_to_frames

        frames = lambda x: [video_to_frames(v) for v in x]  # noqa: E731 - (B, C, T, H, W) -> list of uint8
        prior = self.sample(video.shape[0], num_frames=video.shape[2], seed=seed)
        return tile(frames(video) + frames(self.reconstruct(video)) + frames(prior), cols=video.shape[0])

    def probe(self, x: Tensor) -> Tensor:
        return self.sample(2, num_frames=4, seed=0)
