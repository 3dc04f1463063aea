"""Feed-forward video style transfer (Johnson et al. 2016) with a temporal-consistency loss.

The stylizer is Johnson's image transformation net, applied to every frame: a 9x9 conv, two
stride-2 convs, residual blocks, two upsampling convs and a 9x9 conv, with instance norm.
Frame H and W must be multiples of 4.

Losses, from a fixed feature extractor phi (below), with x the content frames and y = net(x):

    content   ||phi_2(y) - phi_2(x)||^2 / ||phi_2(x)||^2                 (second scale)
    style     sum_l ||G(phi_l(y)) - G(phi_l(s))||^2 / ||G(phi_l(s))||^2  (Gram matrices; s = style image)
    temporal  mean(m_t * (y_t - y_{t-1})^2), m_t = exp(-50 |x_t - x_{t-1}|) (per pixel, channel mean)

Each term is relative (divided by the target's energy), so the weights in the config are
comparable across feature extractors and image sizes.

The feature extractor. No pretrained VGG can be downloaded here, so phi is a fixed multi-scale
conv net with random weights (He-normal, seeded by `feature_seed`, never trained, not saved: it is
rebuilt from the seed). Gram matrices of random conv features are known to capture texture
(Ustyuzhaninov et al. 2017, "What does it take to generate natural textures?"), so colours,
local textures and stroke patterns of the style image transfer. What random features do NOT give
is VGG's semantic content representation: the content term keeps edges and local structure, not
object identity, and structure of the style larger than the extractor's receptive field (18 px
with three scales, 38 px with four) does not transfer. Expect "texture and palette transfer", not
VGG-quality artistic rendering.

The temporal term is flow-free: it treats the input's frame difference as an occlusion/motion mask
(identity flow) and penalises output changes where the input is static. That removes the flicker of
per-frame stylisation in static regions; consistency of moving regions would need optical flow.

The style image is a (C, style_size, style_size) buffer, saved with the model. A new one is set
with `set_style_image(image)`; the default is a built-in stripe pattern so an untouched model trains.

    model = Stylizer(Stylizer.Config.preset("tiny"))
    model.set_style_image(image)                    # (3, H, W) in [-1, 1]
    stylized = model.stylize(video)                 # (B, C, T, H, W) -> same shape
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Batch, OnePartConfig, OnePartFamily, require

INFER_PIXELS = 1 << 20  # pixels (frames x height x width) a forward pass of stylize(): bounded memory
STATIC_SHARPNESS = 50.0  # temporal mask exp(-50 |dx|): |dx| = 0.02 (2.5/255 of range) -> 0.37


@dataclass
class StyleConfig(OnePartConfig):
    channels: int = 3
    width: int = 32                  # Johnson: 32, then 64 and 128 after the two downsamplings
    num_res_blocks: int = 5
    style_size: int = 256            # the style image buffer is (channels, style_size, style_size)
    feature_widths: tuple[int, ...] = (64, 128, 256)  # random feature net channels, one scale each
    feature_seed: int = 0
    content_weight: float = 1.0
    style_weight: float = 5.0
    temporal_weight: float = 10.0
    lr: float = 1e-3

    def __post_init__(self):
        require(len(self.feature_widths) >= 2,
                f"StyleConfig.feature_widths needs >= 2 scales (content uses the second), got {self.feature_widths}")
        require(self.style_size >= 16, f"StyleConfig.style_size must be >= 16, got {self.style_size}")


PRESETS = {
    "tiny": dict(width=8, num_res_blocks=1, style_size=32, feature_widths=(16, 32, 32)),
    "small": dict(width=32, num_res_blocks=5, style_size=128, feature_widths=(64, 128, 256)),
    "base": dict(width=96, num_res_blocks=8, style_size=256, feature_widths=(64, 128, 256, 512)),
}


class RandomFeatures(nn.Module):
    """Fixed random multi-scale features: image (N, C, H, W) -> [(N, w_l, H / 2**l, W / 2**l), ...].

    Weights are non-persistent buffers (not parameters, not in the state dict), drawn from
    `torch.Generator().manual_seed(seed)`, so they are the same on every machine and never trained.
    """

    def __init__(self, channels: int, widths: tuple[int, ...], seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c_in = channels
        for i, c_out in enumerate(widths):
            weight = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2.0 / (c_in * 9))  # He-normal
            self.register_buffer(f"weight{i}", weight, persistent=False)
            c_in = c_out
        self.depth = len(widths)

    def forward(self, image: Tensor) -> list[Tensor]:
        features, x = [], image
        for i in range(self.depth):
            if i > 0:
                x = F.avg_pool2d(x, 2)
            x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), getattr(self, f"weight{i}")))
            features.append(x)
        return features


def gram(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, C), normalised by C * H * W."""
    N, C, H, W = features.shape
    f = features.flatten(2)
    return f @ f.transpose(1, 2) / (C * H * W)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c_in, c_out, kernel, stride=stride),
                         nn.InstanceNorm2d(c_out, affine=True), nn.ReLU())


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width, affine=True), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width, affine=True))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class StyleNet(nn.Module):
    """video (B, C, T, H, W) -> stylized video, same shape, frame by frame. The "model" part."""

    def __init__(self, cfg: StyleConfig):
        super().__init__()
        w = cfg.width
        self.net = nn.Sequential(
            _conv(cfg.channels, w, 9), _conv(w, 2 * w, 3, stride=2), _conv(2 * w, 4 * w, 3, stride=2),  # H / 4
            *[ResBlock(4 * w) for _ in range(cfg.num_res_blocks)],
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(4 * w, 2 * w, 3),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(2 * w, w, 3),                        # H
            nn.ReflectionPad2d(4), nn.Conv2d(w, cfg.channels, 9), nn.Tanh())

    def forward(self, video: Tensor) -> Tensor:
        B, C, T, H, W = video.shape
        if H % 4 or W % 4:
            raise ValueError(f"Stylizer frames must be multiples of 4 in H and W, got {H}x{W}")
        frames = self.net(video.transpose(1, 2).flatten(0, 1))   # (B*T, C, H, W)
        return frames.unflatten(0, (B, T)).transpose(1, 2)       # (B, C, T, H, W)


