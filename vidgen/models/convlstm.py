"""A ConvLSTM encoder-forecaster for next-frame prediction (Shi et al. 2015).

Each step encodes one frame with stride-2 convs, advances a stack of ConvLSTM cells on the
encoded grid, and decodes the top hidden state (with skip connections from the encoder, so static
detail need not pass through the recurrent state) into the next frame. Given k context frames the
net predicts frame k+1, then feeds its own prediction back in: `predict` rolls out to any length.

Training: a clip (B, C, T, H, W) is split into `context_frames` context frames and T - k targets;
the net rolls out T - k frames from the context alone (no teacher forcing), and the loss is the
mean squared (or absolute) error of the rollout, so training sees its own errors as inference does.

    model = ConvLSTM(ConvLSTM.Config.preset("tiny"))
    future = model.predict(context, num_frames=12)  # (B, C, k, H, W) -> (B, C, 12, H, W)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Batch, OnePartConfig, OnePartFamily, require


@dataclass
class ConvLSTMConfig(OnePartConfig):
    channels: int = 3
    context_frames: int = 4     # k: frames given before predicting; training clips need T > k
    width: int = 32             # encoder channels at full resolution; doubles per downsampling
    hidden: int = 64            # ConvLSTM hidden channels
    num_layers: int = 2         # stacked ConvLSTM cells
    down: int = 2               # 2x downsamplings before the recurrent grid (H and W multiples of 2**down)
    kernel_size: int = 3        # ConvLSTM gate kernel
    loss: str = "mse"           # "mse" or "l1"
    lr: float = 1e-3

    def __post_init__(self):
        require(self.context_frames >= 1, f"ConvLSTMConfig.context_frames must be >= 1, got {self.context_frames}")
        require(self.loss in ("mse", "l1"), f"ConvLSTMConfig.loss must be 'mse' or 'l1', got {self.loss!r}")
        require(self.kernel_size % 2 == 1, f"ConvLSTMConfig.kernel_size must be odd, got {self.kernel_size}")
        require(self.num_layers >= 1, f"ConvLSTMConfig.num_layers must be >= 1, got {self.num_layers}")


PRESETS = {
    # CPU: one downsampling makes the recurrent grid match Life's 2-pixel cells at 64x64, so a 3x3 gate
    # conv sees exactly a cell's neighbours; 2 context frames. 1.00 next-frame cell accuracy in ~2 CPU minutes.
    "tiny": dict(width=16, hidden=64, num_layers=1, down=1, context_frames=2, lr=3e-3),
    "small": dict(width=32, hidden=96, num_layers=2),
    "base": dict(width=64, hidden=256, num_layers=3, down=3),
}


class ConvLSTMCell(nn.Module):
    """(x (B, Ci, h, w), (h, c) each (B, Ch, h, w)) -> (h, c): all four gates from one conv."""

    def __init__(self, c_in: int, hidden: int, kernel_size: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(c_in + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTMNet(nn.Module):
    """(context (B, C, k, H, W), num_frames) -> predicted frames (B, C, num_frames, H, W). The "model" part."""

    def __init__(self, cfg: ConvLSTMConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.width * 2**i for i in range(cfg.down + 1)]
        self.stem = nn.Sequential(nn.Conv2d(cfg.channels, widths[0], 3, padding=1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.LeakyReLU(0.2))
            for i in range(cfg.down))
        self.cells = nn.ModuleList(
            ConvLSTMCell(widths[-1] if i == 0 else cfg.hidden, cfg.hidden, cfg.kernel_size)
            for i in range(cfg.num_layers))
        ups, c_in = [], cfg.hidden
        for i in reversed(range(cfg.down)):  # upsample, then fuse with the encoder's skip at that scale
            ups.append(nn.Sequential(nn.Conv2d(c_in + widths[i + 1], widths[i], 3, padding=1), nn.LeakyReLU(0.2)))
            c_in = widths[i]
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(c_in + widths[0], cfg.channels, 3, padding=1)

    def step(self, frame: Tensor, state: list[tuple[Tensor, Tensor]] | None):
        """frame (B, C, H, W), state -> (next frame (B, C, H, W), state)."""
        skips = [self.stem(frame)]                               # (B, w, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))                        # (B, w * 2**i, H / 2**i, W / 2**i)
        x = skips[-1]
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.cfg.hidden, *x.shape[2:])
            state = [(zeros, zeros)] * len(self.cells)
        new_state = []
        for cell, s in zip(self.cells, state):
            h, c = cell(x, s)
            new_state.append((h, c))
            x = h                                                # (B, hidden, H / 2**down, W / 2**down)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(torch.cat([x, skip], 1))
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return torch.tanh(self.head(torch.cat([x, skips[0]], 1))), new_state

    def forward(self, context: Tensor, num_frames: int) -> Tensor:
        factor = 2**self.cfg.down
        if context.shape[-1] % factor or context.shape[-2] % factor:
            raise ValueError(f"ConvLSTM frames must be multiples of {factor} in H and W, "
                             f"got {tuple(context.shape[-2:])}")
        state = None
        for t in range(context.shape[2]):                        # read the context
            prediction, state = self.step(context[:, :, t], state)
        predictions = [prediction]
        for _ in range(num_frames - 1):                          # then roll out on own predictions
            prediction, state = self.step(prediction, state)
            predictions.append(prediction)
        return torch.stack(predictions, 2)                       # (B, C, num_frames, H, W)


class ConvLSTM(OnePartFamily):
    """Next-frame prediction: `net` reads a clip's first context_frames and rolls out the rest on
    its own predictions (the predict mode continues an input video)."""

    Config = ConvLSTMConfig
    Net = ConvLSTMNet

    name = "convlstm"
    render_modes = ("predict",)

    def _loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        """MSE (or L1: the config's loss) of the frames rolled out after the context against the clip's."""
        video = batch["video"]                                   # (B, C, T, H, W)
        k = self.config.context_frames
        if video.shape[2] <= k:
            raise ValueError(f"ConvLSTM training clips need more than context_frames={k} frames, got {video.shape[2]}")
        target = video[:, :, k:].float()                         # (B, C, T - k, H, W)
        prediction = modules["model"](video[:, :, :k], target.shape[2]).float()
        loss = F.mse_loss(prediction, target) if self.config.loss == "mse" else F.l1_loss(prediction, target)
        return loss, {"loss": loss.item(), "mse": F.mse_loss(prediction.detach(), target).item()}

    # --- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, context: Tensor, num_frames: int) -> Tensor:
        """context (B, C, k, H, W) in [-1, 1] -> the next num_frames frames (B, C, num_frames, H, W).

        Any k >= 1 works (the net was trained with k = context_frames); any num_frames >= 1.
        """
        if num_frames < 1 or context.shape[2] < 1:
            raise ValueError(f"predict needs >= 1 context frame and num_frames >= 1, got "
                             f"{context.shape[2]} and {num_frames}")
        return self.net(context, num_frames).clamp(-1, 1)

    @torch.no_grad()
    def predict_chunks(self, context: Tensor, num_frames: int, chunk_frames: int = 64) -> Iterator[Tensor]:
        """`predict(context, num_frames)` as chunks (B, C, <= chunk_frames, H, W): the same frames,
        with the recurrent state carried between chunks, so memory stays bounded for any length."""
        if num_frames < 1 or context.shape[2] < 1 or chunk_frames < 1:
            raise ValueError(f"predict_chunks needs >= 1 context frame, num_frames >= 1 and chunk_frames >= 1, "
                             f"got {context.shape[2]}, {num_frames} and {chunk_frames}")
        net = self.net
        factor = 2**self.config.down
        if context.shape[-1] % factor or context.shape[-2] % factor:
            raise ValueError(f"ConvLSTM frames must be multiples of {factor} in H and W, "
                             f"got {tuple(context.shape[-2:])}")
        state = None
        for t in range(context.shape[2]):
            prediction, state = net.step(context[:, :, t], state)
        chunk = [prediction]
        for _ in range(num_frames - 1):
            if len(chunk) == chunk_frames:
                yield torch.stack(chunk, 2).clamp(-1, 1)
                chunk = []
            prediction, state = net.step(prediction, state)
            chunk.append(prediction)
        yield torch.stack(chunk, 2).clamp(-1, 1)

    # --- what the rest of vidgen asks (vidgen.models.contract.Family) ------------------------

    @property
    def context_frames(self) -> int:
        return self.config.context_frames

    @property
    def input_multiple(self) -> int:
        return 2**self.config.down

    @torch.no_grad()
    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]:
        """PSNR/SSIM of the frames predicted after `context_frames`; on Game-of-Life data the rule
        accuracy of the first predicted frame given the last context frame."""
        from vidgen import metrics
        from vidgen.errors import InputError

        k = self.config.context_frames
        if video.shape[2] <= k:
            raise InputError(f"convlstm evaluation needs clips longer than context_frames={k}")
        pred = self.predict(video[:, :, :k], video.shape[2] - k)
        out = {"psnr": metrics.psnr(pred, video[:, :, k:]).item(), "ssim": metrics.ssim(pred, video[:, :, k:]).item()}
        if life_cell:
            last, first_pred = life_grid(video[:, :, k - 1 : k], life_cell), life_grid(pred[:, :, :1], life_cell)
            out["life_rule_accuracy"] = metrics.life_rule_accuracy(last, first_pred)
        return out

    @torch.no_grad()
    def preview(self, video: Tensor | None, seed: int = 0, num_frames: int | None = None):
        """Rows: truth, then the context followed by the prediction."""
        from vidgen.data.tensors import tile, video_to_frames

        frames = lambda x: [video_to_frames(v) for v in x]  # noqa: E731 - (B, C, T, H, W) -> list of uint8
        k = self.config.context_frames
        pred = torch.cat([video[:, :, :k], self.predict(video[:, :, :k], video.shape[2] - k)], 2)
        return tile(frames(video) + frames(pred), cols=video.shape[0])

    def probe(self, x: Tensor) -> Tensor:
        return self.predict(x[:, :, : self.config.context_frames], 2)


def life_grid(video: Tensor, cell: int):
    """(B, C, T, H, W) in [-1, 1] -> bool cell grids (B, T, H / cell, W / cell) from cell centres."""
    centre = cell // 2
    return (video[:, 0, :, centre::cell, centre::cell] > 0).cpu().numpy()
