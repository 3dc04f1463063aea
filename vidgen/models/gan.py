"""A MoCoGAN-style video GAN (Tulyakov et al. 2018): content and motion are separate codes.

Generator. Each video draws one content code z_c ~ N(0, I); a GRU cell, driven by fresh noise at
every frame, turns it into a sequence of motion codes z_m(t); a 2D conv frame generator maps
[z_c, z_m(t), embed(label)] to frame t. Frames are generated independently given their codes, so
any number of frames can be rolled out: the clip length is just the length of the noise sequence.

Discriminators. An image discriminator (2D convs) judges K random frames of each video; a video
discriminator (3D convs) judges the whole clip. With `num_classes > 0` both are projection
discriminators (Miyato & Koyama 2018) and the generator gets a label embedding. Loss: hinge
(default) or non-saturating. G normalises per sample (GroupNorm or PixelNorm), so samples are the
same whatever else is in the batch; D may see the batch's spread (`minibatch_std`). The config's
optional stabilisers (spectral norm, R1, DiffAugment, an AC-GAN head, mode seeking, VGAN's two
streams, a moving sprite, short training windows) are each described beside their field; `tiny` uses the set that
bench/quality.py found to learn fastest on a CPU.

The generator used for sampling is an exponential moving average of the trained one
(`generator_ema`), updated by `after_step("generator")` through the plain function `ema_update`.

    model = GAN(GAN.Config.preset("tiny"))
    video = model.sample(2, num_frames=16, seed=0)   # (2, 3, 16, 32, 32) in [-1, 1]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Batch, Presets, TrainStep, require


@dataclass
class GANConfig(Presets):
    frame_size: int = 64        # H = W of generated frames, a power of two >= 8
    channels: int = 3
    num_frames: int = 16        # clip length that `sample` rolls out by default
    content_dim: int = 64       # z_c, one per video
    motion_dim: int = 32        # z_m(t), the GRU's hidden state
    noise_dim: int = 16         # GRU input noise per frame
    num_classes: int = 0        # > 0: class-conditional
    class_dim: int = 32         # label embedding size in the generator
    g_width: int = 32           # channels of the generator's last stage; doubles towards 4x4
    g_max_width: int = 512
    g_norm: str = "group"       # generator normalisation: "group" (GroupNorm) or "pixel" (ProGAN's PixelNorm)
    rgb_modulation: bool = False  # each frame generator's outputs (colours, alpha) scaled and shifted per sample by its
                                # code (StyleGAN's modulated toRGB, reduced to a per-channel affine): a direct
                                # path from the noise to a clip's colours, against collapse onto one palette
    two_stream: bool = False    # VGAN's two streams (Vondrick et al. 2016): a static background per clip from
                                # the content code, and per frame a foreground with a mask over it
    sprite: bool = False        # layered sprite motion: the foreground is one RGBA sprite per clip (from the
                                # content and class codes), moved in each frame by a translation read from the
                                # motion code (a spatial transformer, Jaderberg et al. 2015) over the static
                                # background. Rigid objects keep their shape across frames, and the frame
                                # generator runs once per clip instead of once per frame
    premultiplied: bool = False # the sprite is moved as colour x alpha and alpha (premultiplied), so a shifted
                                # edge blends the object's colour with the background's; moved as colour and
                                # alpha apart, an edge pixel also takes the colour G painted where the sprite is
                                # transparent, which no loss sees elsewhere (sprite only)
    flat_sprite: bool = False   # the sprite takes one colour per clip, read from its codes (linear, then tanh),
                                # and the frame generator draws only its alpha: colour and shape apart, so the
                                # EMA averages a clip's colour map alone instead of one woven into the shape's
                                # layers (sprite only)
    flat_background: bool = False  # the background is one colour per clip, read from its codes (linear, then
                                # tanh), as the data's plain backgrounds are: no background generator (sprite only)
    d_width: int = 32           # channels of the discriminators' first stage; doubles per stage
    d_max_width: int = 512
    image_frames: int = 4       # K random frames per video shown to the image discriminator
    train_frames: int = 0       # > 0: train on random windows of this many frames of each clip (G rolls out
                                # as many): half the frames, half the cost of a step; samples keep any length
    loss: str = "hinge"         # "hinge" or "nonsaturating"
    minibatch_std: bool = False # D sees the batch's spread as a feature (Karras et al. 2018): collapse shows
    video_weight: float = 1.0   # weight of the video discriminator's loss terms beside the image one's
    mode_seeking: float = 0.0   # > 0: MSGAN's term (Mao et al. 2019): G is rewarded when samples from different
                                # noise differ, against collapse onto one look per class
    r1_gamma: float = 0.0       # > 0: R1 penalty gamma/2 |grad_x D(real)|^2 (Mescheder et al. 2018); a double
                                # backward, tested under ZeRO-0/2 only
    spectral_norm: bool = False # spectral norm on every D layer (Miyato et al. 2018)
    aux_weight: float = 0.0     # > 0: D also classifies real clips, G is pushed towards the asked class (AC-GAN)
    diffaugment: str = ""       # "translation,color,cutout" (color: brightness, saturation and contrast, each also
                                # by itself): random augmentations (one draw per clip) of real
                                # and fake clips alike before D (Zhao et al. 2020), so a small set does not overfit D
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema_decay: float = 0.999

    def __post_init__(self):
        require(self.frame_size >= 8 and self.frame_size & (self.frame_size - 1) == 0,
                f"GANConfig.frame_size must be a power of two >= 8, got {self.frame_size}")
        require(self.loss in ("hinge", "nonsaturating"),
                f"GANConfig.loss must be 'hinge' or 'nonsaturating', got {self.loss!r}")
        require(self.num_classes >= 0, f"GANConfig.num_classes must be >= 0, got {self.num_classes}")
        require(0.0 <= self.ema_decay < 1.0, f"GANConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.image_frames >= 1, f"GANConfig.image_frames must be >= 1, got {self.image_frames}")
        require(self.g_norm in ("group", "pixel"), f"GANConfig.g_norm must be 'group' or 'pixel', got {self.g_norm!r}")
        require(self.train_frames >= 0, f"GANConfig.train_frames must be >= 0, got {self.train_frames}")
        require(self.video_weight >= 0, f"GANConfig.video_weight must be >= 0, got {self.video_weight}")
        require(self.mode_seeking >= 0, f"GANConfig.mode_seeking must be >= 0, got {self.mode_seeking}")
        require(self.sprite or not self.flat_sprite, "GANConfig.flat_sprite needs sprite=True (it colours the sprite)")
        require(self.sprite or not self.flat_background,
                "GANConfig.flat_background needs sprite=True (the sprite draws the scene's shapes)")
        require(self.r1_gamma >= 0, f"GANConfig.r1_gamma must be >= 0, got {self.r1_gamma}")
        require(self.aux_weight >= 0, f"GANConfig.aux_weight must be >= 0, got {self.aux_weight}")
        unknown = [p for p in self.diffaugment.split(",") if p and p not in AUGMENTS]
        require(not unknown, f"GANConfig.diffaugment: unknown {unknown}; expected some of {sorted(AUGMENTS)}")


PRESETS = {
    # CPU: 32x32, G 0.21M and D 0.32M parameters. One sprite per clip moved over a static background,
    # PixelNorm and modulated colours in G; spectral norm and an auxiliary classifier in D; DiffAugment
    # translation, brightness and contrast; TTUR; 4-frame windows; EMA 0.999; MSGAN mode seeking 0.2.
    # bench/quality.py: label accuracy 0.99, Frechet ratio 12x (target 3x): its objects are paler than
    # the data's. What each setting moved, and the ~45 variants tried and left out (among them the
    # wider flat-coloured sprite, 6-12x but 0.915 of the demo's samples recognised), with their figures:
    # docs/gan-recipe.md.
    "tiny": dict(frame_size=32, num_frames=8, content_dim=32, motion_dim=16, noise_dim=8, class_dim=16,
                 g_width=16, g_max_width=64, d_width=16, d_max_width=64, image_frames=2, ema_decay=0.999,
                 g_norm="pixel", rgb_modulation=True, sprite=True, spectral_norm=True, aux_weight=1.0,
                 diffaugment="translation,brightness,contrast", train_frames=4, lr_d=4e-4, lr_g=2e-4, beta1=0.0,
                 beta2=0.99, mode_seeking=0.2),
    # CPU demo: 64x64, G 2.2M and D 5.1M parameters.
    "small": dict(frame_size=64, num_frames=16, g_width=32, g_max_width=256, d_width=32, d_max_width=256,
                  ema_decay=0.995),
    # One GPU: 128x128, G 13M and D 37M parameters.
    "base": dict(frame_size=128, num_frames=16, content_dim=128, motion_dim=64, noise_dim=32, class_dim=64,
                 g_width=64, g_max_width=512, d_width=64, d_max_width=512),
}


# --- DiffAugment (Zhao et al. 2020) on videos: one draw per clip, the same for all its frames ---------

def _translation(video: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each clip by up to ratio x its size (zero fill): (B, C, T, H, W) -> same."""
    B, C, T, H, W = video.shape
    dy, dx = (torch.randint(-int(n * ratio), int(n * ratio) + 1, (B,), device=video.device) for n in (H, W))
    padded = F.pad(video, (1, 1, 1, 1))                        # the 1-px zero border fills what moves in
    ys = (torch.arange(H, device=video.device)[None] - dy[:, None] + 1).clamp(0, H + 1)  # (B, H)
    xs = (torch.arange(W, device=video.device)[None] - dx[:, None] + 1).clamp(0, W + 1)  # (B, W)
    b = torch.arange(B, device=video.device)[:, None, None]
    frames = padded.permute(0, 3, 4, 1, 2)[b, ys[:, :, None], xs[:, None, :]]   # (B, H, W, C, T)
    return frames.permute(0, 3, 4, 1, 2)