def default_style_image(channels: int, size: int) -> Tensor:
    """A built-in style: diagonal stripes in three colours, (channels, size, size) in [-1, 1]."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = ((x + y) * 2 * math.pi / 8).unsqueeze(0)             # 8 px period
    shift = torch.arange(channels).view(-1, 1, 1) * 2 * math.pi / 3
    return 0.8 * torch.sin(phase + shift).float()


class Stylizer(OnePartFamily):
    """The family: one part, `net`; plus the style image buffer and the fixed feature extractor."""

    Config = StyleConfig
    Net = StyleNet

    name = "style"
    render_modes = ("stylize",)
    needs_style_image = True    # the config's style_image, given to set_style_image before training

    def __init__(self, config: StyleConfig):
        super().__init__(config)
        self.features = RandomFeatures(config.channels, config.feature_widths, config.feature_seed)
        self.register_buffer("style_image", default_style_image(config.channels, config.style_size))

    def set_style_image(self, image: Tensor) -> None:
        """image (C, H, W) float in [-1, 1]: centre-cropped to a square and resized to style_size."""
        C = self.config.channels
        if image.dim() != 3 or image.shape[0] != C or not image.is_floating_point():
            raise ValueError(f"style image must be a float ({C}, H, W) tensor in [-1, 1], got "
                             f"{image.dtype} {tuple(image.shape)}")
        _, H, W = image.shape
        side = min(H, W)
        top, left = (H - side) // 2, (W - side) // 2
        square = image[:, top:top + side, left:left + side].unsqueeze(0)
        size = self.config.style_size
        resized = F.interpolate(square.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        self.style_image.copy_(resized[0].clamp(-1, 1))

    # --- training contract: OnePartFamily's, with this loss ------------------------------------

    def losses(self, content: Tensor, stylized: Tensor) -> dict[str, Tensor]:
        """The three loss terms (unweighted) of stylized vs. content, both (B, C, T, H, W)."""
        self.features.to(content.device)  # the extractor is not a trainable part: follow the data
        content, stylized = content.float(), stylized.float()    # losses in float32
        x = content.transpose(1, 2).flatten(0, 1)                # (B*T, C, H, W)
        y = stylized.transpose(1, 2).flatten(0, 1)
        with torch.no_grad():
            style_features = self.features(self.style_image.to(content.device).unsqueeze(0))
            content_features = self.features(x)
        out_features = self.features(y)
        content_loss = (out_features[1] - content_features[1]).pow(2).mean() / content_features[1].pow(2).mean()
        style_loss = sum(
            (gram(f) - gram(s)).pow(2).mean() / gram(s).pow(2).mean() for f, s in zip(out_features, style_features))
        if content.shape[2] > 1:
            static = torch.exp(-STATIC_SHARPNESS * (content[:, :, 1:] - content[:, :, :-1]).abs().mean(1, keepdim=True))
            temporal = (static * (stylized[:, :, 1:] - stylized[:, :, :-1]).pow(2)).mean()  # (B, 1|C, T-1, H, W)
        else:
            temporal = stylized.new_zeros(())
        return {"content": content_loss, "style": style_loss / len(out_features), "temporal": temporal}

    def _loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        video = batch["video"]                                   # (B, C, T, H, W)
        terms = self.losses(video, modules["model"](video))
        cfg = self.config
        loss = cfg.content_weight * terms["content"] + cfg.style_weight * terms["style"] \
            + cfg.temporal_weight * terms["temporal"]
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}

    # --- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def stylize(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) in [-1, 1] -> stylized (B, C, T, H, W) in [-1, 1]."""
        if video.dim() != 5 or video.shape[1] != self.config.channels:
            raise ValueError(f"stylize takes (B, {self.config.channels}, T, H, W), got {tuple(video.shape)}")
        B, _, T, h, w = video.shape
        step = max(1, INFER_PIXELS // (B * h * w))  # a few frames a pass: bounded memory at any resolution
        return torch.cat([self.net(video[:, :, t:t + step]).clamp(-1, 1) for t in range(0, T, step)], 2)

    # --- what the rest of vidgen asks (vidgen.models.contract.Family) ------------------------

    @property
    def render_scale(self) -> int:
        return 1

    @property
    def render_radius(self) -> int:
        return 0

    @property
    def input_multiple(self) -> int:
        return 4

    def transform(self, video: Tensor) -> Tensor:
        return self.stylize(video)

    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]:
        return {}  # no reference-based metric: stylized clips are for looking at

    @torch.no_grad()
    def preview(self, video: Tensor | None, seed: int = 0, num_frames: int | None = None):
        """Columns: content, stylized."""
        from vidgen.data.tensors import tile, video_to_frames

        frames = lambda x: [video_to_frames(v) for v in x]  # noqa: E731 - (B, C, T, H, W) -> list of uint8
        return tile([v for pair in zip(frames(video), frames(self.stylize(video)), strict=True) for v in pair], cols=2)

    def probe(self, x: Tensor) -> Tensor:
        return self.stylize(x)
