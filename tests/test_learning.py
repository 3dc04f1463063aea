"""It learns: tiny in-process trainings of the `tiny` presets that fail when a change breaks learning.

Each trains the family through its own training contract (its TrainSteps, AdamW with its optimizer
settings, gradient clipping at 1.0 as the trainer's DeepSpeed config does, its after_step hook) on
generated data for a fixed number of steps with a fixed seed, then scores it on held-out clips
against the baseline the quality benchmark uses (bench/quality.py has the full-budget figures).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen import metrics, models, quality
from vidgen.data.synth import synth_clip
from vidgen.data.tensors import frames_to_video
from vidgen.models.contract import optimizer_step
from vidgen.models.convlstm import life_grid

pytestmark = pytest.mark.slow


def clips(kind: str, n: int, frames: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = [synth_clip(kind, seed, i, frames, size, 0.0) for i in range(n)]
    labels = [r.label for r in rows]
    return frames_to_video(np.stack([r.frames for r in rows])), (torch.tensor(labels) if None not in labels else None)


def train(model, videos: torch.Tensor, labels: torch.Tensor | None, steps: int, batch: int, seed: int = 0) -> None:
    """`steps` optimizer steps of every TrainStep, the way vidgen.train.loop runs them (no DeepSpeed)."""
    torch.manual_seed(seed)
    parts = model.parts()
    optimizers = {p: torch.optim.AdamW(m.parameters(), **model.optimizer_settings(p)) for p, m in parts.items()}
    for _ in range(steps):
        idx = torch.randint(len(videos), (batch,))
        batch_ = {"video": videos[idx]} | ({"label": labels[idx]} if labels is not None else {})
        optimizer_step(model, optimizers, batch_)
    model.eval()


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def life_clips(n: int, seed: int, cells: int = 16, cell: int = 2, frames: int = 3) -> torch.Tensor:
    """n Game-of-Life clips (n, 3, frames, cells * cell, cells * cell), each cell `cell` px, as the
    `life` dataset draws them (a random soup, then the rule)."""
    rng = np.random.default_rng(seed)
    clips_ = []
    for _ in range(n):
        grid = rng.random((cells, cells)) < rng.uniform(0.25, 0.45)
        grids = []
        for _ in range(frames):
            grids.append(grid)
            grid = metrics.life_step(grid)
        pixels = np.kron(np.stack(grids), np.ones((1, cell, cell), bool))       # (T, H, W)
        clips_.append(np.repeat(pixels[..., None], 3, -1).astype(np.uint8) * 255)
    return frames_to_video(np.stack(clips_))


def test_convlstm_learns_the_game_of_life():
    video, held_out = life_clips(256, seed=1), life_clips(64, seed=2)
    torch.manual_seed(0)
    model = models.build("convlstm", "tiny")                     # 2 context frames, then the next one
    train(model, video, None, steps=LIFE_STEPS, batch=16)
    truth = life_grid(held_out[:, :, 2:3], 2)
    accuracy = float((life_grid(model.predict(held_out[:, :, :2], 1), 2) == truth).mean())
    copy_last = float((life_grid(held_out[:, :, 1:2], 2) == truth).mean())
    assert accuracy >= 0.95 and accuracy > copy_last + 0.05, (accuracy, copy_last)


def test_restore_gains_over_its_degraded_input():
    video, _ = clips("shapes", 48, 6, 32, seed=1)
    held_out, _ = clips("shapes", 8, 6, 32, seed=2)
    torch.manual_seed(0)
    model = models.build("restore", "tiny", crop=16)
    train(model, video, None, steps=RESTORE_STEPS, batch=8)
    degraded = model.degrade(held_out, seed=5)
    gain = (metrics.psnr(model.restore(degraded), held_out) - metrics.psnr(degraded, held_out)).item()
    assert gain >= 1.0, gain


def test_vae_reconstructs_held_out_clips_better_than_their_mean_frame():
    """Each clip's mean frame (its background, the object smeared along its path) is the baseline.
    The preset before its norms had 4 channels a group and lr 2e-3 (one channel a group, lr 2e-4)
    ended 1.2 dB below it here; this one ends 2.0 dB above."""
    video, _ = clips("shapes", 128, 8, 16, seed=1)
    held_out, _ = clips("shapes", 16, 8, 16, seed=2)
    torch.manual_seed(0)
    model = models.build("vae", "tiny", num_frames=8, frame_size=16)
    train(model, video, None, steps=VAE_STEPS, batch=16)
    mean_frame = held_out.mean(2, keepdim=True).expand_as(held_out)
    gain = (metrics.psnr(model.reconstruct(held_out), held_out) - metrics.psnr(mean_frame, held_out)).item()
    assert gain >= 1.0, gain


def test_conditional_gan_samples_move_a_frozen_classifier_above_chance():
    """After 250 steps the samples' distribution has moved towards the real clips' (the Frechet
    distance of a frozen judge's features, against the untrained generator's), and the judge sees
    the asked shape above chance. The label conditioning itself takes ~1,000 steps to settle: at
    250 steps the accuracy swings between 0.42 and 0.67 with the seed (0.48 for this one), so the
    bar is a margin over chance, not a good score (bench/quality.py measures that)."""
    video, labels = clips("shapes", 192, 4, 32, seed=1)
    judge = quality.train_classifier(video, labels, classes=3)
    held_out = clips("shapes", 60, 4, 32, seed=2)
    assert quality.label_accuracy(judge, *held_out) > 0.9  # the judge itself
    real = judge.features(held_out[0]).detach()
    torch.manual_seed(0)
    model = models.build("gan", "tiny", num_classes=3, num_frames=4, label_names=["c", "s", "t"])
    asked = torch.tensor([i % 3 for i in range(60)])
    with torch.no_grad():
        untrained = quality.frechet_distance(judge.features(model.sample(60, labels=asked.tolist(), seed=3)), real)
    train(model, video, labels, steps=GAN_STEPS, batch=16)
    samples = model.sample(60, labels=asked.tolist(), seed=3)
    with torch.no_grad():
        trained = quality.frechet_distance(judge.features(samples), real)
    assert trained < untrained / 3, (trained, untrained)
    accuracy = quality.label_accuracy(judge, samples, asked)
    assert accuracy >= 0.4, accuracy  # chance is 1/3


LIFE_STEPS, RESTORE_STEPS, GAN_STEPS, VAE_STEPS = 150, 250, 250, 700