def _uniform(video: Tensor) -> Tensor:
    """One draw in [0, 1) per clip, shaped to broadcast over (B, C, T, H, W)."""
    return torch.rand(video.shape[0], 1, 1, 1, 1, device=video.device, dtype=video.dtype)


def _brightness(video: Tensor) -> Tensor:
    return video + (_uniform(video) - 0.5)


def _saturation(video: Tensor) -> Tensor:
    mean = video.mean(1, keepdim=True)
    return (video - mean) * (_uniform(video) * 2) + mean


def _contrast(video: Tensor) -> Tensor:
    mean = video.mean((1, 2, 3, 4), keepdim=True)
    return (video - mean) * (_uniform(video) + 0.5) + mean


def _color(video: Tensor) -> Tensor:
    """Random brightness, saturation and contrast per clip (DiffAugment's "color")."""
    return _contrast(_saturation(_brightness(video)))


def _cutout(video: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero a random square of half the frame size in each clip (the same place in every frame)."""
    B, C, T, H, W = video.shape
    h, w = int(H * ratio), int(W * ratio)
    y0 = torch.randint(0, H - h + 1, (B, 1, 1), device=video.device)
    x0 = torch.randint(0, W - w + 1, (B, 1, 1), device=video.device)
    ys, xs = torch.arange(H, device=video.device)[None, :, None], torch.arange(W, device=video.device)[None, None, :]
    keep = ~((ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w))       # (B, H, W)
    return video * keep[:, None, None].to(video.dtype)


AUGMENTS = {"translation": _translation, "color": _color, "brightness": _brightness, "saturation": _saturation,
            "contrast": _contrast, "cutout": _cutout}


def diff_augment(video: Tensor, policy: str) -> Tensor:
    """Differentiable augmentations of (B, C, T, H, W), applied to real and fake alike, in order."""
    for name in filter(None, policy.split(",")):
        video = AUGMENTS[name](video)
    return video


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


def _widths(width: int, max_width: int, stages: int) -> list[int]:
    """Channels per stage, doubling from `width` and capped: [w, 2w, 4w, ...] (stages + 1 entries)."""
    return [min(width * 2**i, max_width) for i in range(stages + 1)]


class PixelNorm(nn.Module):
    """Each pixel's feature vector scaled to unit RMS (Karras et al. 2018): per sample, per position,
    so the per-channel means that carry a frame's colours survive (GroupNorm with one channel per
    group removes them)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


