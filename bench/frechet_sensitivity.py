"""What the GAN's Frechet ratio punishes: real clips altered one way each, scored as samples are.

    python bench/frechet_sensitivity.py          # about 30 s on 2 cores

`bench/quality.py` scores a conditional GAN by the Frechet distance of a judge's features (a
classifier trained on other real clips), samples vs real val clips, over real train vs real val
clips, each the mean over 6 draws of clips, for each of a panel of judges. This takes the same data,
draws and judges and scores the real clips themselves after one alteration each (blur, smaller
objects, one colour for every object, texture, noise, frames shuffled or frozen): a generator whose
samples share a defect can read no better than that defect's ratio. It tells which defect of the
samples to fix first. 2026-12-01, 2 cores, the judges' geometric mean (lowest-highest judge):
everything 0.8 times its size 48.0x (40-61), blur of sigma 1 px 31.6x (14-95), every object one
colour 15.9x (13-21), blur 0.5 px 4.5x (2.1-24), still frames 2.9x (1.5-5.0); colours halfway to
grey, textured backgrounds, pixel noise and shuffled frames about 1x. One judge alone (seed 0,
trained on the train clips) over one draw, as the figures were scored until then, read blur 1 px
22.6x and still frames 6.0x: a judge's seed moves a ratio as much as a defect does.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from quality import clips, synth  # bench/quality.py: its gan run's data
from vidgen import quality
from vidgen.models.restore import _gaussian_blur


def blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each clip (B, C, T, H, W) blurred as the restore family's blur degradation blurs it."""
    return torch.stack([_gaussian_blur(clip, sigma) for clip in video])


def shrunk(video: torch.Tensor, factor: float) -> torch.Tensor:
    """Every frame scaled by `factor` (nearest) and padded back with its edge pixels."""
    B, C, T, H, W = video.shape
    small = F.interpolate(video.transpose(1, 2).flatten(0, 1), scale_factor=factor, mode="nearest")
    ph, pw = H - small.shape[-2], W - small.shape[-1]
    padded = F.pad(small, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
    return padded.view(B, T, C, H, W).transpose(1, 2)


def alterations(x: torch.Tensor) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    obj = (x - x[:, :, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05  # differs from the corner: the object
    texture = F.interpolate(torch.randn(x.shape[0], 3, 1, 4, 4, generator=rng), size=x.shape[2:], mode="trilinear")
    return {
        "as is": x,
        "blur sigma 0.5 px": blur(x, 0.5),
        "blur sigma 1 px": blur(x, 1.0),
        "everything 0.8 times its size": shrunk(x, 0.8),
        "every object one colour (0.8 grey)": torch.where(obj, torch.full_like(x, 0.8), x),
        "object colours halfway to grey": torch.where(obj, 0.5 * x + 0.5 * x.mean(1, keepdim=True), x),
        "background texture, amplitude 0.15": torch.where(obj, x, x + 0.15 * texture),
        "pixel noise 0.03": x + 0.03 * torch.randn(x.shape, generator=rng),
        "frames shuffled in time": x[:, :, torch.randperm(x.shape[2], generator=rng)],
        "still (the first frame throughout)": x[:, :, :1].expand_as(x),
    }


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="vidgen-frechet-") as work:
        data = synth(work, "shapes", 768, 8, 32, seed=0, val=0.5)
        (x, _), (xv, _) = clips(data, "train"), clips(data, "val")
    judges, draws = quality.scoring_clips("shapes", len(x), len(xv), 8, 32)
    panel = quality.JudgePanel(*judges, classes=3)
    reals, held_outs = [x, *(r for (r, _), _ in draws)], [xv, *(h for _, (h, _) in draws)]
    altered = [alterations(r) for r in reals]
    print(f"Frechet ratio over real vs held-out, the means over {len(reals)} draws of clips: "
          f"the geometric mean of {quality.JUDGES} judges (their range)")
    for name in altered[0]:
        ratios = panel.frechet_ratios([a[name].clamp(-1, 1) for a in altered], reals, held_outs)
        print(f"{quality.geometric_mean(ratios):8.2f}x  ({min(ratios):5.1f}-{max(ratios):5.1f})  {name}")


if __name__ == "__main__":
    main()