def _g_norm(kind: str, channels: int) -> nn.Module:
    return PixelNorm() if kind == "pixel" else nn.GroupNorm(_groups(channels), channels)


class FrameGenerator(nn.Module):
    """Codes (N, D) -> frames (N, out_channels, H, W) in [-1, 1]: a 4x4 stem, then 2x upsampling stages."""

    def __init__(self, cfg: GANConfig, code_dim: int, out_channels: int | None = None, width_divisor: int = 1):
        super().__init__()
        stages = int(math.log2(cfg.frame_size)) - 2
        widths = _widths(max(cfg.g_width // width_divisor, 4), max(cfg.g_max_width // width_divisor, 4), stages)[::-1]
        self.stem_width = widths[0]
        self.stem = nn.Linear(code_dim, widths[0] * 16)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1), _g_norm(cfg.g_norm, c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), _g_norm(cfg.g_norm, c_out), nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(widths[-1], out_channels or cfg.channels, 3, padding=1)
        self.rgb_modulation = None
        if cfg.rgb_modulation:  # starts as the identity: scale 1 + 0, shift 0
            self.rgb_modulation = nn.Linear(code_dim, 2 * self.to_rgb.out_channels)
            nn.init.zeros_(self.rgb_modulation.weight)
            nn.init.zeros_(self.rgb_modulation.bias)

    def forward(self, codes: Tensor) -> Tensor:
        x = self.stem(codes).view(-1, self.stem_width, 4, 4)  # (N, W0, 4, 4)
        x = F.relu(x)
        rgb = self.to_rgb(self.blocks(x))                       # (N, C, H, W)
        if self.rgb_modulation is not None:
            scale, shift = self.rgb_modulation(codes)[:, :, None, None].chunk(2, 1)
            rgb = rgb * (1 + scale) + shift
        return torch.tanh(rgb)


class Generator(nn.Module):
    """(content, motion noise, labels) -> video. The trainer's "generator" part."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.h0 = nn.Linear(cfg.content_dim, cfg.motion_dim)  # the GRU's start state, from content
        self.gru = nn.GRUCell(cfg.noise_dim, cfg.motion_dim)
        self.embed = nn.Embedding(cfg.num_classes, cfg.class_dim) if cfg.num_classes else None
        code_dim = cfg.content_dim + cfg.motion_dim + (cfg.class_dim if cfg.num_classes else 0)
        self.channels = cfg.channels
        self.frame_size = cfg.frame_size
        static_dim = cfg.content_dim + (cfg.class_dim if cfg.num_classes else 0)
        self.sprite = cfg.sprite
        self.premultiplied = cfg.premultiplied
        self.colour = None  # flat_sprite: the sprite's one colour a clip, from its codes
        if cfg.sprite:  # the RGBA sprite comes from the clip's codes; each frame's code gives its shift
            self.frames = FrameGenerator(cfg, static_dim, 1 if cfg.flat_sprite else cfg.channels + 1)
            if cfg.flat_sprite:
                self.colour = nn.Linear(static_dim, cfg.channels)
            self.shift = nn.Linear(code_dim, 2)
            nn.init.zeros_(self.shift.weight)
            nn.init.zeros_(self.shift.bias)
        else:
            self.frames = FrameGenerator(cfg, code_dim, cfg.channels + 1 if cfg.two_stream else cfg.channels)
        self.background = (FrameGenerator(cfg, static_dim, width_divisor=2)
                           if (cfg.two_stream or cfg.sprite) and not cfg.flat_background else None)
        self.background_colour = nn.Linear(static_dim, cfg.channels) if cfg.flat_background else None

    def render(self, codes: Tensor, static: Tensor | None) -> Tensor:
        """Per-frame codes (n, t, D) -> frames (n, C, t, H, W).

        `static` is what `static` made of the clip. With two streams, each frame's foreground is
        composited over the clip's background: frame = m * foreground + (1 - m) * background. With a
        sprite, the foreground is the clip's sprite shifted by the frame's code (premultiplied: the
        shifted colour x alpha, plus (1 - alpha) * background).
        """
        n, t = codes.shape[:2]
        C = self.channels
        if static is None:
            return self.frames(codes.flatten(0, 1)).unflatten(0, (n, t)).transpose(1, 2)
        background = static[:, :C].unsqueeze(1)                        # (n, 1, C, H, W)
        premultiplied = self.sprite and self.premultiplied             # the moved colour is already x alpha
        if self.sprite:
            sprite = static[:, C:]
            if premultiplied:
                sprite = torch.cat([sprite[:, :C] * sprite[:, C:], sprite[:, C:]], 1)
            out = self._shifted(sprite, torch.tanh(self.shift(codes)))  # (n, t, C + 1, H, W)
        else:
            out = self.frames(codes.flatten(0, 1)).unflatten(0, (n, t))  # (n, t, C + 1, H, W)
            out = torch.cat([out[:, :, :C], (out[:, :, C:] + 1) / 2], 2)  # mask: tanh -> [0, 1]
        mask = out[:, :, C:]
        frames = (out[:, :, :C] if premultiplied else mask * out[:, :, :C]) + (1 - mask) * background
        return frames.transpose(1, 2)

    @staticmethod
    def _shifted(sprite: Tensor, shift: Tensor) -> Tensor:
        """sprite (n, C + 1, H, W) (colour, then alpha in [0, 1]), shift (n, t, 2) in [-1, 1] (half
        the frame per unit, x then y) -> (n, t, C + 1, H, W); what moves in is transparent."""
        n, t = shift.shape[:2]
        theta = torch.zeros(n * t, 2, 3, dtype=sprite.dtype, device=sprite.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = -shift.flatten(0, 1).to(sprite.dtype)
        grid = F.affine_grid(theta, [n * t, *sprite.shape[1:]], align_corners=False)
        frames = sprite.repeat_interleave(t, 0)
        return F.grid_sample(frames, grid, padding_mode="zeros", align_corners=False).unflatten(0, (n, t))

    def static(self, content: Tensor, class_codes: Tensor | None) -> Tensor | None:
        """What stays fixed in a clip, from its content (and class) code: (n, C, H, W) the background
        (two streams), or (n, 2C + 1, H, W) the background, then the sprite's colour and alpha
        (sprite); None with one stream."""
        if self.background is None and self.background_colour is None:
            return None
        code = content if class_codes is None else torch.cat([content, class_codes], -1)
        if self.background_colour is not None:  # one plain colour a clip
            background = self._flat(self.background_colour, code)
        else:
            background = self.background(code)
        if not self.sprite:
            return background
        sprite = self.frames(code)
        if self.colour is not None:  # one colour a clip, over the drawn alpha
            sprite = torch.cat([self._flat(self.colour, code), sprite], 1)
        return torch.cat([background, sprite[:, :self.channels], (sprite[:, self.channels:] + 1) / 2], 1)

    def _flat(self, head: nn.Linear, code: Tensor) -> Tensor:
        """One colour a clip, read from its code (linear, then tanh), over the whole frame: (n, C, H, W)."""
        side = self.frame_size
        return torch.tanh(head(code))[:, :, None, None].expand(-1, -1, side, side)

    def forward(self, content: Tensor, motion_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """content (B, Dc), motion_noise (B, T, Dn), labels (B,) long -> video (B, C, T, H, W)."""
        B, T, _ = motion_noise.shape
        h = torch.tanh(self.h0(content))                        # (B, Dm)
        motion = []
        for t in range(T):
            h = self.gru(motion_noise[:, t], h)
            motion.append(h)
        codes = [content.unsqueeze(1).expand(B, T, -1), torch.stack(motion, 1)]  # (B, T, Dc), (B, T, Dm)
        class_codes = None
        if self.embed is not None:
            if labels is None:
                raise ValueError("this GAN is class-conditional: pass labels (B,)")
            class_codes = self.embed(labels)
            codes.append(class_codes.unsqueeze(1).expand(B, T, -1))
        return self.render(torch.cat(codes, -1), self.static(content, class_codes))  # (B, C, T, H, W)


def _projection(num_classes: int, width: int) -> nn.Embedding | None:
    """Class embeddings for the projection term; zero at first, so D starts unconditional."""
    if num_classes == 0:
        return None
    embed = nn.Embedding(num_classes, width)
    nn.init.zeros_(embed.weight)
    return embed


def _with_batch_std(x: Tensor, enabled: bool, group: int = 4) -> Tensor:
    """x (N, C, ...) -> (N, C + 1, ...): the std across groups of `group` consecutive samples, averaged
    over features, as one more channel (ProGAN's minibatch standard deviation), so a collapsed G shows.

    Groups are consecutive samples, so in D's cat([real, fake]) batch no group mixes the two halves.
    """
    if not enabled:
        return x
    n = x.shape[0]
    g = math.gcd(n, group)
    y = x.float().view(n // g, g, *x.shape[1:])                # (N / G, G, C, ...)
    std = (y.var(1, unbiased=False) + 1e-8).sqrt()             # (N / G, C, ...)
    std = std.flatten(1).mean(1).to(x.dtype)                   # (N / G,)
    std = std.repeat_interleave(g).view(n, 1, *([1] * (x.dim() - 2))).expand(n, 1, *x.shape[2:])
    return torch.cat([x, std], 1)


class _Critic(nn.Module):
    """What the image and the video discriminator share: strided convs down to 4x4 (`_down`), a
    minibatch std channel before the last conv, features pooled over positions, then a logit, the
    projection on the labels and the auxiliary classifier (when the config asks for one)."""

    _conv: type[nn.Module]

    def __init__(self, cfg: GANConfig):
        super().__init__()
        stages = int(math.log2(cfg.frame_size)) - 2
        widths = _widths(cfg.d_width, cfg.d_max_width, stages)
        layers, c_in = [], cfg.channels
        for i, c_out in enumerate(widths[:-1]):
            layers += [self._down(i, c_in, c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.std = cfg.minibatch_std
        layers += [self._conv(c_in + self.std, widths[-1], 3, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)  # one Sequential, so models saved before minibatch std still load
        # With spectral norm every layer is 1-Lipschitz and a mean over positions leaves features too
        # small for the unnormalised class heads (projection, AC) to learn in a few hundred steps;
        # SNGAN and BigGAN sum over positions instead.
        self.sum_pool = cfg.spectral_norm
        self.logit = nn.Linear(widths[-1], 1)
        self.embed = _projection(cfg.num_classes, widths[-1])
        self.classify = nn.Linear(widths[-1], cfg.num_classes) if cfg.aux_weight and cfg.num_classes else None

    def _down(self, i: int, c_in: int, c_out: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h = self.features[-2:](_with_batch_std(self.features[:-2](x), self.std))
        positions = tuple(range(2, h.dim()))
        h = h.sum(positions) if self.sum_pool else h.mean(positions)  # (N, W)
        out = self.logit(h).squeeze(1)                          # (N,)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(1)         # projection term
        return out, (self.classify(h) if self.classify is not None else None)


class ImageDiscriminator(_Critic):
    """Frames (N, C, H, W) -> logits (N,); stride-2 convs down to 4x4, projection on labels."""

    _conv = nn.Conv2d

    def _down(self, i: int, c_in: int, c_out: int) -> nn.Module:
        return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)


class VideoDiscriminator(_Critic):
    """Video (B, C, T, H, W) -> logits (B,); 3D convs halve H, W (and T from the second stage)."""

    _conv = nn.Conv3d

    def _down(self, i: int, c_in: int, c_out: int) -> nn.Module:
        t_stride = 1 if i == 0 else 2  # T -> ceil(T / 2), so any clip length works
        return nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(t_stride, 2, 2), padding=1)


class Discriminator(nn.Module):
    """video (B, C, T, H, W), labels -> (image logits (B, K), video logits (B,), class logits or None).

    Class logits ((B * K + B, classes): the image head's, then the video head's) exist when
    `aux_weight > 0`. The K frames per video and the DiffAugment draws come from the global RNG,
    inside forward.
    """

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.num_frames = cfg.image_frames
        self.conditional = cfg.num_classes > 0
        self.augment = cfg.diffaugment
        self.image = ImageDiscriminator(cfg)
        self.video = VideoDiscriminator(cfg)
        if cfg.spectral_norm:  # not the class heads: a Lipschitz-1 head could never be confident
            heads = {id(self.image.classify), id(self.video.classify)}
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)) and id(m) not in heads:
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, video: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.conditional and labels is None:
            raise ValueError("this GAN is class-conditional: pass labels (B,)")
        if self.augment and self.training:
            video = diff_augment(video, self.augment)
        B, C, T, H, W = video.shape
        K = self.num_frames
        index = torch.randint(T, (B, K), device=video.device)
        frames = video.transpose(1, 2)[torch.arange(B, device=video.device)[:, None], index]  # (B, K, C, H, W)
        frame_labels = labels.repeat_interleave(K) if labels is not None else None
        image_logits, image_classes = self.image(frames.flatten(0, 1), frame_labels)
        video_logits, video_classes = self.video(video, labels)
        classes = torch.cat([image_classes, video_classes]) if image_classes is not None else None
        return image_logits.view(B, K), video_logits, classes


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied.

    A plain function of two modules with the same structure, so a trainer can call it inside a
    parameter-gathering context (DeepSpeed ZeRO-3's `GatheredParameters(model.parameters())`).
    """
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _d_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def _g_loss(kind: str, fake: Tensor) -> Tensor:
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


class GAN(nn.Module):
    """The family: generator, discriminator and the EMA generator used by `sample`."""

    Config = GANConfig

    name = "gan"
    render_modes = ("generate",)
    conditional = True          # trained on the dataset's labels: num_classes comes from them
    needs_style_image = False
    preview_needs_input = False
    after_step_gathers = frozenset({"generator"})  # the EMA update reads the generator's weights

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        self.label_names: list[str] | None = None
        self.preset: str | None = None
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # --- training contract -------------------------------------------------------------------

    def parts(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizer_settings(self, part: str) -> dict:
        cfg = self.config
        lr = {"generator": cfg.lr_g, "discriminator": cfg.lr_d}.get(part)
        if lr is None:
            raise ValueError(f"unknown GAN part {part!r}; expected 'generator' or 'discriminator'")
        return {"lr": lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": 0.0}

    def train_steps(self) -> list[TrainStep]:
        """D step (one D forward on cat([real, fake.detach()])), then G step through D."""
        return [TrainStep("discriminator", self._discriminator_loss), TrainStep("generator", self._generator_loss)]

    def after_step(self, part: str) -> None:
        if part == "generator":
            # Warm-up: early on the average follows the generator closely (as TF's EMA with num_updates).
            n = int(self.ema_updates)
            ema_update(self.generator_ema, self.generator, min(self.config.ema_decay, (1 + n) / (10 + n)))
            self.ema_updates += 1

    def _window(self, batch: Batch) -> Tensor:
        """The clips of a batch, or random `train_frames`-long windows of them (B, C, T', H, W)."""
        video = batch["video"]
        T, t = video.shape[2], self.config.train_frames
        if not t or t >= T:
            return video
        starts = torch.randint(T - t + 1, (video.shape[0],)).tolist()
        return torch.stack([v[:, s:s + t] for v, s in zip(video, starts, strict=True)])

    def _discriminator_loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        real = self._window(batch)                              # (B, C, T, H, W)
        labels = self._batch_labels(batch)
        B, T = real.shape[0], real.shape[2]
        with torch.no_grad():
            fake = modules["generator"](*self._noise(B, T, real), labels)
        both = torch.cat([labels, labels]) if labels is not None else None
        r1 = self.config.r1_gamma > 0
        if r1:
            real = real.detach().requires_grad_(True)
        image_logits, video_logits, classes = modules["discriminator"](torch.cat([real, fake.detach()]), both)
        image_logits, video_logits = image_logits.float(), video_logits.float()
        image_loss = _d_loss(self.config.loss, image_logits[:B], image_logits[B:])
        video_loss = _d_loss(self.config.loss, video_logits[:B], video_logits[B:])
        loss = image_loss + self.config.video_weight * video_loss
        scalars = {"d_loss": loss.item(), "d_image": image_loss.item(), "d_video": video_loss.item(),
                   "d_real": video_logits[:B].mean().item(), "d_fake": video_logits[B:].mean().item()}
        if r1:  # from the same forward: ZeRO-2/3 accept one D forward per D backward
            real_score = image_logits[:B].sum() + video_logits[:B].sum()
            (grad,) = torch.autograd.grad(real_score, real, create_graph=True)
            penalty = grad.float().pow(2).flatten(1).sum(1).mean()
            loss = loss + 0.5 * self.config.r1_gamma * penalty
            scalars["d_r1"] = penalty.item()
        if classes is not None:  # AC-GAN: D learns the classes from real clips only
            aux = self._aux_loss(classes.float(), labels, real_half=True)
            loss = loss + self.config.aux_weight * aux
            scalars["d_aux"] = aux.item()
        return loss, scalars

    def _generator_loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        real = batch["video"][:, :, : self.config.train_frames or None]  # only its shape is used
        labels = self._batch_labels(batch)
        content, motion = self._noise(real.shape[0], real.shape[2], real)
        fake = modules["generator"](content, motion, labels)
        image_logits, video_logits, classes = modules["discriminator"](fake, labels)
        image_loss = _g_loss(self.config.loss, image_logits.float())
        video_loss = _g_loss(self.config.loss, video_logits.float())
        loss = image_loss + self.config.video_weight * video_loss
        scalars = {"g_loss": loss.item(), "g_image": image_loss.item(), "g_video": video_loss.item()}
        if classes is not None:  # AC-GAN: G is rewarded when D recognises the asked class
            aux = self._aux_loss(classes.float(), labels, real_half=False)
            loss = loss + self.config.aux_weight * aux
            scalars["g_aux"] = aux.item()
        if self.config.mode_seeking and fake.shape[0] >= 2:  # pairs: the first half against the second
            h = fake.shape[0] // 2
            ratio = ((fake[:h] - fake[h:2 * h]).abs().mean((1, 2, 3, 4))
                     / (content[:h] - content[h:2 * h]).abs().mean(1)).mean()
            loss = loss + self.config.mode_seeking / (ratio.float() + 1e-5)
            scalars["g_diversity"] = ratio.item()
        return loss, scalars

    def _aux_loss(self, classes: Tensor, labels: Tensor, real_half: bool) -> Tensor:
        """Cross-entropy of D's class logits (image rows, then video rows) against the labels.

        real_half: the batch was cat([real, fake]) and only the real half is scored.
        """
        K = self.config.image_frames
        n = labels.shape[0] * (2 if real_half else 1)
        image, video = classes[: n * K].view(n, K, -1), classes[n * K:]
        if real_half:
            image, video = image[: n // 2], video[: n // 2]
        return (F.cross_entropy(image.flatten(0, 1), labels.repeat_interleave(K))
                + F.cross_entropy(video, labels))

    def _batch_labels(self, batch: Batch) -> Tensor | None:
        if self.config.num_classes == 0:
            return None
        if "label" not in batch:
            raise ValueError(f"this GAN has num_classes={self.config.num_classes}: the batch needs 'label'")
        return batch["label"].long()

    def _noise(self, n: int, num_frames: int, like: Tensor, generator: torch.Generator | None = None):
        """(content (n, Dc), motion noise (n, T, Dn)) on like's device and dtype, from `generator`
        (drawn on the CPU, so a seed gives the same noise everywhere) or the global RNG."""
        cfg = self.config
        if generator is None:
            content = torch.randn(n, cfg.content_dim, device=like.device, dtype=like.dtype)
            motion = torch.randn(n, num_frames, cfg.noise_dim, device=like.device, dtype=like.dtype)
            return content, motion
        content = torch.randn(n, cfg.content_dim, generator=generator)
        motion = torch.randn(n, num_frames, cfg.noise_dim, generator=generator)
        return content.to(like), motion.to(like)

    # --- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, num_frames: int | None = None, labels=None, seed: int | None = None) -> Tensor:
        """n videos (n, C, num_frames, H, W) in [-1, 1] from the EMA generator.

        `labels`: for a class-conditional model, n class indices or names (from `label_names`);
        None draws them at random. Same seed -> same samples (noise is drawn on the CPU).
        """
        num_frames = self.config.num_frames if num_frames is None else num_frames
        if n < 1 or num_frames < 1:
            raise ValueError(f"sample needs n >= 1 and num_frames >= 1, got n={n}, num_frames={num_frames}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        like = next(self.generator_ema.parameters())
        content, motion = self._noise(n, num_frames, like, generator)
        labels = self._sample_labels(n, labels, generator)
        video = self.generator_ema(content, motion, None if labels is None else labels.to(like.device))
        return video.float().clamp(-1, 1)

    @torch.no_grad()
    def sample_chunks(self, seeds: list[int], num_frames: int | None = None, labels=None,
                      chunk_frames: int = 64) -> Iterator[Tensor]:
        """len(seeds) videos, one per seed, as chunks (n, C, <= chunk_frames, H, W) in [-1, 1].

        Video i equals `sample(1, num_frames, labels[i], seed=seeds[i])` (its noise comes from its own
        seed), so a video does not depend on what it was batched with. Only the small per-frame codes
        (n, T, D) exist whole; frames are generated chunk by chunk, so memory stays bounded for any length.
        """
        num_frames = self.config.num_frames if num_frames is None else num_frames
        n = len(seeds)
        if n < 1 or num_frames < 1 or chunk_frames < 1:
            raise ValueError(f"sample_chunks needs >= 1 seed, num_frames >= 1 and chunk_frames >= 1, got "
                             f"{n}, {num_frames}, {chunk_frames}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} seeds")
        g = self.generator_ema
        like = next(g.parameters())
        content, motion, label_ids = [], [], []
        for i, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed))
            c, m = self._noise(1, num_frames, like, generator)
            content.append(c)
            motion.append(m)
            label = None if labels is None or labels[i] is None else [labels[i]]  # None: drawn from the seed
            label_ids.append(self._sample_labels(1, label, generator))
        content, noise = torch.cat(content), torch.cat(motion)  # (n, Dc), (n, T, Dn)
        # the generator's forward, with the frame generator applied chunk by chunk
        h = torch.tanh(g.h0(content))
        states = []
        for t in range(num_frames):
            h = g.gru(noise[:, t], h)
            states.append(h)
        codes = [content.unsqueeze(1).expand(n, num_frames, -1), torch.stack(states, 1)]
        class_codes = None
        if g.embed is not None:
            class_codes = g.embed(torch.cat(label_ids).to(like.device))
            codes.append(class_codes.unsqueeze(1).expand(n, num_frames, -1))
        codes = torch.cat(codes, -1)                              # (n, T, D)
        static = g.static(content, class_codes)                   # what stays fixed per clip, or None
        for start in range(0, num_frames, chunk_frames):
            frames = g.render(codes[:, start:start + chunk_frames], static)  # (n, C, t, H, W)
            yield frames.float().clamp(-1, 1)

    def _sample_labels(self, n: int, labels, generator) -> Tensor | None:
        classes = self.config.num_classes
        if classes == 0:
            if labels is not None:
                raise ValueError("this GAN is unconditional (num_classes=0): labels must be None")
            return None
        if labels is None:
            return torch.randint(classes, (n,), generator=generator)
        if isinstance(labels, Tensor):
            labels = labels.tolist()
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} samples")
        out = []
        for label in labels:
            if isinstance(label, str):
                if not self.label_names or label not in self.label_names:
                    raise ValueError(f"unknown label {label!r}; known labels: {self.label_names}")
                label = self.label_names.index(label)
            if not 0 <= int(label) < classes:
                raise ValueError(f"label {label} out of range [0, {classes})")
            out.append(int(label))
        return torch.tensor(out, dtype=torch.long)

    # --- what the rest of vidgen asks (vidgen.models.contract.Family) ------------------------

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]:
        return {}  # no reference-based metric: samples are for looking at

    @torch.no_grad()
    def preview(self, video: Tensor | None, seed: int = 0, num_frames: int | None = None):
        """Samples, one row per class (conditional) or 4 columns."""
        from vidgen.data.tensors import tile, video_to_frames

        classes = self.config.num_classes
        n = max(4, min(12, 4 * max(classes, 1)))
        labels = [i % classes for i in range(n)] if classes else None
        cols = (n // classes) if classes else 4
        samples = [video_to_frames(v) for v in self.sample(n, num_frames=num_frames, labels=labels, seed=seed)]
        order = sorted(range(n), key=lambda i: (labels[i] if labels else 0, i))
        return tile([samples[i] for i in order], cols=cols)

    def probe(self, x: Tensor) -> Tensor:
        return self.sample(2, num_frames=4, seed=0)
